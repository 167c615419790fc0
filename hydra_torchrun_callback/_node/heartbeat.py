"""One-line "ranks alive" reports in the Hydra process's log while the job runs
(``heartbeat_interval``), from the node's records.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Optional

from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._report.frames import rank_ranges

__all__ = [
    "Heartbeat",
]


class Heartbeat:
    """Log, every ``interval`` seconds, which ranks are alive (a one-line report)."""

    def __init__(
        self,
        interval: float,
        world_size: int,
        states: Callable[[], Mapping[int, str]],
        elastic: Optional[Callable[[], tuple[int, str]]] = None,
        active: Optional[Callable[[], bool]] = None,
    ) -> None:
        """``elastic``: an elastic job's current world size and membership line;
        ``active``: whether this node reports now (the node that leads the job)."""
        self.active = active
        self.interval = interval
        self.world_size = world_size
        self.states = states
        self.elastic = elastic
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchrun-heartbeat", daemon=True)

    def line(self) -> str:
        world, membership = self.elastic() if self.elastic else (self.world_size, "")
        states = {r: s for r, s in self.states().items() if r < world}
        alive = [r for r, state in states.items() if state == "alive"]
        ended = [r for r, state in states.items() if state == "ended"]
        starting = [r for r in range(world) if states.get(r, "starting") == "starting"]
        text = (
            f"torchrun heartbeat: {len(alive)}/{world} ranks alive "
            f"[{rank_ranges(alive)}] after {time.monotonic() - self.started:.0f}s"
        )
        if membership:
            text += f"; {membership}"
        if starting:
            text += f"; starting: [{rank_ranges(starting)}]"
        if ended:
            text += f"; ended: [{rank_ranges(ended)}]"
        return text

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a report, never a reason to fail
                if self.active is None or self.active():
                    log.info("%s", self.line())

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
