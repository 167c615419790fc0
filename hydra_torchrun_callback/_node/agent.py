"""Run one torch elastic agent in this (the Hydra) process and wait for it.

Builds torch's ``LaunchConfig`` directly (the programmatic layer, not torchrun's
CLI parser) and calls ``launch_agent`` with :func:`_worker.run_worker` as the
entrypoint. Whatever the agent changes in this process (environment variables,
signal handlers) is put back afterwards, so jobs of a multirun do not leak into
each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._node.coordinator import JobCoordinator
from hydra_torchrun_callback._node.placement import Placement, free_port
from hydra_torchrun_callback._node.records import NodeRecords
from hydra_torchrun_callback._node.warm import no_main_reimport
from hydra_torchrun_callback._options import Options, StdSpec
from hydra_torchrun_callback._proc import (
    agent_host,
    alive,
    descendants,
    job_pid,
    parent_of,
    stop_self,
    worker_root,
)
from hydra_torchrun_callback._result import TorchrunJobError, root_cause_error
from hydra_torchrun_callback._wire.store import (
    Signer,
    load_secret,
    released_spare,
    rendezvous_signer,
)

__all__ = ["AgentResult", "launch"]


_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    if hasattr(signal, name)
)


class AgentResult:
    """What the local agent got back: per global rank, the worker's return value."""

    def __init__(self, values: dict[int, Any], placement: Placement) -> None:
        self.values = values
        self.placement = placement

    @property
    def rank0_payload(self) -> Optional[bytes]:
        """Global rank 0's pickled return value, if rank 0 ran on this node."""
        value = self.values.get(0)
        return value if isinstance(value, bytes) else None


#: torch logs each worker failure with its whole traceback; the job's error
#: already carries the root cause, so this logger is quieted during a launch.
_NOISY_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _FailureTap(logging.Filter):
    """Quiet torch's per-failure log record, keeping the exit code it carries.

    torch logs a failed worker's exit code and pid once per failed attempt, also for
    attempts it then restarts (which ``launch_agent`` never reports): the job summary
    takes them from here.
    """

    def __init__(self, records: Optional[NodeRecords]) -> None:
        super().__init__()
        self.records = records

    def filter(self, record: logging.LogRecord) -> bool:
        if self.records is not None and str(record.msg).startswith("failed (exitcode"):
            args = record.args if isinstance(record.args, tuple) else ()
            with contextlib.suppress(TypeError, ValueError, IndexError):
                self.records.exit_codes[int(str(args[2]))] = int(str(args[0]))
        return record.levelno >= logging.CRITICAL


@contextlib.contextmanager
def isolated_process_state(records: Optional[NodeRecords] = None) -> Iterator[None]:
    """Put environment variables, signal handlers and log filters back as they were."""
    env = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    noisy = logging.getLogger(_NOISY_LOGGER)
    tap = _FailureTap(records)
    noisy.addFilter(tap)
    try:
        yield
    finally:
        noisy.removeFilter(tap)
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        for sig, handler in handlers.items():
            with contextlib.suppress(ValueError, TypeError):  # not in the main thread
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


#: How long workers get to act on a preemption signal (save a checkpoint, exit)
#: before submitit's own handler requeues the job and exits this process: the
#: ``preemption_grace`` option's default.
PREEMPT_GRACE_S = 30.0


def _worker_pids() -> list[int]:
    """The node's live worker processes found by a scan (not mp's helpers): this
    process's descendants, or the warm server's when the agent is its fork."""
    from multiprocessing import forkserver

    # Not workers: this agent (a fork of the server too), the server (a child of the
    # agent's process when the agent runs there), multiprocessing's resource tracker.
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    helpers = {os.getpid(), server}
    root = worker_root()
    found = []
    for pid in descendants(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if pid in helpers or b"multiprocessing.resource_tracker" in cmd:
                continue
            # A forkserver a worker started for itself (a DataLoader's forkserver
            # context), and its forks: not the node's workers (they have the spawned
            # warm server's command line too, but their parent is the warm server).
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if b"multiprocessing.forkserver" in cmd and parent not in (root, server):
                continue
            found.append(pid)
    return found


def preemption_signal(env: Mapping[str, str]) -> Optional[signal.Signals]:
    """The signal submitit uses to announce preemption/timeout, if under submitit/SLURM."""
    if "SUBMITIT_EXECUTOR" not in env and "SLURM_JOB_ID" not in env:
        return None
    name = "SIG" + env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal.Signals, name, None)


