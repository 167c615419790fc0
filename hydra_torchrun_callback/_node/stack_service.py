"""Where is every rank? Python stacks of the workers, when a job stops and on demand.

A rank that hangs (in a collective, a data loader, a deadlock) prints nothing. So:

- **Worker side** (:func:`arm_worker`): before the task runs, faulthandler is told to
  dump the stacks of all the worker's threads into a private file of its node when
  the worker gets SIGTERM or SIGINT (chained: the signal then does what it did
  before) and when it gets :data:`STACKS_SIGNAL` (nothing else happens). faulthandler
  writes from the C signal handler, so a rank blocked in native code (a gloo/NCCL
  wait) is dumped too, at once. Every way a job stops reaches the workers as SIGTERM
  (the agent stops its workers that way; scancel and time limits signal every
  process of the step) or SIGINT (Ctrl-C), so every still-running rank leaves its
  stacks before it is killed.
- **Node side** (:class:`StackService`, run by each node's Hydra process): on a request
  it signals the node's live workers, waits (bounded) for their dumps, appends each to
  the rank's own log and answers with the innermost frames. After the job it appends
  the stop dumps to the per-rank logs and hands the innermost frames to the summary.
- **Requests** travel through the job's output dir, which every node and the user's
  shell see: ``hydra-torchrun-summary --stacks DIR`` creates ``.torchrun_stacks/req-ID``;
  node 0 notices it and relays it to the other nodes through the job store; each node
  writes ``ans-ID-node<K>.json``. Node 0 writes ``job.json`` there while the job runs.

Everything stays inside the node (the dump files live in the node's private records
folder, mode 0700) or the job's output dir (what the logs already hold).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._files import write_text_atomic
from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._proc import descendants, job_pid, worker_root
from hydra_torchrun_callback._report.frames import (
    Frame,
    group_by_frame,
    main_thread_frames,
    parse_dumps,
    rank_label,
    where,
)
from hydra_torchrun_callback._wire.protocol import (
    DUMP_WAIT_S,
    JOB_FILE,
    REQUEST_ID,
    STACKS_DIR,
    STACKS_SIGNAL,
    dump_paths,
)

__all__ = [
    "RankDump",
    "StackService",
    "append_to_log",
    "dump_live_workers",
    "harvest_stop_dumps",
    "log_block",
]

#: Cap on one rank's dump text kept in an answer (faulthandler caps each thread at 100
#: frames; a process with hundreds of threads can still write megabytes).
_MAX_DUMP_CHARS = 200_000
_POLL_S = 0.5


def log_block(text: str, rank: int, pid: int, why: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"---- stacks of rank {rank} (pid {pid}), {why}, {stamp} ----\n"
        f"{text.rstrip()}\n---- end of stacks of rank {rank} ----\n"
    )


def append_to_log(path: Optional[str], block: str) -> bool:
    """Append a dump to the rank's own log; False when it has none (or it is gone)."""
    if not path:
        return False
    try:
        with open(path, "a") as f:
            f.write(block)
    except OSError:
        return False
    return True


@dataclass
class RankDump:
    rank: int
    local_rank: int
    pid: int
    text: str
    frames: list[Frame]  # the main thread's, innermost first

    def answer(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "pid": self.pid,
            "where": where(self.frames),
            "frame": self.frames[0].as_dict() if self.frames else None,
            "main_thread": [f.as_dict() for f in self.frames],
            "text": self.text[:_MAX_DUMP_CHARS],
        }


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _ident(record: Mapping[str, Any]) -> Optional[int]:
    value = record.get("main_thread")
    return int(value) if isinstance(value, int) else None


def dump_live_workers(
    folder: str, live: Iterable[Mapping[str, Any]], why: str, timeout: float = DUMP_WAIT_S
) -> tuple[list[RankDump], list[int]]:
    """Signal each live worker (its record) to dump its stacks; wait for the dumps.

    Returns the dumps and the ranks that wrote none in time. Each dump is appended to
    the rank's log."""
    pending: dict[int, tuple[Mapping[str, Any], Path, int]] = {}
    ours = set(descendants(worker_root()))  # a recorded pid may have been reused since
    for record in live:
        if int(record["pid"]) not in ours:
            continue
        _, demand = dump_paths(folder, int(record["rank"]), int(record["pid"]))
        offset = _size(demand)
        try:
            os.kill(int(record["pid"]), STACKS_SIGNAL)
        except OSError:
            continue  # it ended meanwhile
        pending[int(record["rank"])] = (record, demand, offset)
    done: list[RankDump] = []
    deadline = time.monotonic() + timeout
    sizes: dict[int, int] = {}
    while pending:
        time.sleep(0.05)
        last = time.monotonic() > deadline
        for rank, (record, path, offset) in list(pending.items()):
            size = _size(path)
            # The signal handler writes the dump in many small writes, the main thread
            # last: it is complete once the main thread's frames are in and it stopped
            # growing for one poll (a worker descheduled mid-dump also stops growing).
            if size > offset and sizes.get(rank) == size:
                text = _read_from(path, offset)
                ident = _ident(record)
                frames = main_thread_frames(parse_dumps(text), ident) or []
                if frames or ident is None or last:
                    pid = int(record["pid"])
                    dump = RankDump(rank, int(record.get("local_rank", 0)), pid, text, frames)
                    done.append(dump)
                    _emit(record, log_block(text, rank, pid, why))
                    del pending[rank]
                    continue
            sizes[rank] = size
        if last:
            break
    return sorted(done, key=lambda d: d.rank), sorted(pending)


