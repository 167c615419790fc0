"""Apps that import torch at module top: the warm server is a fork of the Hydra process.

Most training scripts start with ``import torch``: the Hydra process has then paid for
torch, and a fresh warm server would import it a second time on the node. When the Hydra
process is fork-safe the server is a fork of it (one torch import per node); when it is
not (a thread started at import, OpenMP's pool after a parallel torch op; CUDA at import
on GPU machines: scripts/gpu_check.sh) the server is a fresh interpreter and a log line
says why. Each rank of ``top_import_app.py`` records its server's command line and
parent, and runs a collective, an OpenMP-parallel torch op and an OpenBLAS numpy op (the
ones a fork could break).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import AppRun, app_env, run_app

APP = "top_import_app.py"
FALLBACK = "warm start: torch is already imported here, but this process is not safe to fork"


def _run(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None, **kw: Any) -> AppRun:
    tmp_path.mkdir(parents=True, exist_ok=True)
    probe = str(tmp_path / "imports.txt")
    return run_app(
        tmp_path,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        *overrides,
        script=APP,
        env=app_env(HTR_IMPORT_PROBE=probe, **(env or {})),
        **kw,
    )


def _importers(tmp_path: Path) -> set[int]:
    """The processes that imported the app's modules (import_probe, a module it imports)."""
    return {int(pid) for pid in (tmp_path / "imports.txt").read_text().split()}


def _ranks(job_dir: Path, world: int) -> list[dict[str, Any]]:
    import json

    ranks = [json.loads((job_dir / f"rank{r}.json").read_text()) for r in range(world)]
    total = world * (world + 1) / 2
    for rec in ranks:
        assert rec["sum"] == total and rec["world"] == world
        assert rec["parallel"] == 1.0 and rec["blas"] == 600.0 * 600
        assert rec["threads"] == ["MainThread"]
    return ranks


def _imported_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("top_import_app: imported")]


def test_server_is_a_fork_of_the_hydra_process(tmp_path: Path) -> None:
    """Default options: one server, forked from the Hydra process (its command line, its
    child); the workers never imported the app's module again; the module's buffered
    output before the fork is written once; rank 0's value is the job's."""
    run = _run(tmp_path)
    assert run.proc.returncode == 0, run.output
    ranks = _ranks(run.out, 2)
    (server,) = {r["server"] for r in ranks}
    (hydra,) = {r["server_parent"] for r in ranks}
    assert _importers(tmp_path) == {hydra}  # the workers inherited the modules (the fork)
    assert not any("multiprocessing.forkserver" in part for part in ranks[0]["server_cmd"])
    assert ranks[0]["server_cmd"][1].endswith(APP)
    assert _imported_lines(run.output) == [f"top_import_app: imported in pid {hydra}"]
    # The quick exit (garbage frozen at exit) keeps the app's exit handlers, and no
    # finalizer complains of a half-torn-down interpreter.
    assert run.output.count("top_import_app: exit handler ran") == 1
    assert "Exception ignored" not in run.output
    assert FALLBACK not in run.output
    assert run.records[0]["value"] == {"sum": 3.0, "x": 0}
    assert server != hydra


@pytest.mark.parametrize(
    ("switch", "why"),
    [
        ("TOP_APP_THREAD", "Python threads are running: app-prefetch"),
        ("TOP_APP_OMP", "native thread(s) are running (OpenMP's pool"),
    ],
    ids=["thread-at-import", "openmp-pool-at-import"],
)
def test_unsafe_hydra_process_gets_a_fresh_server(tmp_path: Path, switch: str, why: str) -> None:
    """A thread started at import, or OpenMP's pool after a parallel torch op at import
    (a fork would hang in its next parallel region): the server is a fresh interpreter,
    the log says why, and the job runs as before (each worker imports the module)."""
    run = _run(tmp_path, env={switch: "1"})
    assert run.proc.returncode == 0, run.output
    assert FALLBACK in run.output and why in run.output
    ranks = _ranks(run.out, 2)
    assert all("multiprocessing.forkserver" in " ".join(r["server_cmd"]) for r in ranks)
    assert {r["pid"] for r in ranks} <= _importers(tmp_path)  # each worker imported them
    assert run.records[0]["value"] == {"sum": 3.0, "x": 0}


