"""The Hydra callback: config -> placement -> launch -> worker -> result.

``on_job_start`` runs the whole distributed job (the Hydra process hosts the
torch elastic agent), then diverts Hydra's own call of the task so that it
returns global rank 0's value or raises the job's root cause. The task body
never runs in the Hydra process.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hydra_torchrun_callback._divert import Diversion, DivertError, Outcome, can_divert, divert
from hydra_torchrun_callback._options import TorchrunOptionError, options_here, with_log_dir
from hydra_torchrun_callback._per_node import (
    adopt_output_dir,
    prepare_multirun,
    prepare_run,
)
from hydra_torchrun_callback._placement import inside_torchrun_worker
from hydra_torchrun_callback._result import TorchrunJobError, TorchrunSetupError

__all__ = ["TorchrunAbort", "TorchrunCallback"]

log = logging.getLogger("hydra_torchrun_callback")

TARGET = "hydra_torchrun_callback.TorchrunCallback"

#: ``0``: keep the agent in the Hydra process with ``start_method=forkserver`` (one more
#: torch import per node; for debugging the agent with pdb). Default: in a fork of the
#: warm server (see ``_agent_host``).
AGENT_IN_SERVER_ENV = "HYDRA_TORCHRUN_AGENT_IN_SERVER"


@dataclasses.dataclass(frozen=True)
class JobOrigin:
    """What the agent needs from the Hydra process itself, read there (the agent may run
    in a fork of the warm server, which has neither the app's resolvers nor its
    ``__main__``)."""

    started: float  # when the job reached the callback (the summary's wall time)
    resolvers: dict[str, bytes]  # custom OmegaConf resolvers, each pickled
    main_module: Optional[tuple[str, str]]  # the app's __main__, for workers to import


class JobReport:
    """What the job summary is made of, filled in as the job runs (node 0 publishes it)."""

    def __init__(self, placement: Any, started: float) -> None:
        from hydra_torchrun_callback._summary import NodeRecords

        self.placement = placement
        self.started = started
        self.records = NodeRecords()
        self.rows: list[dict[str, Any]] = []
        self.missing_nodes: list[int] = []
        self.error: Optional[BaseException] = None

    def publish(self, output_dir: str) -> None:
        """Log the table and save the JSON (nothing when no worker started)."""
        from hydra_torchrun_callback._summary import build_summary, render_table, write_summary

        rows = self.rows or self.records.rows(self.placement.node_rank, socket.gethostname())
        if not rows:
            return
        summary = build_summary(
            rows,
            run_id=self.placement.run_id,
            nnodes=self.placement.max_nodes,
            nproc_per_node=self.placement.nproc_per_node,
            wall_s=time.time() - self.started,
            error=self.error,
            missing_nodes=self.missing_nodes,
        )
        log.info("%s", render_table(summary))
        write_summary(summary, output_dir)


def _stack_service(
    output_dir: str, placement: Any, report: JobReport, relay: Any = None
) -> contextlib.AbstractContextManager[Any]:
    """Answer ``hydra-torchrun-summary --stacks`` (and SIGURG) while the agent runs."""
    from hydra_torchrun_callback._stacks import StackService

    job = {
        "run_id": placement.run_id,
        "nnodes": placement.max_nodes,
        "nproc_per_node": placement.nproc_per_node,
        "world_size": placement.max_nodes * placement.nproc_per_node,
        "started": report.started,
    }
    records = report.records
    return StackService(output_dir, records.dir, records.live, placement.node_rank, job, relay)


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
    if "hydra_torchrun_callback._store" not in sys.modules:
        return ""
    keys = sys.modules["hydra_torchrun_callback._store"].rejected_keys()
    if not keys:
        return ""
    return (
        f"Another process on the network wrote forged values into this job's store (keys "
        f"{keys}; rejected unread): it can disrupt a rendezvous. Keep the cluster network "
        "private or run the job again (README: threat model)."
    )


def _unpicklable(task_function: Any, exc: BaseException) -> TorchrunSetupError:
    return TorchrunSetupError(
        f"the task function {getattr(task_function, '__qualname__', task_function)!r}"
        f" or its config cannot be pickled for the workers ({type(exc).__name__}: "
        f"{exc}). Fix: keep locks, open files, sockets and other process-bound "
        "objects out of the task's closure and config; create them inside the task."
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


def pin_now_interpolations(config: DictConfig) -> None:
    """Resolve every ``${now:...}`` once here: the resolver cache travels with
    the pickled config, so workers see the Hydra process's timestamps."""

    def walk(node: Any, path: str) -> None:
        keys: list[Any] = list(node.keys()) if isinstance(node, DictConfig) else [*range(len(node))]
        for key in keys:
            child = node._get_node(key)
            sub = f"{path}.{key!s}" if path else f"{key!s}"
            if child is None:
                continue
            if OmegaConf.is_config(child):
                walk(child, sub)
                continue
            raw = child._value()
            if isinstance(raw, str) and "${now:" in raw:
                # An unrelated broken interpolation is the task's to report, not ours.
                with contextlib.suppress(Exception):
                    OmegaConf.select(config, sub, throw_on_missing=False)

    walk(config, "")


