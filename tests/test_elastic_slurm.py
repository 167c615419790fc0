"""Elastic jobs on a real SLURM cluster (3 nodes) that these tests start and stop: a lost
node, node 0 included, is a membership change when the allocation and the step run with
``--no-kill`` (``+hydra.launcher.additional_parameters.no_kill=true`` and
``+hydra.launcher.srun_args=[--no-kill,'--kill-on-bad-exit=0']``).

A node is lost the way a host dies: its task's processes (the Hydra process, warm server,
agent, worker) are SIGKILLed at once, or SLURM is told the node is DOWN. ``.ci/run`` sets
HTR_REQUIRE_SLURM=1: a missing cluster fails there.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_elastic import lose_node, starts, step, sweeper_saw, wait_for

from hydra_torchrun_callback.slurm_sandbox import SlurmSandbox

from conftest import app_env, left_behind, slurm_sandbox_or_skip, start_app

SWEEPER_PLUGIN = Path(__file__).parent / "sweeper_plugin"
SLURM3 = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.nodes=3",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=30",
    "hydra.callbacks.torchrun.nproc_per_node=1",
]
NO_KILL = [
    "+hydra.launcher.additional_parameters.no_kill=true",
    "+hydra.launcher.srun_args=[--no-kill,'--kill-on-bad-exit=0']",
]
ELASTIC = [
    "hydra.callbacks.torchrun.nnodes=2:3",
    "hydra.callbacks.torchrun.max_restarts=2",
    "hydra.callbacks.torchrun.peer_timeout=10",
    "+steps=60",
    "+step_s=0.5",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmSandbox]:
    with slurm_sandbox_or_skip(tmp_path_factory, nodes=3).running() as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def nodes_back(cluster: SlurmSandbox) -> Iterator[None]:
    """Each test starts with every node up and nothing queued."""
    yield
    env = app_env(**cluster.env())
    subprocess.run(["scancel", "--user=root"], env=env, timeout=30, check=False)
    for node in cluster.node_names:
        subprocess.run(
            ["scontrol", "update", f"nodename={node}", "state=resume"],
            env=env,
            timeout=30,
            check=False,
            capture_output=True,
        )


def start(tmp_path: Path, cluster: SlurmSandbox, tag: str, *overrides: str) -> Any:
    env = app_env(HTR_TEST_TAG=tag, **cluster.env())
    env["PYTHONPATH"] = os.pathsep.join([str(SWEEPER_PLUGIN), env["PYTHONPATH"]])
    return start_app(
        tmp_path,
        *SLURM3,
        "hydra/sweeper=record",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
        f"hydra.launcher.submitit_folder={tmp_path / 'multi' / '.submitit' / '%j'}",
        *overrides,
        script="elastic_app.py",
        multirun=True,
        env=env,
    )


def finish(proc: Any) -> str:
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return str(out)


def sacct_state(cluster: SlurmSandbox, job: str) -> tuple[str, str]:
    """The job's state and exit code in SLURM's accounting (what a site's tools show)."""
    env = app_env(**cluster.env())
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        # A --no-kill job that lost a node has one record per size (RESIZING, then the last).
        last = out.splitlines()[-1] if out else ""
        if last and not last.startswith(("RUNNING", "PENDING", "COMPLETING", "RESIZING")):
            state, code = last.split("|")
            return state, code
        assert time.monotonic() < deadline, f"sacct never showed job {job} ended: {out!r}"
        time.sleep(1)


def job_id(tmp_path: Path) -> str:
    (pickle,) = (tmp_path / "multi" / ".submitit").glob("*/*_submitted.pkl")
    return pickle.name.split("_")[0]


def training(tmp_path: Path, proc: Any) -> dict[int, int]:
    try:
        wait_for(lambda: len(starts(tmp_path)) >= 3 and step(tmp_path) >= 2, 180, "training", proc)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; output:\n{finish(proc)[-4000:]}") from None
    return {s["node"]: s["hydra_pid"] for s in starts(tmp_path) if s["restart"] == 0}


def set_down(cluster: SlurmSandbox, host: str) -> None:
    """What an admin does to a failing node: ``scontrol update nodename=... state=down``."""
    down = subprocess.run(
        ["scontrol", "update", f"nodename={host}", "state=down", "reason=t"],
        env=app_env(**cluster.env()),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 0, down.stderr


def host_of(tmp_path: Path, node: int) -> str:
    return str(next(s["host"] for s in starts(tmp_path) if s["node"] == node))


def test_node_0_lost_on_slurm_with_no_kill(tmp_path: Path, cluster: SlurmSandbox) -> None:
    """nnodes=2:3 on 3 SLURM nodes with --no-kill: node 0's task dies (as with its host);
    nodes 1 and 2 re-form the group and finish, and the sweeper gets rank 0's value."""
    tag = uuid.uuid4().hex
    proc = start(tmp_path, cluster, tag, *ELASTIC, *NO_KILL)
    pids = training(tmp_path, proc)
    lost_wall = time.time()
    lose_node(pids[0])
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    second = [s for s in starts(tmp_path) if s["at"] > lost_wall]
    assert sorted(s["node"] for s in second) == [1, 2]
    assert {s["world"] for s in second} == {2}
    (saw,) = sweeper_saw(tmp_path)
    assert saw["status"] == "COMPLETED" and "'world': 2" in saw["value"], saw
    summary = json.loads((tmp_path / "multi" / "0" / "torchrun_summary.json").read_text())
    (change,) = summary["elastic"]["changes"]
    assert change["lost"] == [0]
    # SLURM's own verdict: the step lost a task, so srun (and the batch script) exit
    # non-zero; the allocation was never revoked (--no-kill).
    state, _ = sacct_state(cluster, job_id(tmp_path))
    assert state in ("COMPLETED", "FAILED"), state
    print(f"\nsacct after losing node 0's task with --no-kill: {state}")
    assert left_behind(tag) == []


def test_node_set_down_on_slurm_with_no_kill(tmp_path: Path, cluster: SlurmSandbox) -> None:
    """`scontrol update nodename=... state=down` on the node of task 2 (SLURM kills the
    step's task there): the job goes on with the other two nodes and completes."""
    tag = uuid.uuid4().hex
    proc = start(tmp_path, cluster, tag, *ELASTIC, *NO_KILL)
    training(tmp_path, proc)
    lost_wall = time.time()
    set_down(cluster, host_of(tmp_path, 2))
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    second = [s for s in starts(tmp_path) if s["at"] > lost_wall]
    assert sorted(s["node"] for s in second) == [0, 1]
    (saw,) = sweeper_saw(tmp_path)
    assert saw["status"] == "COMPLETED" and "'world': 2" in saw["value"], saw
    state, _ = sacct_state(cluster, job_id(tmp_path))
    print(f"\nsacct after task 2's node went DOWN with --no-kill: {state}")
    assert state in ("COMPLETED", "FAILED", "NODE_FAIL"), state
    assert left_behind(tag) == []


def test_node_set_down_without_no_kill_requeues_the_job(
    tmp_path: Path, cluster: SlurmSandbox
) -> None:
    """The control: without --no-kill a node that goes DOWN ends the step, and SLURM
    requeues the batch job (JobRequeue=1, its default; ``--no-requeue`` would leave it
    NODE_FAIL). The job starts again from the beginning under the same id, on a fresh
    rendezvous (one store directory per SLURM_RESTART_COUNT), and the task resumes from
    its checkpoint."""
    tag = uuid.uuid4().hex
    proc = start(tmp_path, cluster, tag, *ELASTIC)
    training(tmp_path, proc)
    lost_wall = time.time()
    set_down(cluster, host_of(tmp_path, 2))
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    again = [s for s in starts(tmp_path) if s["at"] > lost_wall]
    # A new run of the whole job: every node's agent starts afresh (restart count 0).
    assert sorted(s["node"] for s in again) == [0, 1, 2]
    assert {s["restart"] for s in again} == {0}
    assert all(s["resumed_at"] >= 2 for s in again)
    (saw,) = sweeper_saw(tmp_path)
    assert saw["status"] == "COMPLETED", saw
    stores = sorted(p.name for p in (tmp_path / "multi" / ".submitit").glob("*/.torchrun_store/*"))
    assert [name.rsplit(".", 1)[1] for name in stores] == ["r0", "r1"], stores
    assert left_behind(tag) == []
