"""The folder an evaluation is kept in (``deltakv eval --out FOLDER``), for the CLI and for Python alike.

    results.json          every measurement (``evaluate.Measurement``), rewritten after each run
    commands.txt          the commands that measured them, one a line, oldest first
    EVAL.md               those commands, then the tables (``evaluate.markdown_table``)
    rate_distortion.png   KL against bits per value (``evaluate.plot``)

A measurement is one (model, text, prefix, chunk, row); measuring it again replaces it. So an
evaluation grows a few rows or prefixes at a time (``deltakv eval --add``), and from Python::

    from deltakv_tools.measure.eval_results import EvaluationFolder
    from deltakv_tools.measure.evaluate import run_eval

    folder = EvaluationFolder(Path("eval"))  # keeps what eval/ holds; keep_earlier=False starts afresh
    table = folder.record(run_eval(config, on_run=folder.save), "2026-12-01: run_eval, gemma3, prose")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from deltakv_format.operations import atomic_write

from .evaluate import Measurement, load_results, markdown_table, plot

RESULTS_FILE = "results.json"
REPORT_FILE = "EVAL.md"
COMMANDS_FILE = "commands.txt"
PLOT_FILE = "rate_distortion.png"
EVALUATION_FILES = (RESULTS_FILE, REPORT_FILE, COMMANDS_FILE, PLOT_FILE)


def _measurement_key(m: Measurement) -> tuple:
    return m.model, m.text, m.prefix, m.chunk, m.row


def merge_measurements(earlier: list[Measurement], new: list[Measurement]) -> list[Measurement]:
    """``earlier`` without what ``new`` measured again (same model, text, prefix, chunk and row), then ``new``."""
    remeasured = {_measurement_key(m) for m in new}
    return [m for m in earlier if _measurement_key(m) not in remeasured] + list(new)


def write_report(folder: Path, measurements: list[Measurement], commands: list[str]) -> str:
    """Write ``folder``'s commands.txt, EVAL.md and rate_distortion.png for ``measurements``, which
    ``commands`` measured (EVAL.md lists them above the tables); returns the tables."""
    folder = Path(folder)
    table = markdown_table(measurements)
    (folder / COMMANDS_FILE).write_text("\n".join(commands) + "\n")
    measured = "\n".join(f"    {c}" for c in commands)
    (folder / REPORT_FILE).write_text(f"Measured with\n\n{measured}\n\n{table}\n")
    plot(measurements, folder / PLOT_FILE)
    return table


class EvaluationFolder:
    """An evaluation's folder, opened to add measurements to.

    ``keep_earlier=True`` (``--add``) keeps the measurements and commands the folder holds, read once
    here; False (a first evaluation, or ``--force``) starts from none and replaces them. The folder is
    made here if missing, so that a folder that cannot be made fails before hours of measuring.
    """

    def __init__(self, path: Path, *, keep_earlier: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        results, commands = self.path / RESULTS_FILE, self.path / COMMANDS_FILE
        self.earlier = load_results(results) if keep_earlier and results.exists() else []
        self.earlier_commands = commands.read_text().splitlines() if keep_earlier and commands.exists() else []

    def save(self, new: list[Measurement]) -> list[Measurement]:
        """Write results.json: the earlier measurements merged with ``new``; returns them.

        Give it to ``run_eval`` as ``on_run``, so that an interrupted evaluation keeps every run it
        finished (atomically written: an interruption leaves the last whole file, not part of one)."""
        merged = merge_measurements(self.earlier, new)
        atomic_write(self.path / RESULTS_FILE, [json.dumps([dataclasses.asdict(m) for m in merged], indent=1).encode()])
        return merged

    def record(self, new: list[Measurement], command: str) -> str:
        """``save(new)``, then rewrite EVAL.md, commands.txt and the plot from every measurement, with
        ``command`` (how ``new`` was measured, e.g. ``"2026-12-01: deltakv eval --add ..."``) after the
        earlier commands; returns the tables."""
        return write_report(self.path, self.save(new), self.earlier_commands + [command])
