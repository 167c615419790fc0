"""Turn what the agent reports into the Hydra job's return value or error."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any, Optional

__all__ = [
    "FailureRecord",
    "TorchrunJobError",
    "TorchrunPointLost",
    "TorchrunSetupError",
    "cap_text",
    "is_crash",
    "job_error",
    "root_cause_error",
    "to_cpu",
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


class TorchrunPointLost(TorchrunJobError):
    """A sweep point whose job ended without a result (killed, OOM, ``scancel``, a lost
    node, a time limit after its requeues): its FAILED ``JobReturn`` carries this, and the
    sweep's other points go on. ``state``/``exit_code``: the scheduler's; ``log_tail``: the
    last lines of the job's log."""

    def __init__(
        self,
        message: str,
        *,
        job_id: Optional[str] = None,
        state: Optional[str] = None,
        exit_code: Optional[str] = None,
        log_tail: str = "",
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.exit_code = exit_code
        self.log_tail = log_tail

    def __reduce__(self) -> Any:
        return (_rebuild_point_lost, (self.args[0], self.__dict__))


def _rebuild_point_lost(message: str, state: dict[str, Any]) -> TorchrunPointLost:
    error = TorchrunPointLost(message)
    error.__dict__.update(state)
    return error


@dataclasses.dataclass(frozen=True)
class FailureRecord:
    """One failure as it crosses a process or a host (a worker's claim, a node's report, a
    node's done beat): JSON with its texts capped, never a pickle. The one list of what
    a failure carries; :class:`TorchrunJobError` has the same attributes."""

    rank: Optional[int] = None
    local_rank: Optional[int] = None
    node: Optional[str] = None
    node_rank: Optional[int] = None
    exc_type: Optional[str] = None
    exc_message: Optional[str] = None
    traceback: Optional[str] = None
    exitcode: Optional[int] = None
    #: The whole error text (empty in a worker's claim: its node builds it).
    message: str = ""

    @classmethod
    def of(cls, error: BaseException) -> FailureRecord:
        """The record of a job error (attributes it lacks stay None)."""
        fields: dict[str, Any] = {
            f.name: getattr(error, f.name, None) for f in dataclasses.fields(cls)
        }
        fields["message"] = str(error.args[0]) if error.args else str(error)
        return cls(**fields).capped()

    def capped(self) -> FailureRecord:
        return dataclasses.replace(
            self,
            message=cap_text(self.message, keep_tail=True),
            exc_message=cap_text(self.exc_message),
            traceback=cap_text(self.traceback, keep_tail=True),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.capped())

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def from_dict(cls, data: Any) -> FailureRecord:
        """A record read from another process or host: each field checked for its type
        (raises ``ValueError``/``TypeError``/``KeyError`` on anything else)."""
        if not isinstance(data, dict):
            raise TypeError(f"a failure record is a JSON object, not {type(data).__name__}")

        def num(name: str) -> Optional[int]:
            return None if data.get(name) is None else int(data[name])

        def text(name: str) -> Optional[str]:
            return None if data.get(name) is None else str(data[name])

        return cls(
            rank=num("rank"),
            local_rank=num("local_rank"),
            node=text("node"),
            node_rank=num("node_rank"),
            exc_type=text("exc_type"),
            exc_message=text("exc_message"),
            traceback=text("traceback"),
            exitcode=num("exitcode"),
            message=str(data.get("message") or ""),
        )

    @classmethod
    def from_json(cls, payload: bytes) -> FailureRecord:
        return cls.from_dict(json.loads(payload))

    def error(self) -> TorchrunJobError:
        """The job error this record describes (its message as written)."""
        attrs = dataclasses.asdict(self)
        return TorchrunJobError(attrs.pop("message"), **attrs)

    def claimed_error(self) -> TorchrunJobError:
        """A worker's own claim (no message yet) as the job's error, in its one format."""
        if self.rank is None or self.local_rank is None or self.node_rank is None:
            raise KeyError("a claim names its rank, local rank and node rank")
        return job_error(
            rank=self.rank,
            local_rank=self.local_rank,
            node=str(self.node),
            node_rank=self.node_rank,
            what=f"raised {self.exc_type}: {self.exc_message}",
            exc_type=self.exc_type,
            exc_message=self.exc_message,
            traceback=self.traceback,
            exitcode=1 if self.exitcode is None else self.exitcode,  # torch's @record's
        )


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


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor on an accelerator (CUDA, MPS, XPU, ...) copied to the CPU.

    Rank 0 calls it on its return value before pickling it, so that unpickling the
    value in the Hydra process (or in a sweeper on a node without GPUs) never needs,
    nor initialises, CUDA. Walks dicts (``OrderedDict`` state dicts keep their
    ``_metadata``, ``defaultdict`` its factory), lists, tuples, named tuples, sets,
    frozensets and dataclass instances; an ``nn.Module`` is moved to the CPU in place
    (``module.cpu()``); attributes of other objects are not walked.

    Objects other than these, and containers that hold no accelerator tensor, are
    returned as the very same object; a container that does hold one is copied (same
    type), never changed in place. A tensor met twice gives one CPU tensor; a
    ``requires_grad`` tensor gives a CPU leaf that requires grad; an ``nn.Parameter``
    stays one; ``meta`` tensors (no data) are kept. Without torch imported there can be
    no tensor: ``value`` is returned as is and torch is not imported.
    """
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "Tensor"):
        return value
    return _CpuWalk(torch.Tensor, sys.modules.get("torch.nn")).walk(value)


#: Device types whose tensors stay where they are: the CPU, and ``meta`` (no data).
_KEEP_DEVICES = frozenset({"cpu", "meta"})
_ATOMS = (str, bytes, int, float, complex, type(None))


class _CpuWalk:
    def __init__(self, tensor_type: type, nn: Any) -> None:
        self.tensor_type = tensor_type
        self.parameter_type: Any = getattr(nn, "Parameter", None)
        self.module_type: Any = getattr(nn, "Module", None)
        self.memo: dict[int, Any] = {}  # id -> result: a shared object stays shared
        self.alive: list[Any] = []  # walked objects outlive the walk: ids stay unique

    def walk(self, value: Any) -> Any:
        if isinstance(value, _ATOMS):
            return value
        key = id(value)
        if key not in self.memo:
            self.memo[key] = value  # a reference cycle back to it finds the original
            self.alive.append(value)
            self.memo[key] = self._convert(value)
        return self.memo[key]

    def _walk_all(self, items: Any) -> Optional[list[Any]]:
        """The walked items, or None when every one came back unchanged."""
        walked = [self.walk(v) for v in items]
        return None if all(w is v for w, v in zip(walked, items, strict=True)) else walked

    def _convert(self, value: Any) -> Any:
        if isinstance(value, self.tensor_type):
            return self._tensor(value)
        if self.module_type is not None and isinstance(value, self.module_type):
            return value.cpu()  # in place: the same module, now on the CPU
        if isinstance(value, dict):
            keys = list(value)
            walked = self._walk_all([value[k] for k in keys])
            if walked is None:
                return value
            mapping = copy.copy(value)  # keeps the type, default_factory, _metadata
            mapping.update(zip(keys, walked, strict=True))
            return mapping
        if isinstance(value, list):
            walked = self._walk_all(value)
            if walked is None:
                return value
            seq = copy.copy(value)
            seq[:] = walked
            return seq
        if isinstance(value, (tuple, set, frozenset)):
            items = list(value)
            walked = self._walk_all(items)
            if walked is None:
                return value
            if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
                return type(value)(*walked)
            return type(value)(walked)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            names = [f.name for f in dataclasses.fields(value) if hasattr(value, f.name)]
            walked = self._walk_all([getattr(value, name) for name in names])
            if walked is None:
                return value
            instance = copy.copy(value)
            for name, item in zip(names, walked, strict=True):
                object.__setattr__(instance, name, item)  # frozen dataclasses too
            return instance
        return value

    def _tensor(self, tensor: Any) -> Any:
        if tensor.device.type in _KEEP_DEVICES:
            return tensor
        moved = tensor.detach().cpu()
        if self.parameter_type is not None and isinstance(tensor, self.parameter_type):
            return self.parameter_type(moved, requires_grad=tensor.requires_grad)
        return moved.requires_grad_() if tensor.requires_grad else moved
