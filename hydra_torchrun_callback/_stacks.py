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
import faulthandler
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

from hydra_torchrun_callback._files import write_text_atomic
from hydra_torchrun_callback._proc import descendants, job_pid, worker_root
from hydra_torchrun_callback._protocol import (
    DUMP_SIGNALS,
    JOB_FILE,
    STACKS_DIR,
    STACKS_SIGNAL,
    dump_paths,
)

__all__ = [
    "STACKS_SIGNAL",
    "Frame",
    "StackService",
    "arm_worker",
    "group_by_frame",
    "parse_dumps",
    "request_stacks",
]

log = logging.getLogger("hydra_torchrun_callback")

_REQUEST_ID = re.compile(r"^[0-9]{10}-[0-9a-f]{8}$")
#: How long a node waits for its workers' dumps (faulthandler writes at once; a worker
#: that never answers is reported as such).
DUMP_WAIT_S = 3.0
#: Cap on one rank's dump text kept in an answer (faulthandler caps each thread at 100
#: frames; a process with hundreds of threads can still write megabytes).
_MAX_DUMP_CHARS = 200_000
_POLL_S = 0.5


# -- worker side -------------------------------------------------------------------------
_armed: list[IO[bytes]] = []  # faulthandler keeps the files; so do we, for clarity


def arm_worker(folder: Optional[str], rank: int) -> None:
    """Have faulthandler dump this worker's stacks on a stop signal and on demand."""
    if not folder:
        return
    stop, demand = dump_paths(folder, rank, os.getpid())
    try:
        stop_file = open(stop, "ab", buffering=0)  # noqa: SIM115 (held for the process's life)
        demand_file = open(demand, "ab", buffering=0)  # noqa: SIM115
    except OSError:
        return  # never a reason for the task to fail
    _armed[:] = [stop_file, demand_file]
    for sig in DUMP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_IGN:
            continue  # the process ignores it: a dump would be noise
        faulthandler.register(sig, file=stop_file, all_threads=True, chain=True)
    faulthandler.register(STACKS_SIGNAL, file=demand_file, all_threads=True, chain=False)
    # A process the task forks (a DataLoader worker) would write into this rank's files.
    os.register_at_fork(after_in_child=_disarm)


def _disarm() -> None:
    for sig in (*DUMP_SIGNALS, STACKS_SIGNAL):
        with contextlib.suppress(Exception):
            faulthandler.unregister(sig)


# -- reading dumps -----------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str

    def short(self) -> str:
        return f"{self.function} ({os.path.basename(self.file)}:{self.line})"

    def as_dict(self) -> dict[str, Any]:
        return {"function": self.function, "file": self.file, "line": self.line}


_THREAD = re.compile(r"(Current thread|Thread) (0x[0-9a-fA-F]+) \(most recent call first\):")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')

#: One dump: thread ident -> its frames, innermost first.
Dump = dict[int, list[Frame]]


def parse_dumps(text: str) -> list[Dump]:
    """faulthandler's output, possibly several dumps appended, as a list of dumps.

    faulthandler writes no separator; each thread appears once per dump, so a thread
    seen again starts the next dump. A dump cut short by a second signal can end in the
    middle of a line (faulthandler writes a line in many small writes): a thread header
    found after other text on a line also starts the next dump."""
    dumps: list[Dump] = []
    current: Optional[list[Frame]] = None
    for line in text.splitlines():
        head = _THREAD.search(line)
        if head:
            ident = int(head.group(2), 16)
            if not dumps or ident in dumps[-1] or line[: head.start()].strip():
                dumps.append({})
            current = dumps[-1][ident] = []
            continue
        frame = _FRAME.match(line)
        if frame and current is not None:
            current.append(Frame(frame.group(1), int(frame.group(2)), frame.group(3)))
    return dumps


def _is_library(path: str) -> bool:
    return (
        "site-packages" in path
        or "dist-packages" in path
        or path.startswith("<")
        or re.search(r"/lib/python3\.\d+/", path) is not None
        or "hydra_torchrun_callback" in path
    )


def where(frames: Sequence[Frame]) -> str:
    """ "all_reduce (distributed_c10d.py:2806) <- main (train.py:42)": the innermost frame
    and, if that is library code, the innermost frame of the user's own code."""
    if not frames:
        return "<no Python frame>"
    text = frames[0].short()
    if _is_library(frames[0].file):
        own = next((f for f in frames if not _is_library(f.file)), None)
        if own is not None:
            text += f" <- {own.short()}"
    return text


def main_thread_frames(dumps: Sequence[Dump], main_ident: Optional[int]) -> Optional[list[Frame]]:
    """The main thread's frames in the first dump that has them.

    A stop dump can be cut short: faulthandler chains with SA_NODEFER, so a second
    SIGTERM (SLURM signals every process of a step and the agent signals its workers
    too) starts a new dump inside the first and then ends the process. faulthandler
    writes the newest thread first and the main thread last, so the cut dump usually
    lacks it; the next dump has it. Without a known ident, the last thread of the first
    dump is the main thread (the oldest). None: no dump reached the main thread (the
    process was killed while writing); another thread's frames would mislead."""
    if main_ident is not None:
        found = [dump[main_ident] for dump in dumps if main_ident in dump]
        # A dump cut right after the main thread's header has it without frames.
        return next((frames for frames in found if frames), found[0] if found else None)
    return next((list(dump.values())[-1] for dump in dumps if dump), None)


