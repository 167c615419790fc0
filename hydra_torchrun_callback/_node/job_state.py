"""What one node knows of its job: who is in it, who failed, who is alive.

Kept apart from the store operations (:mod:`.job_ops`) and the decisions
(:mod:`.job_decisions`), as torch's dynamic rendezvous keeps its state apart from its
operations: a membership change (elastic jobs) is a change of this state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra_torchrun_callback._node.job_decisions import Progress
from hydra_torchrun_callback._result import TorchrunJobError

__all__ = ["JobState"]


@dataclass
class JobState:
    """This node's view of the job; node 0 also tracks every peer."""

    #: This node's rank, and the job's node count.
    node: int
    nnodes: int
    #: Heartbeats this node wrote so far (each beat carries a higher count).
    beats: int = 0
    #: This node said done; how its part ended (its error, encoded), in its done beat.
    done: bool = False
    outcome: Optional[dict[str, Any]] = None
    #: Node 0: every node's last heartbeat read (forged ones skipped).
    peers: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: Node 0: each peer's heartbeat progress, to tell a lost peer from a slow one.
    progress: dict[int, Progress] = field(default_factory=dict)
    #: Node 0: peers its watchdog declared lost (they will not say done).
    lost: set[int] = field(default_factory=set)
    #: Node 0: an elastic job's membership changes, oldest first (see Membership), each
    #: with ``silent_since``: the wall-clock time of the lost node's last heartbeat.
    changes: list[dict[str, Any]] = field(default_factory=list)
    #: Why this node's agent was interrupted, once it was (a failure elsewhere).
    abort_reason: Optional[TorchrunJobError] = None

    def states_elsewhere(self) -> dict[int, str]:
        """Rank states the other nodes last published (lost nodes' left out)."""
        states: dict[int, str] = {}
        for peer, beat in list(self.peers.items()):
            if peer != self.node and peer not in self.lost:
                published = beat.get("states") or {}
                states.update({int(rank): str(state) for rank, state in published.items()})
        return states