def recorded_workers(records: Optional[NodeRecords]) -> Callable[[], list[int]]:
    """The pids of this node's running workers: from their records (the agent's own
    children, whatever the start method; never their DataLoader children), else a scan."""
    if records is None:
        return _worker_pids

    def pids() -> list[int]:
        ours = set(descendants(worker_root()))
        return [int(r["pid"]) for r in records.live() if int(r["pid"]) in ours]

    return pids


@contextlib.contextmanager
def forward_preemption(
    sig: Optional[signal.Signals],
    workers: Callable[[], list[int]] = _worker_pids,
    grace: float = PREEMPT_GRACE_S,
) -> Iterator[None]:
    """Pass the preemption signal on to the workers, give them time to checkpoint,
    then let the handler that was there (submitit's: checkpoint + requeue) run: in the
    Hydra process, when the agent runs in a fork of the warm server."""
    if sig is None:
        yield
        return
    previous = signal.getsignal(sig)
    host = agent_host()
    then = host.preempted if host is not None else previous

    def handler(signum: int, frame: Any) -> None:
        pids = alive(workers())
        log.warning("got %s: passing it to %d worker(s)", signal.Signals(signum).name, len(pids))
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if callable(then):
            for pid in alive(pids):  # about to exit/requeue: leave nothing behind
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            then(signum, frame)

    try:
        signal.signal(sig, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(sig, previous)


#: How often an emulated node checks that the Hydra process that launched it lives.
LAUNCHER_POLL_S = 0.5


@contextlib.contextmanager
def follow_local_launcher(env: Mapping[str, str]) -> Iterator[None]:
    """An emulated node (a submitit_local task) stops when the Hydra process that
    launched it is gone.

    submitit cancels its local jobs when that process exits normally; if it is
    SIGKILLed, submitit's controller and its tasks (our agents and their workers) would
    run on, unwatched, to the end of the job. The node then terminates itself the way
    scancel would (SIGTERM: the agent stops its workers, the job fails as stopped).
    """
    controller = parent_of(job_pid())
    launcher = parent_of(controller) if controller else None
    cmd = b""
    with contextlib.suppress(OSError):
        cmd = Path(f"/proc/{controller}/cmdline").read_bytes()
    local = env.get("SUBMITIT_EXECUTOR") == "local" and b"submitit.local" in cmd
    if not local or not controller or not launcher:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(LAUNCHER_POLL_S):
            if parent_of(controller) != launcher:
                log.error(
                    "the Hydra process that launched this emulated node (pid %d) is gone: "
                    "stopping the node",
                    launcher,
                )
                stop_self(signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, name="torchrun-launcher-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def _std(spec: StdSpec) -> Any:
    from torch.distributed.elastic.multiprocessing import Std

    if isinstance(spec, int):
        return Std(spec)
    return {rank: Std(code) for rank, code in spec.items()}


def _port_race(exc: BaseException) -> bool:
    text = f"{exc!r} {exc.__cause__!r}"
    return "EADDRINUSE" in text or "address already in use" in text.lower()


#: torchrun's environment variable for the workers' output line prefix (``[${rank}]:``).
LOG_PREFIX_ENV = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"


def _logs_specs_class(name: Optional[str]) -> Any:
    """torchrun's ``--logs-specs``: a class from the ``torchrun.logs_specs`` entry points."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

    if name is None:
        return DefaultLogsSpecs
    from importlib import metadata

    return metadata.entry_points(group="torchrun.logs_specs")[name].load()


def _launch_config(opts: Options, placement: Placement, log_dir: str) -> Any:
    """torch's ``LaunchConfig`` from the options, as torchrun's ``config_from_args`` builds
    it; the options torch gained after our floor only where the installed torch has them
    (setting one on an older torch is refused earlier, by ``check_torch_supports``)."""
    import dataclasses

    from torch.distributed.launcher.api import LaunchConfig

    logs_specs = _logs_specs_class(opts.logs_specs)(
        log_dir=log_dir,
        redirects=_std(opts.redirects),
        tee=_std(opts.tee),
        local_ranks_filter=set(opts.local_ranks_filter) if opts.local_ranks_filter else None,
    )
    from hydra_torchrun_callback._wire.store import BACKEND_NAME

    # c10d's state (a pickle torch reads from the store) goes through the signed backend.
    backend = BACKEND_NAME if placement.rdzv_backend == "c10d" else placement.rdzv_backend
    newer: dict[str, Any] = {
        "log_line_prefix_template": os.environ.get(LOG_PREFIX_ENV),
        "event_log_handler": opts.event_log_handler,
        "signals_to_handle": opts.signals_to_handle,
        "duplicate_stdout_filters": list(opts.duplicate_stdout_filters) or None,
        "duplicate_stderr_filters": list(opts.duplicate_stderr_filters) or None,
        "virtual_local_rank": opts.virtual_local_rank,
        "shutdown_timeout": opts.shutdown_timeout,
    }
    if opts.numa_binding is not None:
        from torch.numa.binding import AffinityMode, NumaOptions

        newer["numa_options"] = NumaOptions(affinity_mode=AffinityMode(opts.numa_binding))
    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    return LaunchConfig(
        min_nodes=placement.min_nodes,
        max_nodes=placement.max_nodes,
        nproc_per_node=placement.nproc_per_node,
        logs_specs=logs_specs,
        run_id=placement.run_id,
        role=opts.role,
        rdzv_endpoint=placement.rdzv_endpoint,
        rdzv_backend=backend,
        rdzv_configs=dict(placement.rdzv_configs),
        max_restarts=opts.max_restarts,
        monitor_interval=opts.monitor_interval,
        start_method=opts.start_method,
        local_addr=placement.local_addr,
        **{k: v for k, v in newer.items() if k in known},
    )


def _raise_signal(signum: int, frame: Any) -> None:
    """SIGTERM before torch installs its own handler (e.g. during rendezvous)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"Process {os.getpid()} got signal: {signum}", signal.Signals(signum))


def _prepare_environment(
    config: Any,
    placement: Placement,
    records: Optional[NodeRecords],
    coord: Optional[JobCoordinator],
) -> None:
    """This process's environment for one attempt (``isolated_process_state`` puts it
    back): what torch's agent reads, and what it hands on to every worker."""
    # A fresh worker store per attempt. With the agent's shared store (torch's
    # default) a restarted group finds the failed attempt's keys, and gloo's
    # connectFullMesh can dial a dead rank's stale address and hang.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if "OMP_NUM_THREADS" not in os.environ and placement.nproc_per_node > 1:
        # Each worker's share of this task's CPUs (torchrun sets 1).
        threads = placement.plan.threads if placement.plan else 1
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if hasattr(config, "signals_to_handle"):
        # launch_agent exports it to its own environment only after the workers'
        # environment was taken from it (_workers_environment): set it first.
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle
    if records is not None:
        os.environ.update(records.env)
    if coord is not None:
        os.environ.update(coord.worker_env)
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, _raise_signal)
        coord.start_watchdog(records.rank_states if records is not None else None)


