"""Elastic jobs on emulated nodes (submitit_local, one task = one node, 3 nodes): a lost
node is a membership change when nnodes=MIN:MAX leaves room and restarts are left.

Each test runs the real thing: three Hydra processes, their agents and gloo workers that
train in steps and checkpoint; a node is lost by SIGKILLing its whole task (the Hydra
process, its warm server, agent and worker at once). Recovery times are printed (-s); the
benchmark that reports them is benchmarks/elastic_recovery.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import app_env, left_behind, start_app

LOCAL = [
    "hydra/launcher=submitit_local",
    "hydra.launcher.timeout_min=60",
    "hydra.callbacks.torchrun.nproc_per_node=1",
]
RECOVERY: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    print("\nelastic recovery (s): " + ", ".join(f"{k}: {v:.1f}" for k, v in RECOVERY.items()))


SWEEPER_PLUGIN = Path(__file__).parent / "sweeper_plugin"


#: Makes one node late: its submitit task's interpreter sleeps before it starts the job.
LATE_SITECUSTOMIZE = """
import os, sys, time
if os.environ.get("SUBMITIT_LOCAL_GLOBALID") == os.environ.get("HTR_LATE_NODE") and any(
    "submitit.core._submit" in arg for arg in getattr(sys, "orig_argv", [])
):
    time.sleep(float(os.environ["HTR_LATE_S"]))
