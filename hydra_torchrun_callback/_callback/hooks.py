"""The Hydra callback: config -> placement -> launch -> worker -> result.

``on_job_start`` runs the whole distributed job (the Hydra process hosts the
torch elastic agent), then diverts Hydra's own call of the task so that it
returns global rank 0's value or raises the job's root cause. The task body
never runs in the Hydra process.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hydra_torchrun_callback._callback.divert import (
    Diversion,
    DivertError,
    Outcome,
    can_divert,
    divert,
)
from hydra_torchrun_callback._callback.per_node import (
    adopt_output_dir,
    node_index,
    prepare_multirun,
    prepare_run,
)
from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._node.job import node_job, run_node
from hydra_torchrun_callback._node.placement import inside_torchrun_worker
from hydra_torchrun_callback._options import TorchrunOptionError, options_here
from hydra_torchrun_callback._result import TorchrunJobError, TorchrunSetupError
from hydra_torchrun_callback._sweep.points import PointJob
from hydra_torchrun_callback._wire.protocol import AGENT_IN_SERVER_ENV, QUICK_EXIT_ENV, RUN_ID_ENV

__all__ = ["TorchrunAbort", "TorchrunCallback"]


TARGET = "hydra_torchrun_callback.TorchrunCallback"


class TorchrunAbort(BaseException):
    """Raised out of ``on_job_start`` when the job cannot be made to fail cleanly.

    Hydra turns an ``Exception`` in a hook into a warning and then runs the task
    in the Hydra process; a ``BaseException`` stops the app instead, which is the
    only safe outcome when the task's call cannot be diverted.
    """


_REPORT = (
    "If this is not a problem in your environment, please report it with the full log "
    "(hydra-torchrun-callback's issue tracker)"
)


def _forgery_note() -> str:
    """Why a launch may have failed, if another process wrote into this job's store."""
    if "hydra_torchrun_callback._wire.store" not in sys.modules:
        return ""
    keys = sys.modules["hydra_torchrun_callback._wire.store"].rejected_keys()
    if not keys:
        return ""
    return (
        f"Another process on the network wrote forged values into this job's store (keys "
        f"{keys}; rejected unread): it can disrupt a rendezvous. Keep the cluster network "
        "private or run the job again (README: threat model)."
    )


def _abort(step: str, exc: BaseException) -> TorchrunAbort:
    return TorchrunAbort(
        f"hydra/callbacks=torchrun failed while {step} ({type(exc).__name__}: {exc}); "
        "stopping the app before the task could run undistributed in the Hydra process. "
        f"{_REPORT}."
    )


def job_options(config: DictConfig, fallback: Mapping[str, Any]) -> dict[str, Any]:
    """This job's options, read from its own config so per-job interpolations
    (e.g. ``nproc_per_node: ${nproc}`` in a sweep) resolve for this job."""
    callbacks = OmegaConf.select(config, "hydra.callbacks")
    if isinstance(callbacks, DictConfig):
        for node in callbacks.values():
            if isinstance(node, DictConfig) and node.get("_target_") == TARGET:
                raw = OmegaConf.to_container(node, resolve=True)
                assert isinstance(raw, dict)
                return {str(k): v for k, v in raw.items() if k != "_target_"}
    return dict(fallback)


def _quick_exit_at_end() -> None:
    """Skip Python's final garbage collections at exit, where torch is loaded.

    With torch loaded, Python's shutdown walks every object for cycles (0.4 s here for a
    process that imported torch, ~1 s in a node's task): in a node's submitit task it
    delays the job's end (and the step's end under SLURM), in the user's Hydra process
    (an app that imports torch at the top) the command's return. So at exit, garbage is
    collected once (what is already unreachable is finalized as usual), then what is
    left is frozen, after the exit handlers registered later ran and before the ones
    registered earlier (logging, multiprocessing, weakref finalizers, the app's own
    imports'), which still run; Python does not promise finalizers for objects alive at
    exit anyway. ``HYDRA_TORCHRUN_QUICK_EXIT=0`` leaves the exit as Python's default.
    """
    if os.environ.get(QUICK_EXIT_ENV) == "0":
        return
    atexit.unregister(_collect_and_freeze)  # once, however many times it is asked
    atexit.register(_collect_and_freeze)