def _workers_environment(opts: Options, placement: Placement) -> dict[str, str]:
    """What every worker adopts (a forkserver's own environment is older than this)."""
    from hydra_torchrun_callback._wire.protocol import FAILURE_GRACE_ENV, LOCAL_SLOT_ENV
    from hydra_torchrun_callback._worker.entry import failure_grace

    env = dict(os.environ)
    env[FAILURE_GRACE_ENV] = str(failure_grace(opts.monitor_interval))
    if placement.plan is not None and not opts.virtual_local_rank:
        # Where its workers sit on the host (virtual_local_rank: each sees rank 0).
        plan = placement.plan
        env[LOCAL_SLOT_ENV] = f"{plan.local_offset}:{plan.local_world_size}"
    return env


def launch(
    opts: Options,
    placement: Placement,
    payload: bytes,
    coord: Optional[JobCoordinator] = None,
    records: Optional[NodeRecords] = None,
) -> AgentResult:
    """Start this node's agent and workers; return when the worker group is done.

    Workers leave their records (for the job summary) in ``records``' folder; the
    agent's failure report is added to it.

    Raises :class:`TorchrunJobError` with the root cause when a worker failed
    (after ``max_restarts``), ``KeyboardInterrupt``/``SystemExit`` when this
    process was interrupted or terminated.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import launch_agent

    from hydra_torchrun_callback._worker.entry import run_worker

    own_log_dir = opts.log_dir is None
    log_dir = tempfile.mkdtemp(prefix="hydra_torchrun_") if own_log_dir else str(opts.log_dir)
    # torch's spawn has each worker pickle its traceback into a file in the temp dir
    # (world-readable, never removed): they go to this private folder, removed after.
    private_tmp = tempfile.mkdtemp(prefix="hydra_torchrun_tmp_")
    attempts = 3 if placement.port_picked else 1
    try:
        for attempt in range(attempts):
            with (
                isolated_process_state(records),
                no_main_reimport(),
                forward_preemption(
                    preemption_signal(os.environ), recorded_workers(records), opts.preemption_grace
                ),
                follow_local_launcher(os.environ),
                private_tempdir(private_tmp),
                rendezvous_signer(placement.run_id, _rendezvous_signer(placement, coord)),
            ):
                config = _launch_config(opts, placement, log_dir)
                _prepare_environment(config, placement, records, coord)
                try:
                    try:
                        agent_env = _workers_environment(opts, placement)
                        values = launch_agent(config, run_worker, [payload, agent_env])
                    except ChildFailedError as err:
                        if records is not None:
                            records.note_failures(err.failures)
                        first = coord.ops.first_failed_rank() if coord is not None else None
                        raise root_cause_error(
                            err, socket.gethostname(), placement.node_rank, prefer_rank=first
                        ) from None
                    finally:
                        # Joined inside the SignalException handler's reach: the watchdog's
                        # SIGTERM can land while this node handles its own workers' failure.
                        if coord is not None:
                            coord.stop_watchdog()
                except SignalException as err:
                    if coord is not None and coord.abort_reason is not None:
                        raise coord.abort_reason from None
                    if err.sigval == signal.SIGINT:
                        raise KeyboardInterrupt(
                            "torchrun job interrupted (SIGINT); workers were stopped"
                        ) from None
                    raise SystemExit(128 + int(err.sigval)) from err
                except TorchrunJobError:
                    raise
                except Exception as exc:
                    if released_spare(placement.run_id):
                        log.info(
                            "elastic: this node waited as a spare and the job ended without "
                            "needing it"
                        )
                        return AgentResult({}, placement)
                    if attempt + 1 < attempts and _port_race(exc):
                        port = free_port()
                        log.warning("rendezvous port was taken meanwhile; retrying on %d", port)
                        placement = _with_port(placement, port)
                        continue
                    raise
            return AgentResult(dict(values), placement)
        raise AssertionError("unreachable")
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)
        if own_log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)


@contextlib.contextmanager
def private_tempdir(path: str) -> Iterator[None]:
    """Point this process's ``tempfile`` (what torch's spawn uses) at ``path``."""
    saved = tempfile.tempdir
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _rendezvous_signer(placement: Placement, coord: Optional[JobCoordinator]) -> Signer:
    """What signs the rendezvous state: the job store's signer on a cluster; a secret
    that never leaves this process on one machine; the user's key for hand-wired nodes."""
    if coord is not None:
        return coord.signer
    if placement.source == "local":
        return Signer(secrets.token_bytes(32), placement.run_id)
    return Signer(load_secret(os.environ), placement.run_id)


def _with_port(placement: Placement, port: int) -> Placement:
    from dataclasses import replace

    host = placement.rdzv_endpoint.rsplit(":", 1)[0]
    return replace(placement, rdzv_endpoint=f"{host}:{port}")
