"""A failure anywhere becomes a FAILED job carrying the root cause; restarts recover."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

NPROC2 = "hydra.callbacks.torchrun.nproc_per_node=2"


def test_worker_raises_gives_failed_job_with_root_cause(app) -> None:
    start = time.monotonic()
    run = app(NPROC2, "fail_rank=1")
    elapsed = time.monotonic() - start
    assert run.proc.returncode == 1
    [job] = run.records
    assert job["status"] == "FAILED"
    err = job["error"]
    assert "rank 1" in err and "ValueError: probe failure on rank 1 attempt 0" in err
    assert "probe_app.py" in err and "raise ValueError" in err  # the worker's traceback
    assert job["error_attrs"]["rank"] == 1 and job["error_attrs"]["exc_type"] == "ValueError"
    assert job["value_type"] == "TorchrunJobError"
    assert "probe failure on rank 1" in run.proc.stderr  # what the user sees
    assert not (run.out / "rank1.a0.json").exists()
    assert elapsed < 60


def test_restart_recovers_and_returns_second_attempt(app) -> None:
    run = app(NPROC2, "fail_rank=1", "fail_attempts=1", "hydra.callbacks.torchrun.max_restarts=1")
    assert run.proc.returncode == 0, run.output
    [job] = run.records
    assert job["status"] == "COMPLETED" and job["value"]["attempt"] == 1
    files = run.rank_files()
    assert sorted(files) == ["rank0.a1.json", "rank1.a1.json"]
    assert all(f["env"]["TORCHELASTIC_MAX_RESTARTS"] == "1" for f in files.values())


def test_restarts_exhausted_fail(app) -> None:
    run = app(NPROC2, "fail_rank=0", "hydra.callbacks.torchrun.max_restarts=1")
    assert run.proc.returncode == 1
    assert "probe failure on rank 0 attempt 1" in run.records[0]["error"]


def test_sigkilled_worker_names_the_signal(app) -> None:
    run = app(NPROC2, "kill_rank=1")
    assert run.proc.returncode == 1
    err = run.records[0]["error"]
    assert "rank 1" in err and "SIGKILL" in err


def test_sigkilled_worker_recovered_by_restart(app) -> None:
    run = app(NPROC2, "kill_rank=0", "fail_attempts=1", "hydra.callbacks.torchrun.max_restarts=1")
    assert run.proc.returncode == 0, run.output
    assert run.records[0]["value"]["attempt"] == 1


def test_unpicklable_return_value_fails_clearly(app) -> None:
    run = app(NPROC2, "returns=unpicklable")
    assert run.proc.returncode == 1
    err = run.records[0]["error"]
    assert "rank 0's return value of type lock cannot be pickled" in err


def test_unpicklable_task_never_runs(app, tmp_path: Path) -> None:
    run = app(NPROC2, script="unpicklable_app.py")
    assert run.proc.returncode == 1
    [job] = run.records
    assert job["status"] == "FAILED"
    assert "cannot be pickled for the workers" in job["error"] and "lock" in job["error"]
    # Neither a worker nor the Hydra process ran the body.
    assert not list(tmp_path.rglob("ran_in_*"))


def test_port_in_use_fails_fast(app) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        run = app(NPROC2, f"hydra.callbacks.torchrun.master_port={port}")
        elapsed = time.monotonic() - start
    assert run.proc.returncode == 1
    err = run.records[0]["error"]
    assert f"master_port={port}" in err and "already in use" in err
    assert not list(run.out.glob("rank*.json"))
    assert elapsed < 30


BAD = [
    ("nproc_per_node", "abc", "expected a positive integer, 'auto', 'gpu' or 'cpu'"),
    ("nproc_per_node", "0", "expected a positive integer"),
    ("nnodes", "3:1", "1 <= MIN <= MAX"),
    ("nnodes", "0", "node count N >= 1"),
    ("max_restarts", "-1", "expected an integer >= 0"),
    ("start_method", "thread", "expected one of forkserver"),
    ("monitor_interval", "0", "seconds > 0"),
    ("redirects", "9", "0 (none), 1 (stdout), 2 (stderr), 3 (both)"),
    ("tee", "x", "0 (none), 1 (stdout), 2 (stderr), 3 (both)"),
    ("rdzv_backend", "zookeeper", "expected one of c10d"),
    ("local_ranks_filter", "x", "comma-separated local ranks"),
]


@pytest.mark.parametrize(("option", "value", "accepted"), BAD, ids=[f"{o}={v}" for o, v, _ in BAD])
def test_bad_option_refused_before_workers(app, option: str, value: str, accepted: str) -> None:
    run = app(f"hydra.callbacks.torchrun.{option}={value}")
    assert run.proc.returncode == 1
    named = (f"torchrun.{option}={value}", f"torchrun.{option}='{value}'")
    assert any(n in run.output for n in named), run.output  # the option and the bad value
    assert "is not valid" in run.output
    assert accepted in run.output  # what is accepted
    assert "Fix: e.g." in run.output  # and how to fix it
    assert not run.out.exists() or not list(run.out.glob("rank*.json"))


def test_unknown_option_refused(app) -> None:
    run = app("hydra.callbacks.torchrun.nproc=2")
    assert run.proc.returncode == 1
    assert "Key 'nproc' not in 'TorchrunConf'" in run.output
    run = app("+hydra.callbacks.torchrun.nproc=2")
    assert run.proc.returncode == 1
    assert "there is no such option" in run.output
    assert "did you mean hydra.callbacks.torchrun.nproc_per_node?" in run.output


def test_bad_per_job_option_fails_that_job_only(app) -> None:
    """Options read per job (interpolations) are checked per job: FAILED, next job runs."""
    run = app("hydra.callbacks.torchrun.nproc_per_node=${oc.select:n,1}", "+n=x,2", multirun=True)
    statuses = [(r["status"], r["overrides"]) for r in run.records]
    assert statuses == [("FAILED", ["+n=x"]), ("COMPLETED", ["+n=2"])]
    assert "nproc_per_node='x'" in run.records[0]["error"]
