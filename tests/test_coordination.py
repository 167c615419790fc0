"""The job store's root-cause logic, on a real TCPStore hosted by a node-0 coordinator."""

from __future__ import annotations

import socket
import time

import pytest

from hydra_torchrun_callback._coordination import JobCoordinator
from hydra_torchrun_callback._options import parse_options
from hydra_torchrun_callback._placement import resolve_placement
from hydra_torchrun_callback._result import job_error
from hydra_torchrun_callback._worker import _claim_first_failure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def node0() -> JobCoordinator:
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "777",
        "SUBMITIT_LOCAL_GLOBALID": "0",
        "SUBMITIT_LOCAL_NTASKS": "2",
    }
    placement = resolve_placement(parse_options({"master_port": _free_port()}), env, 1)
    return JobCoordinator(placement, peer_timeout=5)


def _diverge() -> None:
    raise FloatingPointError("loss diverged")


def test_root_cause_from_the_claiming_worker_when_its_agent_never_reports(
    node0: JobCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank raised at once; rank 0 claimed first, but node 0's agent was stopped by
    node 1's report before it could publish its own: node 0 still names rank 0, from what
    rank 0's worker wrote beside its claim, after a short grace instead of the full wait."""
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
    node1 = job_error(rank=1, local_rank=0, node="n2", node_rank=1, what="raised ValueError: late")
    node0.report_failure(node1)

    start = time.monotonic()
    root = node0.root_cause(None, timeout=10, grace=0.5)
    waited = time.monotonic() - start
    assert root is not None and waited < 3
    assert (root.rank, root.node_rank, root.exc_type) == (0, 0, "FloatingPointError")
    assert str(root).startswith(
        "torchrun worker rank 0 (local rank 0, node 0 on "
    ) and "raised FloatingPointError: loss diverged" in str(root)
    assert "in _diverge" in (root.traceback or "")


def test_root_cause_prefers_the_agents_report(node0: JobCoordinator, monkeypatch) -> None:
    """When the claimer's own node reports in time, its (agent-built) error is used at once."""
    for key, value in node0.worker_env.items():
        monkeypatch.setenv(key, value)
    try:
        _diverge()
    except FloatingPointError as exc:
        _claim_first_failure(1, exc)
    agent_view = job_error(rank=1, local_rank=0, node="n2", node_rank=1, what="raised X: y")
    node0.report_failure(agent_view)
    root = node0.root_cause(None, timeout=10, grace=5)
    assert root is not None and str(root) == str(agent_view)
