"""Every kind of task callable runs in the workers and is left as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import APPS, app_env

EXPECTED_X = {
    "main": 2,
    "closure": 9,
    "module": 2,
    "partial": 6,
    "object": 7,
    "method": -3,
    "slots": 24,
}


def run_kind(tmp_path: Path, kind: str, *overrides: str) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            str(APPS / "callables_app.py"),
            kind,
            f"hydra.run.dir={tmp_path / 'out'}",
            *overrides,
        ],
        cwd=tmp_path,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("kind", sorted(EXPECTED_X))
def test_callable_kinds_under_spawn(tmp_path: Path, kind: str) -> None:
    res = run_kind(tmp_path, kind, "hydra.callbacks.torchrun.nproc_per_node=2")
    assert res["status"] == "COMPLETED"
    value = res["value"]
    assert value["kind"] == kind and value["x"] == EXPECTED_X[kind]
    assert value["rank"] == 0 and value["pid"] != res["hydra_pid"]  # ran in worker rank 0
    assert res["unchanged"] is True  # the task object is as it was
    if res["direct"] is not None:  # and calling it again runs the real body
        assert res["direct"]["rank"] == -1 and res["direct"]["pid"] == res["hydra_pid"]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_other_start_methods(tmp_path: Path, start_method: str) -> None:
    res = run_kind(
        tmp_path,
        "closure",
        "hydra.callbacks.torchrun.nproc_per_node=2",
        f"hydra.callbacks.torchrun.start_method={start_method}",
    )
    assert res["status"] == "COMPLETED" and res["value"]["x"] == 9
    assert res["unchanged"] is True
