"""``deltakv eval``'s results folder from Python: merging measurements (``--add``), EVAL.md and the plot.

The measurements here are made up (no llama.cpp): what is tested is the bookkeeping, which the CLI
calls the same way (tests/test_runtime.py runs the real evaluation through the CLI).
"""

import json

import pytest

from deltakv_tools.measure.eval_results import EvaluationFolder, merge_measurements, write_report
from deltakv_tools.measure.evaluate import Measurement, load_results, markdown_table


def measured(row, chunk, kl, prefix=64):
    return Measurement(model="smollm2", text="prose", prefix=prefix, chunk=chunk, row=row, bits_per_value=4.5,
                       ratio=0.3, kl=kl, ppl_ref=10.0, ppl=10.0 * (1 + kl), top1=1 - kl, continuation=16)


def test_a_measurement_made_again_replaces_the_earlier_one_and_new_ones_come_last():
    earlier = [measured("raw", 0, 0.0), measured("q4_0", 0, 0.02), measured("q4_0", 1, 0.03)]
    new = [measured("q4_0", 1, 0.05), measured("q8_0", 0, 0.01), measured("q4_0", 1, 0.04, prefix=128)]
    assert merge_measurements(earlier, new) == earlier[:2] + new
    assert merge_measurements([], new) == new and merge_measurements(earlier, []) == earlier


def test_record_adds_to_the_folder_and_rewrites_the_report(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "eval"  # made by the folder, as `deltakv eval --out` does
    first = [measured("raw", 0, 0.0), measured("q4_0", 0, 0.02), measured("q4_0", 1, 0.03)]
    table = EvaluationFolder(out, keep_earlier=False).record(first, "day 1: deltakv eval")
    assert load_results(out / "results.json") == first
    assert table == markdown_table(first) and "| q4_0 | 4.50 |" in table
    assert (out / "EVAL.md").read_text() == f"Measured with\n\n    day 1: deltakv eval\n\n{table}\n"
    assert (out / "rate_distortion.png").stat().st_size > 1000

    second = [measured("q4_0", 1, 0.05), measured("q8_0", 0, 0.01)]
    table = EvaluationFolder(out).record(second, "day 2: deltakv eval --add")
    merged = first[:2] + second
    assert load_results(out / "results.json") == merged and table == markdown_table(merged)
    assert (out / "commands.txt").read_text() == "day 1: deltakv eval\nday 2: deltakv eval --add\n"
    assert (out / "EVAL.md").read_text().startswith(
        "Measured with\n\n    day 1: deltakv eval\n    day 2: deltakv eval --add\n\n")


def test_save_after_each_run_keeps_the_earlier_measurements_it_was_opened_with(tmp_path):
    earlier = [measured("raw", 0, 0.0), measured("q4_0", 0, 0.02)]
    EvaluationFolder(tmp_path, keep_earlier=False).save(earlier)
    folder = EvaluationFolder(tmp_path)
    so_far = [measured("q4_0", 0, 0.04)]
    assert folder.save(so_far) == [earlier[0]] + so_far  # run_eval's on_run, after the first run
    assert folder.save(so_far + [measured("q4_0", 1, 0.05)]) == [earlier[0]] + so_far + [measured("q4_0", 1, 0.05)]
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3
    # keep_earlier=False (--force) starts from nothing: the folder's measurements are replaced
    assert EvaluationFolder(tmp_path, keep_earlier=False).save(so_far) == so_far
    assert load_results(tmp_path / "results.json") == so_far


def test_write_report_rebuilds_eval_md_from_given_measurements(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [measured("raw", 0, 0.0), measured("llama.cpp cache q8_0", 0, 0.01), measured("dkv-q4 kf64", 0, 0.02),
            measured("llama.cpp cache q8_0", 1, 0.012), measured("dkv-q4 kf64", 1, 0.018)]
    table = write_report(tmp_path, rows, ["a", "b"])
    assert "paired by run (smollm2)" in table and "| dkv-q4 kf64 | +0.0080 |" in table
    assert (tmp_path / "commands.txt").read_text() == "a\nb\n"
    assert (tmp_path / "EVAL.md").read_text() == f"Measured with\n\n    a\n    b\n\n{table}\n"
