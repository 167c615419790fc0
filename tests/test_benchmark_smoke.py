"""Keeps the benchmark harness working: its --quick mode, once (not a timed test).

One repetition at N=2 of every system, the phase table, a 20-step steady-state run and the
plot; every run must leave no process behind.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO, app_env


@pytest.mark.timeout(900)  # the run's own limit (600 s) is the one that should apply
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
    report = out.read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in report.split("## Where the time goes")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| system")
    }
    assert sorted(rows) == sorted(
        [
            "torchrun --standalone N=2",
            "ours default N=2",
            "ours default N=2, torch at top",
            "ours spawn N=2",
            "ours multirun 2 jobs, per job, N=2",
            "ours multirun 2 jobs, per job, N=2, torch at top",
        ]
    ), report
    assert re.search(r"^- full: `[^`]+`: \d+ distributions; ", report, flags=re.M), report
    for name, cells in rows.items():
        assert cells[5] == "0", f"{name} left processes alive:\n{report}"  # left alive
        assert cells[6].endswith("x"), report  # ratio vs torchrun
    phases = report.split("## Where the time goes")[1].split("## Steady state")[0]
    assert (
        "| phase (s, median) | torchrun --standalone N=2 | ours default N=2 | ours default N=2, "
        "torch at top | ours spawn"
    ) in (phases)
    for phase in ("Hydra import + compose", "worker start + imports", "first collective"):
        assert f"| {phase}" in phases, phases
    steady = report.split("## Steady state (DDP step time)")[1]
    assert "| torchrun --standalone N=2 |" in steady and "| ours default N=2 |" in steady
    assert "Steady state, step time: ours default N=2 / torchrun = " in steady
    # The CPU figures come from every run of both systems: real numbers, not nan.
    launcher = re.search(
        r"it used (\d+\.\d+) % of one core under ours and (\d+\.\d+) % under torchrun", steady
    )
    own = re.search(r"Rank 0's own CPU per step: (\d+\.\d+) ms vs (\d+\.\d+) ms", steady)
    assert launcher is not None and own is not None, steady
    assert float(own.group(1)) > 0 and float(own.group(2)) > 0, steady
    gc_time = re.search(
        r"Rank 0's cyclic garbage collector over the timed steps: (\d+\.\d) ms under ours "
        r"and (\d+\.\d) ms under torchrun",
        steady,
    )
    assert gc_time is not None, steady  # measured in every run (nan would not match)
    tracked = re.findall(r"\| [\d.]+ ms, \d+ full; (\d+)k tracked, \d+k frozen \|", steady)
    assert len(tracked) == 2 and all(int(t) > 0 for t in tracked), steady  # both systems
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "launch_overhead.png").stat().st_size > 0
    assert "LEFT ALIVE" not in proc.stderr


def test_slope_is_least_squares() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from launch_overhead import slope
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert slope([(1, 5.0), (2, 7.0), (4, 11.0)]) == 2.0
    assert abs(slope([(1, 5.0), (1, 6.0), (2, 8.0), (4, 13.0)]) - 2.5) < 1e-9
