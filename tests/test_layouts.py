"""The llama.cpp layouts are one table (BodyLayout's rows): the parser, the writer, SPEC.md and the
docs follow it, so that a new state version is one row plus a fixture."""

from __future__ import annotations

import dataclasses
import re

import pytest

from deltakv_format.constants import BodyLayout, LayoutTraits
from deltakv_format.llama_state import (
    SEQUENCE_VERSION_LAYOUTS,
    SESSION_VERSION_LAYOUTS,
    file_version_for,
    parse_state,
    write_state,
)
from deltakv_format.state_model import Framing, KVCacheSection, OpaqueSection

from .conftest import FIXTURES, ROOT

SPEC = (ROOT / "SPEC.md").read_text()
NEWEST_FIRST = tuple(reversed(BodyLayout))
VERSION_TABLES = {Framing.SESSION_FILE: SESSION_VERSION_LAYOUTS, Framing.SEQUENCE_FILE: SEQUENCE_VERSION_LAYOUTS}


@pytest.mark.parametrize("framing", list(VERSION_TABLES))
def test_version_tables_are_the_rows_version_words(framing):
    table = VERSION_TABLES[framing]
    for layout in BodyLayout:
        assert layout in table[file_version_for(layout, framing)], (framing, layout)
    for version, layouts in table.items():
        assert all(file_version_for(layout, framing) == version for layout in layouts), (framing, version)
        # tried, and preferred among identical readings, newest first
        assert list(layouts) == [layout for layout in NEWEST_FIRST if layout in layouts], (framing, version)
    assert list(table) == sorted(table)


def test_in_memory_framings_have_no_version_word():
    for framing in (Framing.STATE, Framing.SEQ_STATE):
        with pytest.raises(ValueError, match="has no version word"):
            file_version_for(BodyLayout.V10, framing)


def _as_layout(layout: BodyLayout):
    """A whole-context state of ``layout`` made of real payloads (llama.cpp 2025-05, with outputs)."""
    src = parse_state((FIXTURES / "smollm2_v9_fa0.ggsn").read_bytes())
    sections = []
    for section in src.sections:
        if isinstance(section, KVCacheSection):
            sections.append(dataclasses.replace(section, has_n_stream=layout.traits.has_n_stream))
        elif isinstance(section, OpaqueSection) and section.role == "outputs":
            if layout.traits.has_outputs_section:
                sections.append(section)
        else:
            sections.append(section)
    return dataclasses.replace(src, layout=layout, file_version=None, sections=sections)


@pytest.mark.parametrize("layout", list(BodyLayout), ids=lambda layout: layout.value)
def test_every_layout_writes_and_reads_back_as_itself(layout):
    # A session file's version word and the traits single out one row: what the writer makes of
    # a row, the parser reads back as that row, with no fixture of its own needed.
    data = write_state(_as_layout(layout), framing=Framing.SESSION_FILE)
    back = parse_state(data)
    assert back.layout == layout and back.file_version == layout.traits.session_file_version
    assert write_state(back) == data
    stream = back.kv_sections[0].streams[0]
    assert (stream.rot is not None) == layout.traits.has_rotation_fields
    assert any(s.role == "outputs" for s in back.sections if isinstance(s, OpaqueSection)) == (
        layout.traits.has_outputs_section
    )


def test_every_layout_is_in_the_spec():
    (values_row,) = [line for line in SPEC.splitlines() if line.startswith("| `deltakv.source.layout` |")]
    assert re.findall(r"`(v[^`]*)`", values_row) == [layout.value for layout in BodyLayout]
    for layout in BodyLayout:
        (row,) = [line for line in SPEC.splitlines() if line.startswith(f"| `{layout.value}` |")]
        stated = re.search(r"ggsn (\d+) / ggsq (\d+)", row)
        if stated:  # rows that name their version words name the ones the table has
            traits = layout.traits
            assert stated.groups() == (str(traits.session_file_version), str(traits.sequence_file_version)), row


def test_every_trait_is_documented():
    doc = (ROOT / "docs" / "llama-state.md").read_text()
    versions_and_provenance = {"seen_in", "session_file_version", "sequence_file_version"}
    for trait in dataclasses.fields(LayoutTraits):
        if trait.name not in versions_and_provenance:
            assert f"`{trait.name}`" in doc, trait.name


def test_no_source_cites_files_outside_the_repository():
    # What a docstring or document needs lives in the repository (docs/, SPEC.md), not in a
    # sibling folder of one machine's checkout.
    outside = re.compile(r"\bshared/reference\b")
    this_file = ROOT / "tests" / "test_layouts.py"
    offenders = []
    for folder in ("deltakv_format", "runtime", "tools", "tests", "fuzz", "docs", "fixtures", "eval", "spec"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path != this_file and outside.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    for path in ROOT.glob("*.md"):
        if outside.search(path.read_text()):
            offenders.append(path.name)
    assert not offenders, offenders