def test_warm_server_fork_refuses_an_unsafe_process(tmp_path: Path) -> None:
    """warm_server=fork insists: an unsafe process fails the job before any worker
    starts, naming the option, why and the fix."""
    run = _run(tmp_path, "hydra.callbacks.torchrun.warm_server=fork", env={"TOP_APP_THREAD": "1"})
    assert run.proc.returncode != 0
    assert (
        "hydra.callbacks.torchrun.warm_server='fork' is not valid: this Hydra process cannot "
        "be forked safely: Python threads are running: app-prefetch" in run.output
    )
    assert "Fix: e.g. hydra.callbacks.torchrun.warm_server=auto" in run.output
    assert not list(run.out.glob("rank*.json"))


def test_warm_server_fresh_and_bad_value(tmp_path: Path) -> None:
    """warm_server=fresh: a fresh server although the process could be forked (each
    worker imports the app, as under torchrun); a wrong value is refused up front."""
    run = _run(tmp_path, "hydra.callbacks.torchrun.warm_server=fresh")
    assert run.proc.returncode == 0, run.output
    ranks = _ranks(run.out, 2)
    assert all("multiprocessing.forkserver" in " ".join(r["server_cmd"]) for r in ranks)
    assert {r["pid"] for r in ranks} <= _importers(tmp_path)
    assert FALLBACK not in run.output
    bad = _run(tmp_path / "bad", "hydra.callbacks.torchrun.warm_server=forked")
    assert bad.proc.returncode != 0
    assert "hydra.callbacks.torchrun.warm_server='forked' is not valid" in bad.output
    assert "auto, fork, fresh" in bad.output


def test_multirun_reuses_one_forked_server(tmp_path: Path) -> None:
    """Basic launcher, 3 points: the server is forked once, before the sweep's own
    threads start, and serves every job with that job's config."""
    run = _run(tmp_path, "x=1,2,3", multirun=True)
    assert run.proc.returncode == 0, run.output
    servers = set()
    for job, x in enumerate((1, 2, 3)):
        ranks = _ranks(run.out / str(job), 2)
        assert {r["x"] for r in ranks} == {x}
        servers |= {(r["server"], r["server_parent"]) for r in ranks}
        assert run.records[job]["value"] == {"sum": 3.0, "x": x}
    ((_, hydra),) = servers
    assert _importers(tmp_path) == {hydra}
    assert FALLBACK not in run.output


def test_emulated_nodes_each_fork_their_own_server(tmp_path: Path) -> None:
    """2 emulated nodes x 2 workers: each node's Hydra process (a submitit task) forks
    its own server; ranks span the nodes; rank 0's value reaches the sweep."""
    run = _run(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=10",
        multirun=True,
    )
    assert run.proc.returncode == 0, run.output
    ranks = _ranks(run.out / "0", 4)
    nodes = {(r["server"], r["server_parent"]) for r in ranks}
    assert len(nodes) == 2
    # Each node's Hydra process imported the app (the launching one too): not the workers.
    assert {parent for _, parent in nodes} < _importers(tmp_path)
    assert not {r["pid"] for r in ranks} & _importers(tmp_path)
    task0 = next(r for r in run.records if r["task"] == 0)  # one record per node's job
    assert task0["value"] == {"sum": 10.0, "x": 0}


def test_worker_state_a_fork_must_not_inherit(tmp_path: Path) -> None:
    """What a forked server must not pass on: a Lightning-style rank read from the
    environment at import (each worker gets its own RANK, not the Hydra process's 0),
    and multiprocessing's forkserver lock (held while the Hydra process forked): a
    worker starting a process with a forkserver context of its own (a DataLoader's
    multiprocessing_context="forkserver") must not hang."""
    pytest.importorskip("lightning_utilities")
    run = _run(tmp_path, env={"TOP_APP_RANK_AT_IMPORT": "1", "TOP_APP_NESTED": "1"})
    assert run.proc.returncode == 0, run.output
    ranks = _ranks(run.out, 2)
    assert _importers(tmp_path) >= {ranks[0]["server_parent"]}
    assert not any("multiprocessing.forkserver" in part for part in ranks[0]["server_cmd"])
    assert [r["rank_zero_only"] for r in ranks] == [0, 1]
    assert [r["nested_exitcode"] for r in ranks] == [0, 0]


def test_lazy_app_with_warm_server_fork(tmp_path: Path) -> None:
    """warm_server=fork on an app that never imported torch: the server is still a fork
    of the Hydra process (it imports torch itself, after the fork)."""
    run = run_app(
        tmp_path,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "hydra.callbacks.torchrun.warm_server=fork",
    )
    assert run.proc.returncode == 0, run.output
    assert run.records[0]["value"]["sum"] == 1
