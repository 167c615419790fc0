"""The coordinator's decisions, as pure functions: no store, no thread, no clock.

The job's nodes decide the same few things again and again: is a peer lost, which
failure is the root cause, has the job failed elsewhere, is every node done. Each is a
function of what the store last said and of the time, so unit tests drive them with
plain values (``tests/test_job_decisions.py``), and the membership changes of elastic
jobs get one place to go. :mod:`.coordinator` reads the store (through
:mod:`.job_ops`), keeps what it read (:mod:`.job_state`) and acts on the answers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from hydra_torchrun_callback._result import TorchrunJobError, is_crash

__all__ = [
    "Membership",
    "Progress",
    "beat_payload",
    "cannot_go_on",
    "crash_report",
    "failed_node",
    "lost_nodes_error",
    "lost_peer",
    "nodes_not_done",
    "root_candidate",
    "stale_workers",
    "stop_for",
    "store_lost",
]

#: Seconds without the store before a node gives up on node 0 (at most peer_timeout).
STORE_GRACE_S = 10.0


@dataclass(frozen=True)
class Progress:
    """What node 0 last saw of a peer's heartbeat: its highest count, and since when."""

    count: int
    since: float


@dataclass(frozen=True)
class Membership:
    """An elastic job's nodes after a loss, as node 0 decided and published it.

    ``alive`` nodes go on; every node stops its workers of a group that still counts more
    nodes (started before ``at``, the wall-clock time of the decision), so that torch's
    agents re-rendezvous with the survivors even where no collective failed."""

    epoch: int
    lost: tuple[int, ...]
    alive: int  # nodes in the group that goes on (at most MAX)
    at: float
    why: str
    spares: int = 0  # live tasks beyond MAX, waiting on torch's redundancy list

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "lost": list(self.lost),
            "alive": self.alive,
            "at": self.at,
            "why": self.why,
            "spares": self.spares,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Membership:
        return cls(
            epoch=int(data["epoch"]),
            lost=tuple(int(n) for n in data["lost"]),
            alive=int(data["alive"]),
            at=float(data["at"]),
            why=str(data["why"]),
            spares=int(data.get("spares", 0)),
        )


def beat_payload(
    beats: int,
    done: bool,
    outcome: Optional[dict[str, Any]],
    states: Optional[Mapping[int, str]],
    restarts: int = 0,
) -> dict[str, Any]:
    """This node's heartbeat: a count that only grows, whether it is done (and how it
    ended), its ranks' states while it runs, and how many restarts its agent made."""
    beat: dict[str, Any] = {"beat": beats, "done": done}
    if restarts:
        beat["restarts"] = restarts
    if done:
        beat["error"] = outcome
    elif states is not None:
        beat["states"] = {str(k): v for k, v in states.items()}
    return beat


def lost_peer(
    beats: Mapping[int, Mapping[str, Any]],
    seen: Mapping[int, Progress],
    now: float,
    running: float,
    nnodes: int,
    peer_timeout: float,
    never_beat_timeout: float,
    known: Collection[int] = (),
    me: int = 0,
) -> tuple[Optional[TorchrunJobError], dict[int, Progress]]:
    """Node ``me`` (node 0, or any node of a job with a shared store): the first peer
    whose heartbeat stopped (or never started in time), and the progress table updated
    with the beats just read; peers in ``known`` were declared lost already.

    A forged, unreadable or replayed (older) beat counts as no beat: only a higher count
    than seen before is progress, so it cannot hide a lost node. A peer that said done
    is never lost."""
    table = dict(seen)
    for peer in range(nnodes):
        if peer in known or peer == me:
            continue
        last = table.get(peer, Progress(-1, now))
        beat = beats.get(peer)
        if beat is not None and beat.get("done"):
            continue
        count = int(beat.get("beat", 0)) if beat is not None else max(last.count, 0)
        if count > last.count:
            table[peer] = Progress(count, now)
        elif last.count > 0 and now - last.since > peer_timeout:
            return (
                TorchrunJobError(
                    f"node {peer} stopped sending heartbeats {now - last.since:.0f}s ago "
                    "(its Hydra/agent process died or hangs): the job cannot finish",
                    node=str(peer),
                    node_rank=peer,
                ),
                table,
            )
        elif last.count <= 0 and running > never_beat_timeout:
            return (
                TorchrunJobError(
                    f"node {peer} never joined the job's store within "
                    f"{never_beat_timeout:.0f}s (it did not start, or cannot reach the store)",
                    node=str(peer),
                    node_rank=peer,
                ),
                table,
            )
    return None, table


