"""Keeps the benchmark harness working: one repetition at N=2 (not a timed test)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, app_env


def test_launch_overhead_harness_quick(tmp_path) -> None:
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "launch_overhead.py"),
            "--quick",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    for row in (
        "| torchrun --standalone N=2 |",
        "| ours spawn N=2 |",
        "| ours multirun 4 jobs, per job, N=2 |",
        "| ours forkserver N=2 |",
    ):
        assert row in table
    assert "x |" in table  # ratios are computed