def _collect_and_freeze() -> None:
    gc.collect()
    gc.freeze()


class TorchrunCallback(Callback):
    """Run each Hydra job's task under a torch elastic agent (torchrun)."""

    def __init__(self, **options: Any) -> None:
        # Fail at app start on options that can never work (unknown name, bad value).
        self._warm = options_here(options).start_method == "forkserver"
        self._options = options
        self._diversion: Optional[Diversion] = None
        self._point: Optional[PointJob] = None
        self._run_id: Optional[str] = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A node's copy of the callback, unpickled by submitit in the node's task."""
        self.__dict__.update(state)
        if os.environ.get("SUBMITIT_EXECUTOR"):
            _quick_exit_at_end()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        opts = options_here(self._options)
        if opts.detach or opts.resume:
            name = "detach" if opts.detach else "resume"
            raise SystemExit(
                f"hydra/callbacks=torchrun: hydra.callbacks.torchrun.{name}=true is for sweeps: "
                "add -m (a single run is a one-point sweep then), or drop the option."
            )
        prepare_run(config)  # node k of a plain srun step: no .hydra/, its own log file
        self._start_warm_early()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra_torchrun_callback._sweep.control import begin_sweep, wrap
        from hydra_torchrun_callback._wire.protocol import SWEEP_ROLE_ENV

        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        opts = options_here(self._options)
        basic = launcher.endswith("BasicLauncher")  # jobs run in this very process
        if basic and "torch" in sys.modules and not opts.detach:
            self._start_warm_early()  # a fork of this process: before the sweep's threads
        try:
            # Checks a resume, or detaches (SystemExit(0)): before anything is submitted.
            start = begin_sweep(config, opts)
        except TorchrunSetupError as exc:
            # Hydra turns an Exception from this hook into a warning and sweeps on.
            raise SystemExit(f"hydra/callbacks=torchrun: {exc}") from exc
        except Exception as exc:
            if opts.detach or opts.resume or os.environ.get(SWEEP_ROLE_ENV):
                # Never a silent foreground sweep, nor a resume that runs everything again.
                raise SystemExit(
                    f"hydra/callbacks=torchrun: the sweep could not be set up "
                    f"({type(exc).__name__}: {exc}); nothing was submitted."
                ) from exc
            log.warning(
                "the sweep runs without its records in the sweep dir (%s: %s): a dead point "
                "may end it, and resume=true will not find it",
                type(exc).__name__,
                exc,
            )
            start = None
        # Each node's job writes only its own files in the shared output dir.
        prepare_multirun(config)
        if start is not None:
            wrap(config, start)  # dead points fail alone; resume; the sweep's records
        if basic:
            self._start_warm_early()
        elif launcher.endswith("submitit_launcher.LocalLauncher"):  # emulated nodes
            from hydra_torchrun_callback._callback.local_wait import prompt_local_waits

            prompt_local_waits()  # see each job end when its nodes exit, not 1 s later

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if "torch" in sys.modules and not inside_torchrun_worker(os.environ):
            _quick_exit_at_end()  # the app imported torch: its exit would walk it all

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra_torchrun_callback._callback.local_wait import restore_local_waits
        from hydra_torchrun_callback._sweep.control import end_sweep

        restore_local_waits()
        end_sweep()
        if "torch" in sys.modules and not inside_torchrun_worker(os.environ):
            _quick_exit_at_end()

    def _start_warm_early(self) -> None:
        """The warm server imports torch while Hydra sets the job up, if it has a core of
        its own (else ``_run_job`` starts it after this process's own torch import). An
        app that imported torch itself gets a fork of this process, made here, before
        any thread of ours starts (see ``_node.warm``)."""
        if not self._warm or inside_torchrun_worker(os.environ):
            return
        from hydra_torchrun_callback._node.placement import detect_cluster, task_cpus, usable_cpus

        try:
            task = detect_cluster(os.environ, options_here(self._options).cluster)
        except Exception:  # e.g. a cluster variable missing: the job itself will say so
            return
        from hydra_torchrun_callback._node.warm import overlaps_imports, start_warm

        if "torch" in sys.modules or overlaps_imports(task_cpus(os.environ, usable_cpus(), task)):
            with contextlib.suppress(TorchrunOptionError):  # warm_server=fork: the job says
                start_warm(options_here(self._options).warm_server)

    def on_job_start(self, config: DictConfig, *, task_function: Any, **kwargs: Any) -> None:
        """Run the job, then arm the task's call to deliver its outcome.

        Fails closed: Hydra turns an ``Exception`` from a hook into a warning and then
        calls the task in this process, undistributed. So every failure here either
        becomes the job's error (delivered by the diverted call) or, if the call
        cannot be diverted, a :class:`TorchrunAbort` that stops the app.
        """
        try:
            self._restore()
            if inside_torchrun_worker(os.environ):
                log.info("already inside a torchrun worker: running the task directly")
                return
            can_divert(task_function)
        except DivertError as exc:
            raise TorchrunAbort(
                f"hydra/callbacks=torchrun cannot run this task: {exc}. Stopping before the "
                "task could run in the Hydra process."
            ) from exc
        except Exception as exc:
            raise _abort("preparing the job", exc) from exc
        outcome = Outcome()
        try:
            self._job_started(config)
            outcome.value = self._run_job(config, task_function)
        except (TorchrunJobError, TorchrunOptionError, TorchrunSetupError) as exc:
            outcome.error = exc
        except Exception as exc:
            if type(exc).__module__.startswith("submitit"):
                # submitit's own verdict (e.g. "not requeued: timed out too many times")
                # raised by its signal handler while our agent ran: report it as is.
                outcome.error = exc
            else:
                outcome.error = TorchrunSetupError(
                    f"launching the torchrun workers failed: {type(exc).__name__}: {exc}. "
                    + (_forgery_note() or _REPORT)
                )
                outcome.error.__cause__ = exc
        try:
            if outcome.error is not None:
                log.error("%s", outcome.error)
            self._diversion = divert(task_function, outcome)
        except Exception as exc:
            raise _abort("arming the task's call", exc) from exc

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self._restore()
        try:
            if self._point is not None:
                from hydra_torchrun_callback._sweep.points import finish_point

                finish_point(self._point, job_return)
        finally:
            self._point = None
            if self._run_id is not None:
                os.environ.pop(RUN_ID_ENV, None)
                self._run_id = None

    def _job_started(self, config: DictConfig) -> None:
        """This job's run identity for the task, and (node 0 of a sweep's point) its
        record in its output dir: what resume and the sweep's summary read."""
        from hydra_torchrun_callback._sweep.points import point_job, run_identity, sweep_id

        sweep = sweep_id(config)
        if RUN_ID_ENV not in os.environ:
            self._run_id = os.environ[RUN_ID_ENV] = run_identity(config, os.environ, sweep)
        self._point = point_job(config, os.environ, sweep) if node_index() == 0 else None

    def _job_options(self, config: DictConfig) -> dict[str, Any]:
        return job_options(config, self._options)

    def _restore(self) -> None:
        if self._diversion is not None:
            self._diversion.restore()
            self._diversion = None

    def _run_job(self, config: DictConfig, task_function: Any) -> Any:
        from hydra_torchrun_callback._support import require_supported

        require_supported()  # before importing torch: a missing torch gets its fix too
        from hydra_torchrun_callback._wire import pickling as _pickling

        options = options_here(self._job_options(config))
        job = node_job(config, task_function, options)  # pickles the task: fails here
        adopt = functools.partial(adopt_output_dir, config)
        if options.start_method == "forkserver" and os.environ.get(AGENT_IN_SERVER_ENV) != "0":
            # The agent runs in a fork of the warm server: this process never imports
            # torch (see _node.agent_host).
            from hydra_torchrun_callback._callback.agent_link import run_in_warm_server
            from hydra_torchrun_callback._node.agent import preemption_signal

            data = run_in_warm_server(
                _pickling.dumps(job), adopt, preemption_signal(os.environ), options.warm_server
            )
        else:
            data = run_node(job, adopt)
        if data is None:
            return None

        try:
            return _pickling.loads(data)
        except Exception as exc:
            raise TorchrunSetupError(
                f"rank 0's return value could not be unpickled in the Hydra process "
                f"({type(exc).__name__}: {exc}). Fix: return plain data types."
            ) from exc