def _quick_exit_at_end() -> None:
    """In a node's submitit task: skip the final garbage collection at exit.

    With torch loaded, Python's shutdown spends ~1 s walking every object for cycles (the
    task's teardown delays the job's end under submitit_local, and the step's end under
    SLURM). Frozen at exit, after the handlers registered later ran and before the ones
    registered earlier (logging, multiprocessing, weakref finalizers), which still run.
    Only in submitit's task processes: the user's own Hydra process is left alone.
    """
    atexit.unregister(gc.freeze)  # once, however many copies are unpickled
    atexit.register(gc.freeze)


class TorchrunCallback(Callback):
    """Run each Hydra job's task under a torch elastic agent (torchrun)."""

    def __init__(self, **options: Any) -> None:
        # Fail at app start on options that can never work (unknown name, bad value).
        self._warm = options_here(options).start_method == "forkserver"
        self._options = options
        self._diversion: Optional[Diversion] = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A node's copy of the callback, unpickled by submitit in the node's task."""
        self.__dict__.update(state)
        if os.environ.get("SUBMITIT_EXECUTOR"):
            _quick_exit_at_end()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        prepare_run(config)  # node k of a plain srun step: no .hydra/, its own log file
        self._start_warm_early()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Each node's job writes only its own files in the shared output dir.
        prepare_multirun(config)
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if launcher.endswith("BasicLauncher"):  # jobs run in this very process
            self._start_warm_early()
        elif launcher.endswith("submitit_launcher.LocalLauncher"):  # emulated nodes
            from hydra_torchrun_callback._local_wait import prompt_local_waits

            prompt_local_waits()  # see each job end when its nodes exit, not 1 s later

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra_torchrun_callback._local_wait import restore_local_waits

        restore_local_waits()

    def _start_warm_early(self) -> None:
        """The warm server imports torch while Hydra sets the job up, if it has a core of
        its own (else ``_run_job`` starts it after this process's own torch import)."""
        if not self._warm or inside_torchrun_worker(os.environ):
            return
        from hydra_torchrun_callback._placement import detect_cluster, task_cpus, usable_cpus

        try:
            task = detect_cluster(os.environ, options_here(self._options).cluster)
        except Exception:  # e.g. a cluster variable missing: the job itself will say so
            return
        from hydra_torchrun_callback._warm import overlaps_imports, start_warm

        if overlaps_imports(task_cpus(os.environ, usable_cpus(), task)):
            start_warm()

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

    def _job_options(self, config: DictConfig) -> dict[str, Any]:
        return job_options(config, self._options)

    def _restore(self) -> None:
        if self._diversion is not None:
            self._diversion.restore()
            self._diversion = None

    def _run_job(self, config: DictConfig, task_function: Any) -> Any:
        from hydra_torchrun_callback._support import require_supported

        require_supported()  # before importing torch: a missing torch gets its fix too
        from hydra_torchrun_callback import _pickling
        from hydra_torchrun_callback._worker import capture_resolvers, describe_main_module

        # What only the Hydra process knows: its custom resolvers and __main__ module.
        origin = JobOrigin(
            started=time.time(),
            resolvers=capture_resolvers(),
            main_module=describe_main_module(sys.modules.get("__main__")),
        )
        if (
            options_here(self._job_options(config)).start_method == "forkserver"
            and os.environ.get(AGENT_IN_SERVER_ENV, "1") != "0"
        ):
            # The agent runs in a fork of the warm server: this process never imports
            # torch (see _agent_host). The job is pickled here, so that an unpicklable
            # task fails before anything starts, with the same error as below.
            from hydra_torchrun_callback._agent_host import run_in_warm_server
            from hydra_torchrun_callback._launch import preemption_signal

            try:
                blob = _pickling.dumps((self, config, task_function, origin))
            except Exception as exc:
                raise _unpicklable(task_function, exc) from exc
            data = run_in_warm_server(blob, config, adopt_output_dir, preemption_signal(os.environ))
        else:
            data = self._run_agent(config, task_function, origin)
        if data is None:
            return None

        try:
            return _pickling.loads(data)
        except Exception as exc:
            raise TorchrunSetupError(
                f"rank 0's return value could not be unpickled in the Hydra process "
                f"({type(exc).__name__}: {exc}). Fix: return plain data types."
            ) from exc

    def _run_agent(
        self,
        config: DictConfig,
        task_function: Any,
        origin: JobOrigin,
        adopt: Callable[[DictConfig, str, str], bool] = adopt_output_dir,
    ) -> Optional[bytes]:
        """Place this node, start its agent and workers; rank 0's pickled value (node 0)."""
        from hydra_torchrun_callback._store import reset_rejections

        reset_rejections()  # each job logs (and names) the forgeries it saw itself
        from hydra_torchrun_callback._placement import (
            check_port_free,
            detect_cluster,
            host_share,
            interface_address,
            plan_workers,
            resolve_placement,
            task_cpus,
            usable_cpus,
        )
        from hydra_torchrun_callback._warm import overlaps_imports, start_warm

        started = origin.started
        opts = options_here(self._job_options(config))
        task = detect_cluster(os.environ, opts.cluster)
        cpus = task_cpus(os.environ, usable_cpus(), task)
        warm = opts.start_method == "forkserver"
        if warm and overlaps_imports(cpus):
            start_warm()  # a node's first job: nothing is warm yet
        import torch

        if warm:
            start_warm()  # no-op when already running

        from hydra_torchrun_callback import _pickling
        from hydra_torchrun_callback._launch import launch
        from hydra_torchrun_callback._worker import WorkerPayload

        # Workers from the allocation: GPUs SLURM gave this host (no CUDA context here),
        # split among the job's tasks on it; CPUs from this task's affinity mask.
        share = host_share(os.environ, task)
        plan = plan_workers(
            opts.nproc_per_node,
            share,
            cpus,
            torch.cuda.device_count() if share.host_gpus is None else 0,
        )
        job_num = OmegaConf.select(config, "hydra.job.num", default=0)
        placement = resolve_placement(
            opts, os.environ, plan.nproc, job_num=job_num if isinstance(job_num, int) else 0
        )
        placement = dataclasses.replace(placement, plan=plan)
        if placement.local_addr:  # an interface name (ib0) is resolved on each node
            address = interface_address(placement.local_addr)
            if address is not None:
                placement = dataclasses.replace(placement, local_addr=address)
        if placement.source == "local" and not placement.port_picked:
            check_port_free(int(placement.rdzv_endpoint.rsplit(":", 1)[1]))
        output_dir = str(OmegaConf.select(config, "hydra.runtime.output_dir") or os.getcwd())
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise TorchrunSetupError(
                f"the job's output dir {output_dir} is not writable, so the workers could not "
                "write their logs there. Fix: make it writable or point hydra.run.dir / "
                "hydra.sweep.dir at a writable place."
            )
        opts = with_log_dir(opts, output_dir)  # files the user asked for are kept
        pin_now_interpolations(config)

        def make_payload() -> bytes:
            try:
                return _pickling.dumps(
                    WorkerPayload(
                        task=task_function,
                        config=config,
                        cwd=os.getcwd(),
                        started=started,
                        resolvers=origin.resolvers,
                        main_module=origin.main_module,
                    )
                )
            except Exception as exc:
                raise _unpicklable(task_function, exc) from exc

        def payload_in(job_dir: str) -> Optional[bytes]:
            """Node 0 decided the job's output dir (``${now:}`` resolved at another time
            here): take it, then pickle the job as it now is (None: kept our own)."""
            return make_payload() if adopt(config, output_dir, job_dir) else None

        payload = make_payload()
        log.info("%s", placement.describe())
        report = JobReport(placement, started)
        try:
            if placement.cluster is None:
                with (
                    self._heartbeat(opts, placement, report.records.rank_states),
                    _stack_service(output_dir, placement, report),
                ):
                    data = launch(opts, placement, payload, records=report.records).rank0_payload
                report.records.harvest_stacks()
                report.rows = report.records.rows(0, socket.gethostname())
            else:
                data = self._run_multinode(opts, placement, payload, report, output_dir, payload_in)
        except BaseException as exc:
            report.error = exc
            raise
        finally:
            report.records.harvest_stacks()  # the stacks of ranks the stop interrupted
            if opts.summary and placement.node_rank == 0:
                report.publish(output_dir)
            report.records.close()
        return data

    @staticmethod
    def _heartbeat(
        opts: Any, placement: Any, states: Any
    ) -> contextlib.AbstractContextManager[Any]:
        if opts.heartbeat_interval <= 0 or placement.node_rank != 0:
            return contextlib.nullcontext()
        from hydra_torchrun_callback._summary import Heartbeat

        world = placement.max_nodes * placement.nproc_per_node
        return Heartbeat(opts.heartbeat_interval, world, states)

    def _run_multinode(
        self,
        opts: Any,
        placement: Any,
        payload: bytes,
        report: JobReport,
        output_dir: str,
        payload_in: Callable[[str], Optional[bytes]],
    ) -> Optional[bytes]:
        """Run this node's agent; node 0 returns global rank 0's value or the root cause."""
        from hydra_torchrun_callback._coordination import JobCoordinator, StacksRelay
        from hydra_torchrun_callback._launch import launch
        from hydra_torchrun_callback._placement import candidate_ports
        from hydra_torchrun_callback._store import SecretError, load_secret

        try:
            secret = load_secret(os.environ)
        except (SecretError, OSError) as exc:
            raise TorchrunSetupError(str(exc)) from exc
        ports = None if opts.master_port is not None else candidate_ports(placement.run_id)
        # A node that never beats counts as lost after torch's rendezvous join timeout.
        join_timeout = float(str(placement.rdzv_configs.get("join_timeout", 600)))
        coord = JobCoordinator(
            placement,
            opts.peer_timeout,
            secret,
            ports=ports,
            join_timeout=join_timeout,
            job_dir=output_dir,
        )
        placement = coord.placement  # with the port the job's store was found on
        node0 = placement.node_rank == 0
        job_dir = coord.job_dir()
        if job_dir and job_dir != output_dir:  # every node works in node 0's output dir
            adopted = payload_in(job_dir)
            if adopted is not None:
                payload, output_dir = adopted, job_dir
        records = report.records

        def states() -> dict[int, str]:
            return {**coord.states_elsewhere(), **records.rank_states()}

        def finish(
            wait: float = opts.peer_timeout, error: Optional[BaseException] = None
        ) -> list[int]:
            """Publish this node's rows, say done (and how this node's part ended); node 0
            waits for the others."""
            records.harvest_stacks()
            with contextlib.suppress(Exception):
                coord.put_rows(records.rows(placement.node_rank, socket.gethostname()))
            coord.mark_done(error)
            if not node0:
                return []
            missing = coord.wait_all_done(timeout=wait)
            report.rows, report.missing_nodes = coord.gather_rows()
            return missing

        try:
            try:
                with (
                    self._heartbeat(opts, placement, states),
                    _stack_service(output_dir, placement, report, StacksRelay(coord)),
                ):
                    data = launch(opts, placement, payload, coord, records).rank0_payload
            except TorchrunJobError as err:
                if coord.abort_reason is not err:
                    coord.report_failure(err)
                root = coord.root_cause(err, timeout=10.0)
                finish(error=root or err)
                raise (root or err) from None
            except (SystemExit, KeyboardInterrupt) as stop:
                # Stopped (scancel, a time limit, Ctrl-C): the summary still shows every
                # node's ranks and where they were, if the others report back quickly
                # (SLURM's KillWait leaves 30 s by default).
                with contextlib.suppress(Exception):
                    finish(wait=min(opts.peer_timeout, 5.0), error=stop)
                raise
            if data is not None:
                coord.put_result(data)
            missing = finish()
            if not node0:
                return None  # only node 0's JobReturn carries the job's value
            # Each node's signed done beat says how its part ended: a forged or emptied
            # failure key cannot make a failed job look completed.
            failure = coord.failure() or coord.failed_node()
            if failure is not None:
                raise failure
            if data is None:
                data = coord.wait_result(timeout=5.0)
            if data is None:
                raise TorchrunSetupError(
                    "the job finished but global rank 0's return value never reached node 0"
                    + (f" (nodes {missing} did not report back)" if missing else "")
                )
            return data
        finally:
            coord.close()
