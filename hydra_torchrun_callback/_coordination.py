"""Tie the nodes of one multi-node job together through one TCPStore.

Node 0's Hydra process hosts the store on the job's rendezvous port; every
node's agent (node 0's too) joins it as a c10d rendezvous client, and the Hydra
processes use a private, signed key space in it (see :mod:`._store`) to:

- carry global rank 0's pickled return value to node 0, wherever rank 0 ran
  (under c10d rendezvous it need not be on node 0: pytorch #137402);
- publish the first failure (the root cause) so that every node reports it;
- beat: each node rewrites its heartbeat key every second (with its ranks' states and
  whether it is done); node 0 alone reads them all, in one round trip;
- stop: the job's one ``failure`` key, which every node polls.

So coordination costs O(n) store calls per second: node 0 watches the heartbeats and
publishes a lost node as the job's failure; the other nodes watch that one key. A
watchdog thread per node interrupts the local agent when the job failed elsewhere, so
no node waits for a collective or rendezvous timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional

from hydra_torchrun_callback._placement import Placement
from hydra_torchrun_callback._proc import stop_self
from hydra_torchrun_callback._result import (
    TorchrunJobError,
    TorchrunSetupError,
    is_crash,
    job_error,
)
from hydra_torchrun_callback._store import (
    ForeignStoreError,
    Signer,
    decode_error,
    encode_error,
    host_job_store,
    join_job_store,
)

__all__ = ["JobCoordinator", "StacksRelay"]

log = logging.getLogger("hydra_torchrun_callback")

_POLL_S = 0.25
#: The end of a job is waited for more closely (every node is idle by then): each poll is
#: one or two store reads, and it is on the critical path of every multi-node job.
_END_POLL_S = 0.05
#: Key a failing worker claims (compare_set) before its exception propagates: peers
#: only fail after it, so the claim orders the root cause before any consequence.
FIRST_FAILED_KEY = "first_failed_rank"
#: What the claiming worker raised (JSON), written right after its claim.
FIRST_FAILURE_KEY = "first_failure"
#: Environment variable telling workers where to claim it: "host:port prefix session".
JOB_STORE_ENV = "HYDRA_TORCHRUN_JOB_STORE"
_HEARTBEAT_S = 1.0
#: The job's failure slot holds this until a node fills it.
_NO_FAILURE = b""


def _hb(node: int) -> str:
    return f"hb/{node}"


class JobCoordinator:
    """This node's handle on the job store (node 0 hosts it)."""

    def __init__(
        self,
        placement: Placement,
        peer_timeout: float,
        secret: bytes,
        ports: Optional[Sequence[int]] = None,
        join_timeout: Optional[float] = None,
        abort: Optional[Callable[[TorchrunJobError], None]] = None,
        job_dir: Optional[str] = None,
    ):
        """``job_dir``: node 0's output dir, the one all nodes of the job work in."""
        assert placement.cluster is not None
        self.node = placement.node_rank
        self.nnodes = placement.max_nodes
        self.peer_timeout = peer_timeout
        host, port = placement.rdzv_endpoint.rsplit(":", 1)
        candidates = list(ports or [int(port)])
        prefix = f"hydra_torchrun/{placement.run_id}/"
        self.is_server = self.node == 0
        #: A peer that never beat counts as lost after this (it may start late).
        self.never_beat_timeout = join_timeout or max(2 * peer_timeout, 60.0)
        # Node 0 may start much later than the others (submitit can start nodes minutes
        # apart): wait for it as long as torch's rendezvous would.
        connect_timeout = 2 * peer_timeout if self.is_server else (join_timeout or 2 * peer_timeout)
        initial = {
            _hb(n): json.dumps({"beat": 0, "done": False}).encode() for n in range(self.nnodes)
        }
        initial["failure"] = _NO_FAILURE
        if job_dir:
            initial["jobdir"] = job_dir.encode()
        try:
            if self.is_server:
                self.js, chosen = host_job_store(
                    host, candidates, secret, placement.run_id, prefix, connect_timeout, initial
                )
            else:
                self.js, chosen = join_job_store(
                    host, candidates, secret, placement.run_id, prefix, connect_timeout
                )
        except Exception as exc:
            where = f"port {candidates[0]}" if len(candidates) == 1 else f"ports {candidates}"
            if self.is_server:
                raise TorchrunSetupError(
                    f"node 0 could not host the job's rendezvous store on {where} "
                    f"({type(exc).__name__}: {exc}). Other processes hold it: set "
                    "hydra.callbacks.torchrun.master_port to a free port (same on all nodes)."
                ) from exc
            why = str(exc) if isinstance(exc, ForeignStoreError) else f"{type(exc).__name__}: {exc}"
            raise TorchrunSetupError(
                f"node {self.node} could not reach the job's rendezvous store at {host} "
                f"({where}) within {connect_timeout:.0f}s: {why}. Is node 0 running, and does "
                "its address resolve from here (hydra.callbacks.torchrun.master_addr / "
                "local_addr)? Do all nodes share the key file "
                "~/.config/hydra-torchrun-callback/secret (or HYDRA_TORCHRUN_SECRET_FILE)? If "
                "another job holds the port, set hydra.callbacks.torchrun.master_port to a free "
                "port (same on all nodes)."
            ) from exc
        #: The placement with the port the store was found on.
        self.placement = replace(placement, rdzv_endpoint=f"{host}:{chosen}")
        self.store = self.js.store
        self.abort_reason: Optional[TorchrunJobError] = None
        #: What workers need to claim the first failure (see FIRST_FAILED_KEY).
        self.worker_env = {JOB_STORE_ENV: f"{host}:{chosen} {prefix} {self.js.signer.session}"}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._states: Optional[Callable[[], Mapping[int, str]]] = None
        self._beats = 0
        self._done = False
        self._outcome: Optional[dict[str, Any]] = None  # this node's error, in its done beat
        self._abort_lock = threading.Lock()
        self._peers: dict[int, dict[str, Any]] = {}  # node 0: the last heartbeats read
        self._lost: set[int] = set()  # node 0: peers its watchdog declared lost
        self._on_abort: Optional[Callable[[TorchrunJobError], None]] = abort

    @property
    def signer(self) -> Signer:
        return self.js.signer

    # -- what nodes tell each other --------------------------------------------
    def job_dir(self) -> Optional[str]:
        """Node 0's output dir (set when it hosted the store), None if it gave none."""
        payload = self.js.get("jobdir")
        return payload.decode() if payload else None

    def put_result(self, data: bytes) -> None:
        self.js.put_large("result", data)

    def first_failed_rank(self) -> Optional[int]:
        """The global rank whose worker raised first (claimed by the worker itself)."""
        payload = self.js.get(FIRST_FAILED_KEY)
        return None if payload is None else int(payload)

    def report_failure(self, error: TorchrunJobError) -> None:
        """Publish this node's failure. The root cause (the rank that claimed the first
        failure) always wins the job's slot; any other failure only fills an empty one.
        Each node's own report is kept too: it is the last word on that node's ranks."""
        blob = encode_error(error)
        self.js.set(f"failure/{self.node}", blob)
        if error.rank is not None and error.rank == self.first_failed_rank():
            self.js.set("failure", blob)
        else:
            self.js.replace_if("failure", _NO_FAILURE, blob)

    def _read_error(self, name: str) -> Optional[TorchrunJobError]:
        payload = self.js.get(name)
        if not payload:  # absent, forged, or the empty slot
            return None
        try:
            return decode_error(payload)  # type: ignore[no-any-return]
        except (ValueError, TypeError, KeyError):
            return None

    def _node_failure(self, node: int) -> Optional[TorchrunJobError]:
        return self._read_error(f"failure/{node}")

    def failure(self) -> Optional[TorchrunJobError]:
        payload = self.js.get_present("failure")
        if not payload:
            return None
        try:
            return decode_error(payload)  # type: ignore[no-any-return]
        except (ValueError, TypeError, KeyError):
            return None

    def claimed_failure(self) -> Optional[TorchrunJobError]:
        """The first failure as its worker described it (no agent needed)."""
        d = self.js.get_json(FIRST_FAILURE_KEY)
        if not isinstance(d, dict):
            return None
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
        self.js.put_large(f"rows/{self.node}", json.dumps(rows).encode())

    def gather_rows(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Node 0: every node's summary rows, and the nodes that sent none."""
        rows: list[dict[str, Any]] = []
        missing = []
        for node in range(self.nnodes):
            try:
                data = self.js.get_large(f"rows/{node}")
                if data is None:
                    missing.append(node)
                    continue
                rows.extend(row for row in json.loads(data) if isinstance(row, dict))
            except Exception:
                missing.append(node)
        return rows, missing

    def states_elsewhere(self) -> dict[int, str]:
        """Rank states the other nodes last published (node 0, for its heartbeat line)."""
        states: dict[int, str] = {}
        for peer, beat in list(self._peers.items()):
            if peer != self.node:
                published = beat.get("states") or {}
                states.update({int(rank): str(state) for rank, state in published.items()})
        return states

    # -- stack requests (node 0 relays what it found in the output dir) -----------
    def publish_stacks_request(self, request: str) -> None:
        count = self.js.counter("stacks/count", 1)
        self.js.set(f"stacks/{count}", request.encode())

    def stacks_requests(self, after: int) -> tuple[int, list[str]]:
        """Requests numbered above ``after``: (latest number, their ids)."""
        count = self.js.counter("stacks/count")
        found = []
        for n in range(after + 1, min(count, after + 16) + 1):  # the counter is unsigned
            payload = self.js.get(f"stacks/{n}")
            if payload is None:  # not written yet (or forged): read it next time
                break
            found.append(payload.decode(errors="replace"))
            after = n
        return after, found

    # -- heartbeats -----------------------------------------------------------------
    def _beat(self) -> None:
        self._beats += 1
        beat: dict[str, Any] = {"beat": self._beats, "done": self._done}
        if self._done:
            beat["error"] = self._outcome
        if self._states is not None and not self._done:
            beat["states"] = {str(k): v for k, v in self._states().items()}
        self.js.set_json(_hb(self.node), beat)

    def _read_beats(self) -> dict[int, dict[str, Any]]:
        """Node 0: every node's last heartbeat, in one round trip (forged ones skipped)."""
        payloads = self.js.multi_get([_hb(n) for n in range(self.nnodes)])
        beats = {}
        for node, payload in enumerate(payloads):
            if payload is not None:
                with contextlib.suppress(ValueError):
                    beats[node] = json.loads(payload)
        return beats

    def mark_done(self, error: Optional[BaseException] = None) -> None:
        """Say this node is done, and how its part ended (``error``: it failed)."""
        if error is not None and not isinstance(error, TorchrunJobError):
            error = TorchrunJobError(
                f"node {self.node} stopped before the job finished "
                f"({type(error).__name__}: {error})",
                node_rank=self.node,
            )
        self._outcome = None if error is None else json.loads(encode_error(error))
        self._done = True
        self._beat()

    def wait_all_done(self, timeout: float) -> list[int]:
        """Node 0: wait until every node has said done; return the ones that did not."""
        deadline = time.monotonic() + timeout
        while True:
            beats = self._read_beats()
            self._peers = beats
            missing = [n for n in range(self.nnodes) if not beats.get(n, {}).get("done")]
            # A peer already declared lost (its heartbeats stopped) will not say done.
            if not set(missing) - self._lost or time.monotonic() >= deadline:
                return missing
            time.sleep(_END_POLL_S)

    def failed_node(self) -> Optional[TorchrunJobError]:
        """Node 0, after :meth:`wait_all_done`: the first node whose done beat says it
        failed. Each node writes that beat once, signed with this run's session, so a
        forged or emptied failure key cannot turn a failed job into a completed one."""
        for node in range(self.nnodes):
            error = self._peers.get(node, {}).get("error")
            if isinstance(error, dict):
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    return decode_error(json.dumps(error).encode())  # type: ignore[no-any-return]
        return None

    def wait_result(self, timeout: float) -> Optional[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.js.get_large("result")
            if data is not None:
                return data
            if self.failure() is not None:
                return None
            time.sleep(_END_POLL_S)
        return None

    # -- the watchdog -------------------------------------------------------------
    def start_watchdog(self, states: Optional[Callable[[], Mapping[int, str]]] = None) -> None:
        """Beat, and watch the job's failure key (node 0: every node's heartbeat too);
        ``states`` gives this node's rank states to publish."""
        self._states = states
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="torchrun-watchdog", daemon=True)
        self._thread.start()

    def stop_watchdog(self) -> None:
        with self._abort_lock:  # no abort once the launch is over (see _abort)
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _abort(self, reason: TorchrunJobError) -> None:
        """Interrupt this node's agent: it stops its workers and returns."""
        with self._abort_lock:
            if self.abort_reason is not None or self._stop.is_set():
                return  # a watchdog late out of a store call must not signal a later job
            self.abort_reason = reason
            log.error("stopping this node's workers: %s", str(reason).splitlines()[0])
            if self._on_abort is not None:
                self._on_abort(reason)
            else:
                stop_self(signal.SIGTERM)

    def _watch(self) -> None:
        last_beat = 0.0
        seen: dict[int, tuple[int, float]] = {}
        started = time.monotonic()
        unreachable_since: Optional[float] = None
        while not self._stop.wait(_POLL_S):
            now = time.monotonic()
            try:
                beat_due = now - last_beat >= _HEARTBEAT_S
                if beat_due:
                    self._beat()
                    last_beat = now
                failure = self.failure()
                if self.is_server and beat_due:
                    self._peers = self._read_beats()
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
            if self.is_server and beat_due:
                lost = self._lost_peer(seen, now, now - started)
                if lost is not None:
                    if lost.node_rank is not None and not self._stop.is_set():
                        self._lost.add(lost.node_rank)
                    with contextlib.suppress(Exception):
                        self.report_failure(lost)
                    self._abort(lost)
                    return

    def _lost_peer(
        self, seen: dict[int, tuple[int, float]], now: float, running: float
    ) -> Optional[TorchrunJobError]:
        """Node 0: the first peer whose heartbeat stopped (or never started in time)."""
        for peer in range(1, self.nnodes):
            last, since = seen.get(peer, (-1, now))
            beat = self._peers.get(peer)
            if beat is not None and beat.get("done"):
                continue
            # A forged, unreadable or replayed (older) beat counts as no beat: only a higher
            # count than seen before is progress, so it cannot hide a lost node.
            count = int(beat.get("beat", 0)) if beat is not None else max(last, 0)
            if count > last:
                seen[peer] = (count, now)
            elif last > 0 and now - since > self.peer_timeout:
                return TorchrunJobError(
                    f"node {peer} stopped sending heartbeats {now - since:.0f}s ago "
                    "(its Hydra/agent process died or hangs): the job cannot finish",
                    node=str(peer),
                    node_rank=peer,
                )
            elif last <= 0 and running > self.never_beat_timeout:
                return TorchrunJobError(
                    f"node {peer} never joined the job's store within "
                    f"{self.never_beat_timeout:.0f}s (it did not start, or cannot reach node 0)",
                    node=str(peer),
                    node_rank=peer,
                )
        return None

    def close(self) -> None:
        """Stop watching; node 0's store closes now (not at some garbage collection), so
        the next job of a sweep can never find this job's store and hello."""
        self.stop_watchdog()
        self.js.store = None
        self.store = None


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
