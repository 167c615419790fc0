"""On-demand stacks, the user's side: ``hydra-torchrun-summary --stacks DIR`` writes a
request into the job's output dir (``.torchrun_stacks/req-ID``), waits for every node's
answer (``ans-ID-node<K>.json``, written by ``_node.stack_service``) and renders them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra_torchrun_callback._report.frames import group_by_frame, rank_label
from hydra_torchrun_callback._wire.protocol import (
    DUMP_WAIT_S,
    JOB_FILE,
    STACKS_DIR,
)

__all__ = [
    "NoRunningJob",
    "new_request_id",
    "render_stacks",
    "request_stacks",
    "running_jobs",
]


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
