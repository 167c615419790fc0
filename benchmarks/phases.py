"""A Hydra callback that timestamps the Hydra process's side of a job, for the harness.

Selected before the torchrun callback (``hydra/callbacks=[phases,torchrun]``; see
conf/hydra/callbacks/phases.yaml) so its start hooks run first and its ``on_job_end`` runs
last (Hydra calls end hooks in reverse). It only reads clocks and writes
``$BENCH_OUT/hydra_<pid>.json`` (nothing without ``BENCH_OUT``): the torchrun callback's
behaviour is unchanged. Marks, in epoch seconds: ``created`` (this process, /proc),
``composed`` (on_run_start / on_multirun_start: config composed, callbacks built), and per
job ``job_start`` and ``result`` (on_job_end: the job's value is back in this process).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from _clock import process_start
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PhaseCallback(Callback):
    """Record when Hydra reached each hook; never raises (Hydra would only warn)."""

    def __init__(self) -> None:
        self._out = os.environ.get("BENCH_OUT")
        self._marks: dict[str, Any] = {}
        self._here()

    def _here(self) -> None:
        """Start this process's own record. submitit pickles the Hydra process's callbacks
        into each task (node), so a copy must not report the Hydra process's marks."""
        if self._marks.get("pid") != os.getpid():
            self._marks = {"pid": os.getpid(), "jobs": []}
            with contextlib.suppress(OSError, ValueError, IndexError):
                self._marks["created"] = process_start()

    def _save(self) -> None:
        if self._out:
            with contextlib.suppress(OSError):
                path = os.path.join(self._out, f"hydra_{os.getpid()}.json")
                with open(path, "w") as f:
                    json.dump(self._marks, f)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._marks["composed"] = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._marks["composed"] = time.time()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        now = time.time()
        self._here()
        self._marks["jobs"].append({"job_start": now})

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        now = time.time()
        if self._marks["jobs"]:
            self._marks["jobs"][-1]["result"] = now
        self._save()

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._save()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._save()  # the submitit launcher's process runs no job of its own
