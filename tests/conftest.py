from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
VECTORS = ROOT / "spec" / "vectors"


@pytest.fixture
def tmp_dkv(tmp_path):
    return tmp_path / "session.dkv"


@pytest.fixture(autouse=True)
def every_dkv_is_valid_gguf(tmp_path):
    """After each test, gguf-py's GGUFReader must open every .dkv the test left in its tmp_path."""
    yield
    from deltakv_format.container import DkvFile
    from deltakv_format.errors import DeltaKVError
    from gguf import GGUFReader

    for path in tmp_path.rglob("*.dkv"):
        try:
            DkvFile(path).close()
        except DeltaKVError:
            continue  # a file the test broke on purpose
        reader = GGUFReader(path)
        assert reader.fields["general.architecture"].contents() == "deltakv", path
