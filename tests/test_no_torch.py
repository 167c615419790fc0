"""Without torch installed, a job fails with the fix and its task never runs (fail closed).

Runs in the torch-less cells of scripts/compat.sh (every supported Python); where torch is
installed (the main suite) the same path is covered by test_fail_closed's injected import
failure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import app_env, run_app

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None,
    reason="torch is installed: this runs in scripts/compat.sh's torch-less cells",
)


def test_job_without_torch_fails_with_the_fix(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    env = app_env(HTR_INJECT="none", HTR_MARK_DIR=str(marks))
    run = run_app(tmp_path, script="inject_app.py", env=env)
    assert run.proc.returncode == 1, run.output
    assert "torch is not installed: pip install 'torch>=2.4.1'" in run.output
    assert [json.loads(p.read_text()) for p in marks.iterdir()] == []
    [job] = run.records
    assert job["status"] == "FAILED" and "torch is not installed" in job["error"]
