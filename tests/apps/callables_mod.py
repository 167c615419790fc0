"""Importable task callables (pickled by reference)."""

import os
from typing import Any


def _record(kind: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "rank": int(os.environ["RANK"]), "pid": os.getpid(), **extra}


def module_task(cfg: Any) -> dict[str, Any]:
    return _record("module", x=cfg.x)


def scaled_task(cfg: Any, scale: int) -> dict[str, Any]:
    return _record("partial", x=cfg.x * scale)


class TaskObject:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, cfg: Any) -> dict[str, Any]:
        return _record("object", x=cfg.x + self.offset)

    def method(self, cfg: Any) -> dict[str, Any]:
        return _record("method", x=cfg.x - self.offset)


class SlotsTask:
    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, cfg: Any) -> dict[str, Any]:
        return _record("slots", x=cfg.x * 10 + self.offset)
