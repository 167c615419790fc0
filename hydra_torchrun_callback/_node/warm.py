"""Warm start: workers forked from a server that already imported torch and Hydra.

The default ``start_method`` (``forkserver``) uses multiprocessing's forkserver, started
once per Hydra process and preloaded with :data:`WARM_PRELOAD`. Each worker is then a
fork of a warm interpreter instead of a fresh one importing torch (the bulk of a
worker's start-up).

Why it is safe on GPU machines:

- A spawned server is a fresh interpreter, and nothing preloaded initialises CUDA
  (torch initialises it lazily) or starts a thread: the server has one thread when it
  forks (``tests/test_orphans.py`` checks). A forked server (below) comes only from a
  process that has no other thread and has not loaded the CUDA driver.
- A spawned server never imports the task's own module: each worker does, so a module
  that touches CUDA at import does it in the worker, as under torchrun.
- The server outlives the job it was started for (later jobs of a multirun reuse
  it), so each worker takes the agent's environment at launch (``adopt_agent_env``)
  and torch's thread count is re-applied.

Why nothing outlives the Hydra process: multiprocessing's server exits when every
holder of its "alive" pipe is gone, but each worker holds a copy of that pipe, and a
worker's death signal (``PR_SET_PDEATHSIG``) is tied to its parent, the server. If the
Hydra process is SIGKILLed (OOM killer, SLURM's final kill, a lost node), the server
and the workers would keep each other alive for ever, holding their GPUs. So the
server binds its own life to the Hydra process at preload (the first module it
imports is this one; a forked server, right after the fork): the kernel SIGKILLs it
when the Hydra process dies, and the workers follow (their death signal). The same
binding makes the server go at once when the Hydra process exits normally, instead of
tearing torch down for a second while it holds the app's stdout/stderr pipes open.

Apps that import torch at module top (most training scripts): the Hydra process has
already paid for torch, and a spawned server would import it a second time on the node
(~1.3 s of CPU, more with Lightning). So when torch is in ``sys.modules`` and the Hydra
process is fork-safe (:func:`fork_unsafe_reason`: on its main thread, no other Python
thread, no native thread once numpy's OpenBLAS pool is stopped as OpenBLAS itself does
before a fork, the CUDA driver not loaded), the server is a *fork* of the Hydra process
made once, at the first job's start, before any thread of ours starts; it then imports
only what the Hydra process lacks. The fork sheds what the Hydra process set up for
itself: Python signal handlers (submitit's, ours) go back to their defaults (an ignored
signal stays ignored; signals are blocked across the fork so none runs a parent's handler
in the child), buffered output is flushed first so nothing is written twice, the root
logger's handlers go, multiprocessing's forkserver state is a fresh one, what it
inherited is frozen out of the garbage collector's reach (``gc.freeze``, as Python's docs
advise for a fork), and it binds its life to the Hydra process as a spawned server does.
Otherwise (a thread started at import, OpenMP's pool after a parallel torch op, CUDA
touched at import) the server is spawned as above, and a log line says why. What the
workers then inherit is what ``start_method=fork`` gives: the app's modules as the Hydra
process imported them (module state computed from the environment at import holds the
Hydra process's values; Lightning's ``rank_zero_only.rank`` is set right in each worker;
``warm_server=fresh`` restores torchrun's per-worker imports).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

from hydra_torchrun_callback._proc import die_with_parent, shield_signals
from hydra_torchrun_callback._wire.protocol import WARM_PARENT_ENV

__all__ = [
    "WARM_PRELOAD",
    "bind_to_parent",
    "fork_unsafe_reason",
    "fork_verdict",
    "no_main_reimport",
    "overlaps_imports",
    "server_is_fork",
    "start_warm",
]

log = logging.getLogger("hydra_torchrun_callback")

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


def start_warm(mode: str = "auto") -> Optional[int]:
    """Start (once per Hydra process) the preloaded server; return its pid.

    ``mode`` is the ``warm_server`` option: "auto" forks this process when torch is
    already imported here and the fork is safe, "fork" insists (an error says why it
    cannot), "fresh" always spawns. Call it from the main thread: the server's death
    signal is tied to the thread that starts it. A spawned server imports torch in its
    own process while this one goes on with the job's set-up; a forked one only imports
    what this process lacks. It serves every later job of a multirun (a job asking for
    the other kind replaces it).
    """
    from multiprocessing import forkserver

    running = _running_server()
    if running is not None and not _is_child(running):
        return running  # the agent, given its server: the Hydra process chose its kind
    if running is not None:
        if mode == "fresh" and running == _forked_pid:
            _retire_forked_server()
        elif mode == "fork" and running != _forked_pid:
            _refuse_fork("an earlier job of this process started a fresh server")
        else:
            return running
    if mode != "fresh":
        if mode == "auto" and "torch" not in sys.modules:
            why: Optional[str] = "the app did not import torch"  # the server imports it
        else:
            why = fork_unsafe_reason()
        if why is None:
            pid = _fork_server()
            if pid is not None:
                return pid
            why = "os.fork() failed (see the warning above)"
        if mode == "fork":
            _refuse_fork(why)
        if "torch" in sys.modules:
            log.info(
                "warm start: torch is already imported here, but this process is not safe "
                "to fork (%s): the warm server is a fresh interpreter that imports torch "
                "again (hydra.callbacks.torchrun.warm_server)",
                why,
            )
    import multiprocessing

    multiprocessing.set_forkserver_preload(list(WARM_PRELOAD))
    os.environ[WARM_PARENT_ENV] = str(os.getpid())
    try:
        with no_main_reimport():
            forkserver.ensure_running()
    finally:
        os.environ.pop(WARM_PARENT_ENV, None)
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return int(pid) if pid is not None else None


def _refuse_fork(why: str) -> None:
    from hydra_torchrun_callback._options import TorchrunOptionError

    raise TorchrunOptionError(
        "warm_server", "fork", f"this Hydra process cannot be forked safely: {why}", "auto"
    )


_forked_pid: Optional[int] = None


def server_is_fork() -> bool:
    """Whether this process's warm server is a fork of it (torch imported once)."""
    return _forked_pid is not None and _running_server() == _forked_pid