def group_by_frame(wheres: Mapping[int, str]) -> list[tuple[list[int], str]]:
    """Ranks with the same place collapsed: [([0, 1, 3], "all_reduce ..."), ([2], ...)]."""
    groups: dict[str, list[int]] = {}
    for rank in sorted(wheres):
        groups.setdefault(wheres[rank], []).append(rank)
    return sorted(((ranks, text) for text, ranks in groups.items()), key=lambda g: g[0][0])


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


# -- node side ---------------------------------------------------------------------------
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
        new = [r for r in found if _REQUEST_ID.match(r) and r not in self._seen]
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


def rank_label(ranks: Sequence[int]) -> str:
    """ "rank 3" or "ranks 0-2,5"."""
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {_ranges(ranks)}"


def _ranges(ranks: Iterable[int]) -> str:
    from hydra_torchrun_callback._summary import rank_ranges

    return rank_ranges(ranks)


# -- the requester (hydra-torchrun-summary --stacks) -------------------------------------
class NoRunningJob(Exception):
    """No running job under the folder (no ``.torchrun_stacks/job.json``)."""


def running_jobs(root: Path) -> list[Path]:
    """Job output dirs under ``root`` (``root`` itself included) whose job is running."""
    found = [p.parent.parent for p in root.rglob(f"{STACKS_DIR}/{JOB_FILE}")]
    return sorted(set(found))


def new_request_id() -> str:
    return f"{int(time.time()):010d}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def _request_file(job_dir: Path, request: str) -> Iterator[Path]:
    folder = job_dir / STACKS_DIR
    path = folder / f"req-{request}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        for answer in folder.glob(f"ans-{request}-node*.json"):
            with contextlib.suppress(OSError):
                answer.unlink()


def request_stacks(job_dir: Path, timeout: float = 15.0) -> dict[str, Any]:
    """Ask every node of the running job in ``job_dir`` for its ranks' stacks.

    Returns ``{"job": job.json, "nodes": {node: answer}, "missing_nodes": [...]}``."""
    try:
        job = json.loads((job_dir / STACKS_DIR / JOB_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise NoRunningJob(f"no running torchrun job in {job_dir}") from exc
    nnodes = int(job.get("nnodes", 1))
    request = new_request_id()
    answers: dict[int, dict[str, Any]] = {}
    with _request_file(job_dir, request) as folder:
        deadline = time.monotonic() + timeout
        while len(answers) < nnodes and time.monotonic() < deadline:
            time.sleep(0.2)
            if not (folder / JOB_FILE).exists():
                break  # the job ended meanwhile
            for path in folder.glob(f"ans-{request}-node*.json"):
                with contextlib.suppress(OSError, ValueError):
                    answer = json.loads(path.read_text())
                    answers[int(answer["node"])] = answer
    return {
        "job": job,
        "nodes": answers,
        "missing_nodes": [n for n in range(nnodes) if n not in answers],
    }


def _task_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The main thread's frames down to the task (the worker's plumbing left out)."""
    for i, frame in enumerate(frames):
        if frame["function"] == "run_worker" and "hydra_torchrun_callback" in frame["file"]:
            return frames[:i]
    return frames


def render_stacks(job_dir: str, result: Mapping[str, Any], full: bool = False) -> str:
    """Ranks grouped by where their main thread is, with one stack per group."""
    job = result["job"]
    ranks: dict[int, dict[str, Any]] = {}
    silent: list[int] = []
    for answer in result["nodes"].values():
        for entry in answer["ranks"]:
            ranks[int(entry["rank"])] = {**entry, "host": answer["host"], "node": answer["node"]}
        silent.extend(int(r) for r in answer.get("silent_ranks", ()))
    world = int(job.get("world_size", len(ranks)))
    out = [
        f"{job_dir}: run id {job.get('run_id')}, {len(ranks)}/{world} rank(s) dumped, "
        f"{len(result['nodes'])}/{job.get('nnodes', '?')} node(s) answered"
    ]
    for members, text in group_by_frame({r: e["where"] for r, e in ranks.items()}):
        out.append(f"{rank_label(members)}: {text}")
        sample = ranks[members[0]]
        frames = _task_frames(sample["main_thread"]) if not full else []
        for frame in frames[:12]:
            out.append(f'    File "{frame["file"]}", line {frame["line"]} in {frame["function"]}')
        if len(frames) > 12:
            out.append(f"    ... {len(frames) - 12} more frame(s)")
        if full:
            out.extend("    " + line for line in str(sample["text"]).splitlines())
    if silent:
        out.append(f"{rank_label(silent)}: alive but wrote no dump within {DUMP_WAIT_S:.0f}s")
    if result["missing_nodes"]:
        out.append(
            f"nodes {result['missing_nodes']} did not answer (node lost, or the output dir "
            "is not shared with them)"
        )
    out.append("every rank's full dump (all threads) was appended to its log")
    return "\n".join(out)
