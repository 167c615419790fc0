"""Turn what the agent reports into the Hydra job's return value or error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

__all__ = [
    "TorchrunJobError",
    "TorchrunSetupError",
    "cap_text",
    "is_crash",
    "job_error",
    "root_cause_error",
]

#: Error texts (exception message, traceback) are kept up to this many characters: they
#: travel through the job store (8 MiB per value at most) and into logs.
MAX_TEXT = 32 * 1024


def cap_text(text: Any, keep_tail: bool = False) -> Any:
    """``text`` cut to :data:`MAX_TEXT` characters, saying so (None stays None).

    ``keep_tail`` keeps mostly the end (a traceback's end says where it was raised)."""
    if text is None or len(text) <= MAX_TEXT:
        return text
    note = f"\n[... {len(text) - MAX_TEXT} characters cut: the text exceeded {MAX_TEXT} ...]\n"
    head = MAX_TEXT // 8 if keep_tail else MAX_TEXT // 2
    return text[:head] + note + text[-(MAX_TEXT - head) :]


class TorchrunJobError(RuntimeError):
    """A worker failed; the message carries rank, exception and traceback.

    Attributes let code (sweepers, callbacks) inspect the root cause without
    parsing the message.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: Optional[int] = None,
        local_rank: Optional[int] = None,
        node: Optional[str] = None,
        exc_type: Optional[str] = None,
        exc_message: Optional[str] = None,
        traceback: Optional[str] = None,
        exitcode: Optional[int] = None,
        node_rank: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.node_rank = node_rank
        self.rank = rank
        self.local_rank = local_rank
        self.node = node
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback
        self.exitcode = exitcode

    def __reduce__(self) -> Any:  # keep the attributes across pickling (submitit)
        return (_rebuild_job_error, (self.args[0], self.__dict__))


def _rebuild_job_error(message: str, attrs: dict[str, Any]) -> TorchrunJobError:
    err = TorchrunJobError(message)
    err.__dict__.update(attrs)
    return err


class TorchrunSetupError(RuntimeError):
    """Preparing or launching the workers failed; no worker ran the task."""


def _split_exception(message: str) -> tuple[Optional[str], str]:
    """'ValueError: boom' -> ('ValueError', 'boom') (the format of @record's message)."""
    head, sep, rest = message.partition(": ")
    if sep and head and " " not in head and head[0].isalpha():
        return head, rest
    return None, message


def is_crash(exitcode: Optional[int]) -> bool:
    """Killed by a signal other than the stop signals the agent or the user send."""
    return exitcode is not None and exitcode < 0 and -exitcode not in (2, 15)


def root_cause_error(
    err: Any, node: str, node_rank: int = 0, prefer_rank: Optional[int] = None
) -> TorchrunJobError:
    """Build the job's error from torch's ``ChildFailedError``.

    The root cause is a crashed worker (killed by a signal: it could not claim
    anything), else ``prefer_rank`` when it failed here (the rank that claimed the
    job's first failure), else torch's first failure (by timestamp).
    """
    crashed = sorted(r for r, f in err.failures.items() if is_crash(f.exitcode))
    if crashed:  # a crashed process claims nothing; its peers' errors follow from it
        rank, failure = crashed[0], err.failures[crashed[0]]
    elif prefer_rank is not None and prefer_rank in err.failures:
        rank, failure = prefer_rank, err.failures[prefer_rank]
    else:
        rank, failure = err.get_first_failure()
    data = failure.error_file_data or {}
    info = data.get("message", {}) if isinstance(data.get("message"), dict) else {}
    extra = info.get("extraInfo", {}) if isinstance(info, dict) else {}
    traceback = extra.get("py_callstack") if isinstance(extra, dict) else None
    message = str(info.get("message") or failure.message or "").strip()
    exc_type, exc_message = _split_exception(message)
    if failure.exitcode < 0:
        what = f"was killed by {failure.signal_name()} (exit code {failure.exitcode})"
    elif exc_type:
        what = f"raised {exc_type}: {exc_message}"
    else:
        what = f"exited with code {failure.exitcode}: {message}"
    others = sorted(r for r in err.failures if r != rank)
    return job_error(
        rank=rank,
        local_rank=failure.local_rank,
        node=node,
        node_rank=node_rank,
        what=what,
        exc_type=exc_type,
        exc_message=exc_message,
        traceback=traceback,
        exitcode=failure.exitcode,
        others=others,
    )


def job_error(
    *,
    rank: int,
    local_rank: int,
    node: str,
    node_rank: int,
    what: str,
    exc_type: Optional[str] = None,
    exc_message: Optional[str] = None,
    traceback: Optional[str] = None,
    exitcode: Optional[int] = None,
    others: Sequence[int] = (),
) -> TorchrunJobError:
    """The job's error in its one format: who failed, where, what, and the traceback."""
    what, exc_message = cap_text(what), cap_text(exc_message)
    traceback = cap_text(traceback, keep_tail=True)
    text = (
        f"torchrun worker rank {rank} (local rank {local_rank}, node {node_rank} on {node}) {what}"
    )
    if others:
        text += f"\n(ranks {list(others)} also failed; rank {rank} failed first: the root cause)"
    if traceback:
        traceback = str(traceback).replace("Traceback (most recent call last):\n", "", 1)
        text += "\n\nWorker traceback (most recent call last):\n" + str(traceback).rstrip()
    return TorchrunJobError(
        text,
        rank=rank,
        local_rank=local_rank,
        node=node,
        exc_type=exc_type,
        exc_message=exc_message,
        traceback=traceback,
        exitcode=exitcode,
        node_rank=node_rank,
    )
