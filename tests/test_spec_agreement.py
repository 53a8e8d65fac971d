"""SPEC.md, the constants table and the code agree."""

import re

from deltakv_format import constants
from deltakv_format.codecs import CODEC_CLASSES, get_codec
from deltakv_format.container import HEADER_CRC_VALUE_OFFSET, KEY_HEADER_CRC, KEY_RESERVE, KEY_TENSOR_CRC

from .conftest import ROOT

SPEC = (ROOT / "SPEC.md").read_text()


def test_version_alignment_and_architecture():
    assert re.search(r"^# Delta-KV format, version (\d+)$", SPEC, re.M).group(1) == str(constants.FORMAT_VERSION)
    assert f"MUST be {constants.ALIGNMENT}" in SPEC
    assert f'`"{constants.ARCHITECTURE}"`' in SPEC


def test_header_crc_position():
    assert f"sits at file offset {HEADER_CRC_VALUE_OFFSET}" in SPEC
    assert f"offsets {HEADER_CRC_VALUE_OFFSET}..{HEADER_CRC_VALUE_OFFSET + 3}" in SPEC
    for key in (KEY_HEADER_CRC, KEY_TENSOR_CRC, KEY_RESERVE):
        assert f"`{key}`" in SPEC


def test_every_codec_is_specified_with_its_parts():
    for name in constants.CODECS:
        assert f"| `{name}` |" in SPEC, name
        codec = get_codec(name)
        for part in codec.parts(constants.GGMLType.F16, 64):
            assert f"`{part.role}`" in SPEC, (name, part.role)
    assert f"Default `N` = {constants.DEFAULT_KEYFRAME_INTERVAL}" in SPEC


def test_every_registered_codec_states_its_error_bound():
    """SPEC.md 6.4 has one row per codec, and the constants the bounds use are the ones it states."""
    from deltakv_format.codecs import bounds

    section = SPEC[SPEC.index("### 6.4 Error bounds"):SPEC.index("## 7. Reading")]
    rows = re.findall(r"^\| `([a-z0-9_-]+)` \|", section, re.M)
    assert rows == list(CODEC_CLASSES)
    assert f"`α = {bounds.SEARCH_ALPHA}`" in section
    assert "1/2 + 2^-15" in section and bounds.GGML_Q8_0_STEP == 0.5 + 2.0 ** -15
    assert "1/2 + 2^-18" in section and bounds.GGML_Q4_0_STEP == 0.5 + 2.0 ** -18
    assert "1 + 2^-18" in section and bounds.GGML_Q4_0_CLAMPED_STEP == 1 + 2.0 ** -18
    assert "1/2 + 2^-19" in section and bounds.SEARCH_ROUNDING_STEP == 0.5 + 2.0 ** -19
    assert "at most `2^-20`" in section and bounds.STATE_ROUNDING == 2.0 ** -20


def test_rotation_sizes_and_journal():
    assert "n = 16, 64 or 256" in SPEC and constants.ROTATION_SIZES == (0, 16, 64, 256)
    assert f'`"{constants.JOURNAL_MAGIC.decode()}"`' in SPEC
    assert f"`<path>{constants.JOURNAL_SUFFIX}`" in SPEC


def test_session_keys_in_the_code_are_in_the_spec():
    code = (ROOT / "deltakv_format" / "session.py").read_text()
    keys = set(re.findall(r'"(deltakv\.[a-z_.]+)"', code))
    assert keys
    missing = [k for k in sorted(keys) if f"`{k}`" not in SPEC and not k.startswith("deltakv.runtime.")]
    assert not missing, missing
