"""Make Hydra's own call of the task deliver the distributed outcome instead.

Hydra's callback API cannot replace the task function: ``run_job`` calls
``task_function(task_cfg)`` right after ``on_job_start`` returns, and turns an
exception raised in a hook into a warning. So after the workers are done, the
callback *diverts* that one call: the Python code the call would run is swapped
for a trampoline that restores the original and returns rank 0's value (or
raises the job's error). The task body therefore never runs in the Hydra
process, and the task object is exactly as it was once the call is over.

What gets swapped, by kind of callable:
- a Python function (module-level, ``__main__``, closure): its ``__code__``;
- a bound method: its function's ``__code__``;
- ``functools.partial``: whatever its ``func`` is, recursively;
- a callable object: its ``__class__``, for a same-layout subclass whose
  ``__call__`` is the trampoline.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Diversion", "DivertError", "Outcome", "can_divert", "divert"]


class DivertError(TypeError):
    """This callable's call cannot be intercepted (e.g. a C builtin)."""


@dataclass
class Outcome:
    """What the task's call in the Hydra process must produce."""

    value: Any = None
    error: Optional[BaseException] = None


_lock = threading.Lock()
_armed: dict[int, tuple[Outcome, Callable[[], None]]] = {}
_tokens = itertools.count(1)


def _deliver(token: int) -> Any:
    """Called by a trampoline: restore the original task, then deliver."""
    with _lock:
        outcome, restore = _armed.pop(token)
    restore()
    if outcome.error is not None:
        # The error's own traceback is the callback's plumbing; the worker's
        # traceback is in its message. Keep what Hydra prints short.
        raise outcome.error.with_traceback(None)
    return outcome.value


def _trampoline_code(token: int, nfree: int, name: str, qualname: str) -> types.CodeType:
    """Code taking any arguments that calls ``_deliver(token)``.

    It needs as many free variables as the function it replaces (CPython checks
    ``len(co_freevars) == len(__closure__)``); they are never read. It finds
    this module through ``__import__`` because it runs with the user's globals.
    """
    names = [f"_free{i}" for i in range(nfree)]
    src = "def _outer():\n"
    src += "".join(f"    {n} = None\n" for n in names)
    src += "    def _trampoline(*args, **kwargs):\n"
    if names:
        src += f"        if False: ({', '.join(names)},)\n"
    src += (
        f"        return __import__('{__name__}', fromlist=['_deliver'])._deliver({token})\n"
        "    return _trampoline\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(src, "<hydra_torchrun_callback: task ran under torchrun>", "exec"), namespace)
    code: types.CodeType = namespace["_outer"]().__code__
    if sys.version_info >= (3, 11):  # 3.10 keeps the qualified name on the function only
        return code.replace(co_name=name, co_qualname=qualname)
    return code.replace(co_name=name)


@dataclass
class Diversion:
    """An armed diversion; :meth:`restore` undoes it (idempotent)."""

    token: int

    def restore(self) -> None:
        with _lock:
            armed = _armed.pop(self.token, None)
        if armed is not None:
            armed[1]()


def _swap_function(func: types.FunctionType, token: int) -> Callable[[], None]:
    original = func.__code__
    func.__code__ = _trampoline_code(
        token, len(original.co_freevars), original.co_name, func.__qualname__
    )

    def restore() -> None:
        func.__code__ = original

    return restore


def _swap_object(obj: Any, token: int) -> Callable[[], None]:
    cls = type(obj)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _deliver(token)

    diverted = type(cls.__name__, (cls,), {"__call__": __call__, "__slots__": ()})
    diverted.__qualname__ = cls.__qualname__
    diverted.__module__ = cls.__module__
    try:
        obj.__class__ = diverted
    except TypeError as exc:
        raise DivertError(f"cannot intercept calls of {cls.__qualname__} objects: {exc}") from exc

    def restore() -> None:
        obj.__class__ = cls

    return restore


def _swap(task: Any, token: int) -> Callable[[], None]:
    if isinstance(task, functools.partial):
        return _swap(task.func, token)
    if isinstance(task, types.MethodType):
        return _swap(task.__func__, token)
    if isinstance(task, types.FunctionType):
        return _swap_function(task, token)
    if isinstance(task, (types.BuiltinFunctionType, types.BuiltinMethodType, type)):
        raise DivertError(
            f"{task!r} is a builtin or a class; the callback needs a Python function, "
            "a functools.partial of one, or a callable object"
        )
    if callable(task):
        return _swap_object(task, token)
    raise DivertError(f"{task!r} is not callable")


def can_divert(task: Any) -> None:
    """Raise :class:`DivertError` now if :func:`divert` would fail later."""
    restore = _swap(task, 0)
    restore()


def divert(task: Any, outcome: Outcome) -> Diversion:
    """Arm ``task`` so that its next call delivers ``outcome`` and restores it."""
    token = next(_tokens)
    with _lock:
        restore = _swap(task, token)
        _armed[token] = (outcome, restore)
    return Diversion(token)
