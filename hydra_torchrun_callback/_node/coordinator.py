"""Tie the nodes of one multi-node job together through one TCPStore.

Node 0's Hydra process hosts the store on the job's rendezvous port; every
node's agent (node 0's too) joins it as a c10d rendezvous client, and the Hydra
processes use a private, signed key space in it (see :mod:`.._wire.store`) to:

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

An elastic job (nnodes=MIN:MAX, MIN < MAX) with restarts left takes a lost node as a
membership change instead: node 0 publishes the nodes that go on (``membership``), and
every survivor stops its workers of a group that still counts the lost node. Its agent
sees them fail, spends one of torch's restarts and re-rendezvouses with the survivors, as
torchrun's would after a failed collective; the agent itself is never signalled.

Node 0 is not special in an elastic job whose nodes share a directory (submitit's folder):
the store is a FileStore there (torch's rendezvous too, ``store_type=file``), every node
reads every heartbeat, and the lowest node not lost acts for the job (:meth:`leads`):
it decides membership changes, waits for the end and writes the summary. Every node that
finishes returns rank 0's value, so the job's value survives whichever task is lost.

Split the way torch's dynamic rendezvous is: :class:`JobCoordinator` here connects and
runs the watchdog; what it knows is a :class:`.job_state.JobState`, what it does on the
store is :class:`.job_ops.JobOps` (every key is named there), and what it decides is
:mod:`.job_decisions` (pure functions, unit-tested without a store).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional

from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._node import job_decisions as decide
from hydra_torchrun_callback._node.job_ops import JobOps, initial_keys
from hydra_torchrun_callback._node.job_state import JobState
from hydra_torchrun_callback._node.placement import Placement
from hydra_torchrun_callback._node.records import NodeRecords
from hydra_torchrun_callback._proc import descendants, stop_self, worker_root
from hydra_torchrun_callback._result import FailureRecord, TorchrunJobError, TorchrunSetupError
from hydra_torchrun_callback._wire.protocol import JOB_STORE_ENV, SECRET_FILE_ENV, job_prefix
from hydra_torchrun_callback._wire.store import (
    ForeignStoreError,
    JobStore,
    Signer,
    host_job_store,
    join_job_store,
    open_shared_job_store,
)

__all__ = ["JobCoordinator", "StacksRelay"]


_POLL_S = 0.25
#: The end of a job is waited for more closely (every node is idle by then): each poll is
#: one or two store reads, and it is on the critical path of every multi-node job.
_END_POLL_S = 0.05
_HEARTBEAT_S = 1.0
#: An elastic job's nodes wait this long for each other before the first rendezvous (torch's
#: last_call default): its short last_call_timeout is for later rounds, not for a node that
#: starts a few seconds after the others.
ELASTIC_GATHER_S = 30.0
#: A gap this long between two of this node's store reads restarts its clock on the peers.
STALL_S = 5.0


def open_job_store(
    placement: Placement,
    candidates: Sequence[int],
    secret: bytes,
    timeout: float,
    initial: Mapping[str, bytes],
) -> tuple[JobStore, int]:
    """Node 0 hosts the job's store on the first free candidate port (with ``initial``
    keys); every other node joins the one that proves it belongs to the job. Returns the
    store and its port (0: the shared FileStore of an elastic job, which the first node
    there creates); a clear setup error naming the fix otherwise."""
    host = placement.rdzv_endpoint.rsplit(":", 1)[0]
    prefix = job_prefix(placement.run_id)
    node = placement.node_rank
    if placement.store_dir is not None:
        try:
            job_store, _ = open_shared_job_store(
                placement.store_dir, secret, placement.run_id, prefix, timeout, dict(initial)
            )
        except Exception as exc:
            raise TorchrunSetupError(
                f"node {node} could not open the job's store in {placement.store_dir} "
                f"({type(exc).__name__}: {exc}). It must be on a file system every node "
                "shares, with working file locks (NFS does; Lustre needs -o flock), as "
                "submitit's folder (hydra.launcher.submitit_folder) is."
            ) from exc
        return job_store, 0
    try:
        if node == 0:
            return host_job_store(
                host, candidates, secret, placement.run_id, prefix, timeout, dict(initial)
            )
        return join_job_store(host, candidates, secret, placement.run_id, prefix, timeout)
    except Exception as exc:
        where = f"port {candidates[0]}" if len(candidates) == 1 else f"ports {list(candidates)}"
        if node == 0:
            raise TorchrunSetupError(
                f"node 0 could not host the job's rendezvous store on {where} "
                f"({type(exc).__name__}: {exc}). Other processes hold it: set "
                "hydra.callbacks.torchrun.master_port to a free port (same on all nodes)."
            ) from exc
        why = str(exc) if isinstance(exc, ForeignStoreError) else f"{type(exc).__name__}: {exc}"
        raise TorchrunSetupError(
            f"node {node} could not reach the job's rendezvous store at {host} "
            f"({where}) within {timeout:.0f}s: {why}. Is node 0 running, and does "
            "its address resolve from here (hydra.callbacks.torchrun.master_addr / "
            "local_addr)? Do all nodes share the key file "
            f"~/.config/hydra-torchrun-callback/secret (or {SECRET_FILE_ENV})? If "
            "another job holds the port, set hydra.callbacks.torchrun.master_port to a free "
            "port (same on all nodes)."
        ) from exc


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
        max_restarts: int = 0,
        records: Optional[NodeRecords] = None,
    ):
        """``job_dir``: node 0's output dir, the one all nodes of the job work in;
        ``records``: this node's worker records (an elastic job stops stale workers)."""
        assert placement.cluster is not None
        self.node = placement.node_rank
        assert placement.cluster is not None
        #: The job's tasks: every one beats (MAX of them form the group, the rest are spares).
        self.nnodes = placement.cluster.num_tasks
        self.max_nodes = placement.max_nodes
        self.min_nodes = placement.min_nodes
        self.max_restarts = max_restarts
        self.peer_timeout = peer_timeout
        self._records = records
        #: The membership change this node acted on last, and workers it asked to stop.
        self._epoch = 0
        self._stopping: Optional[tuple[float, decide.Membership]] = None
        prefix = job_prefix(placement.run_id)
        #: The job's store is a shared FileStore (an elastic job): no node hosts it.
        self.shared = placement.store_dir is not None
        self.is_server = self.node == 0 and not self.shared
        #: A peer that never beat counts as lost after this (it may start late).
        self.never_beat_timeout = join_timeout or max(2 * peer_timeout, 60.0)
        # Node 0 may start much later than the others (submitit can start nodes minutes
        # apart): wait for it as long as torch's rendezvous would.
        connect_timeout = 2 * peer_timeout if self.is_server else (join_timeout or 2 * peer_timeout)
        if self.shared:
            assert placement.store_dir is not None
            candidates: list[int] = []
            address = "file:" + os.path.join(placement.store_dir, "job")
        else:
            host, port = placement.rdzv_endpoint.rsplit(":", 1)
            candidates = list(ports or placement.store_ports or [int(port)])
        self.js, chosen = open_job_store(
            placement, candidates, secret, connect_timeout, initial_keys(self.nnodes, job_dir)
        )
        if not self.shared:
            #: The placement with the port the store was found on.
            placement = replace(placement, rdzv_endpoint=f"{host}:{chosen}")
            address = f"{host}:{chosen}"
        self.placement = placement
        self.store = self.js.store
        self.ops = JobOps(self.js, self.node, self.nnodes)
        self.state = JobState(node=self.node, nnodes=self.nnodes)
        #: What workers need to claim the first failure (see _wire.protocol.FIRST_FAILED_KEY).
        self.worker_env = {JOB_STORE_ENV: f"{address} {prefix} {self.js.signer.session}"}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._states: Optional[Callable[[], Mapping[int, str]]] = None
        self._abort_lock = threading.Lock()
        self._on_abort: Optional[Callable[[TorchrunJobError], None]] = abort
        if self.elastic:
            self._beat()  # joined: see wait_for_nodes

    @property
    def signer(self) -> Signer:
        return self.js.signer

    def leads(self, also_lost: Collection[int] = ()) -> bool:
        """Whether this node acts for the job (watches the others, decides, waits for the
        end, writes the summary): node 0; with a shared store, the lowest node not lost
        (``also_lost``: nodes this node just found silent)."""
        if not self.shared:
            return self.node == 0
        gone = self.state.lost | set(also_lost)
        # A node the others declared lost (it was slow) never leads again.
        return self.node not in gone and all(n in gone for n in range(self.node))

    @property
    def abort_reason(self) -> Optional[TorchrunJobError]:
        """Why this node's agent was interrupted (a failure elsewhere), if it was."""
        return self.state.abort_reason

    # -- what nodes tell each other (``ops``: the store operations, see job_ops) ----------
    def report_failure(self, error: TorchrunJobError) -> None:
        self.ops.report_failure(error)

    def failure(self) -> Optional[TorchrunJobError]:
        """The job's published failure (raises when the store cannot be reached)."""
        return self.ops.failure()

    def states_elsewhere(self) -> dict[int, str]:
        """Rank states the other nodes last published (node 0, for its heartbeat line)."""
        return self.state.states_elsewhere()

    def root_cause(
        self,
        own: Optional[TorchrunJobError],
        timeout: float,
        grace: float = 2.0,
        settle: float = 1.0,
    ) -> Optional[TorchrunJobError]:
        """The job's root cause, waiting at most ``timeout`` seconds for it.

        A crashed worker (killed by a signal, reported by its node's agent) comes first;
        every answer waits ``settle`` seconds for such a report. Otherwise the rank that
        claimed the first failure names the node to ask; if that node sends no report
        within ``grace``, the claimer's own description is used. Without a claim: the
        first failure published, else ours (see :func:`.job_decisions.root_candidate`)."""
        start = time.monotonic()
        answer: Optional[TorchrunJobError] = None
        answered_at = 0.0
        while True:
            waited = time.monotonic() - start
            crash = decide.crash_report(self.ops.node_failures())
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

    def _root_candidate(self, claim_is_enough: bool) -> Optional[TorchrunJobError]:
        first, failure = self.ops.first_failed_rank(), self.failure()
        claimed = claimer_report = None
        if first is not None and (failure is None or failure.rank != first):
            try:
                claimed = self.ops.claimed_failure()
                if claimed is not None and claimed.node_rank is not None:
                    claimer_report = self.ops.node_failure(claimed.node_rank)
            except Exception:
                claimed = None
        return decide.root_candidate(first, failure, claimed, claimer_report, claim_is_enough)

    # -- heartbeats -----------------------------------------------------------------
    def _beat(self) -> None:
        self.state.beats += 1
        states = self._states() if self._states is not None and not self.state.done else None
        self.ops.write_beat(
            decide.beat_payload(
                self.state.beats, self.state.done, self.state.outcome, states, self._own_restarts()
            )
        )

    def mark_done(self, error: Optional[BaseException] = None) -> None:
        """Say this node is done, and how its part ended (``error``: it failed)."""
        if error is not None and not isinstance(error, TorchrunJobError):
            error = TorchrunJobError(
                f"node {self.node} stopped before the job finished "
                f"({type(error).__name__}: {error})",
                node_rank=self.node,
            )
        self.state.outcome = None if error is None else FailureRecord.of(error).to_dict()
        self.state.done = True
        self._beat()

    def wait_for_nodes(self, timeout: float = ELASTIC_GATHER_S) -> list[int]:
        """An elastic job, before its first rendezvous: wait until every node joined the
        job's store (or ``timeout``), so the first group has them all; the ones that did
        not join in time (they join a later round)."""
        deadline = time.monotonic() + timeout
        while True:
            beats = self.ops.read_beats()
            missing = [n for n in range(self.nnodes) if int(beats.get(n, {}).get("beat", 0)) < 1]
            if not missing or time.monotonic() >= deadline:
                if missing:
                    log.warning(
                        "elastic: starting without nodes %s (not there after %.0fs); they "
                        "join a later round",
                        missing,
                        timeout,
                    )
                return missing
            time.sleep(_POLL_S)

    def wait_all_done(self, timeout: float) -> list[int]:
        """The leader: wait until every node has said done; return the ones that did not."""
        start = time.monotonic()
        deadline = start + timeout
        # Peers stop beating when their agent returns; a slow one (finding a root cause)
        # is lost only peer_timeout after this wait began.
        self.state.progress = {
            n: decide.Progress(p.count, max(p.since, start)) for n, p in self.state.progress.items()
        }
        while True:
            self.state.peers = self.ops.read_beats()
            missing = decide.nodes_not_done(self.state.peers, self.nnodes)
            now = time.monotonic()
            if self.elastic:  # an elastic job may end before node 0 noticed a loss
                self._lost_at_end(now)
            # A peer already declared lost (its heartbeats stopped) will not say done.
            if not set(missing) - self.state.lost or now >= deadline:
                return missing
            time.sleep(_END_POLL_S)

    def settle_leader(self, timeout: float) -> bool:
        """A node of a job with a shared store that does not lead at its end: wait until
        every live node below it said done (then it does not lead) or fell silent (then it
        leads, and waits for the end in their place). Whether it leads."""
        if not self.shared or self.leads():
            return self.leads()
        start = time.monotonic()
        self.state.progress = {
            n: decide.Progress(p.count, max(p.since, start)) for n, p in self.state.progress.items()
        }
        while time.monotonic() < start + timeout:
            self.state.peers = self.ops.read_beats()
            below = [n for n in range(self.node) if n not in self.state.lost]
            if all(self.state.peers.get(n, {}).get("done") for n in below):
                return False
            self._lost_at_end(time.monotonic())
            if self.leads():
                return True
            time.sleep(_END_POLL_S)
        return self.leads()

    def _lost_at_end(self, now: float) -> None:
        # running=0: a node that never beat was noticed while the job ran
        lost = self._next_lost(now, 0.0, self.state.lost)
        if lost is not None and lost.node_rank is not None:
            self.state.lost.add(lost.node_rank)
            self._note_change(lost, sorted(self.state.lost), now, at_end=True)

    def failed_node(self) -> Optional[TorchrunJobError]:
        """Node 0, after :meth:`wait_all_done`: the first node whose done beat says it
        failed (see :func:`.job_decisions.failed_node`)."""
        error = decide.failed_node(self.state.peers, self.nnodes)
        if error is None:
            return None
        try:
            return FailureRecord.from_dict(error).error()
        except (ValueError, TypeError, KeyError):
            return None

    def wait_result(self, timeout: float) -> Optional[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.ops.get_result()
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
            if self.state.abort_reason is not None or self._stop.is_set():
                return  # a watchdog late out of a store call must not signal a later job
            self.state.abort_reason = reason
            log.error("stopping this node's workers: %s", str(reason).splitlines()[0])
            if self._on_abort is not None:
                self._on_abort(reason)
            else:
                stop_self(signal.SIGTERM)

    def _watch(self) -> None:
        last_beat = 0.0
        started = time.monotonic()
        unreachable_since: Optional[float] = None
        last_ok = started
        while not self._stop.wait(_POLL_S):
            now = time.monotonic()
            if now - last_ok > STALL_S:
                # This node could not look for a while (a stalled shared file system, a
                # paused process): the peers' silence in that time is not theirs.
                self.state.progress = {
                    n: decide.Progress(p.count, max(p.since, now))
                    for n, p in self.state.progress.items()
                }
            try:
                beat_due = now - last_beat >= _HEARTBEAT_S
                if beat_due:
                    self._beat()
                    last_beat = now
                failure = self.failure()
                if (self.is_server or self.shared) and beat_due:
                    self.state.peers = self.ops.read_beats()
                membership = self.ops.membership() if beat_due and self.elastic else None
                unreachable_since = None
                last_ok = time.monotonic()
            except Exception as exc:  # the store (node 0) is gone
                unreachable_since = unreachable_since or now
                if decide.store_lost(unreachable_since, now, self.peer_timeout):
                    self._abort(self._store_lost(exc))
                    return
                continue
            if decide.stop_for(failure, self.node):
                assert failure is not None
                self._abort(failure)
                return
            try:
                if membership is not None and membership.epoch > self._epoch:
                    self._reform(membership)
                self._finish_stopping(now)
            except Exception as exc:  # never the end of the watchdog
                log.warning("elastic: could not stop this node's stale workers: %s", exc)
            watches = self.is_server or self.shared
            if watches and beat_due and self._watch_peers(now, now - started):
                return

    def _store_lost(self, exc: BaseException) -> TorchrunJobError:
        if self.shared:
            return TorchrunJobError(
                f"node {self.node} lost access to the job's store in "
                f"{self.placement.store_dir} ({type(exc).__name__}: {exc}); is the shared "
                "file system still mounted here?",
                node_rank=self.node,
            )
        return TorchrunJobError(
            f"node {self.node} lost contact with node 0, which hosts the job's "
            f"store ({type(exc).__name__}: {exc}); node 0 probably died",
            node=self.placement.rdzv_endpoint.rsplit(":", 1)[0],
            node_rank=0,
        )

    def _next_lost(
        self, now: float, running: float, known: Collection[int]
    ) -> Optional[TorchrunJobError]:
        """The leader: the first peer not in ``known`` whose heartbeats stopped (the progress
        table takes the beats last read)."""
        lost, self.state.progress = decide.lost_peer(
            self.state.peers,
            self.state.progress,
            now,
            running,
            self.nnodes,
            self.peer_timeout,
            self.never_beat_timeout,
            known=known,
            me=self.node,
        )
        return lost

    @property
    def elastic(self) -> bool:
        """nnodes=MIN:MAX with MIN < MAX: a lost node may be a membership change."""
        return self.min_nodes < self.nnodes

    def _watch_peers(self, now: float, running: float) -> bool:
        """The leading node: a lost peer is a membership change (elastic, enough nodes
        and restarts left) or the job's failure, which stops it; True if it stops. With a
        shared store every node looks: one that finds every node below it lost leads."""
        lost = self._next_lost(now, running, self.state.lost)
        if lost is None or lost.node_rank is None:
            return False
        found = {lost.node_rank}
        while self.elastic:  # nodes lost together are decided together
            more = self._next_lost(now, running, self.state.lost | found)
            if more is None or more.node_rank is None:
                break
            found.add(more.node_rank)
        if not self.leads(found):
            return False  # a live node below this one decides
        gone = sorted(self.state.lost | found)
        why = decide.cannot_go_on(
            gone, self.nnodes, self.min_nodes, self.max_restarts, self._restarts_used()
        )
        if why is not None and self.elastic and self._reformed(len(gone), lost.node_rank, now):
            why = None  # torch's agents re-formed the group without it already
        if not self._stop.is_set():
            self.state.lost.update(found)
        if why is None:
            membership = self._note_change(lost, gone, now)
            with contextlib.suppress(Exception):
                self.ops.publish_membership(membership)
            self._reform(membership)
            return False
        failure = decide.lost_nodes_error(lost, gone, why) if self.elastic else lost
        with contextlib.suppress(Exception):
            self.report_failure(failure)
        self._abort(failure)
        return True

    def _note_change(
        self, lost: TorchrunJobError, gone: Sequence[int], now: float, at_end: bool = False
    ) -> decide.Membership:
        """The leader: log and keep (for the summary) a membership change."""
        membership = decide.Membership(
            epoch=len(gone),
            lost=tuple(gone),
            alive=min(self.nnodes - len(gone), self.max_nodes),
            spares=max(self.nnodes - len(gone) - self.max_nodes, 0),
            at=time.time(),
            why=str(lost).rsplit(": the job cannot finish", 1)[0],
        )
        if at_end:
            log.warning("elastic: %s (the job had ended without it)", membership.why)
        else:
            log.warning(
                "elastic: %s; going on with %d of %d nodes%s (nnodes=%d:%d, restarts used "
                "so far: %d of max_restarts=%d)",
                membership.why,
                membership.alive,
                self.max_nodes,
                _spares(membership.spares, " left"),
                self.min_nodes,
                self.max_nodes,
                self._restarts_used(),
                self.max_restarts,
            )
        last = self.state.progress.get(-1 if lost.node_rank is None else lost.node_rank)
        silent = now - last.since if last is not None else self.peer_timeout
        self.state.changes.append({**membership.to_dict(), "silent_since": membership.at - silent})
        return membership

    def elastic_status(self, nproc_per_node: int) -> tuple[int, str]:
        """The job's world size now and, for an elastic job, its membership line
        ("elastic: 2 of 3 nodes, attempt 2/3"), for the heartbeat and the summary."""
        live = self.nnodes - len(self.state.lost)
        alive = min(live, self.max_nodes)
        if not self.elastic:
            return alive * nproc_per_node, ""
        return alive * nproc_per_node, (
            f"elastic: {alive} of {self.max_nodes} nodes{_spares(live - alive)}, "
            f"attempt {self._restarts_used() + 1}/{self.max_restarts + 1}"
        )

    def membership_history(self) -> dict[str, Any]:
        """The leader: the elastic job's node range and each membership change, with the time
        it cost: from the lost node's last heartbeat to this node's workers of the
        re-formed group starting (None if they never did)."""
        starts = self._records.records() if self._records is not None else []
        changes = []
        for change in self.state.changes:
            resumed = [
                float(r["started"])
                for r in starts
                if int(r.get("group_world_size", 0)) == change["alive"]
                and float(r["started"]) > change["silent_since"]
            ]
            lost_s = round(min(resumed) - change["silent_since"], 1) if resumed else None
            changes.append({**change, "lost_s": lost_s})
        return {
            "nnodes": f"{self.min_nodes}:{self.max_nodes}",
            "tasks": self.nnodes,
            "changes": changes,
        }

    def _reformed(self, gone: int, peer: int, now: float) -> bool:
        """The leader: whether its workers already run in a group without the lost nodes,
        started after ``peer`` fell silent (a collective failed and torch re-formed it)."""
        if self._records is None:
            return False
        last = self.state.progress.get(peer)
        silent_since = time.time() - (now - last.since) if last is not None else time.time()
        return any(
            int(r.get("group_world_size", 0)) <= min(self.nnodes - gone, self.max_nodes)
            and float(r.get("started", 0.0)) > silent_since
            for r in self._records.live()
        )

    def _own_restarts(self) -> int:
        """Restarts this node's agent made so far (its workers' latest attempt)."""
        if self._records is None or not self.elastic:
            return 0
        return max((int(r.get("attempt", 0)) for r in self._records.records()), default=0)

    def _restarts_used(self) -> int:
        """The leader: the most restarts any live node's agent made (each agent has its own
        ``max_restarts``; a membership change torch saw on a healthy agent costs none)."""
        peers = [
            int(beat.get("restarts", 0))
            for node, beat in list(self.state.peers.items())
            if node not in self.state.lost and node != self.node
        ]
        return max([self._own_restarts(), *peers])

    def _reform(self, membership: decide.Membership) -> None:
        """Stop this node's workers of a group that still counts a lost node: its agent
        sees them fail and re-rendezvouses with the survivors (SIGTERM: each rank's stack
        is dumped on the way out; SIGKILL 5 s later for one that ignores it)."""
        self._epoch = membership.epoch
        self.state.lost.update(membership.lost)
        # "Started before the change" on this node's clock (the leader's may be skewed):
        # this node read the change within a beat of its decision.
        membership = replace(membership, at=time.time())
        stale = self._signal_stale(membership, signal.SIGTERM)
        if stale:
            log.warning(
                "elastic: node%s %s lost: stopping this node's workers (pids %s) to re-form "
                "the group with %d nodes",
                "s" if len(membership.lost) > 1 else "",
                ", ".join(str(n) for n in membership.lost),
                ", ".join(str(p) for p in stale),
                membership.alive,
            )
            self._stopping = (time.monotonic() + 5.0, membership)

    def _signal_stale(self, membership: decide.Membership, signum: int) -> list[int]:
        """Signal this node's running workers of a group that counts a lost node."""
        if self._records is None:
            return []
        ours = set(descendants(worker_root()))
        stale = [p for p in decide.stale_workers(self._records.live(), membership) if p in ours]
        for pid in stale:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return stale

    def _finish_stopping(self, now: float) -> None:
        if self._stopping is None or now < self._stopping[0]:
            return
        membership, self._stopping = self._stopping[1], None
        self._signal_stale(membership, signal.SIGKILL)

    def close(self) -> None:
        """Stop watching; node 0's store closes now (not at some garbage collection), so
        the next job of a sweep can never find this job's store and hello."""
        self.stop_watchdog()
        self.js.store = None
        self.store = None


def _spares(count: int, suffix: str = "") -> str:
    return f" (+{count} spare{'s' if count > 1 else ''}{suffix})" if count > 0 else ""


class StacksRelay:
    """Stack requests from node 0 to the other nodes (see ``_node.stack_service.StackService``)."""

    def __init__(self, coord: JobCoordinator) -> None:
        self.coord = coord
        self.seen = 0

    def publish(self, request: str) -> None:
        self.coord.ops.publish_stacks_request(request)

    def poll(self) -> list[str]:
        self.seen, new = self.coord.ops.stacks_requests(self.seen)
        return new
