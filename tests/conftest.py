import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
VECTORS = ROOT / "spec" / "vectors"


@pytest.fixture
def tmp_dkv(tmp_path):
    return tmp_path / "session.dkv"
