"""Warm start: workers forked from a server that already imported torch and Hydra.

The default ``start_method`` (``forkserver``) uses multiprocessing's forkserver, started
once per Hydra process and preloaded with :data:`WARM_PRELOAD`. Each worker is then a
fork of a warm interpreter instead of a fresh one importing torch (the bulk of a
worker's start-up).

Why it is safe on GPU machines:

- The server is a fresh interpreter (spawned, never forked from the Hydra process),
  and nothing preloaded initialises CUDA (torch initialises it lazily) or starts a
  thread: the server has one thread when it forks (``tests/test_orphans.py`` checks).
- The task's own module is never preloaded: it is imported in each worker, so a
  module that touches CUDA at import does it in the worker, as under torchrun.
- The server outlives the job it was started for (later jobs of a multirun reuse
  it), so each worker takes the agent's environment at launch (``adopt_agent_env``)
  and torch's thread count is re-applied.

Why nothing outlives the Hydra process: multiprocessing's server exits when every
holder of its "alive" pipe is gone, but each worker holds a copy of that pipe, and a
worker's death signal (``PR_SET_PDEATHSIG``) is tied to its parent, the server. If the
Hydra process is SIGKILLed (OOM killer, SLURM's final kill, a lost node), the server
and the workers would keep each other alive for ever, holding their GPUs. So the
server binds its own life to the Hydra process at preload (the first module it
imports is this one): the kernel SIGKILLs it when the Hydra process dies, and the
workers follow (their death signal). The same binding makes the server go at once
when the Hydra process exits normally, instead of tearing torch down for a second
while it holds the app's stdout/stderr pipes open.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, Optional

from hydra_torchrun_callback._proc import die_with_parent, shield_signals
from hydra_torchrun_callback._wire.protocol import WARM_PARENT_ENV

__all__ = [
    "WARM_PRELOAD",
    "bind_to_parent",
    "no_main_reimport",
    "overlaps_imports",
    "start_warm",
]

#: The Hydra process's pid, for the server to bind its life to (set while starting it).

#: What the server imports once, in this order. This module comes first: it binds the
#: server's life to the Hydra process before the slow imports.
WARM_PRELOAD = (
    "hydra_torchrun_callback._node.warm",
    "torch",
    "torch.distributed",
    "torch.distributed.elastic.multiprocessing.api",
    "omegaconf",
    "hydra.core.utils",
    "cloudpickle",
    "hydra_torchrun_callback._worker.entry",
)


def bind_to_parent(environ: Any = os.environ) -> bool:
    """In the warm server (a direct child of the Hydra process that named itself in
    :data:`WARM_PARENT_ENV`): die by SIGKILL when the Hydra process dies. True if bound.

    Anywhere else (the Hydra process, a worker importing this module) it does nothing.
    """
    parent = environ.get(WARM_PARENT_ENV, "")
    # SIGKILL: the server holds nothing to clean up.
    if not parent.isdigit() or not die_with_parent(int(parent)):
        return False
    environ.pop(WARM_PARENT_ENV, None)  # its forks (the workers) are not the server
    shield_signals()
    return True


@contextlib.contextmanager
def no_main_reimport() -> Iterator[None]:
    """Keep spawned workers from re-importing the app's ``__main__`` module.

    multiprocessing's spawn/forkserver re-run the parent's main script (as
    ``__mp_main__``) in every child so that objects pickled by reference to
    ``__main__`` resolve. The task and its config travel by value (cloudpickle),
    so the re-import only costs start-up time and breaks scripts that call
    ``main()`` without an ``if __name__ == "__main__":`` guard.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {
        key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__
    }
    main.__dict__.pop("__file__", None)
    if "__spec__" in saved:
        main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)


def overlaps_imports(cpus: int) -> bool:
    """Whether the server may import torch while this process imports its own (the agent's):
    only with a core for each. On one core the two imports only slow each other down
    (measured: 4 at once on 2 cores take 15 % longer than 2 then 2), so there the server
    starts after this process's import."""
    return cpus >= 2


def start_warm() -> Optional[int]:
    """Start (once per Hydra process) the preloaded server; return its pid.

    Call it from the main thread: the server's death signal is tied to the thread that
    starts it. It imports torch in its own process while this one goes on with the
    job's set-up, and serves every later job of a multirun.
    """
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload(list(WARM_PRELOAD))
    os.environ[WARM_PARENT_ENV] = str(os.getpid())
    try:
        with no_main_reimport():
            forkserver.ensure_running()
    finally:
        os.environ.pop(WARM_PARENT_ENV, None)
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return int(pid) if pid is not None else None


bind_to_parent()
