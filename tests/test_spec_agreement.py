"""SPEC.md, the constants table and the code agree."""

import re

from deltakv_format import constants
from deltakv_format.codecs import CODEC_CLASSES, get_codec
from deltakv_format.container import HEADER_CRC_VALUE_OFFSET, KEY_HEADER_CRC, KEY_RESERVE, KEY_TENSOR_CRC
from deltakv_format.session_schema import ANY_LENGTH, SESSION_KEYS, TENSOR_TEMPLATES, TrackId, parse_track_part

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
    for name in CODEC_CLASSES:
        assert f"| `{name}` |" in SPEC, name
        codec = get_codec(name)
        for part in codec.parts(constants.GGMLType.F16, 64):
            assert f"`{part.role}`" in SPEC, (name, part.role)
    assert f"Default `N` = {constants.DEFAULT_KEYFRAME_INTERVAL}" in SPEC


def test_every_registered_codec_states_its_error_bound():
    """SPEC.md 6.4 has one row per codec, and the constants the bounds use are the ones it states."""
    from deltakv_format.codecs import bounds

    section = SPEC[SPEC.index("### 6.4 Error bounds"):SPEC.index("### 6.5 dkv-ans")]
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
    keys = {row.key for row in SESSION_KEYS}  # the table the writer and the reader are driven by
    assert keys
    missing = [k for k in sorted(keys) if f"`{k}`" not in SPEC and not k.startswith("deltakv.runtime.")]
    assert not missing, missing


def _spec_section(title: str, next_title: str) -> str:
    return SPEC.split(title, 1)[1].split(next_title, 1)[0]


def _spec_key_rows() -> dict[str, tuple[str, str, bool]]:
    """SPEC.md section 3's key table: key -> (type, entries, optional), in the table's order."""
    rows = {}
    for line in _spec_section("## 3. Session metadata", "### 3.1").splitlines():
        if not line.startswith("| `"):
            continue
        key_cell, type_cell, entries_cell, meaning = (c.strip() for c in line.strip().strip("|").split("|", 3))
        for key in re.findall(r"`([^`]+)`", key_cell):
            rows[key] = (type_cell, entries_cell, meaning.startswith("optional"))
    return rows


def _schema_entries(row) -> str:
    if not row.is_array:
        return "1"
    return "any" if row.per == ANY_LENGTH else f"per {row.per}"


def test_spec_key_table_is_the_schema_table():
    """Every key of SESSION_KEYS is in SPEC.md's table with the same type, length and requiredness, in
    the same order, and the table has no other key."""
    spec = _spec_key_rows()
    schema = {row.key: (row.spec_type(), _schema_entries(row), not row.required) for row in SESSION_KEYS}
    assert list(spec) == list(schema)
    assert spec == schema
    counts = _spec_section("| `deltakv.header_reserve`", "### 3.1")
    for row in SESSION_KEYS:
        if row.defines is not None:  # SPEC names the key each array length is counted by
            assert f"`{row.key}`" in counts, row.key


def test_tensor_names_and_track_ids_are_the_spec_templates():
    tensors = _spec_section("### 3.1 Tensors", "### 3.2")
    # SPEC.md writes the fields as {s} (segment), {i} (section), {g} (stream), {track} and {part}
    letters = {"segment": "{s}", "section": "{i}", "stream": "{g}", "track": "{track}", "part": "{part}"}
    for template in TENSOR_TEMPLATES.values():
        assert f"| `{template.format(**letters)}` |" in tensors, template
    assert "`s{stream}.l{i}.k`" in SPEC and "`s{stream}.l{i}.v`" in SPEC
    assert TrackId(3, 5, "v").name == "s3.l5.v" and TrackId(0, 1, "k").part_tensor(2, "q4") == "s0.l1.k.2.q4"
    assert parse_track_part("s0.l1.k.2.q4") == (TrackId(0, 1, "k"), 2, "q4") and parse_track_part("s0.cells.0") is None


def test_version_2_and_readable_versions():
    assert constants.FORMAT_VERSION == 2 and constants.READABLE_VERSIONS == (1, 2)
    versions = _spec_section("### 2.2 Versioning", "## 3.")
    assert "`2` for this document" in versions and "MUST read versions `1` and `2`" in versions
    assert "- 2 (" in _spec_section("## 9. Version history", "\x00")


def test_dkv_ans_parameters_and_head_layout_are_the_code():
    """SPEC.md 6.5's parameter table is the codec's parameters and defaults; the head size formula is
    the parser's."""
    from deltakv_format.codecs import dkv_ans

    section = _spec_section("### 6.5 dkv-ans", "### 6.6 Transcoded quantized caches")
    table = dict(re.findall(r"^\| `([a-z0-9_]+)` \| (\d+) \|", section, re.M))
    codec = get_codec("dkv-ans")
    assert {k: int(v) for k, v in table.items()} == type(codec).parameters
    assert "`12 + 3C + 66 n_classes + 4 n_streams`" in section
    assert dkv_ans.head_bytes(64, 5, 3) == 12 + 3 * 64 + 66 * 5 + 4 * 3 and dkv_ans.CLASS_BYTES == 66


def test_transcode_parameter_and_types_are_the_code():
    """SPEC.md 6.6's parameter table names the code's parameter and exactly the types it re-quantizes,
    by the same rule (6.1) as the q8_0 / q4_0 codecs."""
    from deltakv_format.codecs import Q4_0Codec, Q8_0Codec
    from deltakv_format.codecs.transcode import FLOAT_TYPE, REQUANTIZERS, TRANSCODE_PARAM

    section = _spec_section("### 6.6 Transcoded quantized caches", "## 7. Reading")
    (name, values), = re.findall(r"^\| `([a-z0-9_]+)` \| ([0-9, ]+) \|", section, re.M)
    assert name == TRANSCODE_PARAM
    assert sorted(int(v) for v in values.split(",")) == sorted(int(t) for t in REQUANTIZERS)
    assert REQUANTIZERS == {constants.GGMLType.Q8_0: Q8_0Codec, constants.GGMLType.Q4_0: Q4_0Codec}
    assert FLOAT_TYPE == constants.GGMLType.F16 and "`T` = F16" in section
    assert "`quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`" in section
