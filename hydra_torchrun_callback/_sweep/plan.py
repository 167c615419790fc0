"""Pure decisions of a resumed sweep: which job number each point gets, and what to do.

Fed what the sweep dir says (the controller's ledger, each point's own record, which of
its scheduler jobs still live); no file, no scheduler, no Hydra here, so every case is
a unit test.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Action", "Known", "Step", "assign_numbers", "decide"]


class Action(enum.Enum):
    #: Run the point (first time, or again after a failure): in its recorded dir.
    RUN = "run"
    #: Its scheduler job is still queued or running: wait for it, never submit it again.
    ATTACH = "attach"
    #: It completed and its value verifies: hand the saved value back, submit nothing.
    DONE = "done"


@dataclass(frozen=True)
class Known:
    """A point the sweep already had, as the ledger and the point's record say."""

    num: int
    overrides: tuple[str, ...]
    #: The point's own record: "running", "completed", "failed", or None (none written).
    state: Optional[str] = None
    #: Its value file is there and its signature checks out.
    value_ok: bool = False
    #: Its last scheduler job, if that job is still queued or running.
    live_job: Optional[str] = None


@dataclass(frozen=True)
class Step:
    """What the launcher does with the sweeper's point ``index`` of this batch."""

    index: int
    num: int
    overrides: tuple[str, ...]
    action: Action
    known: Optional[Known] = field(default=None, compare=False)


def decide(known: Optional[Known]) -> Action:
    """A known point's action: its value if it has one, its live job if any, else run it."""
    if known is None:
        return Action.RUN
    if known.state == "completed" and known.value_ok:
        return Action.DONE
    if known.live_job is not None:
        return Action.ATTACH
    return Action.RUN


def assign_numbers(
    batch: Sequence[Sequence[str]],
    first_idx: int,
    known: Mapping[int, Known],
    claimed: set[int],
    resume: bool,
) -> list[Step]:
    """Give each point of the batch its job number, and its action.

    Without ``resume``, Hydra's numbering (``first_idx + i``) and every point runs, as
    Hydra does. With it, a point is the known point with the same overrides (the one at
    the sweeper's own number if there are several): it keeps that point's number, hence
    its dir. A point the sweep never had (a sweeper that draws new points: Optuna) gets
    the sweeper's number if no known point holds it, else the next number nobody holds,
    so no earlier point's dir is written into. ``claimed`` (numbers taken by earlier
    batches of this run) is updated.
    """
    steps = []
    for i, overrides in enumerate(batch):
        wanted = first_idx + i
        ov = tuple(overrides)
        if not resume:
            claimed.add(wanted)
            steps.append(Step(i, wanted, ov, Action.RUN))
            continue
        same = [k for k in known.values() if k.overrides == ov and k.num not in claimed]
        match = next((k for k in same if k.num == wanted), None) or min(
            same, key=lambda k: k.num, default=None
        )
        if match is not None:
            claimed.add(match.num)
            steps.append(Step(i, match.num, ov, decide(match), match))
            continue
        num = wanted
        if num in known or num in claimed:
            num = max([*known, *claimed, wanted]) + 1
        claimed.add(num)
        steps.append(Step(i, num, ov, Action.RUN))
    return steps
