"""Whatever breaks while the callback prepares a job, the task never runs undistributed in
the Hydra process: the job fails (or the app stops) with the cause and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import app_env, run_app

#: step broken -> what the user must read (the cause, and the fix where there is one).
STEPS = {
    "restore": ["injected failure in restore", "stopping the app before the task could run"],
    "can_divert": ["AttributeError: injected failure in can_divert", "stopping the app"],
    "python": ["is older than 3.99", "run the app with Python >= 3.99"],
    "old_torch": ["torch 2.1.0 is older than 2.4.1", "pip install 'torch>=2.4.1'"],
    "no_torch": ["torch is not installed", "pip install 'torch>=2.4.1'"],
    "placement": ["launching the torchrun workers failed: RuntimeError: injected failure"],
    "pickle": ["cannot be pickled for the workers", "injected failure in pickle"],
    "launch": ["launching the torchrun workers failed: RuntimeError: injected failure"],
    "agent": ["ended without a result (exit code 1)", "injected failure in agent"],
    "divert": ["failed while arming the task's call", "injected failure in divert"],
}


@pytest.mark.parametrize("step", list(STEPS))
def test_task_never_runs_in_the_hydra_process(tmp_path: Path, step: str) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    env = app_env(HTR_INJECT=step, HTR_MARK_DIR=str(marks))
    run = run_app(
        tmp_path, "hydra.callbacks.torchrun.nproc_per_node=2", script="inject_app.py", env=env
    )
    assert run.proc.returncode != 0, run.output
    ran = [json.loads(p.read_text()) for p in marks.iterdir()]
    assert [r for r in ran if r["rank"] is None] == [], "the task ran undistributed"
    if step != "divert":  # only a failure after the workers ran leaves their marks
        assert ran == []
    else:
        assert sorted(r["rank"] for r in ran) == ["0", "1"]
    for needed in STEPS[step]:
        assert needed in run.output, run.output
    assert "Callback TorchrunCallback.on_job_start raised" not in run.output  # no warning path
    if run.records:  # the job ended as a failed job (not a stopped app): it says why
        [job] = run.records
        assert job["status"] == "FAILED" and STEPS[step][0] in job["error"]