"""


def start(
    tmp_path: Path,
    tag: str,
    *overrides: str,
    tasks: int = 3,
    late: tuple[int, float] = (),
    record: bool = True,
) -> subprocess.Popen[str]:
    """``record``: hydra/sweeper=record (never fails the command) instead of the basic
    sweeper (a failed point fails the command)."""
    env = app_env(HTR_TEST_TAG=tag)
    # hydra/sweeper=record writes down the JobReturn the sweeper got (sweeper_saw.jsonl).
    env["PYTHONPATH"] = os.pathsep.join([str(SWEEPER_PLUGIN), env["PYTHONPATH"]])
    if late:
        site = tmp_path / "late_site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(LATE_SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
        env["HTR_LATE_NODE"], env["HTR_LATE_S"] = str(late[0]), str(late[1])
    return start_app(
        tmp_path,
        *LOCAL,
        f"hydra.launcher.tasks_per_node={tasks}",
        *(["hydra/sweeper=record"] if record else []),
        f"hydra.sweep.dir={tmp_path / 'multi'}",
        "+hydra.callbacks.recorder._target_=recorder.Recorder",
        f"+hydra.callbacks.recorder.path={tmp_path / 'recorder.jsonl'}",
        *overrides,
        script="elastic_app.py",
        multirun=True,
        env=env,
    )


def sweeper_saw(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "multi" / "sweeper_saw.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def starts(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "multi" / "0" / "starts.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # being written
            found.append(json.loads(line))
    return found


def step(tmp_path: Path) -> int:
    try:
        return int(json.loads((tmp_path / "multi" / "0" / "ckpt.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(cond: Any, timeout: float, what: str, proc: subprocess.Popen[str]) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic()


def lose_node(hydra_pid: int) -> None:
    """SIGKILL a node's whole task at once: its Hydra process and every descendant."""
    from hydra_torchrun_callback._proc import descendants

    for pid in [hydra_pid, *descendants(hydra_pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def training(tmp_path: Path, proc: subprocess.Popen[str], nodes: int) -> dict[int, int]:
    """Wait for the first group (``nodes`` workers) to train; node -> its Hydra pid."""
    wait_for(lambda: len(starts(tmp_path)) >= nodes and step(tmp_path) >= 2, 180, "training", proc)
    return {s["node"]: s["hydra_pid"] for s in starts(tmp_path) if s["restart"] == 0}


def finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out


def logs(tmp_path: Path) -> str:
    """Every node's log: the Hydra job logs and submitit's task logs."""
    multi = tmp_path / "multi"
    return "\n".join(
        p.read_text(errors="replace")
        for pattern in ("**/*.log", "**/*.out", "**/*.err")
        for p in sorted(multi.glob(pattern))
    )


def node0_record(tmp_path: Path) -> dict[str, Any]:
    records = [json.loads(x) for x in (tmp_path / "recorder.jsonl").read_text().splitlines()]
    return next(r for r in records if r["value"] is not None or r["status"] == "FAILED")


@pytest.mark.parametrize(
    "survivors",
    [
        # The survivors' workers are in an all_reduce with the lost one: gloo fails them
        # at once, and torch's agents re-rendezvous by themselves.
        pytest.param("in_collective", id="survivors-in-collective"),
        # The survivors sit idle (no collective): nothing fails on them; node 0 sees the
        # node's heartbeats stop and every survivor stops its workers of the old group.
        pytest.param("idle", id="survivors-idle"),
    ],
)
def test_lost_node_is_a_membership_change(tmp_path: Path, survivors: str) -> None:
    tag = uuid.uuid4().hex
    # Idle survivors: the default peer_timeout (20 s) bounds recovery. In a collective:
    # peer_timeout=10 notices the loss well before the job's last step.
    hold = ["+hold_s=600"] if survivors == "idle" else ["hydra.callbacks.torchrun.peer_timeout=10"]
    proc = start(
        tmp_path,
        tag,
        "hydra.callbacks.torchrun.nnodes=2:3",
        "hydra.callbacks.torchrun.max_restarts=2",
        "hydra.callbacks.torchrun.heartbeat_interval=1",
        "+steps=40",
        "+step_s=0.5",
        *hold,
    )
    pids = training(tmp_path, proc, 3)
    if survivors == "idle":
        wait_for(lambda: step(tmp_path) >= 3, 60, "step 3", proc)
    lost_at, lost_wall = time.monotonic(), time.time()
    lose_node(pids[2])
    back = wait_for(
        lambda: any(s["world"] == 2 for s in starts(tmp_path)), 120, "the re-formed group", proc
    )
    out = finish(proc)
    RECOVERY[f"node 2 of 3 lost, survivors {survivors}"] = back - lost_at
    assert proc.returncode == 0, out[-4000:]
    first = [s for s in starts(tmp_path) if s["at"] < lost_wall]
    assert sorted((s["node"], s["world"]) for s in first) == [(0, 3), (1, 3), (2, 3)]
    second = [s for s in starts(tmp_path) if s["at"] > lost_wall]
    # Both survivors restarted their workers, with new ranks, from the checkpoint.
    assert sorted(s["node"] for s in second) == [0, 1]
    assert sorted(s["rank"] for s in second) == [0, 1]
    assert all(s["resumed_at"] >= 2 for s in second)
    # A failed worker costs its agent a restart; an agent that re-rendezvoused because
    # another node asked to (torch's num_nodes_waiting) spends none, as under torchrun.
    assert max(s["restart"] for s in second) >= 1
    record = node0_record(tmp_path)
    assert record["status"] == "COMPLETED", record
    assert record["value"]["world"] == 2 and record["value"]["resumed_at"] >= 2
    text = logs(tmp_path)
    assert "elastic: node 2 stopped sending heartbeats" in text
    assert "going on with 2 of 3 nodes (nnodes=2:3, restarts used so far" in text
    assert re.search(r"/2 ranks alive .*; elastic: 2 of 3 nodes, attempt [23]/3", text)
    if survivors == "idle":  # nothing failed on the survivors: they stopped their workers
        assert "stopping this node's workers" in text
    summary = json.loads((tmp_path / "multi" / "0" / "torchrun_summary.json").read_text())
    assert summary["status"] == "COMPLETED"
    (change,) = summary["elastic"]["changes"]
    assert (change["lost"], change["alive"]) == ([2], 2)
    assert change["lost_s"] is not None and change["lost_s"] < 60
    assert summary["elastic"]["nnodes"] == "2:3"
    assert left_behind(tag) == []


def test_node_0_lost_is_a_membership_change(tmp_path: Path) -> None:
    """Node 0 is not special: the job's store and rendezvous are files in submitit's
    folder, so losing node 0 (its Hydra process, agent and worker) leaves nodes 1 and 2
    to re-form the group, and rank 0's value reaches the sweeper from a surviving task."""
    tag = uuid.uuid4().hex
    proc = start(
        tmp_path,
        tag,
        "hydra.callbacks.torchrun.nnodes=2:3",
        "hydra.callbacks.torchrun.max_restarts=2",
        "hydra.callbacks.torchrun.heartbeat_interval=1",
        "hydra.callbacks.torchrun.peer_timeout=10",
        "+steps=40",
        "+step_s=0.5",
    )
    pids = training(tmp_path, proc, 3)
    lost_at, lost_wall = time.monotonic(), time.time()
    lose_node(pids[0])
    back = wait_for(
        lambda: any(s["world"] == 2 for s in starts(tmp_path)), 120, "the re-formed group", proc
    )
    out = finish(proc)
    RECOVERY["node 0 of 3 lost, survivors in_collective"] = back - lost_at
    assert proc.returncode == 0, out[-4000:]
    second = [s for s in starts(tmp_path) if s["at"] > lost_wall]
    assert sorted(s["node"] for s in second) == [1, 2]
    assert sorted(s["rank"] for s in second) == [0, 1]
    assert all(s["resumed_at"] >= 2 for s in second)
    # The sweeper got rank 0's value from a task that survived.
    (saw,) = sweeper_saw(tmp_path)
    assert saw["status"] == "COMPLETED", saw
    assert "'world': 2" in saw["value"], saw
    text = logs(tmp_path)
    assert "elastic: node 0 stopped sending heartbeats" in text
    assert "going on with 2 of 3 nodes" in text
    assert re.search(r"/2 ranks alive .*; elastic: 2 of 3 nodes", text)
    # Node 1 led the job's end: the summary names the change.
    summary = json.loads((tmp_path / "multi" / "0" / "torchrun_summary.json").read_text())
    assert summary["status"] == "COMPLETED"
    (change,) = summary["elastic"]["changes"]
    assert (change["lost"], change["alive"]) == ([0], 2)
    # The store's files live in submitit's folder, private to the user.
    (store_dir,) = (tmp_path / "multi" / ".submitit").glob("*/.torchrun_store/*")
    assert store_dir.stat().st_mode & 0o777 == 0o700
    assert left_behind(tag) == []


def test_a_spare_replaces_a_lost_node(tmp_path: Path) -> None:
    """4 tasks for nnodes=2:3: three form the group, the fourth waits on torch's
    redundancy list; when a node of the group is lost, the spare takes its place and the
    group goes on at full size."""
    tag = uuid.uuid4().hex
    proc = start(
        tmp_path,
        tag,
        "hydra.callbacks.torchrun.nnodes=2:3",
        "hydra.callbacks.torchrun.max_restarts=2",
        "hydra.callbacks.torchrun.peer_timeout=10",
        "+steps=40",
        "+step_s=0.5",
        tasks=4,
    )
    pids = training(tmp_path, proc, 3)
    first = {s["node"] for s in starts(tmp_path)}
    (spare,) = {0, 1, 2, 3} - first
    victim = max(first)
    lost_at, lost_wall = time.monotonic(), time.time()
    lose_node(pids[victim])
    back = wait_for(
        lambda: len([s for s in starts(tmp_path) if s["at"] > lost_wall]) >= 3,
        120,
        "the group with the spare",
        proc,
    )
    out = finish(proc)
    RECOVERY["node of 3 lost, a spare replaces it"] = back - lost_at
    assert proc.returncode == 0, out[-4000:]
    second = [s for s in starts(tmp_path) if s["at"] > lost_wall]
    assert sorted(s["node"] for s in second) == sorted(first - {victim} | {spare})
    assert {s["world"] for s in second} == {3}
    assert all(s["resumed_at"] >= 2 for s in second)
    (saw,) = sweeper_saw(tmp_path)
    assert saw["status"] == "COMPLETED" and "'world': 3" in saw["value"], saw
    text = logs(tmp_path)
    assert f"elastic: node {victim} stopped sending heartbeats" in text
    assert "going on with 3 of 3 nodes (nnodes=2:3" in text
    summary = json.loads((tmp_path / "multi" / "0" / "torchrun_summary.json").read_text())
    (change,) = summary["elastic"]["changes"]
    assert (change["lost"], change["alive"], change["spares"]) == ([victim], 3, 0)
    assert left_behind(tag) == []


def test_an_unneeded_spare_ends_with_the_job(tmp_path: Path) -> None:
    """3 tasks for nnodes=1:2 and no loss: the spare waits, and when the job ends it ends
    too, without an error (torch's agent itself fails on a closed rendezvous there)."""
    tag = uuid.uuid4().hex
    proc = start(tmp_path, tag, "hydra.callbacks.torchrun.nnodes=1:2", "+steps=4", "+step_s=0.2")
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    first = starts(tmp_path)
    assert len(first) == 2 and {s["world"] for s in first} == {2}
    (saw,) = sweeper_saw(tmp_path)
    assert saw["status"] == "COMPLETED" and "'world': 2" in saw["value"], saw
    text = logs(tmp_path)
    assert "waited as a spare and the job ended without needing it" in text
    records = [json.loads(x) for x in (tmp_path / "recorder.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in records) == ["COMPLETED"] * 3
    assert left_behind(tag) == []


def test_a_late_node_is_admitted_at_the_next_round(tmp_path: Path) -> None:
    """nnodes=2:3 and node 2 starts 20 s late: the first group trains with nodes 0 and 1;
    node 2's arrival makes torch's agents re-form the group with all three (scale-up),
    which costs no restart."""
    tag = uuid.uuid4().hex
    proc = start(
        tmp_path,
        tag,
        "hydra.callbacks.torchrun.nnodes=2:3",
        "hydra.callbacks.torchrun.rdzv_conf='last_call_timeout=3'",
        "+steps=60",
        "+step_s=0.5",
        late=(2, 20.0),
    )
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    groups = starts(tmp_path)
    first = [s for s in groups if s["world"] == 2]
    assert sorted(s["node"] for s in first) == [0, 1]
    later = [s for s in groups if s["world"] == 3]
    assert sorted(s["node"] for s in later) == [0, 1, 2]
    assert all(s["resumed_at"] >= 1 for s in later)
    (saw,) = sweeper_saw(tmp_path)
    assert saw["status"] == "COMPLETED" and "'world': 3" in saw["value"], saw
    assert "elastic: starting without nodes [2]" in logs(tmp_path)
    assert left_behind(tag) == []


def failed_after_losing(tmp_path: Path, victims: list[int], *overrides: str) -> dict[str, Any]:
    """Start an elastic job (nnodes=2:3, peer_timeout=10), lose ``victims`` once it trains:
    it must fail and leave nothing behind; node 0's record."""
    tag = uuid.uuid4().hex
    proc = start(
        tmp_path,
        tag,
        "hydra.callbacks.torchrun.nnodes=2:3",
        "hydra.callbacks.torchrun.peer_timeout=10",
        "+steps=200",
        "+step_s=0.5",
        *overrides,
        record=False,
    )
    pids = training(tmp_path, proc, 3)
    if "+hold_s=600" in overrides:
        wait_for(lambda: step(tmp_path) >= 3, 60, "step 3", proc)
    lost_at = time.monotonic()
    for node in victims:
        lose_node(pids[node])
    out = finish(proc)
    RECOVERY[f"nodes {victims} of 3 lost {list(overrides)} -> job failed"] = (
        time.monotonic() - lost_at
    )
    assert proc.returncode == 1, out[-4000:]
    assert left_behind(tag) == []
    return node0_record(tmp_path)


def test_loss_below_min_fails_naming_the_lost_nodes(tmp_path: Path) -> None:
    record = failed_after_losing(tmp_path, [1, 2], "hydra.callbacks.torchrun.max_restarts=2")
    assert record["status"] == "FAILED"
    assert "stopped sending heartbeats" in record["error"]
    assert "1 of 3 nodes are left, below nnodes MIN=2" in record["error"]
    assert "lost before: node 1" in record["error"] or "lost before: node 2" in record["error"]


def test_elastic_without_restarts_fails_saying_so(tmp_path: Path) -> None:
    record = failed_after_losing(
        tmp_path, [2], "hydra.callbacks.torchrun.max_restarts=0", "+hold_s=600"
    )
    assert "node 2 stopped sending heartbeats" in record["error"]
    assert "no restarts are left" in record["error"] and "max_restarts=0" in record["error"]
