"""Tie the nodes of one multi-node job together through one TCPStore.

Node 0's Hydra process hosts the store on the job's rendezvous port; every
node's agent (node 0's too) joins it as a c10d rendezvous client, and the Hydra
processes use a private key space in it to:

- carry global rank 0's pickled return value to node 0, wherever rank 0 ran
  (under c10d rendezvous it need not be on node 0: pytorch #137402);
- publish the first failure (the root cause) so that every node reports it;
- mark each node done, so node 0 keeps the store up until everyone has read it;
- exchange heartbeats, so a node whose Hydra process died is noticed.

A watchdog thread per node interrupts the local agent when another node failed
or went silent, so no node waits for a collective or rendezvous timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Optional

from hydra_torchrun_callback._placement import Placement
from hydra_torchrun_callback._result import (
    TorchrunJobError,
    TorchrunSetupError,
    is_crash,
    job_error,
)

__all__ = ["JobCoordinator", "StacksRelay"]

log = logging.getLogger("hydra_torchrun_callback")

_POLL_S = 0.25
#: Key a failing worker claims (compare_set) before its exception propagates: peers
#: only fail after it, so the claim orders the root cause before any consequence.
FIRST_FAILED_KEY = "first_failed_rank"
#: What the claiming worker raised (JSON), written right after its claim.
FIRST_FAILURE_KEY = "first_failure"
#: Environment variable telling workers where to claim it: "host:port prefix".
JOB_STORE_ENV = "HYDRA_TORCHRUN_JOB_STORE"
_HEARTBEAT_S = 1.0


def _open_store(host: str, port: int, server: bool, timeout: float) -> Any:
    """Host (node 0) or join the job's TCPStore, within ``timeout`` seconds.

    A client's handshake can block for ever when something else listens on the
    port (node 0 could not host the store there): the connection is made in a
    helper thread and abandoned past the deadline.
    """
    import torch.distributed as dist

    def connect() -> Any:
        return dist.TCPStore(  # type: ignore[attr-defined]
            host_name=host,
            port=port,
            world_size=None,
            is_master=server,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
            multi_tenant=False,
        )

    if server:
        return connect()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["store"] = connect()
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="torchrun-store-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if "store" in box:
        return box["store"]
    raise box.get("error") or TimeoutError(f"no job store answered at {host}:{port}")


class JobCoordinator:
    """This node's handle on the job store (node 0 hosts it)."""

    def __init__(self, placement: Placement, peer_timeout: float):
        assert placement.cluster is not None
        self.placement = placement
        self.node = placement.node_rank
        self.nnodes = placement.max_nodes
        self.peer_timeout = peer_timeout
        host, port = placement.rdzv_endpoint.rsplit(":", 1)
        self.prefix = f"hydra_torchrun/{placement.run_id}/"
        self.is_server = self.node == 0
        # Node 0 may start a little later than the others (imports, scheduling).
        connect_timeout = 2 * peer_timeout
        try:
            self.store = _open_store(host, int(port), self.is_server, connect_timeout)
        except Exception as exc:
            if self.is_server:
                raise TorchrunSetupError(
                    f"node 0 could not host the job's rendezvous store on port {port} "
                    f"({type(exc).__name__}: {exc}). Another process holds it: set "
                    "hydra.callbacks.torchrun.master_port to a free port (same on all nodes)."
                ) from exc
            raise TorchrunSetupError(
                f"node {self.node} could not reach the job's rendezvous store at "
                f"{placement.rdzv_endpoint} within {connect_timeout:.0f}s "
                f"({type(exc).__name__}: {exc}). Is node 0 running, and does its address "
                "resolve from here? (set hydra.callbacks.torchrun.master_addr / local_addr)"
            ) from exc
        self.abort_reason: Optional[TorchrunJobError] = None
        #: What workers need to claim the first failure (see FIRST_FAILED_KEY).
        self.worker_env = {JOB_STORE_ENV: f"{host}:{port} {self.prefix}"}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._states: Optional[Callable[[], Mapping[int, str]]] = None
        self._main_pid = os.getpid()

    # -- keys -----------------------------------------------------------------
    def _key(self, name: str) -> str:
        return self.prefix + name

    def _set(self, name: str, value: bytes) -> None:
        self.store.set(self._key(name), value)

    def _has(self, name: str) -> bool:
        return bool(self.store.check([self._key(name)]))

    def _get(self, name: str) -> bytes:
        return bytes(self.store.get(self._key(name)))

    # -- what nodes tell each other --------------------------------------------
    def put_result(self, data: bytes) -> None:
        self._set("result", data)

    def first_failed_rank(self) -> Optional[int]:
        """The global rank whose worker raised first (claimed by the worker itself)."""
        if not self._has(FIRST_FAILED_KEY):
            return None
        return int(self.store.get(self._key(FIRST_FAILED_KEY)))

    def report_failure(self, error: TorchrunJobError) -> None:
        """Publish this node's failure. The root cause (the rank that claimed the first
        failure) always wins the job's slot; any other failure only fills an empty one.
        Each node's own report is kept too: it is the last word on that node's ranks."""
        blob = pickle.dumps(error)
        self._set(f"failure/{self.node}", blob)
        if error.rank is not None and error.rank == self.first_failed_rank():
            self._set("failure", blob)
        else:
            self.store.compare_set(self._key("failure"), "", blob)

    def _read_error(self, name: str) -> Optional[TorchrunJobError]:
        if not self._has(name):
            return None
        err = pickle.loads(self._get(name))
        return err if isinstance(err, TorchrunJobError) else None

    def _node_failure(self, node: int) -> Optional[TorchrunJobError]:
        return self._read_error(f"failure/{node}")

    def failure(self) -> Optional[TorchrunJobError]:
        return self._read_error("failure")

    def claimed_failure(self) -> Optional[TorchrunJobError]:
        """The first failure as its worker described it (no agent needed)."""
        if not self._has(FIRST_FAILURE_KEY):
            return None
        d = json.loads(self._get(FIRST_FAILURE_KEY))
        return job_error(
            rank=int(d["rank"]),
            local_rank=int(d["local_rank"]),
            node=str(d["node"]),
            node_rank=int(d["node_rank"]),
            what=f"raised {d['exc_type']}: {d['exc_message']}",
            exc_type=str(d["exc_type"]),
            exc_message=str(d["exc_message"]),
            traceback=str(d["traceback"]),
            exitcode=1,  # what torch's @record makes of a raised exception
        )

    def root_cause(
        self,
        own: Optional[TorchrunJobError],
        timeout: float,
        grace: float = 2.0,
        settle: float = 1.0,
    ) -> Optional[TorchrunJobError]:
        """The job's root cause, waiting at most ``timeout`` seconds for it.

        A crashed worker (killed by a signal, reported by its node's agent) comes first:
        it could not claim anything, and its peers' errors follow from it, so every
        answer waits ``settle`` seconds for such a report. Otherwise the rank that
        claimed the first failure names the node to ask: that node's agent report is the
        last word; if it sends none within ``grace`` (its agent was stopped by another
        node's failure first), the claimer's own description is used. Without a claim:
        the first failure published, else ours."""
        start = time.monotonic()
        answer: Optional[TorchrunJobError] = None
        answered_at = 0.0
        while True:
            waited = time.monotonic() - start
            crash = self._crash_report()
            if crash is not None:
                return crash
            if answer is None:
                answer = self._root_candidate(waited >= grace)
                answered_at = waited
            if answer is not None and waited - answered_at >= settle:
                return answer
            if waited >= timeout:
                return answer or self.failure() or own
            time.sleep(_POLL_S)

    def _crash_report(self) -> Optional[TorchrunJobError]:
        for node in range(self.nnodes):
            with contextlib.suppress(Exception):
                report = self._node_failure(node)
                if report is not None and is_crash(report.exitcode):
                    return report
        return None

    def _root_candidate(self, claim_is_enough: bool) -> Optional[TorchrunJobError]:
        first, failure = self.first_failed_rank(), self.failure()
        if failure is not None and (first is None or failure.rank == first):
            return failure
        with contextlib.suppress(Exception):
            claimed = self.claimed_failure() if first is not None else None
            if claimed is not None and claimed.rank == first:
                assert claimed.node_rank is not None
                report = self._node_failure(claimed.node_rank)
                if report is not None:
                    return report
                if claim_is_enough:
                    return claimed
        return None

    def put_rows(self, rows: list[dict[str, Any]]) -> None:
        """This node's rows of the job summary (read by node 0)."""
        self._set(f"rows/{self.node}", json.dumps(rows).encode())

    def gather_rows(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Node 0: every node's summary rows, and the nodes that sent none."""
        rows: list[dict[str, Any]] = []
        missing = []
        for node in range(self.nnodes):
            try:
                if not self._has(f"rows/{node}"):
                    missing.append(node)
                    continue
                rows.extend(json.loads(self._get(f"rows/{node}")))
            except Exception:
                missing.append(node)
        return rows, missing

    def states_elsewhere(self) -> dict[int, str]:
        """Rank states the other nodes last published (for node 0's heartbeat)."""
        states: dict[int, str] = {}
        for peer in range(self.nnodes):
            if peer == self.node:
                continue
            with contextlib.suppress(Exception):
                if self._has(f"states/{peer}"):
                    published = json.loads(self._get(f"states/{peer}"))
                    states.update({int(rank): str(state) for rank, state in published.items()})
        return states

    # -- stack requests (node 0 relays what it found in the output dir) -----------
    def publish_stacks_request(self, request: str) -> None:
        count = self.store.add(self._key("stacks/count"), 1)
        self._set(f"stacks/{count}", request.encode())

    def stacks_requests(self, after: int) -> tuple[int, list[str]]:
        """Requests numbered above ``after``: (latest number, their ids)."""
        count = int(self.store.add(self._key("stacks/count"), 0))
        return count, [self._get(f"stacks/{n}").decode() for n in range(after + 1, count + 1)]

    def mark_done(self) -> None:
        self._set(f"done/{self.node}", b"1")

    def wait_all_done(self, timeout: float) -> list[int]:
        """Node 0: wait until every node has said done; return the ones that did not."""
        deadline = time.monotonic() + timeout
        missing = list(range(self.nnodes))
        while missing and time.monotonic() < deadline:
            missing = [n for n in missing if not self._has(f"done/{n}")]
            if missing:
                time.sleep(_POLL_S)
        return missing

    def wait_result(self, timeout: float) -> Optional[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._has("result"):
                return self._get("result")
            if self.failure() is not None:
                return None
            time.sleep(_POLL_S)
        return None

    # -- the watchdog -------------------------------------------------------------
    def start_watchdog(self, states: Optional[Callable[[], Mapping[int, str]]] = None) -> None:
        """Watch the other nodes; ``states`` gives this node's rank states to publish."""
        self._states = states
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="torchrun-watchdog", daemon=True)
        self._thread.start()

    def stop_watchdog(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _abort(self, reason: TorchrunJobError) -> None:
        """Interrupt this node's agent: it stops its workers and returns."""
        if self.abort_reason is None:
            self.abort_reason = reason
            log.error("stopping this node's workers: %s", str(reason).splitlines()[0])
            os.kill(self._main_pid, signal.SIGTERM)

    def _watch(self) -> None:
        last_beat = 0.0
        seen: dict[int, tuple[int, float]] = {}
        unreachable_since: Optional[float] = None
        while not self._stop.wait(_POLL_S):
            now = time.monotonic()
            try:
                if now - last_beat >= _HEARTBEAT_S:
                    self.store.add(self._key(f"hb/{self.node}"), 1)
                    if self._states is not None:
                        self._set(f"states/{self.node}", json.dumps(self._states()).encode())
                    last_beat = now
                failure = self.failure()
                unreachable_since = None
            except Exception as exc:  # the store (node 0) is gone
                unreachable_since = unreachable_since or now
                if now - unreachable_since > min(self.peer_timeout, 10.0):
                    self._abort(
                        TorchrunJobError(
                            f"node {self.node} lost contact with node 0, which hosts the job's "
                            f"store ({type(exc).__name__}: {exc}); node 0 probably died",
                            node=self.placement.rdzv_endpoint.rsplit(":", 1)[0],
                            node_rank=0,
                        )
                    )
                    return
                continue
            if failure is not None and failure.node_rank != self.node:
                self._abort(failure)
                return
            for peer in range(self.nnodes):
                if peer == self.node:
                    continue
                try:
                    beats = self.store.add(self._key(f"hb/{peer}"), 0)
                except Exception:
                    break
                if self._has(f"done/{peer}"):
                    continue
                count, since = seen.get(peer, (-1, now))
                if beats != count:
                    seen[peer] = (beats, now)
                elif beats > 0 and now - since > self.peer_timeout:
                    err = TorchrunJobError(
                        f"node {peer} stopped sending heartbeats {now - since:.0f}s ago "
                        "(its Hydra/agent process died or hangs): the job cannot finish",
                        node=str(peer),
                        node_rank=peer,
                    )
                    with contextlib.suppress(Exception):
                        self.report_failure(err)
                    self._abort(err)
                    return

    def close(self) -> None:
        self.stop_watchdog()


class StacksRelay:
    """Stack requests from node 0 to the other nodes (see ``_stacks.StackService``)."""

    def __init__(self, coord: JobCoordinator) -> None:
        self.coord = coord
        self.seen = 0

    def publish(self, request: str) -> None:
        self.coord.publish_stacks_request(request)

    def poll(self) -> list[str]:
        self.seen, new = self.coord.stacks_requests(self.seen)
        return new
