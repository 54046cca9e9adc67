"""The end-of-run report on an 80-column terminal: no wrapped title, a pasteable ``inspect`` command."""

from __future__ import annotations

import dataclasses
import io
import re
import shlex

from paligemma_batch import report
from test_report import SUMMARY


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_title_fits_80_columns_and_inspect_hint_is_quoted():
    odd = dataclasses.replace(SUMMARY, output="/tmp/my out/[x]/runs/20260101T000000Z-abc123")
    terminal = _Terminal()
    report.print_run_report(odd, terminal)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", terminal.getvalue()).splitlines()
    assert all(len(line) <= 80 for line in shown)
    assert shown[0] == "run 20260101T000000Z-abc123 finished"
    assert shown[1].strip() == "10 images · 1.6 s"  # the table's title, on one line
    hint = next(line for line in shown if line.startswith("inspect: "))
    assert shlex.split(hint.removeprefix("inspect: ")) == ["paligemma-batch", "inspect", "/tmp/my out/[x]"]
    assert f"inspect: paligemma-batch inspect {shlex.quote('/tmp/my out/[x]')}" in report.run_report_text(odd)
