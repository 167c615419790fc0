"""The job store's root-cause logic, on a real TCPStore hosted by a node-0 coordinator."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from hydra_torchrun_callback._node.coordinator import JobCoordinator
from hydra_torchrun_callback._node.placement import Placement, resolve_placement
from hydra_torchrun_callback._options import parse_options
from hydra_torchrun_callback._result import job_error
from hydra_torchrun_callback._wire.store import load_secret
from hydra_torchrun_callback._worker.entry import _claim_first_failure

from conftest import free_port


def _coordinator(node: int, port: int, peer_timeout: float = 5, **kw: Any) -> JobCoordinator:
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "777",
        "SUBMITIT_LOCAL_GLOBALID": str(node),
        "SUBMITIT_LOCAL_NTASKS": "2",
    }
    placement = resolve_placement(parse_options({"master_port": port}), env, 1)
    return JobCoordinator(placement, peer_timeout, load_secret(os.environ), **kw)


@pytest.fixture
def nodes() -> tuple[JobCoordinator, JobCoordinator]:
    """Node 0 (hosts the store) and node 1 (a client), as two submitit-local tasks."""
    port = free_port()
    return _coordinator(0, port), _coordinator(1, port)


def _diverge() -> None:
    raise FloatingPointError("loss diverged")


def test_root_cause_from_the_claiming_worker_when_its_agent_never_reports(
    nodes: tuple[JobCoordinator, JobCoordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank raised at once; rank 0 claimed first, but node 0's agent was stopped by
    node 1's report before it could publish its own: node 0 still names rank 0, from what
    rank 0's worker wrote beside its claim, after a short grace instead of the full wait."""
    node0, node1 = nodes
    for key, value in node0.worker_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("GROUP_RANK", "0")
    try:
        _diverge()
    except FloatingPointError as exc:
        _claim_first_failure(0, exc)
    try:
        raise ValueError("late")
    except ValueError as exc:
        _claim_first_failure(1, exc)  # too late: neither the claim nor the details change
    node1.report_failure(
        job_error(rank=1, local_rank=0, node="n2", node_rank=1, what="raised ValueError: late")
    )

    start = time.monotonic()
    root = node0.root_cause(None, timeout=10, grace=0.5)
    waited = time.monotonic() - start
    assert root is not None and waited < 6  # the whole wait would be 10 s
    assert (root.rank, root.node_rank, root.exc_type) == (0, 0, "FloatingPointError")
    assert str(root).startswith(
        "torchrun worker rank 0 (local rank 0, node 0 on "
    ) and "raised FloatingPointError: loss diverged" in str(root)
    assert "in _diverge" in (root.traceback or "")


