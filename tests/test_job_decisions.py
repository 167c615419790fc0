"""The coordinator's decisions, driven with plain values: no process, no store, no clock.

``tests/test_coordination.py`` and ``tests/test_hostile.py`` run the same decisions
through real stores and nodes; these pin each rule down case by case.
"""

from __future__ import annotations

from hydra_torchrun_callback._node.job_decisions import (
    Membership,
    Progress,
    beat_payload,
    cannot_go_on,
    crash_report,
    failed_node,
    lost_nodes_error,
    lost_peer,
    nodes_not_done,
    root_candidate,
    stale_workers,
    stop_for,
    store_lost,
)
from hydra_torchrun_callback._result import TorchrunJobError

PEER_TIMEOUT = 20.0
NEVER = 60.0


def err(
    rank: int | None = None, node: int | None = None, exitcode: int | None = 1
) -> TorchrunJobError:
    return TorchrunJobError(f"rank {rank} failed", rank=rank, node_rank=node, exitcode=exitcode)


def lost(
    beats: dict[int, dict[str, object]],
    seen: dict[int, Progress],
    now: float,
    running: float = 5.0,
) -> tuple[TorchrunJobError | None, dict[int, Progress]]:
    return lost_peer(beats, seen, now, running, 3, PEER_TIMEOUT, NEVER)


def test_a_beating_peer_is_never_lost() -> None:
    seen: dict[int, Progress] = {}
    for second in range(100):
        beats = {1: {"beat": second + 1}, 2: {"beat": second + 1}}
        found, seen = lost(beats, seen, float(second), running=float(second))
        assert found is None
    assert seen[1] == Progress(100, 99.0)


def test_a_peer_whose_beat_stops_is_lost_after_peer_timeout() -> None:
    seen = {1: Progress(7, 100.0), 2: Progress(7, 100.0)}
    beats = {1: {"beat": 7}, 2: {"beat": 8}}
    found, seen = lost(beats, seen, 100.0 + PEER_TIMEOUT)
    assert found is None  # not yet: exactly peer_timeout
    found, _ = lost(beats, seen, 100.5 + PEER_TIMEOUT)
    assert found is not None and found.node_rank == 1
    assert "node 1 stopped sending heartbeats 20s ago" in str(found)


def test_a_replayed_or_forged_beat_is_no_progress() -> None:
    """An older count (a replay) or an unreadable beat does not reset the clock."""
    seen = {1: Progress(9, 0.0), 2: Progress(9, 0.0)}
    found, seen = lost({1: {"beat": 3}, 2: {"beat": 10}}, seen, 10.0)
    assert found is None and seen[1] == Progress(9, 0.0)
    found, _ = lost({2: {"beat": 11}}, seen, PEER_TIMEOUT + 1)  # node 1's beat unreadable
    assert found is not None and found.node_rank == 1


def test_a_peer_that_said_done_is_not_lost() -> None:
    seen = {1: Progress(5, 0.0), 2: Progress(5, 0.0)}
    found, _ = lost({1: {"beat": 5, "done": True}, 2: {"beat": 6, "done": True}}, seen, 500.0)
    assert found is None


def test_a_peer_that_never_beat_is_lost_after_the_join_wait() -> None:
    beats = {1: {"beat": 0}, 2: {"beat": 4}}
    found, seen = lost(beats, {}, 10.0, running=NEVER)
    assert found is None
    found, _ = lost(beats, seen, 11.0, running=NEVER + 1)
    assert found is not None and found.node_rank == 1 and "never joined" in str(found)


def test_the_store_is_given_up_after_the_shorter_of_peer_timeout_and_10s() -> None:
    assert not store_lost(None, 100.0, PEER_TIMEOUT)
    assert not store_lost(95.0, 100.0, PEER_TIMEOUT)
    assert store_lost(89.0, 100.0, PEER_TIMEOUT)
    assert store_lost(97.0, 100.0, 2.0)


def test_only_a_failure_elsewhere_stops_this_node() -> None:
    assert not stop_for(None, 0)
    assert not stop_for(err(rank=3, node=1), 1)
    assert stop_for(err(rank=3, node=1), 0)


def test_a_crash_is_the_root_cause() -> None:
    raised, killed = err(rank=1, node=0), err(rank=2, node=1, exitcode=-9)
    assert crash_report([raised, None, killed]) is killed
    assert crash_report([raised, None]) is None


