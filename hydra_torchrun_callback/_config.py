"""The callback's options: one typed dataclass, torchrun's own option names.

This module is imported by the Hydra plugin at every app start, so it must stay
light: no torch, no submitit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["OPTION_NAMES", "TorchrunConf"]


@dataclass
class TorchrunConf:
    """Options of ``hydra.callbacks.torchrun``; see ``torchrun --help`` for the shared ones."""

    _target_: str = "hydra_torchrun_callback.TorchrunCallback"

    # Number of nodes: "N" or "MIN:MAX" (elastic). Under SLURM/submitit: the job's node count.
    nnodes: Optional[str] = None
    # Workers per node: an int, "auto" (torchrun's: accelerators, else CPU cores), "gpu", "cpu".
    # Unset: one per visible GPU, one when there is none (never one per CPU core).
    nproc_per_node: Optional[str] = None
    # Rendezvous backend: "c10d" (default), "static", "etcd", "etcd-v2".
    rdzv_backend: str = "c10d"
    # host[:port] of the rendezvous store. Unset on one machine: a free local port.
    rdzv_endpoint: str = ""
    # Rendezvous id shared by the nodes of one job. Unset: unique per job.
    rdzv_id: Optional[str] = None
    # Extra rendezvous settings: "key=value,key2=value2" or a mapping (e.g. {timeout: 120}).
    rdzv_conf: Any = ""
    # Force a single-node rendezvous on a free localhost port (the default on one machine).
    standalone: bool = False
    # Restarts of the whole worker group after a failure before the job fails.
    max_restarts: int = 0
    # Seconds between the agent's checks of its workers (torchrun's default 0.1).
    monitor_interval: float = 0.1
    # How workers start: "spawn" (CUDA-safe), "fork", "forkserver".
    start_method: str = "spawn"
    # Worker role name (ROLE_RANK / ROLE_WORLD_SIZE are counted per role).
    role: str = "default"
    # Where torchrun writes per-attempt, per-rank stdout/stderr/error files. Unset: a private
    # temporary folder, removed after the job.
    log_dir: Optional[str] = None
    # Redirect worker stdout/stderr to files in log_dir: 0 none, 1 out, 2 err, 3 both; or per
    # local rank "0:1,1:2".
    redirects: str = "0"
    # Like redirects, but also keep printing to the console.
    tee: str = "0"
    # Only show these local ranks' console output, e.g. "0" or "0,1". Empty: all.
    local_ranks_filter: str = ""
    # Rank of this node (static backend / manual multi-node). Unset: 0, or from SLURM.
    node_rank: Optional[int] = None
    # Master address for the static backend. Unset: 127.0.0.1, or the job's first node.
    master_addr: Optional[str] = None
    # Master port for the static backend / the rendezvous port. Unset: free or job-derived.
    master_port: Optional[int] = None
    # Address this node advertises to the others (bind to the cluster interface).
    local_addr: Optional[str] = None
    # Multi-node detection: "auto" (a submitit task or an srun step with several tasks),
    # "none" (always one machine), "slurm" or "submitit" (require it, fail if absent).
    cluster: str = "auto"
    # Seconds without a heartbeat before a peer node counts as lost (multi-node only).
    peer_timeout: float = 20.0


OPTION_NAMES: tuple[str, ...] = tuple(
    name for name in TorchrunConf.__dataclass_fields__ if name != "_target_"
)