def test_claimers_node_report_wins_over_the_claim(
    nodes: tuple[JobCoordinator, JobCoordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 2 was SIGKILLed (a killed process claims nothing); rank 3, beside it on node 1,
    then raised in gloo and claimed first. Node 1's agent saw both and blames rank 2; that
    report is used at once, though node 0's consequence filled the job's slot first."""
    node0, node1 = nodes
    for key, value in node1.worker_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GROUP_RANK", "1")
    try:
        raise RuntimeError("Connection closed by peer")
    except RuntimeError as exc:
        _claim_first_failure(3, exc)
    consequence = job_error(rank=0, local_rank=0, node="n1", node_rank=0, what="raised X: y")
    node0.report_failure(consequence)
    killed = job_error(
        rank=2, local_rank=0, node="n2", node_rank=1, what="was killed by SIGKILL", exitcode=-9
    )
    node1.report_failure(killed)
    start = time.monotonic()
    root = node0.root_cause(consequence, timeout=10, grace=5)
    assert time.monotonic() - start < 2
    assert root is not None and (root.rank, root.exitcode) == (2, -9)
    assert "SIGKILL" in str(root)


def test_node_0_does_not_wait_for_a_node_it_declared_lost() -> None:
    """Node 1's heartbeats stop: node 0's watchdog declares it lost, and node 0's own end
    (say done, wait for every node's done) does not wait ``peer_timeout`` again for it."""
    reasons: list[Any] = []
    port = free_port()
    node0 = _coordinator(0, port, peer_timeout=2.0, abort=reasons.append)
    node1 = _coordinator(1, port)
    node1.start_watchdog()
    node0.start_watchdog()
    time.sleep(2.5)  # node 0 has seen node 1 beat
    node1.stop_watchdog()  # node 1's process is gone
    start = time.monotonic()
    while not reasons and time.monotonic() - start < 15:
        time.sleep(0.1)
    node0.stop_watchdog()
    assert reasons and "node 1 stopped sending heartbeats" in str(reasons[0])
    node0.mark_done(reasons[0])
    start = time.monotonic()
    assert node0.wait_all_done(timeout=10) == [1]  # still reported missing ...
    assert time.monotonic() - start < 2  # ... without the 10 s wait


def test_coordination_is_linear_in_nodes() -> None:
    """The simulation (benchmarks/coordination_sim.py) at 4 and 16 nodes: store calls per
    node per second stay flat (O(n) in all), and a lost node stops every other node."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from coordination_sim import simulate

    small, large = (simulate(n, steady_s=2.0, peer_timeout=3.0) for n in (4, 16))
    for result in (small, large):
        assert result["stopped_nodes"] == result["nodes"] - 1, result  # all but the lost one
        # peer_timeout + up to one 1 s beat + the others' next poll; twice it would fail
        assert result["all_stopped_after_s"] < 3.0 + 2.5, result
        assert result["calls_per_node_per_s"] < 8, result
    assert large["calls_per_node_per_s"] < 1.5 * small["calls_per_node_per_s"]


def test_a_node_that_never_beats_is_lost_after_the_join_timeout() -> None:
    port = free_port()
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "778",
        "SUBMITIT_LOCAL_GLOBALID": "0",
        "SUBMITIT_LOCAL_NTASKS": "2",
    }
    placement = resolve_placement(parse_options({"master_port": port}), env, 1)
    reasons: list[object] = []
    node0 = JobCoordinator(
        placement, 5, load_secret(os.environ), join_timeout=2.0, abort=reasons.append
    )
    start = time.monotonic()
    node0.start_watchdog()
    while not reasons and time.monotonic() - start < 10:
        time.sleep(0.1)
    node0.stop_watchdog()
    assert reasons and "node 1 never joined the job's store within 2s" in str(reasons[0])
    assert time.monotonic() - start < 2 + 4  # not the 60 s default
    assert node0.failure() is not None  # published: every node that joins later stops


def test_other_nodes_wait_for_a_late_node_0_up_to_the_join_timeout() -> None:
    """submitit can start nodes minutes apart: node 1 starts first and finds node 0's
    store when it comes up, well after 2 x peer_timeout (here 1 s), within join_timeout."""
    import threading

    port = free_port()

    def placement(node: int) -> Placement:
        env = {
            "SUBMITIT_EXECUTOR": "local",
            "SUBMITIT_LOCAL_JOB_ID": "779",
            "SUBMITIT_LOCAL_GLOBALID": str(node),
            "SUBMITIT_LOCAL_NTASKS": "2",
        }
        return resolve_placement(parse_options({"master_port": port}), env, 1)

    joined: list[object] = []

    def node1() -> None:
        try:
            joined.append(
                JobCoordinator(placement(1), 0.5, load_secret(os.environ), join_timeout=30)
            )
        except BaseException as exc:  # recorded for the assertion below
            joined.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=node1, daemon=True)
    thread.start()
    time.sleep(4.0)  # node 0 shows up 4 s later: 8 x peer_timeout
    node0 = JobCoordinator(placement(0), 0.5, load_secret(os.environ), join_timeout=30)
    thread.join(timeout=30)
    assert joined and isinstance(joined[0], JobCoordinator), joined
    assert time.monotonic() - start >= 4.0
    node0.mark_done(None)
