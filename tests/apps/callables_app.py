"""Run one kind of task callable through Hydra with the callback; print the outcome.

usage: callables_app.py KIND [overrides...]
"""

import functools
import json
import os
import sys
from typing import Any

from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra

from callables_mod import SlotsTask, TaskObject, _record, module_task, scaled_task


def main_task(cfg: Any) -> dict[str, Any]:
    """Defined in the app's __main__ (cloudpickle sends it by value)."""
    return _record("main", x=cfg.x)


def make_closure(bias: int) -> Any:
    def closure_task(cfg: Any) -> dict[str, Any]:
        return _record("closure", x=cfg.x + bias)

    return closure_task


def identity(task: Any) -> Any:
    """What must be unchanged after the job: code objects and classes."""
    if isinstance(task, functools.partial):
        return ("partial", task.func.__code__, task.args, tuple(task.keywords.items()))
    if hasattr(task, "__func__"):
        return ("method", task.__func__.__code__)
    if hasattr(task, "__code__"):
        return ("function", task.__code__, task.__closure__)
    return ("object", type(task))


def run() -> None:
    kind, overrides = sys.argv[1], sys.argv[2:]
    tasks = {
        "main": main_task,
        "closure": make_closure(7),
        "module": module_task,
        "partial": functools.partial(scaled_task, scale=3),
        "object": TaskObject(5),
        "method": TaskObject(5).method,
        "slots": SlotsTask(4),
    }
    task = tasks[kind]
    before = identity(task)
    hydra = Hydra.create_main_hydra2(
        task_name="callables", config_search_path=create_config_search_path(None)
    )
    try:
        ret = hydra.run(
            config_name=None,
            task_function=task,
            overrides=["hydra/callbacks=torchrun", "+x=2", *overrides],
            with_log_configuration=True,
        )
    finally:
        GlobalHydra.instance().clear()
    value = ret._return_value
    os.environ["RANK"] = "-1"  # for the direct call below, outside torchrun
    print(
        "RESULT "
        + json.dumps(
            {
                "status": ret.status.name,
                "value": value if isinstance(value, dict) else repr(value),
                "hydra_pid": os.getpid(),
                "unchanged": identity(task) == before,
                # Calling it again now runs the real body here (it is no longer diverted).
                "direct": task(type("C", (), {"x": 1})()) if kind != "partial" else None,
            },
            default=str,
        )
    )


if __name__ == "__main__":
    run()
