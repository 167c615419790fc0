"""Where am I: turn options + the process environment into a rendezvous plan.

Pure functions fed a dict of environment variables, so every case (single
machine, manual multi-node, SLURM, submitit) is testable without a cluster.
Anything impure (finding a free port) is passed in as a callable.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional

from hydra_torchrun_callback._options import Options, TorchrunOptionError
from hydra_torchrun_callback._wire.protocol import STORE_DIR_NAME

__all__ = [
    "HostShare",
    "Placement",
    "WorkerPlan",
    "candidate_ports",
    "check_port_free",
    "free_port",
    "host_share",
    "inside_torchrun_worker",
    "job_store_ports",
    "plan_workers",
    "resolve_placement",
    "shared_store_dir",
    "task_cpus",
]

#: rdzv_conf defaults of an elastic job (nnodes=MIN:MAX, MIN < MAX) on a cluster: how fast
#: a lost node is noticed by torch's rendezvous, and how long a round waits for more nodes
#: once MIN are there (torch's defaults: 5 s x 3 and 30 s).
ELASTIC_RDZV_DEFAULTS: dict[str, object] = {
    "keep_alive_interval": 2,
    "keep_alive_max_attempt": 3,
    "last_call_timeout": 5,
}

DEFAULT_STATIC_PORT = 29500


#: Derived rendezvous ports live below Linux's ephemeral range (32768-60999), so a
#: port picked for an outgoing connection never takes a job's port by chance.
DERIVED_PORT_BASE = 15000
DERIVED_PORT_SPAN = 17000


@dataclass(frozen=True)
class ClusterTask:
    """This process as one task of a multi-task job (one task = one torchrun node)."""

    kind: str  # "slurm" (srun step, submitit_slurm or not) or "submitit-local"
    job_id: str  # array jobs: "<array job id>_<task id>"
    num_tasks: int
    task_rank: int
    hostnames: tuple[str, ...]  # one per node of the step, first = the job's master host
    step_id: str = ""  # SLURM_STEP_ID: two steps of one allocation are two jobs

    def run_key(self, job_num: int = 0) -> str:
        """The rendezvous id, unique per job, step and Hydra job (a sweep run by plain
        srun in one step is one Hydra job after another)."""
        key = f"job{self.job_id}"
        if self.step_id:
            key += f".s{self.step_id}"
        return key + (f".j{job_num}" if job_num else "")

    @property
    def master_addr(self) -> str:
        return self.hostnames[0] if self.hostnames else "localhost"


def parse_node_list(node_list: str) -> list[str]:
    """Expand a SLURM node list such as ``node[001-003,007],gpu12`` in SLURM's order.

    Our own (not submitit's private parser): plain ``srun`` jobs need no submitit.
    """
    hosts: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(node_list + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            if node_list[start:i].strip():
                hosts.extend(_expand_host(node_list[start:i].strip()))
            start = i + 1
    return hosts


def _expand_host(item: str) -> list[str]:
    """``n[1-2]-ib[0,3]`` -> n1-ib0, n1-ib3, n2-ib0, n2-ib3 (zero padding kept)."""
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    values: list[str] = []
    for part in body.split(","):
        low, dash, high = part.partition("-")
        if dash:
            values += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
        else:
            values.append(part)
    tails = _expand_host(rest)
    return [prefix + value + tail for value in values for tail in tails]


def derived_port(job_id: str) -> int:
    """A port that every task of one job computes alike, different across jobs."""
    return DERIVED_PORT_BASE + zlib.crc32(job_id.encode()) % DERIVED_PORT_SPAN


def inside_torchrun_worker(env: Mapping[str, str]) -> bool:
    """True in a process that torchrun (or our agent) started as a worker."""
    return "TORCHELASTIC_RUN_ID" in env and "LOCAL_RANK" in env and "RANK" in env


def _count(listed: Optional[str]) -> Optional[int]:
    """How many devices a ``0,1,3`` list names (None when unset; ``-1``/empty: none)."""
    if listed is None:
        return None
    items = [v.strip() for v in listed.split(",") if v.strip()]
    if not items or items[0] in ("-1", "NoDevFiles"):
        return 0
    if items[0].startswith("MIG-"):
        return 1  # CUDA enumerates one MIG instance per process
    return len(items)


def host_gpus(env: Mapping[str, str]) -> Optional[int]:
    """GPUs SLURM allocated to the job on this node (all its tasks), None when unsaid."""
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit():
        return int(on_node)
    # SLURM_JOB_GPUS first: SLURM_STEP_GPUS is rewritten per task when GPUs are bound.
    for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        listed = _count(env.get(name))
        if listed:
            return listed
    return None


def tasks_on_node(tasks_per_node: str, node_index: int) -> Optional[int]:
    """Entry ``node_index`` of SLURM's compressed ``2(x3),1`` list (None if malformed)."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        count, _, repeat = item.strip().partition("(x")
        if not count.isdigit() or (repeat and not repeat.rstrip(")").isdigit()):
            return None
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node_index] if 0 <= node_index < len(counts) else None