def cannot_go_on(
    lost: Collection[int], nnodes: int, min_nodes: int, max_restarts: int, restarts_used: int
) -> Optional[str]:
    """Why the job cannot go on without its ``lost`` nodes; None when an elastic job
    (nnodes=MIN:MAX) re-forms with the survivors.

    Each membership change costs every survivor one of torch's ``max_restarts`` (its
    workers fail or are stopped), as under torchrun."""
    alive = nnodes - len(lost)
    if min_nodes >= nnodes:
        return "the job cannot finish"
    if alive < min_nodes:
        return (
            f"the job cannot finish: {alive} of {nnodes} nodes are left, below "
            f"nnodes MIN={min_nodes}"
        )
    if restarts_used >= max_restarts:
        return (
            f"the job cannot finish: no restarts are left to re-form it without "
            f"{'them' if len(lost) > 1 else 'it'} (max_restarts={max_restarts}, "
            f"{restarts_used} used)"
        )
    return None


def lost_nodes_error(first: TorchrunJobError, lost: Sequence[int], why: str) -> TorchrunJobError:
    """The job's failure for ``lost`` nodes (``first``: how the last of them was lost)."""
    text = str(first).rsplit(": the job cannot finish", 1)[0]
    earlier = [n for n in lost if n != first.node_rank]
    if earlier:
        text += f" (lost before: node{'s' if len(earlier) > 1 else ''} "
        text += ", ".join(str(n) for n in earlier) + ")"
    return TorchrunJobError(f"{text}: {why}", node=first.node, node_rank=first.node_rank)


def stale_workers(live: Iterable[Mapping[str, Any]], membership: Membership) -> list[int]:
    """Pids of this node's running workers whose group still counts a lost node: started
    before the loss was decided, in a group of more nodes than are alive."""
    return [
        int(r["pid"])
        for r in live
        if int(r.get("group_world_size", 1)) > membership.alive
        and float(r.get("started", 0.0)) < membership.at
    ]


def store_lost(unreachable_since: Optional[float], now: float, peer_timeout: float) -> bool:
    """Whether a node that cannot reach the job's store (node 0's) gives up on it."""
    return unreachable_since is not None and now - unreachable_since > min(
        peer_timeout, STORE_GRACE_S
    )


def stop_for(failure: Optional[TorchrunJobError], node: int) -> bool:
    """Whether the job's published failure stops this node (a failure it published
    itself is already being handled by its own agent)."""
    return failure is not None and failure.node_rank != node


def crash_report(reports: Iterable[Optional[TorchrunJobError]]) -> Optional[TorchrunJobError]:
    """The first node report of a crashed worker (killed by a signal): it could not
    claim anything, and its peers' errors follow from it, so it is the root cause."""
    for report in reports:
        if report is not None and is_crash(report.exitcode):
            return report
    return None


def root_candidate(
    first: Optional[int],
    failure: Optional[TorchrunJobError],
    claimed: Optional[TorchrunJobError],
    claimer_report: Optional[TorchrunJobError],
    claim_is_enough: bool,
) -> Optional[TorchrunJobError]:
    """The root cause as far as the store tells it now, None to wait for more.

    ``first``: the rank that claimed the first failure; ``failure``: the job's failure
    slot; ``claimed``: the claimer's own description; ``claimer_report``: its node's
    agent report (the last word). Without a claim the published failure answers; with
    one, the failure if it names that rank, else the claimer's node report, else (once
    ``claim_is_enough``: its node had time to report) the claimer's description."""
    if failure is not None and (first is None or failure.rank == first):
        return failure
    if first is None or claimed is None or claimed.rank != first:
        return None
    if claimer_report is not None:
        return claimer_report
    return claimed if claim_is_enough else None


def nodes_not_done(beats: Mapping[int, Mapping[str, Any]], nnodes: int) -> list[int]:
    """The nodes whose last heartbeat does not say done."""
    return [n for n in range(nnodes) if not beats.get(n, {}).get("done")]


def failed_node(beats: Mapping[int, Mapping[str, Any]], nnodes: int) -> Optional[dict[str, Any]]:
    """The encoded error of the first node whose done beat says it failed. Each node
    writes that beat once, signed with the run's session, so a forged or emptied failure
    key cannot turn a failed job into a completed one."""
    for node in range(nnodes):
        error = beats.get(node, {}).get("error")
        if isinstance(error, dict):
            return error
    return None
