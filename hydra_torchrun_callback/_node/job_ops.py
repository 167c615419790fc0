"""Every operation the job's nodes do on their job store.

The store itself (signing, encoding, chunking, hosting and joining) is
:mod:`.._wire.store`'s and the key families are named in :mod:`.._wire.protocol`; this module says
what the nodes of a job write to each other, and when:

========================  ============================================================
key                       what
========================  ============================================================
``hb/<node>``             the node's heartbeat (JSON: count, done, ranks' states, error)
``failure``               the job's failure slot: the root cause wins it (encoded error)
``failure/<node>``        each node's own failure report (its agent's last word)
``first_failed_rank``     claimed (compare-set) by the first worker that raised
``first_failure``         what that worker raised (JSON)
``result``                global rank 0's pickled return value (chunked)
``rows/<node>``           the node's rows of the job summary (JSON, chunked)
``stacks/count``          number of stack requests relayed by node 0
``stacks/<n>``            the n-th request's id
``jobdir``                node 0's output dir, where every node works
``membership``            an elastic job's nodes after a loss (JSON, written by node 0)
========================  ============================================================
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Optional

from hydra_torchrun_callback._node.job_decisions import Membership
from hydra_torchrun_callback._result import FailureRecord, TorchrunJobError
from hydra_torchrun_callback._wire.protocol import (
    FAILURE_KEY,
    FIRST_FAILED_KEY,
    FIRST_FAILURE_KEY,
    JOBDIR_KEY,
    MEMBERSHIP_KEY,
    RESULT_KEY,
    STACKS_COUNT_KEY,
    heartbeat_key,
    node_failure_key,
    rows_key,
    stacks_key,
)
from hydra_torchrun_callback._wire.store import JobStore

__all__ = ["JobOps", "initial_keys"]

#: The job's failure slot holds this until a node fills it.
NO_FAILURE = b""


def initial_keys(nnodes: int, job_dir: Optional[str]) -> dict[str, bytes]:
    """What node 0 writes when it hosts the store: a first beat per node, the empty
    failure slot, and its output dir."""
    initial = {
        heartbeat_key(n): json.dumps({"beat": 0, "done": False}).encode() for n in range(nnodes)
    }
    initial[FAILURE_KEY] = NO_FAILURE
    initial[MEMBERSHIP_KEY] = b"null"  # present, so every node reads it in one round trip
    if job_dir:
        initial[JOBDIR_KEY] = job_dir.encode()
    return initial


def _decoded(payload: Optional[bytes]) -> Optional[TorchrunJobError]:
    if not payload:  # absent, forged, or the empty slot
        return None
    try:
        return FailureRecord.from_json(payload).error()
    except (ValueError, TypeError, KeyError):
        return None


class JobOps:
    """One node's operations on the job store (``node``: the node they speak for)."""

    def __init__(self, js: JobStore, node: int, nnodes: int) -> None:
        self.js = js
        self.node = node
        self.nnodes = nnodes

    # -- failures ---------------------------------------------------------------------
    def first_failed_rank(self) -> Optional[int]:
        """The global rank whose worker raised first (claimed by the worker itself)."""
        payload = self.js.get(FIRST_FAILED_KEY)
        return None if payload is None else int(payload)

    def report_failure(self, error: TorchrunJobError) -> None:
        """Publish this node's failure. The root cause (the rank that claimed the first
        failure) always wins the job's slot; any other failure only fills an empty one.
        Each node's own report is kept too: it is the last word on that node's ranks."""
        blob = FailureRecord.of(error).to_json()
        self.js.set(node_failure_key(self.node), blob)
        if error.rank is not None and error.rank == self.first_failed_rank():
            self.js.set(FAILURE_KEY, blob)
        else:
            self.js.replace_if(FAILURE_KEY, NO_FAILURE, blob)

    def node_failure(self, node: int) -> Optional[TorchrunJobError]:
        return _decoded(self.js.get(node_failure_key(node)))

    def node_failures(self) -> list[Optional[TorchrunJobError]]:
        """Every node's own report, None where it sent none (or it could not be read)."""
        reports: list[Optional[TorchrunJobError]] = []
        for node in range(self.nnodes):
            report = None
            with contextlib.suppress(Exception):
                report = self.node_failure(node)
            reports.append(report)
        return reports

    def failure(self) -> Optional[TorchrunJobError]:
        """The job's failure slot (raises when the store cannot be reached)."""
        return _decoded(self.js.get_present(FAILURE_KEY))

    def claimed_failure(self) -> Optional[TorchrunJobError]:
        """The first failure as its worker described it (no agent needed)."""
        data = self.js.get_json(FIRST_FAILURE_KEY)
        return None if data is None else FailureRecord.from_dict(data).claimed_error()

    # -- heartbeats ------------------------------------------------------------------
    def write_beat(self, beat: dict[str, Any]) -> None:
        self.js.set_json(heartbeat_key(self.node), beat)

    def read_beats(self) -> dict[int, dict[str, Any]]:
        """Every node's last heartbeat, in one round trip (forged ones skipped)."""
        payloads = self.js.multi_get([heartbeat_key(n) for n in range(self.nnodes)])
        beats = {}
        for node, payload in enumerate(payloads):
            if payload is not None:
                with contextlib.suppress(ValueError):
                    beats[node] = json.loads(payload)
        return beats

    # -- membership (elastic jobs) -------------------------------------------------------
    def publish_membership(self, membership: Membership) -> None:
        """Node 0: the nodes that go on after a loss (each node reads it every second).
        The first-failure claim of the group that lost them goes: it was that group's (a
        survivor's collective failing with the lost node), never a later root cause."""
        self.js.delete(FIRST_FAILED_KEY)
        self.js.delete(FIRST_FAILURE_KEY)
        self.js.set_json(MEMBERSHIP_KEY, membership.to_dict())

    def membership(self) -> Optional[Membership]:
        """The latest membership change; None before any (or forged, or unreadable).
        Raises when the store cannot be reached."""
        payload = self.js.get_present(MEMBERSHIP_KEY)
        try:
            data = json.loads(payload) if payload else None
            return Membership.from_dict(data) if isinstance(data, dict) else None
        except (KeyError, TypeError, ValueError):
            return None

    # -- what the job produced ---------------------------------------------------------
    def job_dir(self) -> Optional[str]:
        """Node 0's output dir (set when it hosted the store), None if it gave none."""
        payload = self.js.get(JOBDIR_KEY)
        return payload.decode() if payload else None

    def put_result(self, data: bytes) -> None:
        self.js.put_large(RESULT_KEY, data)

    def get_result(self) -> Optional[bytes]:
        return self.js.get_large(RESULT_KEY)

    def put_rows(self, rows: list[dict[str, Any]]) -> None:
        """This node's rows of the job summary (read by node 0)."""
        self.js.put_large(rows_key(self.node), json.dumps(rows).encode())

    def gather_rows(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Every node's summary rows, and the nodes that sent none."""
        rows: list[dict[str, Any]] = []
        missing = []
        for node in range(self.nnodes):
            try:
                data = self.js.get_large(rows_key(node))
                if data is None:
                    missing.append(node)
                    continue
                rows.extend(row for row in json.loads(data) if isinstance(row, dict))
            except Exception:
                missing.append(node)
        return rows, missing

    # -- stack requests (node 0 relays what it found in the output dir) -----------------
    def publish_stacks_request(self, request: str) -> None:
        count = self.js.counter(STACKS_COUNT_KEY, 1)
        self.js.set(stacks_key(count), request.encode())

    def stacks_requests(self, after: int) -> tuple[int, list[str]]:
        """Requests numbered above ``after``: (latest number, their ids)."""
        count = self.js.counter(STACKS_COUNT_KEY)
        found = []
        for n in range(after + 1, min(count, after + 16) + 1):  # the counter is unsigned
            payload = self.js.get(stacks_key(n))
            if payload is None:  # not written yet (or forged): read it next time
                break
            found.append(payload.decode(errors="replace"))
            after = n
        return after, found
