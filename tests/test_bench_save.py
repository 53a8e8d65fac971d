"""``deltakv bench save``: a table of save vs llama_state_seq_save_file with save's steps; its context of
each size is filled once and loaded from llama.cpp's own file afterwards (the same tokens)."""

from click.testing import CliRunner

from deltakv_tools.cli import main
from deltakv_tools.measure import bench_save

from .llama_helpers import needs_llama


def test_bad_token_list_is_one_line():
    result = CliRunner().invoke(main, ["bench", "save", "--tokens", "2k"])
    assert result.exit_code != 0 and "expected token counts such as 2048,16384" in result.output


@needs_llama
def test_table_and_cached_context(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_save, "CACHE", tmp_path / "cache")
    first = bench_save.bench_save(tokens_list=(64,), repeat=1)
    assert "| 64 |" in first and "prompt evaluated" in first
    for step in ("get_data", "parse", "encode", "write+fsync"):
        assert step in first
    second = bench_save.bench_save(tokens_list=(64,), repeat=1)
    assert "loaded from" in second