def _running_server() -> Optional[int]:
    """The warm server's pid if this process started one that still runs."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return None
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (the agent, given its server's address),
        done = 0  # or reaped elsewhere (SIGCHLD ignored, a library's os.wait)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            done = pid
        except PermissionError:
            pass
    if not done:
        return int(pid)
    _forget_server()  # gone: as ensure_running does, so that a new one can start
    return None


def _is_child(pid: int) -> bool:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == (
            os.getpid()
        )
    except (OSError, ValueError, IndexError):
        return False


def _forget_server() -> None:
    from multiprocessing import forkserver

    global _forked_pid
    server: Any = forkserver._forkserver
    with contextlib.suppress(OSError, TypeError):
        os.close(server._forkserver_alive_fd)
    server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None
    _forked_pid = None


def _retire_forked_server() -> None:
    """A job asked for a fresh server: let the forked one go (it exits when its alive
    pipe closes: the jobs it served are over) and reap it."""
    import time

    pid = _forked_pid
    _forget_server()
    deadline = time.monotonic() + 2.0
    while pid is not None and time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
        except ChildProcessError:
            break
        time.sleep(0.01)


# -- a server forked from the Hydra process ------------------------------------------------
def fork_verdict(
    *,
    main_thread: bool,
    python_threads: Sequence[str],
    native_threads: int,
    cuda: bool,
) -> Optional[str]:
    """Why a process in this state must not be forked into the warm server (None: it may).

    ``native_threads`` counts the process's threads besides the main one (``/proc``),
    once OpenBLAS's pthreads pool is stopped (:func:`_quiesce_openblas`). Any other
    thread may hold a lock the fork copies locked (a Python thread, OpenMP's pool after
    a parallel torch op: a forked child hangs in its next parallel region), and a
    process that used the CUDA driver (``torch.cuda.is_available()`` or any CUDA call:
    ``libcuda`` is loaded) cannot use CUDA in a fork at all."""
    if not main_thread:
        return "the job does not run on the main thread"
    if python_threads:
        return f"Python threads are running: {', '.join(sorted(python_threads))}"
    if cuda:
        return (
            "CUDA is in use (the CUDA driver is loaded: torch.cuda.is_available(), "
            "device_count() or a CUDA call at import)"
        )
    if native_threads > 0:
        return (
            f"{native_threads} native thread(s) are running (OpenMP's pool after a "
            "parallel torch op, an OpenMP build of OpenBLAS, an I/O library's thread)"
        )
    return None


def fork_unsafe_reason() -> Optional[str]:
    """:func:`fork_verdict` for this process, read from ``threading``, ``/proc`` and torch."""
    main = threading.main_thread()
    others = [t.name for t in threading.enumerate() if t is not main and t.is_alive()]
    if not hasattr(os, "register_at_fork") or not _forkserver_internals():
        return "this Python's multiprocessing.forkserver is not the one this was written for"
    maps = _mapped_libraries()
    if not others:
        _quiesce_openblas(maps)
    try:
        native = len(os.listdir("/proc/self/task")) - 1
    except OSError:
        return "/proc/self/task cannot be read (threads unknown)"
    torch_cuda = sys.modules.get("torch.cuda")
    cuda = any(os.path.basename(path).startswith("libcuda.so") for path in maps)
    if torch_cuda is not None and not cuda:
        with contextlib.suppress(Exception):
            cuda = bool(torch_cuda.is_initialized())
    return fork_verdict(
        main_thread=threading.current_thread() is main,
        python_threads=others,
        native_threads=native - len(others),
        cuda=cuda,
    )


def _forkserver_internals() -> bool:
    """CPython 3.10-3.13's ForkServer: the fields :func:`_fork_server` fills in as
    ``ensure_running`` does (3.14 adds an auth key: it then spawns, as before)."""
    import inspect
    from multiprocessing import forkserver

    fields = vars(forkserver._forkserver)
    wanted = {"_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_lock"}
    params = list(inspect.signature(forkserver.main).parameters)
    return (
        wanted <= set(fields)
        and "_forkserver_authkey" not in fields
        and params[:3] == ["listener_fd", "alive_r", "preload"]
    )


def _mapped_libraries() -> set[str]:
    """The shared libraries mapped in this process."""
    paths = set()
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            if ".so" in path:
                paths.add(path)
    return paths


#: OpenBLAS builds' threading-model getters (plain, 64-bit-int, numpy's scipy-openblas):
#: 0 sequential, 1 pthreads, 2 OpenMP.
_OPENBLAS_PARALLEL = (
    "openblas_get_parallel",
    "openblas_get_parallel64_",
    "scipy_openblas_get_parallel",
    "scipy_openblas_get_parallel64_",
)


def _quiesce_openblas(maps: set[str]) -> None:
    """Stop the pthreads pool of each OpenBLAS loaded here (numpy's), as OpenBLAS's own
    ``pthread_atfork`` handler does before any fork; its next call starts it again. An
    OpenMP build is left alone: its threads are OpenMP's, and they make the fork unsafe."""
    import ctypes

    for path in maps:
        if "openblas" not in os.path.basename(path).lower():
            continue
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
        except OSError:
            continue
        model = next((getattr(lib, n) for n in _OPENBLAS_PARALLEL if hasattr(lib, n)), None)
        shutdown = getattr(lib, "blas_thread_shutdown_", None)
        if model is None or shutdown is None:
            continue
        model.restype = ctypes.c_int
        if int(model()) == 1:
            shutdown.restype = ctypes.c_int
            shutdown()


def _flush_output() -> None:
    """Write out what this process buffered, so that the fork does not write it again."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    for ref in list(getattr(logging, "_handlerList", [])):
        handler = ref()
        if handler is not None:
            with contextlib.suppress(Exception):
                handler.flush()


def _default_handlers() -> None:
    """In the fork: Python-level signal handlers back to a fresh interpreter's (submitit's
    requeue handler, the agent link's forwarding must not run in the server or its
    workers); a signal the Hydra process ignores stays ignored, as it would for a child."""
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (ValueError, OSError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            fresh = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                signal.signal(sig, fresh)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


def _drop_root_handlers() -> None:
    """In the fork: none of the root logger's handlers (what Hydra configured for this
    process: its console, the job's log file), as in a fresh server; the agent sends its
    records to the Hydra process and each worker configures its own. Handlers libraries
    put on their own loggers at import (torch's, Lightning's) stay, as a fresh worker
    importing them would have them. Nothing is flushed or closed here: the buffers were
    written out before the fork."""
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)


def _fork_server() -> Optional[int]:
    """Fork this process into multiprocessing's forkserver (what ``ensure_running``
    spawns), registered where ``ensure_running`` would register a spawned one; None if
    the fork failed (no memory for the copy, a pids limit)."""
    import multiprocessing
    import socket
    from multiprocessing import connection, forkserver, resource_tracker, util

    global _forked_pid
    server: Any = forkserver._forkserver
    # If this server dies, a respawned one preloads the same (never the app's __main__).
    multiprocessing.set_forkserver_preload(list(WARM_PRELOAD))
    with server._lock:
        resource_tracker.ensure_running()  # its fd is inherited: one tracker for all
        address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(address)
            if not util.is_abstract_socket_namespace(address):
                os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()
            parent = os.getpid()
            _flush_output()
            # No handler of this process may run in the child before it resets them.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            try:
                pid = os.fork()
                if pid == 0:  # the server: never returns
                    _serve(listener.fileno(), alive_r, alive_w, parent, mask)
            except OSError as exc:
                pid = -1
                log.warning("warm start: could not fork the warm server: %s", exc)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(alive_r)
            if pid < 0:
                os.close(alive_w)
                if not util.is_abstract_socket_namespace(address):
                    with contextlib.suppress(OSError):
                        os.unlink(address)
                return None
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid
    _forked_pid = pid
    log.debug("warm start: the warm server is pid %d, a fork of this process", pid)
    return pid


def _serve(
    listener_fd: int, alive_r: int, alive_w: int, parent: int, mask: Iterable[int]
) -> NoReturn:
    """The forked server's whole life: bound to the Hydra process, serve forks until
    every holder of the alive pipe is gone (multiprocessing's own loop)."""
    code = 1
    try:
        # What the Hydra process had (torch, the app's modules, Lightning: millions of
        # objects) is never garbage here: out of the collector's reach, so that the
        # collections of the server, the agent and the workers neither walk it nor write
        # to its pages (a copy of each page touched, instead of one shared copy).
        gc.freeze()
        os.close(alive_w)  # only the Hydra process (and the workers) keep the server up
        _default_handlers()
        if die_with_parent(parent):
            shield_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _drop_root_handlers()
        _fresh_forkserver_state()
        from multiprocessing import forkserver

        forkserver.main(listener_fd, alive_r, list(WARM_PRELOAD), None, None)
        code = 0
    except SystemExit as exc:  # how forkserver.main ends: every holder of the pipe gone
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:  # a server's death says why, then ends
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
    finally:
        os._exit(code)


def _fresh_forkserver_state() -> None:
    """In the fork: multiprocessing's forkserver state as a fresh interpreter has it (the
    Hydra process held the lock while it forked; a worker that starts processes with a
    forkserver context must find it free and start its own server)."""
    from multiprocessing import forkserver

    global _forked_pid
    server: Any = forkserver._forkserver
    server._lock = threading.Lock()
    server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None
    _forked_pid = None


bind_to_parent()
