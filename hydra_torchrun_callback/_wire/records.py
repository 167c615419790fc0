"""A worker's record: the JSON file each worker leaves in its node's private records
folder (named by ``RECORDS_ENV``): rank, pid, attempt, start, end, outcome. Written by the
worker when it starts and when its task ends; read by its node (``_node.records``).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra_torchrun_callback._wire.protocol import RECORDS_ENV

__all__ = [
    "WorkerRecord",
]

#: A rank's outcome detail ("ValueError: boom") is cut to this many characters.
_MAX_DETAIL = 1000


class WorkerRecord:
    """This worker's record: written when it starts and again when its task ends."""

    def __init__(self, env: Mapping[str, str]) -> None:
        folder = env.get(RECORDS_ENV)
        self.path = Path(folder) / f"{env.get('RANK', '0')}-{os.getpid()}.json" if folder else None
        self.data: dict[str, Any] = {
            "rank": int(env.get("RANK", 0)),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "pid": os.getpid(),
            "attempt": int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            # How many nodes its group had: an elastic job's survivors stop a group that
            # still counts a lost node.
            "group_world_size": int(env.get("GROUP_WORLD_SIZE", 1)),
            "started": time.time(),
            # faulthandler names threads by this ident: it finds the main thread's frames.
            "main_thread": threading.main_thread().ident,
            "log": None,
            "ended": None,
            "status": "running",
            "detail": "",
        }
        self._write()

    def note(self, **fields: Any) -> None:
        self.data.update(fields)
        self._write()

    def finish(self, status: str, detail: str = "") -> None:
        # One line of a table: the full text is in the root cause and the rank's log.
        if len(detail) > _MAX_DETAIL:
            detail = detail[: _MAX_DETAIL - 3] + "..."
        self.data.update(ended=time.time(), status=status, detail=detail)
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):  # the summary must never fail the task
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
