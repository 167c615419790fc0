"""What a node runs for one Hydra job: placement -> job store -> agent -> rank 0's value.

The Hydra process builds one :class:`NodeJob` (the job's config and task, what only it
knows, the parsed options), pickles it once, and hands it to :func:`run_node`: in a fork
of the warm server (the default: the Hydra process never imports torch) or in itself
(``start_method=spawn``/``fork``, or ``AGENT_IN_SERVER_ENV`` set to 0). Nothing here
imports the callback: the node side depends on the job, not on the Hydra process's class.

The route of rank 0's return value to Hydra: the worker pickles it (``_worker.entry``) ->
torch's agent returns it per rank (``_node.agent.launch``) -> this node has rank 0's bytes,
or node 0 reads them from the job store (``_node.coordinator``) -> :func:`run_node` returns
them -> the agent pipe (``_node.agent_host``) or the call itself -> the callback unpickles them
and Hydra's diverted call of the task returns them (``_callback.hooks``, ``_callback.divert``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import DictConfig, OmegaConf

from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._options import Options, with_log_dir
from hydra_torchrun_callback._result import TorchrunJobError, TorchrunSetupError

if TYPE_CHECKING:  # imported where a node runs, lazily, as in the functions below
    from hydra_torchrun_callback._node.coordinator import JobCoordinator, StacksRelay
    from hydra_torchrun_callback._node.placement import Placement
    from hydra_torchrun_callback._node.records import NodeRecords

__all__ = [
    "NodeJob",
    "moved_payload",
    "node_job",
    "pin_now_interpolations",
    "place_node",
    "run_node",
    "unpicklable_task_error",
]


@dataclasses.dataclass(frozen=True)
class NodeJob:
    """One Hydra job as a node runs it: built once in the Hydra process (:func:`node_job`),
    pickled once. The task and its config travel inside ``payload``, already pickled for
    the workers, so the node never pickles them again (unless it moves into node 0's
    output dir) and never imports the callback."""

    payload: bytes  # what every worker gets (``_worker.entry.WorkerPayload``), pickled
    output_dir: str  # the job's output dir (``hydra.runtime.output_dir``), writable
    job_num: int  # ``hydra.job.num``: part of a cluster job's rendezvous id
    started: float  # when the job reached the callback (the summary's wall time)
    options: Options  # parsed in the Hydra process (PET_* and the installed torch)


def node_job(config: DictConfig, task: Any, options: Options) -> NodeJob:
    """In the Hydra process: the job as its nodes run it, with what only this process
    knows (its custom resolvers, its ``__main__``, its ``${now:}`` timestamps). An
    unpicklable task or config fails here, before anything starts."""
    from hydra_torchrun_callback._wire import pickling as _pickling
    from hydra_torchrun_callback._worker.entry import (
        WorkerPayload,
        capture_resolvers,
        describe_main_module,
    )

    started = time.time()
    output_dir = _output_dir(config)
    pin_now_interpolations(config)
    try:
        payload = _pickling.dumps(
            WorkerPayload(
                task=task,
                config=config,
                cwd=os.getcwd(),
                started=started,
                resolvers=capture_resolvers(),
                main_module=describe_main_module(sys.modules.get("__main__")),
            )
        )
    except Exception as exc:
        raise unpicklable_task_error(task, exc) from exc
    job_num = OmegaConf.select(config, "hydra.job.num", default=0)
    return NodeJob(
        payload=payload,
        output_dir=output_dir,
        job_num=job_num if isinstance(job_num, int) else 0,
        started=started,
        options=options,
    )


def moved_payload(payload: bytes, job_dir: str) -> bytes:
    """The workers' payload once this node works in node 0's output dir ``job_dir``
    (multi-node, when ``${now:}`` in ``hydra.run.dir`` resolved differently here)."""
    from omegaconf import read_write

    from hydra_torchrun_callback._wire import pickling as _pickling

    moved = _pickling.loads(payload)
    with read_write(moved.config.hydra.runtime):
        moved.config.hydra.runtime.output_dir = job_dir
    return _pickling.dumps(dataclasses.replace(moved, cwd=os.getcwd()))


class JobReport:
    """What the job summary is made of, filled in as the job runs (node 0 publishes it)."""

    def __init__(self, placement: Placement, started: float) -> None:
        from hydra_torchrun_callback._node.records import NodeRecords

        self.placement = placement
        self.started = started
        self.records = NodeRecords()
        self.rows: list[dict[str, Any]] = []
        self.missing_nodes: list[int] = []
        self.error: Optional[BaseException] = None
        #: An elastic job's membership changes (node 0, from its coordinator).
        self.elastic: Optional[dict[str, Any]] = None
        #: Whether this node writes the summary: node 0, or the node that leads an elastic
        #: job with a shared store at its end (see ``JobCoordinator.leads``).
        self.leads = placement.node_rank == 0
        #: Where the summary goes: the job's output dir once this node adopted it.
        self.output_dir: Optional[str] = None

    def publish(self, output_dir: str) -> None:
        """Log the table and save the JSON (nothing when no worker started)."""
        from hydra_torchrun_callback._report.job_summary import (
            build_summary,
            render_table,
            write_summary,
        )

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
            elastic=self.elastic,
        )
        log.info("%s", render_table(summary))
        write_summary(summary, output_dir)


def _stack_service(
    output_dir: str, placement: Placement, report: JobReport, relay: Optional[StacksRelay] = None
) -> contextlib.AbstractContextManager[Any]:
    """Answer ``hydra-torchrun-summary --stacks`` (and SIGURG) while the agent runs."""
    from hydra_torchrun_callback._node.stack_service import StackService

    job = {
        "run_id": placement.run_id,
        "nnodes": placement.max_nodes,
        "nproc_per_node": placement.nproc_per_node,
        "world_size": placement.max_nodes * placement.nproc_per_node,
        "started": report.started,
    }
    records = report.records
    return StackService(output_dir, records.dir, records.live, placement.node_rank, job, relay)


def unpicklable_task_error(task_function: Any, exc: BaseException) -> TorchrunSetupError:
    return TorchrunSetupError(
        f"the task function {getattr(task_function, '__qualname__', task_function)!r}"
        f" or its config cannot be pickled for the workers ({type(exc).__name__}: "
        f"{exc}). Fix: keep locks, open files, sockets and other process-bound "
        "objects out of the task's closure and config; create them inside the task."
    )


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


def place_node(opts: Options, job_num: int) -> Placement:
    """Where this node is in its job, decided once and passed down: the cluster task,
    its workers (GPUs SLURM gave this host, no CUDA context here, split among the job's
    tasks on it; CPUs from this task's affinity mask), the rendezvous. Imports torch,
    overlapped with the warm server's own import where there is a core for each."""
    from hydra_torchrun_callback._node.placement import (
        check_port_free,
        detect_cluster,
        host_share,
        interface_address,
        plan_workers,
        resolve_placement,
        task_cpus,
        usable_cpus,
    )
    from hydra_torchrun_callback._node.warm import overlaps_imports, start_warm

    task = detect_cluster(os.environ, opts.cluster)
    cpus = task_cpus(os.environ, usable_cpus(), task)
    warm = opts.start_method == "forkserver"
    if warm and overlaps_imports(cpus):
        start_warm(opts.warm_server)  # a node's first job: nothing is warm yet
    import torch

    if warm:
        start_warm(opts.warm_server)  # no-op when already running
    share = host_share(os.environ, task)
    plan = plan_workers(
        opts.nproc_per_node,
        share,
        cpus,
        torch.cuda.device_count() if share.host_gpus is None else 0,
    )
    placement = resolve_placement(opts, os.environ, plan.nproc, job_num=job_num)
    # An interface name (ib0) is resolved on each node.
    address = interface_address(placement.local_addr) if placement.local_addr else None
    placement = dataclasses.replace(
        placement, plan=plan, local_addr=address or placement.local_addr
    )
    if placement.source == "local" and not placement.port_picked:
        check_port_free(int(placement.rdzv_endpoint.rsplit(":", 1)[1]))
    return placement


def _output_dir(config: DictConfig) -> str:
    """The job's output dir, where every rank writes its log: refused if not writable."""
    output_dir = str(OmegaConf.select(config, "hydra.runtime.output_dir") or os.getcwd())
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise TorchrunSetupError(
            f"the job's output dir {output_dir} is not writable, so the workers could not "
            "write their logs there. Fix: make it writable or point hydra.run.dir / "
            "hydra.sweep.dir at a writable place."
        )
    return output_dir


def run_node(job: NodeJob, adopt: Callable[[str, str], bool]) -> Optional[bytes]:
    """Place this node, start its agent and workers; rank 0's pickled value (node 0).

    ``adopt(own_dir, node0_dir)`` moves this node's job into node 0's output dir when
    they differ (the Hydra process owns the log files and the config it moves)."""
    from hydra_torchrun_callback._node.agent import launch
    from hydra_torchrun_callback._wire.store import reset_rejections

    reset_rejections()  # each job logs (and names) the forgeries it saw itself
    placement = place_node(job.options, job.job_num)
    output_dir, payload = job.output_dir, job.payload
    opts = with_log_dir(job.options, output_dir)  # files the user asked for are kept

    def payload_in(job_dir: str) -> Optional[bytes]:
        """Node 0 decided the job's output dir (``${now:}`` resolved at another time
        here): take it, then the workers' payload as it now is (None: kept our own)."""
        return moved_payload(payload, job_dir) if adopt(output_dir, job_dir) else None

    log.info("%s", placement.describe())
    report = JobReport(placement, job.started)
    try:
        if placement.cluster is None:
            with (
                _heartbeat(opts, placement, report.records.rank_states),
                _stack_service(output_dir, placement, report),
            ):
                data = launch(opts, placement, payload, records=report.records).rank0_payload
            report.records.harvest_stacks()
            report.rows = report.records.rows(0, socket.gethostname())
        else:
            data = _run_multinode(opts, placement, payload, report, output_dir, payload_in)
    except BaseException as exc:
        report.error = exc
        raise
    finally:
        report.records.harvest_stacks()  # the stacks of ranks the stop interrupted
        if opts.summary and report.leads:
            report.publish(report.output_dir or output_dir)
        report.records.close()
    return data


def _heartbeat(
    opts: Options,
    placement: Placement,
    states: Callable[[], Mapping[int, str]],
    coord: Optional[JobCoordinator] = None,
) -> contextlib.AbstractContextManager[Any]:
    shared = coord is not None and coord.shared  # whichever node leads reports
    if opts.heartbeat_interval <= 0 or (placement.node_rank != 0 and not shared):
        return contextlib.nullcontext()
    from hydra_torchrun_callback._node.heartbeat import Heartbeat

    world = placement.max_nodes * placement.nproc_per_node
    elastic = None
    if coord is not None and coord.elastic:
        elastic = functools.partial(coord.elastic_status, placement.nproc_per_node)
    return Heartbeat(
        opts.heartbeat_interval, world, states, elastic, coord.leads if shared and coord else None
    )


def _join_job_store(
    opts: Options, placement: Placement, output_dir: str, records: NodeRecords
) -> JobCoordinator:
    """This node's handle on the job's store (node 0 hosts it, with its output dir)."""
    from hydra_torchrun_callback._node.coordinator import JobCoordinator
    from hydra_torchrun_callback._wire.store import SecretError, load_secret

    try:
        secret = load_secret(os.environ)
    except (SecretError, OSError) as exc:
        raise TorchrunSetupError(str(exc)) from exc
    # A node that never beats counts as lost after torch's rendezvous join timeout.
    join_timeout = float(str(placement.rdzv_configs.get("join_timeout", 600)))
    return JobCoordinator(
        placement,
        opts.peer_timeout,
        secret,
        join_timeout=join_timeout,
        job_dir=output_dir,
        max_restarts=opts.max_restarts,
        records=records,
    )


def _run_multinode(
    opts: Options,
    placement: Placement,
    payload: bytes,
    report: JobReport,
    output_dir: str,
    payload_in: Callable[[str], Optional[bytes]],
) -> Optional[bytes]:
    """Run this node's agent; node 0 returns global rank 0's value or the root cause (in
    an elastic job with a shared store, every node that finishes returns it)."""
    from hydra_torchrun_callback._node.agent import launch
    from hydra_torchrun_callback._node.coordinator import ELASTIC_GATHER_S, StacksRelay

    coord = _join_job_store(opts, placement, output_dir, report.records)
    placement = coord.placement  # with the port the job's store was found on
    node0 = placement.node_rank == 0
    # Every node of a job with a shared store returns rank 0's value: whichever task
    # survives carries it to the launcher.
    returns_value = node0 or coord.shared
    job_dir = coord.ops.job_dir()
    if job_dir and job_dir != output_dir:  # every node works in node 0's output dir
        adopted = payload_in(job_dir)
        if adopted is not None:
            payload, output_dir = adopted, job_dir
    records = report.records
    if coord.elastic:
        # As long as torch's first round would wait for more nodes (last_call, 30 s),
        # unless the user set how long it waits.
        gather = opts.rdzv_configs.get("last_call_timeout")
        coord.wait_for_nodes(float(str(gather)) if gather is not None else ELASTIC_GATHER_S)

    def states() -> dict[int, str]:
        return {**coord.states_elsewhere(), **records.rank_states()}

    def finish(wait: float = opts.peer_timeout, error: Optional[BaseException] = None) -> list[int]:
        """Publish this node's rows, say done (and how this node's part ended); node 0
        waits for the others."""
        records.harvest_stacks()
        with contextlib.suppress(Exception):
            coord.ops.put_rows(records.rows(placement.node_rank, socket.gethostname()))
        coord.mark_done(error)
        report.leads = coord.settle_leader(2 * opts.peer_timeout)
        report.output_dir = output_dir  # the job's, where its summary goes
        if not report.leads:
            return []
        missing = coord.wait_all_done(timeout=wait)
        report.rows, report.missing_nodes = coord.ops.gather_rows()
        return missing

    try:
        try:
            with (
                _heartbeat(opts, placement, states, coord),
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
        except Exception as exc:  # this node could not run its part: say so, not vanish
            with contextlib.suppress(Exception):
                finish(wait=min(opts.peer_timeout, 5.0), error=exc)
            raise
        if data is not None and (coord.shared or not node0):  # node 0 returns its own
            coord.ops.put_result(data)
        missing = finish()
        if not returns_value:
            return None  # only node 0's JobReturn carries the job's value
        # Each node's signed done beat says how its part ended: a forged or emptied
        # failure key cannot make a failed job look completed.
        failure = coord.failure() or coord.failed_node()
        if failure is not None:
            raise failure
        if data is None:
            data = coord.wait_result(timeout=5.0 if report.leads else opts.peer_timeout)
        if data is None:
            raise TorchrunSetupError(
                f"the job finished but global rank 0's return value never reached node "
                f"{placement.node_rank}"
                + (f" (nodes {missing} did not report back)" if missing else "")
            )
        return data
    finally:
        if report.leads and coord.elastic:
            report.elastic = coord.membership_history()
        coord.close()
