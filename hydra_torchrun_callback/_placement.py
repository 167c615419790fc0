"""Where am I: turn options + the process environment into a rendezvous plan.

Pure functions fed a dict of environment variables, so every case (single
machine, manual multi-node, SLURM, submitit) is testable without a cluster.
Anything impure (finding a free port) is passed in as a callable.
"""

from __future__ import annotations

import errno
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional

from hydra_torchrun_callback._options import Options, TorchrunOptionError

__all__ = ["Placement", "check_port_free", "free_port", "resolve_placement"]

DEFAULT_STATIC_PORT = 29500


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


def resolve_placement(
    opts: Options,
    env: Mapping[str, str],
    nproc_per_node: int,
    pick_port: Callable[[], int] = free_port,
) -> Placement:
    """Decide nodes, node rank and rendezvous for this node.

    ``env`` is the environment to read (``os.environ`` in real use); it is only
    consulted for cluster detection, never changed.
    """
    del env  # single-machine and manual placement do not read the environment
    min_nodes = opts.min_nodes or 1
    max_nodes = opts.max_nodes or min_nodes
    rdzv_configs: dict[str, object] = dict(opts.rdzv_configs)

    manual_endpoint = bool(opts.rdzv_endpoint) or (
        opts.rdzv_backend == "static" and (opts.master_port is not None or max_nodes > 1)
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
    if opts.rdzv_backend == "static":
        endpoint = opts.rdzv_endpoint or (
            f"{opts.master_addr or '127.0.0.1'}:{opts.master_port or DEFAULT_STATIC_PORT}"
        )
        rdzv_configs["rank"] = opts.node_rank or 0
    else:
        endpoint = opts.rdzv_endpoint
    if opts.rdzv_id is None and max_nodes > 1:
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
        rdzv_backend=opts.rdzv_backend,
        rdzv_endpoint=endpoint,
        run_id=opts.rdzv_id or uuid.uuid4().hex,
        rdzv_configs=rdzv_configs,
        local_addr=opts.local_addr,
        source="manual",
        port_picked=False,
    )