@dataclass(frozen=True)
class HostShare:
    """This task's place among the tasks of its job that share one host.

    One task is one torchrun node; with ``tasks_per_node`` > 1 (the everyday SLURM
    idiom: one task per GPU) the host's workers are split among its tasks.
    """

    tasks: int  # tasks of this step on this host
    index: int  # this task's index among them (SLURM_LOCALID)
    host_gpus: Optional[int]  # GPUs allocated on this host (None: nobody said)
    visible_gpus: Optional[int]  # GPUs this task sees (CUDA_VISIBLE_DEVICES; None: unset)
    #: The GPU count is the scheduler's (SLURM): more workers than GPUs is then refused.
    #: On a workstation it is only what is visible: sharing a GPU is the user's call.
    allocated: bool = False

    @property
    def bound(self) -> bool:
        """SLURM bound GPUs per task (``--gpus-per-task``, ``--gpu-bind``): each task sees
        only its own, so LOCAL_RANK must count within the task to index them."""
        return (
            self.tasks > 1
            and self.visible_gpus is not None
            and self.host_gpus is not None
            and self.visible_gpus < self.host_gpus
        )


def host_share(env: Mapping[str, str], task: Optional[ClusterTask]) -> HostShare:
    """Where this task sits on its host, from SLURM's / submitit's variables."""
    visible = _count(env.get("CUDA_VISIBLE_DEVICES"))
    gpus = host_gpus(env)
    allocated = gpus is not None
    if gpus is None or visible == 0:
        gpus = visible  # CUDA_VISIBLE_DEVICES='' hides the host's GPUs: CPU workers
    tasks, index = 1, 0
    if task is not None and task.kind == "slurm":
        node = env.get("SLURM_NODEID", "0")
        for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            listed = env.get(name)
            found = tasks_on_node(listed, int(node)) if listed and node.isdigit() else None
            if found:
                tasks = found
                break
        local = env.get("SLURM_LOCALID", "0")
        index = int(local) if local.isdigit() else 0
    elif task is not None and gpus:
        # Emulated nodes on one GPU machine share its GPUs like tasks of one host.
        tasks, index = task.num_tasks, task.task_rank
    if tasks == 1 and visible is not None:
        gpus = visible  # one task: what it sees is what it has
    return HostShare(
        tasks=tasks,
        index=min(index, tasks - 1),
        host_gpus=gpus,
        visible_gpus=visible,
        allocated=allocated,
    )


@dataclass(frozen=True)
class WorkerPlan:
    """What this task's agent starts: how many workers and how they sit on the host."""

    nproc: int  # workers this task's agent starts (torchrun's nproc_per_node for it)
    local_offset: int  # host-wide LOCAL_RANK of its first worker
    local_world_size: int  # workers on the host (LOCAL_WORLD_SIZE)
    threads: int  # CPU threads per worker (OMP_NUM_THREADS unless the user set it)


_LAYOUT_FIX = "hydra.launcher.tasks_per_node / gpus_per_node (or gpus_per_task)"