def test_root_candidate() -> None:
    claimer = err(rank=2, node=1)
    claimed = err(rank=2, node=1)
    other = err(rank=0, node=0)
    # No claim: the published failure answers, whatever it is.
    assert root_candidate(None, other, None, None, False) is other
    # The failure names the claimer: it answers.
    assert root_candidate(2, claimer, claimed, None, False) is claimer
    # The failure is a consequence: the claimer's node report is the last word...
    assert root_candidate(2, other, claimed, claimer, False) is claimer
    # ...else, once its node had time to report, the claimer's own description.
    assert root_candidate(2, other, claimed, None, False) is None
    assert root_candidate(2, other, claimed, None, True) is claimed
    # A description of another rank than the claim is not trusted.
    assert root_candidate(2, None, err(rank=5, node=1), None, True) is None


def test_heartbeat_payload_and_done() -> None:
    assert beat_payload(3, False, None, {0: "alive"}) == {
        "beat": 3,
        "done": False,
        "states": {"0": "alive"},
    }
    assert beat_payload(4, True, {"m": "x"}, {0: "alive"}) == {
        "beat": 4,
        "done": True,
        "error": {"m": "x"},
    }
    beats = {
        0: {"done": True},
        1: {"done": False, "error": None},
        2: {"done": True, "error": {"m": 1}},
    }
    assert nodes_not_done(beats, 4) == [1, 3]
    assert failed_node(beats, 4) == {"m": 1}
    assert failed_node({0: {"done": True, "error": None}}, 1) is None


# -- elastic jobs (nnodes=MIN:MAX) ---------------------------------------------------------
def test_a_peer_already_lost_is_not_lost_again() -> None:
    seen = {1: Progress(7, 0.0), 2: Progress(7, 0.0)}
    beats = {1: {"beat": 7}, 2: {"beat": 7}}
    found, _ = lost_peer(beats, seen, 30.0, 30.0, 3, PEER_TIMEOUT, NEVER, known={1})
    assert found is not None and found.node_rank == 2
    found, _ = lost_peer(beats, seen, 30.0, 30.0, 3, PEER_TIMEOUT, NEVER, known={1, 2})
    assert found is None


def test_whether_a_job_goes_on_without_its_lost_nodes() -> None:
    # fixed size (MIN = MAX): any loss ends it, as before
    assert cannot_go_on([1], 3, 3, 5, 0) == "the job cannot finish"
    # elastic, enough nodes and restarts left: it goes on
    assert cannot_go_on([2], 3, 2, 2, 0) is None
    assert cannot_go_on([1, 2], 3, 1, 2, 1) is None
    # below MIN
    why = cannot_go_on([1, 2], 3, 2, 2, 0)
    assert why is not None and "1 of 3 nodes are left, below nnodes MIN=2" in why
    # restarts used up (each membership change costs one)
    why = cannot_go_on([2], 3, 2, 1, 1)
    assert why is not None and "no restarts are left" in why and "max_restarts=1" in why


def test_the_failure_names_every_lost_node() -> None:
    first = TorchrunJobError(
        "node 2 stopped sending heartbeats 21s ago (its Hydra/agent process died or hangs): "
        "the job cannot finish",
        node="2",
        node_rank=2,
    )
    error = lost_nodes_error(first, [1, 2], "the job cannot finish: 1 of 3 nodes are left")
    assert str(error) == (
        "node 2 stopped sending heartbeats 21s ago (its Hydra/agent process died or hangs) "
        "(lost before: node 1): the job cannot finish: 1 of 3 nodes are left"
    )
    assert error.node_rank == 2


def test_stale_workers_are_those_of_a_group_that_counts_a_lost_node() -> None:
    change = Membership(epoch=1, lost=(2,), alive=2, at=100.0, why="node 2 lost")
    live = [
        {"pid": 10, "group_world_size": 3, "started": 50.0},  # the old group: stop it
        {"pid": 11, "group_world_size": 2, "started": 90.0},  # already re-formed by torch
        {"pid": 12, "group_world_size": 3, "started": 101.0},  # a later group (a new node)
    ]
    assert stale_workers(live, change) == [10]
    assert Membership.from_dict(change.to_dict()) == change
