"""Re-enter the Hydra job inside each torchrun worker and run the task once.

The agent starts :func:`run_worker` in every worker process (it must be an
importable module-level function: ``spawn`` pickles it by reference). The task,
the job's config and the Hydra process's state travel in one cloudpickled
payload passed as a process argument, never through a file.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._proc import die_with_parent, restore_signals
from hydra_torchrun_callback._result import to_cpu
from hydra_torchrun_callback._wire import pickling as _pickling
from hydra_torchrun_callback._wire.protocol import FAILURE_GRACE_ENV, LOCAL_SLOT_ENV, RECORDS_ENV
from hydra_torchrun_callback._wire.records import WorkerRecord
from hydra_torchrun_callback._worker.stacks import arm_worker

__all__ = ["WorkerPayload", "rank_logging_config", "run_worker"]


@dataclass
class WorkerPayload:
    """Everything a worker needs to look like the Hydra job it belongs to."""

    task: Callable[[Any], Any]
    #: The whole job config, ``hydra`` node included (HydraConfig is built from it).
    config: Any
    #: The job's working directory in the Hydra process (``hydra.job.chdir`` applied).
    cwd: str
    #: When the Hydra job started (epoch seconds): ``${now:...}`` resolves against it.
    started: float
    #: Rewrite the job logging config so each rank has its own file and prefix.
    per_rank_logging: bool = True
    #: OmegaConf resolvers the Hydra process registered (name -> cloudpickled resolver):
    #: a resolver registered in the app's ``main`` or by a library is not re-registered
    #: by a spawned worker's imports.
    resolvers: dict[str, bytes] = field(default_factory=dict)
    #: How to load the app's main module in a worker if something asks for it by name
    #: (``_target_: __main__.MyModel``): ("module", "pkg.app") or ("path", "/x/app.py").
    main_module: Optional[tuple[str, str]] = None


def describe_main_module(main: Any) -> Optional[tuple[str, str]]:
    """The Hydra process's ``__main__`` as something a worker can import again."""
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None) and spec.name != "__main__":
        return ("module", str(spec.name))  # python -m pkg.app
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and path.endswith(".py") and os.path.isfile(path):
        return ("path", os.path.abspath(path))
    return None


def _load_main_module(kind: str, target: str) -> Any:
    """Import the app's main module under another name (its ``__main__`` guard holds),
    as multiprocessing's spawn does, but only when something asks for it."""
    import importlib
    import importlib.util

    if kind == "module":
        return importlib.import_module(target)
    if "__mp_main__" in sys.modules and getattr(sys.modules["__mp_main__"], "__file__", None):
        return sys.modules["__mp_main__"]
    spec = importlib.util.spec_from_file_location("__mp_main__", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["__mp_main__"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["__mp_main__"]
        raise
    return module


def resolve_main_lazily(main_module: Optional[tuple[str, str]]) -> None:
    """Let ``__main__.Name`` lookups (Hydra's ``_target_``) find the app's names.

    Workers do not re-run the app's script at start-up (it costs time and breaks
    scripts without a ``__main__`` guard); a name missing from the worker's own
    ``__main__`` is looked up in the app's main module, imported on first use.
    """
    main = sys.modules.get("__main__")
    if main is None or main_module is None or "__getattr__" in main.__dict__:
        return
    kind, target = main_module
    loaded: list[Any] = []

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if not loaded:
            loaded.append(_load_main_module(kind, target))
        try:
            return getattr(loaded[0], name)
        except AttributeError:
            msg = f"module '__main__' ({target}) has no attribute {name!r}"
            raise AttributeError(msg) from None

    main.__dict__["__getattr__"] = __getattr__


#: Variables torch's agent sets for each worker: never overwritten from the payload.
_TORCH_WORKER_KEYS = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_NAME",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_WORLD_SIZE",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_USE_AGENT_STORE",
        "TORCHELASTIC_ERROR_FILE",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_ASYNC_ERROR_HANDLING",
        "TORCHELASTIC_ENABLE_FILE_TIMER",
        "TORCHELASTIC_TIMER_FILE",
        "CUDA_VISIBLE_DEVICES",
    }
)