def _emit(record: Mapping[str, Any], block: str) -> None:
    if not append_to_log(record.get("log"), block):
        log.info("%s", block.rstrip())


def harvest_stop_dumps(
    folder: str, records: Iterable[Mapping[str, Any]]
) -> dict[tuple[int, int], list[Frame]]:
    """After the workers are gone: the dumps they wrote when they were stopped.

    Each is appended to its rank's log; returns (rank, pid) -> the main thread's frames
    at the first dump (where it was when the stop began)."""
    found: dict[tuple[int, int], list[Frame]] = {}
    for record in records:
        rank, pid = int(record["rank"]), int(record["pid"])
        stop, _ = dump_paths(folder, rank, pid)
        text = _read_from(stop, 0)
        if not text.strip():
            continue
        frames = main_thread_frames(parse_dumps(text), _ident(record))
        if frames is not None:
            found[(rank, pid)] = frames
        _emit(record, log_block(text, rank, pid, "when the job stopped it"))
        with contextlib.suppress(OSError):
            stop.unlink()  # appended once, even if asked again
    return found


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data), mode=0o600)


class StackService:
    """A node's answer to stack requests while its agent runs.

    ``live`` gives this node's running worker records; ``relay`` (multi-node) carries
    request ids from node 0 to the others: ``relay.publish(id)`` on node 0,
    ``relay.poll()`` -> new ids elsewhere."""

    def __init__(
        self,
        output_dir: str,
        folder: str,
        live: Callable[[], list[dict[str, Any]]],
        node_rank: int,
        job: Mapping[str, Any],
        relay: Any = None,
    ) -> None:
        self.dir = Path(output_dir) / STACKS_DIR
        self.folder = folder
        self.live = live
        self.node = node_rank
        self.job = dict(job)
        self.relay = relay
        self._seen: set[str] = set()
        self._signalled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchrun-stacks", daemon=True)
        self._previous: Any = None

    # -- lifecycle
    def __enter__(self) -> StackService:
        if self.node == 0:
            with contextlib.suppress(OSError):
                self.dir.mkdir(exist_ok=True)
                _write_json(self.dir / JOB_FILE, {**self.job, "pid": job_pid()})
        with contextlib.suppress(ValueError):  # not in the main thread: no signal
            self._previous = signal.signal(STACKS_SIGNAL, self._on_signal)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=DUMP_WAIT_S + 2)
        if self._previous is not None:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(STACKS_SIGNAL, self._previous)
        if self.node == 0:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled.set()  # the work is done in the service's thread

    # -- the loop
    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            with contextlib.suppress(Exception):  # a report, never a reason to fail
                if self._signalled.is_set():
                    self._signalled.clear()
                    self._dump_here()
                for request in self._new_requests():
                    self._answer(request)

    def _new_requests(self) -> list[str]:
        found: list[str] = []
        if self.node == 0:
            with contextlib.suppress(OSError):
                found = sorted(p.name[4:] for p in self.dir.iterdir() if p.name.startswith("req-"))
        elif self.relay is not None:
            found = list(self.relay.poll())
        new = [r for r in found if REQUEST_ID.match(r) and r not in self._seen]
        self._seen.update(new)
        if self.node == 0 and self.relay is not None:
            for request in new:
                self.relay.publish(request)
        return new

    def _answer(self, request: str) -> None:
        dumps, silent = dump_live_workers(self.folder, self.live(), "on request")
        answer = {
            "node": self.node,
            "host": os.uname().nodename,
            "ranks": [d.answer() for d in dumps],
            "silent_ranks": silent,
        }
        with contextlib.suppress(OSError):
            _write_json(self.dir / f"ans-{request}-node{self.node}.json", answer)

    def _dump_here(self) -> None:
        dumps, silent = dump_live_workers(self.folder, self.live(), f"on {STACKS_SIGNAL.name}")
        groups = group_by_frame({d.rank: where(d.frames) for d in dumps})
        lines = [f"{rank_label(ranks)}: {text}" for ranks, text in groups]
        if silent:
            lines.append(f"{rank_label(silent)}: no dump within {DUMP_WAIT_S:.0f}s")
        log.info(
            "where this node's ranks are (full stacks in their logs):\n  %s",
            "\n  ".join(lines) or "no running rank",
        )
