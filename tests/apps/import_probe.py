"""Imported by the hang app's task: records which processes imported it.

With HTR_IMPORT_PROBE=<file>, each process that imports this module appends its pid
(the warm server must never be one of them: the task's module is the workers')."""

import os

_path = os.environ.get("HTR_IMPORT_PROBE")
if _path:
    with open(_path, "a") as f:
        f.write(f"{os.getpid()}\n")


def imported_by() -> int:
    return os.getpid()