#: Resolvers every worker registers itself (``now`` is pinned to the job start).
_OWN_RESOLVERS = ("now", "hydra")


def capture_resolvers() -> dict[str, bytes]:
    """The Hydra process's custom resolvers, each pickled on its own (skip what can't be)."""
    from omegaconf.basecontainer import BaseContainer

    from hydra_torchrun_callback._wire import pickling as _pickling

    captured: dict[str, bytes] = {}
    for name, resolver in BaseContainer._resolvers.items():
        if name in _OWN_RESOLVERS or name.startswith("oc."):
            continue
        try:
            captured[name] = _pickling.dumps(resolver)
        except Exception:  # an unpicklable resolver: the task fails only if it uses it
            continue
    return captured


class ReturnValueError(TypeError):
    """Rank 0's return value cannot travel back to the Hydra process."""


def rank_logging_config(job_logging: dict[str, Any], rank: int) -> dict[str, Any]:
    """Hydra's job logging config, adapted for one rank.

    Every format gets a ``[rankR]`` prefix and every file handler writes
    ``<stem>_rank<R><suffix>`` beside the job's own log, so ranks never
    interleave lines in one file and each line says who wrote it.
    """
    conf = copy.deepcopy(job_logging)
    for formatter in (conf.get("formatters") or {}).values():
        if not isinstance(formatter, dict):
            continue
        for key in ("format", "fmt"):
            if isinstance(formatter.get(key), str):
                formatter[key] = f"[rank{rank}]" + formatter[key]
    for handler in (conf.get("handlers") or {}).values():
        if isinstance(handler, dict) and isinstance(handler.get("filename"), str):
            path = Path(handler["filename"])
            handler["filename"] = str(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"))
    return conf


def adopt_agent_env(env: dict[str, str]) -> None:
    """Take the agent's environment at launch (a forkserver's is older), except what
    torch set for this very worker."""
    for key, value in env.items():
        if key not in _TORCH_WORKER_KEYS:
            os.environ[key] = value


def refresh_import_time_ranks(environ: Mapping[str, str]) -> None:
    """Give libraries that read the rank from the environment at import this worker's.

    A worker forked from a Hydra process that imported them (the app imports Lightning
    at the top, warm_server=auto) holds that process's reading, rank 0; a worker that
    imports them itself reads its own. Lightning's ``rank_zero_only.rank`` (shared by
    lightning, pytorch_lightning and lightning_fabric) is the one in common use: without
    this, ``@rank_zero_only`` code that runs before the Trainer sets it would run on
    every rank.
    """
    module = sys.modules.get("lightning_utilities.core.rank_zero")
    rank_zero_only = getattr(module, "rank_zero_only", None)
    if rank_zero_only is not None and hasattr(rank_zero_only, "rank") and "RANK" in environ:
        rank_zero_only.rank = int(environ["RANK"])


#: How long a raising worker waits before it exits (FAILURE_GRACE_ENV, from the agent:
#: its monitor interval plus a margin). torch's agent reports only the first failure it
#: sees in a monitor tick; a peer killed by a signal (which caused this exception: gloo's
#: "connection closed") must be seen first, as it is when workers are spawned and exit
#: slowly.


def failure_grace(monitor_interval: float) -> float:
    return min(1.0, monitor_interval + 0.1)


#: The grace of a worker whose collective failed because a peer went away: the peer's
#: death is the root cause, so it must be seen first even if the agent's monitor is
#: starved for a few ticks on a loaded host.
PEER_FAILURE_GRACE_S = 1.0


def _grace(exc: BaseException) -> float:
    try:
        grace = float(os.environ.get(FAILURE_GRACE_ENV, "0"))
    except ValueError:
        grace = 0.0
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return grace  # no peer
    dist = sys.modules.get("torch.distributed")
    peer_error = getattr(dist, "DistError", None)
    if isinstance(peer_error, type) and isinstance(exc, peer_error):
        return max(grace, PEER_FAILURE_GRACE_S)
    if isinstance(exc, RuntimeError):
        try:
            text = str(exc)
        except Exception:
            return grace
        if "gloo" in text or "NCCL" in text:
            return max(grace, PEER_FAILURE_GRACE_S)
    return grace


def take_host_slot(environ: MutableMapping[str, str]) -> None:
    """Make LOCAL_RANK / LOCAL_WORLD_SIZE count the host's workers, as torchrun on the
    host would: with 2 tasks of 1 worker on a 2-GPU host, LOCAL_RANK is 0 and 1, so
    ``cuda:LOCAL_RANK`` is a different GPU for each."""
    slot = environ.pop(LOCAL_SLOT_ENV, "")
    offset, _, host_workers = slot.partition(":")
    if offset.isdigit() and host_workers.isdigit() and "LOCAL_RANK" in environ:
        environ["LOCAL_RANK"] = str(int(offset) + int(environ["LOCAL_RANK"]))
        environ["LOCAL_WORLD_SIZE"] = host_workers


def _enter_hydra_job(payload: WorkerPayload, rank: int) -> Any:
    """Restore the Hydra job's state in this process; return the task's config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobRuntime, configure_log, setup_globals
    from omegaconf import OmegaConf, open_dict, read_write
    from omegaconf.basecontainer import BaseContainer

    config = payload.config
    if "OMP_NUM_THREADS" in os.environ and "torch" in sys.modules:
        # torch may have been imported (preloaded) before the variable was set.
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    setup_globals()
    resolve_main_lazily(payload.main_module)
    for name, resolver in payload.resolvers.items():
        BaseContainer._resolvers[name] = _pickling.loads(resolver)
    # ${now:...} not yet resolved in the Hydra process must still agree with it
    # (and between ranks): pin the resolver to the job's start time. Patterns
    # the Hydra process already resolved come from the pickled resolver cache.
    started = datetime.fromtimestamp(payload.started)
    OmegaConf.register_new_resolver(
        "now", lambda pattern: started.strftime(pattern), use_cache=True, replace=True
    )
    HydraConfig.instance().set_config(config)
    JobRuntime.instance().set("name", config.hydra.job.name)
    os.chdir(payload.cwd)
    for key, value in (config.hydra.job.env_set or {}).items():
        os.environ[str(key)] = str(value)

    job_logging = OmegaConf.to_container(config.hydra.job_logging, resolve=True)
    if isinstance(job_logging, dict) and job_logging:
        conf: dict[str, Any] = {str(k): v for k, v in job_logging.items()}
        if payload.per_rank_logging:
            conf = rank_logging_config(conf, rank)
        configure_log(OmegaConf.create(conf), config.hydra.verbose)

    # The unpickled config is this worker's own: HydraConfig keeps a copy of the
    # hydra node, so the task's config is the same object without it (no deepcopy:
    # 0.6 s per worker for a 10k-key config).
    with read_write(config), open_dict(config):
        del config["hydra"]
    return config


def _rank_log_file() -> Optional[str]:
    """The file this rank's log lines go to (where its stack dumps are appended)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return str(handler.baseFilename)
    return None


def _claim_first_failure(rank: int, exc: BaseException) -> None:
    """Multi-node: record in the job store that this rank failed, if none did before,
    and if so what it raised.

    Runs before the exception leaves this process, so it precedes every failure
    it causes in other ranks (they fail once this process is gone). The details let
    node 0 name the root cause even when this node's agent is stopped (by the other
    nodes' failures) before it can report it."""
    from hydra_torchrun_callback._wire.protocol import (
        FIRST_FAILED_KEY,
        FIRST_FAILURE_KEY,
        JOB_STORE_ENV,
    )

    spec = os.environ.get(JOB_STORE_ENV)
    if not spec:
        return
    try:
        import socket
        import traceback
        from datetime import timedelta

        import torch.distributed as dist

        from hydra_torchrun_callback._result import FailureRecord
        from hydra_torchrun_callback._wire.store import JobStore, Signer, load_secret

        address, prefix, session = spec.rsplit(" ", 2)
        if address.startswith("file:"):  # an elastic job's shared store (no node hosts it)
            store: Any = dist.FileStore(address[len("file:") :], -1)  # type: ignore[attr-defined]
            store.set_timeout(timedelta(seconds=5))
        else:
            host, port = address.rsplit(":", 1)
            store = dist.TCPStore(  # type: ignore[attr-defined]
                host,
                int(port),
                is_master=False,
                timeout=timedelta(seconds=5),
                wait_for_workers=False,
            )
        job_store = JobStore(store, prefix, Signer(load_secret(os.environ), session))
        if job_store.claim(FIRST_FAILED_KEY, str(rank).encode()):
            claim = FailureRecord(
                rank=rank,
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                node_rank=int(os.environ.get("GROUP_RANK", 0)),
                node=socket.gethostname(),
                exc_type=type(exc).__name__,
                exc_message=str(exc),
                traceback=traceback.format_exc(),
            )
            job_store.set_json(FIRST_FAILURE_KEY, claim.to_dict())
    except Exception:  # never mask the task's own error
        pass


_task_succeeded = False


def _fast_exit() -> None:
    """atexit: once the task succeeded, skip the interpreter's teardown.

    Registered before the task runs, so it runs after every exit handler the task
    registered (atexit is last-in, first-out) and before the ones imported libraries
    registered earlier, whose work it does itself (flush logs and streams). A
    spawned worker with torch loaded otherwise spends 0.3-0.6 s tearing modules
    down after its result was already delivered; fork-started children skip it too.
    """
    if not _task_succeeded:
        return  # a failing worker exits normally: nothing is cut short
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def run_worker(payload_bytes: bytes, env: Optional[dict[str, str]] = None) -> Optional[bytes]:
    """Worker entrypoint: run the task once; rank 0 returns its pickled value.

    ``env`` is the agent's environment at launch: a forkserver started by an earlier
    job of a multirun holds an older one, so workers take this one.
    """
    # torch's agent stops its workers when it exits normally or on a signal it can catch;
    # if it (or the warm server) is SIGKILLed they would be orphaned, blocked in a
    # collective until a 30-minute timeout.
    die_with_parent(os.getppid())
    restore_signals()  # a fork of the warm server: the signals it ignored act again
    atexit.register(_fast_exit)
    rank = int(os.environ["RANK"])
    adopt_agent_env(env or {})
    refresh_import_time_ranks(os.environ)
    take_host_slot(os.environ)
    # Before the record exists: a worker the node knows of can always be asked for stacks.
    arm_worker(os.environ.get(RECORDS_ENV), rank)
    record = WorkerRecord(os.environ)
    try:
        payload: WorkerPayload = _pickling.loads(payload_bytes)
        task_cfg = _enter_hydra_job(payload, rank)
        record.note(log=_rank_log_file())
        try:
            value = payload.task(task_cfg)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt) and not (
                isinstance(exc, SystemExit) and exc.code in (0, None)
            ):  # a stop or a clean exit is nobody's root cause
                _claim_first_failure(rank, exc)
                time.sleep(_grace(exc))
            raise
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
        data = None if rank != 0 else _pickle_return_value(value)
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: not the task's fault
        record.finish("interrupted", "SIGINT")
        raise
    except BaseException as exc:
        record.finish("raised", f"{type(exc).__name__}: {exc}".strip().rstrip(":"))
        raise
    record.finish("ok")
    global _task_succeeded
    _task_succeeded = True
    return data  # only global rank 0's value becomes the job's return value


def _pickle_return_value(value: Any) -> bytes:
    try:
        # CUDA tensors to CPU here: the Hydra process never initialises CUDA, and a node
        # without GPUs can read the value.
        try:
            on_cpu = to_cpu(value)
        except Exception:  # a container to_cpu cannot rebuild: send it as it is
            on_cpu = value
        return _pickling.dumps(on_cpu)
    except Exception as exc:
        raise ReturnValueError(
            f"rank 0's return value of type {type(value).__qualname__} cannot be pickled, "
            f"so it cannot become the Hydra job's return value ({type(exc).__name__}: {exc}). "
            "Return plain data (numbers, strings, dicts, tensors) or save the object to "
            "the job's output dir and return its path."
        ) from exc