def plan_workers(
    spec: Optional[str], share: HostShare, cpus: int, torch_gpus: int = 0
) -> WorkerPlan:
    """Workers for this task, one per GPU it owns, or refuse a layout that cannot be served.

    ``nproc_per_node`` keeps torchrun's meaning, workers per host: with T tasks on a
    host each task runs 1/T of them. Unset (or ``gpu``) means one per GPU allocated on the
    host, one per task without GPUs; ``cpu`` counts this task's CPUs (its affinity
    mask); ``auto`` is ``gpu`` with GPUs, else ``cpu``. ``torch_gpus`` is what torch
    sees, asked only when the scheduler said nothing.
    """
    tasks = share.tasks
    gpus = share.host_gpus if share.host_gpus is not None else torch_gpus
    per_task_gpus = (share.visible_gpus or 0) if share.bound else gpus // tasks
    if spec in (None, "gpu") or (spec == "auto" and gpus > 0):
        if gpus < 1:
            if spec == "gpu":
                raise TorchrunOptionError(
                    "nproc_per_node", spec, "'gpu' needs a visible CUDA device and none is", "1"
                )
            per_task = 1
        else:
            if not share.bound and gpus % tasks:
                raise TorchrunOptionError(
                    "nproc_per_node",
                    spec,
                    f"this node has {gpus} GPU(s) and {tasks} tasks of the job: one worker per "
                    f"GPU cannot be split evenly among the tasks",
                    f"{gpus} (with tasks_per_node=1)",
                    fix=f"ask for a number of tasks per node that divides the GPUs per node "
                    f"({_LAYOUT_FIX}), e.g. tasks_per_node={gpus} or 1",
                )
            per_task = per_task_gpus
    elif spec in ("cpu", "auto"):
        per_task = max(cpus, 1)
    else:
        workers = int(str(spec))
        if workers % tasks:
            raise TorchrunOptionError(
                "nproc_per_node",
                spec,
                f"nproc_per_node counts workers per node (as in torchrun) and this node runs "
                f"{tasks} tasks of the job: {workers} cannot be split evenly among them",
                str(tasks * max(workers // tasks, 1)),
                fix=f"a multiple of the {tasks} tasks per node, or change {_LAYOUT_FIX}",
            )
        per_task = workers // tasks
        if share.allocated and gpus > 0 and (per_task > per_task_gpus or workers > gpus):
            raise TorchrunOptionError(
                "nproc_per_node",
                spec,
                f"{workers} workers on a node with {gpus} GPU(s) allocated"
                + (f" ({per_task_gpus} visible to each of its {tasks} tasks)" if tasks > 1 else "")
                + ": two workers would share a GPU",
                str(gpus),
                fix=f"at most one worker per GPU: lower nproc_per_node (or leave it unset), or "
                f"ask for more GPUs ({_LAYOUT_FIX}); for CPU-only workers on a GPU node set "
                "CUDA_VISIBLE_DEVICES=''",
            )
    per_task = max(per_task, 1)
    if share.bound:
        offset, host_workers = 0, per_task
    else:
        offset, host_workers = share.index * per_task, tasks * per_task
    return WorkerPlan(
        nproc=per_task,
        local_offset=offset,
        local_world_size=host_workers,
        threads=max(cpus // per_task, 1),
    )


def task_cpus(env: Mapping[str, str], affinity: int, task: Optional[ClusterTask]) -> int:
    """This task's CPUs: its affinity mask, capped by what SLURM allocated to it (a task
    SLURM did not pin sees the whole host); emulated nodes share the machine."""
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    cpus = min(affinity, int(per_task)) if per_task.isdigit() and int(per_task) > 0 else affinity
    if task is not None and task.kind == "submitit-local":
        cpus //= max(task.num_tasks, 1)
    return max(cpus, 1)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what SLURM binds), as torchrun
    counts them, not every CPU of the machine."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def interface_address(name: str) -> Optional[str]:
    """The IPv4 address of network interface ``name`` (``ib0``), or None if no such
    interface: ``local_addr`` may name one, resolved on each node."""
    if not hasattr(socket, "if_nameindex") or name not in {n for _, n in socket.if_nameindex()}:
        return None
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        except OSError:  # the interface has no IPv4 address
            return None
    return socket.inet_ntoa(packed[20:24])


def job_store_ports(master_port: Optional[int], run_id: str) -> tuple[int, ...]:
    """Where a multi-task job's nodes meet: the ports node 0 may host the job's store on,
    tried in order by every node (the first free one wins). ``master_port`` if the user
    set it, else ports derived from the run id. The agents' c10d rendezvous runs on that
    same store, so this is also the job's rendezvous (master) port; the one place that
    decides it."""
    return (master_port,) if master_port is not None else tuple(candidate_ports(run_id))


def candidate_ports(job_id: str, count: int = 8) -> list[int]:
    """The ports node 0 may host the job's store on, in order, alike on every node.

    Ports derived from job ids collide (about 1 % of 20 concurrent jobs share one): node 0
    takes the first free one, the others take the first whose store proves it is theirs."""
    return [derived_port(job_id)] + [derived_port(f"{job_id}#{i}") for i in range(1, count)]


def _require(env: Mapping[str, str], names: tuple[str, ...], mode: str) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise TorchrunOptionError(
            "cluster",
            mode,
            f"this process is not a {mode} task: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set",
            "auto",
            fix=f"run it as a task (srun / a submitit launcher), or set "
            f"hydra.callbacks.torchrun.cluster=auto or none (missing: {', '.join(missing)})",
        )


def _int_var(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise TorchrunOptionError(
            "cluster",
            env.get(name),
            f"{name}={env.get(name)!r} is not an integer",
            "auto",
            fix=f"check the environment variable {name}",
        ) from None


_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")
_SUBMITIT_LOCAL = ("SUBMITIT_LOCAL_JOB_ID", "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS")


def detect_cluster(env: Mapping[str, str], mode: str = "auto") -> Optional[ClusterTask]:
    """Which task of which job this process is, or None on a plain machine.

    Only per-task variables count: an ``srun`` step sets ``SLURM_PROCID`` and
    ``SLURM_STEP_*`` for each task it starts, submitit's local executor sets
    ``SUBMITIT_LOCAL_GLOBALID``. The job-level variables an ``salloc`` shell or a
    batch script inherits (``SLURM_JOB_ID``, ``SLURM_NNODES``) never switch
    multi-node on by themselves.
    """
    if mode == "none":
        return None
    local = env.get("SUBMITIT_EXECUTOR") == "local" or "SUBMITIT_LOCAL_GLOBALID" in env
    as_local = local or (mode == "submitit" and "SLURM_PROCID" not in env)
    if mode in ("auto", "submitit") and as_local:
        if mode == "auto" and not all(env.get(n) for n in _SUBMITIT_LOCAL):
            return None
        _require(env, _SUBMITIT_LOCAL, "submitit")
        return ClusterTask(
            kind="submitit-local",
            job_id=env["SUBMITIT_LOCAL_JOB_ID"],
            num_tasks=_int_var(env, "SUBMITIT_LOCAL_NTASKS"),
            task_rank=_int_var(env, "SUBMITIT_LOCAL_GLOBALID"),
            hostnames=("localhost",),
        )
    if mode == "auto" and not all(env.get(n) for n in _SLURM_STEP):
        return None
    _require(env, _SLURM_STEP, "slurm" if mode == "auto" else mode)
    array_id, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_id}_{array_task}" if array_id and array_task else env["SLURM_JOB_ID"]
    return ClusterTask(
        kind="slurm",
        job_id=job_id,
        num_tasks=_int_var(env, "SLURM_STEP_NUM_TASKS"),
        task_rank=_int_var(env, "SLURM_PROCID"),
        hostnames=tuple(parse_node_list(env["SLURM_STEP_NODELIST"])),
        step_id=env.get("SLURM_STEP_ID", ""),
    )


@dataclass(frozen=True)
class Placement:
    """One node's view of the job: what the agent on this node is told."""

    min_nodes: int
    max_nodes: int
    node_rank: int
    nproc_per_node: int
    rdzv_backend: str
    rdzv_endpoint: str
    run_id: str
    rdzv_configs: dict[str, object]
    local_addr: Optional[str]
    #: "local" (one machine), "manual" (user-given rendezvous), later "slurm"/"submitit".
    source: str
    #: True when this process picked the port itself (it may retry on a race).
    port_picked: bool
    #: Set for a multi-task job: node 0 hosts the job's store at ``rdzv_endpoint``.
    cluster: Optional[ClusterTask] = None
    #: Multi-task job: the ports node 0 may host the job's store on, in order (see
    #: :func:`job_store_ports`); ``rdzv_endpoint`` names the first until one is found.
    store_ports: tuple[int, ...] = ()
    #: How this node's workers sit on a host it shares with other tasks of the job.
    plan: Optional[WorkerPlan] = None
    #: An elastic job whose nodes share a directory (submitit's folder): its rendezvous and
    #: job store are files there, hosted by no node, so it survives any node's loss.
    store_dir: Optional[str] = None

    def describe(self) -> str:
        """One line for the logs: node rank / nodes, endpoint, rdzv id, workers."""
        nodes = (
            str(self.max_nodes)
            if self.min_nodes == self.max_nodes
            else f"{self.min_nodes}:{self.max_nodes}"
        )
        return (
            f"torchrun placement ({self.source}): node {self.node_rank}/{nodes}, "
            f"{self.rdzv_backend} rendezvous at {self.rdzv_endpoint}, "
            f"rdzv_id={self.run_id}, {self.nproc_per_node} worker(s) on this node"
        )


def free_port(host: str = "") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(port: int, option: str = "master_port") -> None:
    """Fail in milliseconds, not after a rendezvous timeout, when a fixed port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise TorchrunOptionError(
                    option,
                    port,
                    f"port {port} on this host is already in use ({exc.strerror})",
                    "another free port, or leave it unset to pick a free one",
                ) from None
            raise


def rendezvous_backend(opts: Options, max_nodes: int) -> str:
    """The backend when ``rdzv_backend`` is unset: c10d (one machine: a free port and a
    unique id, as ``--standalone``), except for hand-wired nodes given only a master
    address or port and no endpoint, where torchrun's own default (static) is what their
    commands (and platforms that set ``PET_MASTER_ADDR``/``PET_MASTER_PORT``) mean."""
    if opts.rdzv_backend is not None:
        return opts.rdzv_backend
    hand_wired = max_nodes > 1 and not opts.rdzv_endpoint and not opts.standalone
    if hand_wired and (opts.master_addr is not None or opts.master_port is not None):
        return "static"
    return "c10d"


def resolve_placement(
    opts: Options,
    env: Mapping[str, str],
    nproc_per_node: int,
    pick_port: Callable[[], int] = free_port,
    job_num: int = 0,
) -> Placement:
    """Decide nodes, node rank and rendezvous for this node.

    ``env`` is the environment to read (``os.environ`` in real use); it is only
    consulted for cluster detection, never changed. ``job_num`` is Hydra's job number
    (``hydra.job.num``): part of a cluster job's rendezvous id.
    """
    from_env = dict(opts.from_env)
    # A rendezvous endpoint the user set replaces cluster detection (hand-wired nodes);
    # one that only came from PET_RDZV_ENDPOINT must not re-place a cluster job.
    by_user = bool(opts.rdzv_endpoint) and "rdzv_endpoint" not in from_env
    task = None if by_user else detect_cluster(env, opts.cluster)
    if task is not None and task.num_tasks > 1:
        return _cluster_placement(opts, task, nproc_per_node, job_num, env)
    min_nodes = opts.min_nodes or 1
    max_nodes = opts.max_nodes or min_nodes
    rdzv_configs: dict[str, object] = dict(opts.rdzv_configs)
    backend = rendezvous_backend(opts, max_nodes)

    manual_endpoint = bool(opts.rdzv_endpoint) or (
        backend == "static" and (opts.master_port is not None or max_nodes > 1)
    )
    if opts.standalone or not manual_endpoint:
        if max_nodes > 1 and not opts.standalone:
            raise TorchrunOptionError(
                "rdzv_endpoint",
                opts.rdzv_endpoint,
                f"nnodes={min_nodes}:{max_nodes} needs the address every node can reach "
                "(or run under SLURM/submitit, which sets it)",
                "node0.example.com:29400",
            )
        # One machine: c10d store on a free (or the user's) local port, unique id.
        picked = opts.master_port is None
        port = pick_port() if picked else int(opts.master_port or 0)
        return Placement(
            min_nodes=1,
            max_nodes=1,
            node_rank=0,
            nproc_per_node=nproc_per_node,
            rdzv_backend="c10d",
            rdzv_endpoint=f"localhost:{port}",
            run_id=opts.rdzv_id or uuid.uuid4().hex,
            rdzv_configs=rdzv_configs,
            local_addr=opts.local_addr,
            source="local",
            port_picked=picked,
        )

    # The user wired the rendezvous by hand (seed 002's two-machine recipe).
    if backend == "static":
        endpoint = opts.rdzv_endpoint or (
            f"{opts.master_addr or '127.0.0.1'}:{opts.master_port or DEFAULT_STATIC_PORT}"
        )
        rdzv_configs["rank"] = opts.node_rank or 0
    else:
        endpoint = opts.rdzv_endpoint
    run_id = opts.rdzv_id
    if run_id is None and backend == "static" and max_nodes > 1:
        run_id = "none"  # torchrun's default: the nodes' static store needs no id
    if run_id is None and max_nodes > 1:
        raise TorchrunOptionError(
            "rdzv_id",
            None,
            "a multi-node rendezvous set by hand needs one id shared by all nodes of the job",
            "my_job_42",
        )
    return Placement(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        node_rank=opts.node_rank or 0,
        nproc_per_node=nproc_per_node,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        run_id=run_id or uuid.uuid4().hex,
        rdzv_configs=rdzv_configs,
        local_addr=opts.local_addr,
        source="manual",
        port_picked=False,
    )


def _refuse_contradicting_environment(opts: Options, task: ClusterTask) -> None:
    """torchrun's ``PET_*`` variables (a platform's, e.g. Kubeflow's) never re-place a job
    that SLURM / submitit placed: one that says otherwise is refused, naming both."""
    where = "SLURM" if task.kind == "slurm" else "submitit"
    says = {
        "nnodes": (
            opts.max_nodes not in (None, task.num_tasks),
            f"{task.num_tasks} tasks (one torchrun node each)",
        ),
        "node_rank": (
            opts.node_rank not in (None, task.task_rank),
            f"this task is node {task.task_rank}",
        ),
        "master_addr": (
            opts.master_addr not in (None, task.master_addr),
            f"the job's first node is {task.master_addr}",
        ),
        "rdzv_endpoint": (bool(opts.rdzv_endpoint), "it places the rendezvous itself"),
        "rdzv_backend": (opts.rdzv_backend not in (None, "c10d"), "its nodes meet over c10d"),
    }
    for option, variable in opts.from_env:
        contradicts, fact = says.get(option, (False, ""))
        if contradicts:
            value = _env_value(opts, option)
            raise TorchrunOptionError(
                option,
                value,
                f"{variable}={value!r} contradicts the {where} placement of this job ({fact})",
                "",
                fix=f"unset {variable} for jobs that {where} places (the callback reads "
                f"the placement from {where}), or run without {where}",
            )


def _env_value(opts: Options, option: str) -> object:
    if option == "nnodes":
        return (
            str(opts.max_nodes)
            if opts.min_nodes == opts.max_nodes
            else f"{opts.min_nodes}:{opts.max_nodes}"
        )
    return getattr(opts, option)


def shared_store_dir(env: Mapping[str, str], task: ClusterTask, run_id: str) -> Optional[str]:
    """Where an elastic job keeps its rendezvous and store files: a directory of its own
    in submitit's folder, which every task of a submitit job reads its pickle from (so it
    is shared by the nodes). One per SLURM requeue (``SLURM_RESTART_COUNT``): a requeued
    job never meets its previous run's files. None outside submitit, or when the folder
    is per task (``%t``)."""
    folder = env.get("SUBMITIT_FOLDER", "")
    if not folder or "%t" in folder or not os.path.isabs(folder):
        return None
    array_id, _, index = task.job_id.partition("_")
    folder = folder.replace("%j", task.job_id).replace("%A", array_id).replace("%a", index)
    # The job id always: an rdzv_id the user set may repeat across jobs.
    name = run_id if run_id.startswith(f"job{task.job_id}") else f"job{task.job_id}.{run_id}"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return os.path.join(folder, STORE_DIR_NAME, f"{safe}.r{env.get('SLURM_RESTART_COUNT', '0')}")


def _cluster_placement(
    opts: Options,
    task: ClusterTask,
    nproc_per_node: int,
    job_num: int = 0,
    env: Optional[Mapping[str, str]] = None,
) -> Placement:
    """One node per task: rank = task rank, master = first host, id and port from the job."""
    _refuse_contradicting_environment(opts, task)
    if opts.max_nodes is not None and opts.max_nodes > task.num_tasks:
        raise TorchrunOptionError(
            "nnodes",
            f"{opts.min_nodes}:{opts.max_nodes}",
            f"this job has {task.num_tasks} tasks (one torchrun node each), fewer than MAX",
            str(task.num_tasks),
            fix="leave nnodes unset under SLURM/submitit, or ask the launcher for that many "
            "tasks (hydra.launcher.nodes x hydra.launcher.tasks_per_node); tasks beyond "
            "MAX wait as spares",
        )
    # Tasks beyond MAX are spares: torch's rendezvous keeps them on its redundancy list
    # and admits one when a node of the group is lost.
    max_nodes = task.num_tasks if opts.max_nodes is None else opts.max_nodes
    min_nodes = max_nodes if opts.min_nodes is None else opts.min_nodes
    if not 1 <= min_nodes <= max_nodes:
        raise TorchrunOptionError(
            "nnodes",
            f"{opts.min_nodes}:{opts.max_nodes}",
            f"MIN must be between 1 and MAX={max_nodes}",
            f"1:{max_nodes}",
        )
    elastic = min_nodes < task.num_tasks  # a lost node can be a membership change
    run_id = opts.rdzv_id or task.run_key(job_num)
    ports = job_store_ports(opts.master_port, run_id)
    host = opts.master_addr or task.master_addr
    configs: dict[str, object] = dict(opts.rdzv_configs)
    # Node 0's Hydra process hosts the job's store itself; every agent joins it as a client.
    configs["is_host"] = False
    if elastic:
        # Elastic: survivors re-form the group once a lost node's rendezvous keep-alive
        # has expired (2 s x 3 here, 5 s x 3 in torch) and after last_call (30 s in
        # torch): recovery in about 15 s instead of 50 s. What the user set wins.
        for key, value in ELASTIC_RDZV_DEFAULTS.items():
            configs.setdefault(key, value)
    store_dir = None
    if elastic and opts.master_addr is None and opts.master_port is None:
        store_dir = shared_store_dir(env or {}, task, run_id)
    if store_dir is not None:
        # No node hosts anything: torch's c10d rendezvous on a FileStore (store_type=file)
        # in the job's shared directory, which outlives every node.
        configs.pop("is_host")
        configs["store_type"] = "file"
    return Placement(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        node_rank=task.task_rank,
        nproc_per_node=nproc_per_node,
        rdzv_backend="c10d",
        rdzv_endpoint=(
            os.path.join(store_dir, "rendezvous") if store_dir else f"{host}:{ports[0]}"
        ),
        run_id=run_id,
        rdzv_configs=configs,
        local_addr=opts.local_addr,
        source=task.kind,
        port_picked=False,
        cluster=task,
        store_ports=() if store_dir else ports,
        store_dir=store_dir,
    )
