"""The callback's options: one typed dataclass, torchrun's own option names.

This module is imported by the Hydra plugin at every app start, so it must stay
light: no torch, no submitit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["OPTION_NAMES", "TorchrunConf", "TorchrunLauncherConf"]


@dataclass
class TorchrunConf:
    """Options of ``hydra.callbacks.torchrun``; see ``torchrun --help`` for the shared ones."""

    _target_: str = "hydra_torchrun_callback.TorchrunCallback"

    # Every torchrun option, under torchrun's name and meaning. Unset (null): the variable
    # PET_<NAME> if set (as torchrun reads it), else the default named in the comment.
    # README "torchrun options" lists where our defaults differ from torchrun's, and why.

    # Number of nodes: "N" or "MIN:MAX" (elastic). Under SLURM/submitit: the job's node count.
    nnodes: Optional[str] = None
    # Workers per node: an int, "auto" (torchrun's: accelerators, else CPU cores), "gpu", "cpu".
    # Unset: one per visible GPU, one when there is none (never one per CPU core).
    nproc_per_node: Optional[str] = None
    # Rendezvous backend: "c10d" (unset), "static", "etcd", "etcd-v2".
    rdzv_backend: Optional[str] = None
    # host[:port] of the rendezvous store. Unset on one machine: a free local port.
    rdzv_endpoint: Optional[str] = None
    # Rendezvous id shared by the nodes of one job. Unset: unique per job.
    rdzv_id: Optional[str] = None
    # Extra rendezvous settings: "key=value,key2=value2" or a mapping (e.g. {timeout: 120}).
    rdzv_conf: Any = None
    # Force a single-node rendezvous on a free localhost port (the default on one machine).
    standalone: Optional[bool] = None
    # Restarts of the whole worker group after a failure before the job fails (unset: 0).
    max_restarts: Optional[int] = None
    # Seconds between the agent's checks of its workers (unset: 0.1).
    monitor_interval: Optional[float] = None
    # How workers start: "forkserver" (unset; warm: forks of a server that preloaded torch
    # and Hydra, CUDA-safe), "spawn" (a fresh interpreter each, torchrun's default), "fork".
    start_method: Optional[str] = None
    # Worker role name (ROLE_RANK / ROLE_WORLD_SIZE are counted per role; unset: "default").
    role: Optional[str] = None
    # Where torchrun writes per-attempt, per-rank stdout/stderr/error files. Unset: a private
    # temporary folder, removed after the job (redirected output is copied to the job log).
    log_dir: Optional[str] = None
    # Redirect worker stdout/stderr to files in log_dir: 0 none (unset), 1 out, 2 err, 3 both;
    # or per local rank "0:1,1:2".
    redirects: Optional[str] = None
    # Like redirects, but also keep printing to the console.
    tee: Optional[str] = None
    # Only show these local ranks' console output, e.g. "0" or "0,1". Unset: all.
    local_ranks_filter: Optional[str] = None
    # Rank of this node (static backend / manual multi-node). Unset: 0, or from SLURM.
    node_rank: Optional[int] = None
    # Master address for the static backend. Unset: 127.0.0.1, or the job's first node.
    master_addr: Optional[str] = None
    # The static backend's port (workers' MASTER_PORT); on one machine with c10d the
    # rendezvous port; under SLURM/submitit the job store's port. Unset: free or job-derived.
    master_port: Optional[int] = None
    # Address this node advertises to the others (bind to the cluster interface).
    local_addr: Optional[str] = None
    # A LogsSpecs class registered under the "torchrun.logs_specs" entry point. Unset: torch's.
    logs_specs: Optional[str] = None
    # torchelastic events handler (torch.distributed.elastic.events), e.g. "console".
    # Unset: "null".
    event_log_handler: Optional[str] = None
    # Lines of worker stdout / stderr containing any of these strings are also written to
    # filtered_stdout.log / filtered_stderr.log in log_dir, e.g. [error, warn].
    duplicate_stdout_filters: Optional[list[str]] = None
    duplicate_stderr_filters: Optional[list[str]] = None
    # Bind each worker to its GPU's NUMA node: "node", "socket", "exclusive",
    # "core-complex" (the installed torch's choices). Unset: no binding.
    numa_binding: Optional[str] = None
    # Signals the agent passes on to the workers (exported as TORCHELASTIC_SIGNALS_TO_HANDLE).
    # Unset: "SIGTERM,SIGINT,SIGHUP,SIGQUIT".
    signals_to_handle: Optional[str] = None
    # Seconds workers get between SIGTERM and SIGKILL when stopped (unset: torch's
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30).
    shutdown_timeout: Optional[int] = None
    # Every worker sees its device as local rank 0 (LOCAL_RANK=0, one GPU visible each).
    virtual_local_rank: Optional[bool] = None
    # Multi-node detection: "auto" (a submitit task or an srun step with several tasks),
    # "none" (always one machine), "slurm" or "submitit" (require it, fail if absent).
    cluster: str = "auto"
    # Seconds without a heartbeat before a peer node counts as lost (multi-node only).
    peer_timeout: float = 20.0
    # Log a per-rank table (rank, node, host, pid, attempts, exit status, wall time, root
    # cause) at the end of each job and save it as torchrun_summary.json beside .hydra/.
    summary: bool = True
    # Seconds between one-line "ranks alive" reports in the Hydra process log; 0: off.
    heartbeat_interval: float = 0.0
    # Seconds the workers get after a preemption / time-limit signal (SLURM's, passed on by
    # the agent) to save a checkpoint and exit, before the job is requeued. The workers
    # still running then get SIGTERM (and SIGKILL after shutdown_timeout).
    preemption_grace: float = 30.0
    # With start_method=forkserver, what the workers are forked from. "auto": a fork of the
    # Hydra process when the app imported torch itself and that process is safe to fork
    # (one torch import per node), else a fresh interpreter (a log line says why);
    # "fork": that fork, or an error naming what makes it unsafe; "fresh": always a fresh
    # interpreter that imports torch itself.
    warm_server: str = "auto"

    # Sweeps (-m) only; point jobs ignore these. README "Sweeps that outlive interruptions".
    # Return at once; the sweep runs on in a controller: a SLURM job of its own under
    # submitit_slurm, a detached local process otherwise.
    detach: bool = False
    # Continue the sweep in hydra.sweep.dir (same app, same task overrides): completed
    # points are not run again, queued/running SLURM points are waited for, the rest run
    # again in their own dirs.
    resume: bool = False
    # The detached controller's SLURM job, over the launcher's settings: submitit names
    # (partition, account, qos, timeout_min, cpus_per_task, mem_gb, setup,
    # max_num_timeout, ...), e.g. +hydra.callbacks.torchrun.controller.partition=cpu.
    # Empty: 1 task, 1 CPU, the launcher's site settings and time.
    controller: dict[str, Any] = field(default_factory=dict)


OPTION_NAMES: tuple[str, ...] = tuple(
    name for name in TorchrunConf.__dataclass_fields__ if name != "_target_"
)


@dataclass
class TorchrunLauncherConf:
    """``hydra/launcher=torchrun``: the keys of hydra-torchrun-launcher (seed of this
    project), with its defaults, plus this package's own options.

    Values left at that launcher's defaults mean "decide as the callback does" (a free
    local port instead of 29500, monitor every 0.1 s instead of 5 s); see the README's
    migration table.
    """

    _target_: str = "hydra_plugins.hydra_torchrun_callback.torchrun_launcher.TorchrunLauncher"

    # Number of nodes, "N" or "MIN:MAX".
    nnodes: str = "1:1"
    # Workers per node: an int, "auto", "gpu", "cpu".
    nproc_per_node: str = "1"
    # Rendezvous backend; "static" with the default master address/port means a free
    # local port on one machine.
    rdzv_backend: str = "static"
    rdzv_endpoint: str = ""
    # "none": a unique id per job.
    rdzv_id: str = "none"
    rdzv_conf: str = ""
    standalone: bool = False
    max_restarts: int = 0
    # 5 (that launcher's default) is read as the callback's 0.1 s.
    monitor_interval: float = 5
    start_method: str = "forkserver"
    role: str = "default"
    # torchrun's script-launch flags: this launcher runs the Hydra task function, so they
    # must stay at their defaults (a clear error says so otherwise).
    module: bool = False
    no_python: bool = False
    run_path: bool = False
    log_dir: Optional[str] = None
    redirects: str = "0"
    tee: str = "0"
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_addr: Optional[str] = None
    training_script: str = ""
    training_script_args: list[str] = field(default_factory=list)
    # torchrun's newer options (see TorchrunConf).
    logs_specs: Optional[str] = None
    event_log_handler: Optional[str] = None
    duplicate_stdout_filters: Optional[list[str]] = None
    duplicate_stderr_filters: Optional[list[str]] = None
    numa_binding: Optional[str] = None
    signals_to_handle: Optional[str] = None
    shutdown_timeout: Optional[int] = None
    virtual_local_rank: Optional[bool] = None
    # This package's own options (see TorchrunConf).
    local_ranks_filter: str = ""
    cluster: str = "auto"
    peer_timeout: float = 20.0
    summary: bool = True
    heartbeat_interval: float = 0.0
    preemption_grace: float = 30.0
    warm_server: str = "auto"
