"""A real SLURM cluster on one machine, for tests and for trying multi-node on a laptop.

One ``slurmctld`` and N ``slurmd`` (Debian's slurm-wlm, MULTIPLE_SLURMD build), set up
like a GPU site: munge authentication (a private ``munged``), real accounting
(``slurmdbd`` over a private MariaDB, so ``sacct`` answers), CPU binding
(``task/affinity``) and fake GPUs (GRES over null devices, so SLURM itself sets
``CUDA_VISIBLE_DEVICES`` / ``SLURM_GPUS_ON_NODE`` for jobs that ask for GPUs). Every
file lives under one folder (plus a cached MariaDB data dir under
``~/.cache/hydra-torchrun-callback``); all traffic is loopback. slurmctld, slurmdbd and
MariaDB listen on 127.0.0.1 only and munged on a unix socket; each slurmd listens on its
port on every address (binding it to its node's address makes srun bind there too, and
slurmstepd calls srun back at 127.0.0.1), so munge is what keeps others out.
Each ``slurmd`` runs in its own mount + UTS namespace with its own hostname (``n1``,
``n2`` ...) and a private hosts file, so jobs see distinct node names that resolve to
distinct loopback addresses, as torch's c10d rendezvous needs. Needs root.

    python -m hydra_torchrun_callback.slurm_sandbox start --nodes 2 --gpus 2 --dir /tmp/sb
    export SLURM_CONF=/tmp/sb/etc/slurm.conf     # all a client needs (sbatch, sacct, submitit)
    python -m hydra_torchrun_callback.slurm_sandbox stop --dir /tmp/sb
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hydra_torchrun_callback._sandbox.daemons import start_cluster
from hydra_torchrun_callback._sandbox.files import CLUSTER as CLUSTER
from hydra_torchrun_callback._sandbox.files import ConfigFiles, Layout
from hydra_torchrun_callback._sandbox.processes import SERVICES as SERVICES
from hydra_torchrun_callback._sandbox.processes import Daemons, Teardown, recorded_pids, which

__all__ = ["SlurmSandbox", "main"]

#: Debian packages that provide the daemons and clients (``apt-get install -y ...``).
PACKAGES = "slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
#: Tool -> package, checked before anything starts.
TOOLS = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "slurmdbd": "slurmdbd",
    "sinfo": "slurm-client",
    "sacctmgr": "slurm-client",
    "munged": "munge",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "unshare": "util-linux",
}


def _free_ports(count: int) -> list[int]:
    """Ports for the daemons, free on every address (slurmd binds them all), above the
    ephemeral range (an outgoing connection never takes one between pick and use) and
    clear of the rendezvous ports the callback derives (15000-31999)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        high = int(text.split()[1])
    except (OSError, ValueError, IndexError):
        high = 60999
    candidates = list(range(high + 1, 65536)) if high < 64000 else list(range(10000, 15000))
    random.shuffle(candidates)
    chosen: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("", port))  # only a test (no listen)
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise RuntimeError("SLURM sandbox: no free ports")


def _machine_cpus() -> int:
    """The CPUs this process may use: a node that declares more goes INVAL."""
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1


@dataclass
class SlurmSandbox:
    """Start/stop a private SLURM cluster (with munge, slurmdbd and MariaDB) under ``base``.

    ``cpus``: CPUs declared per node (default: the machine's; more puts a node in INVAL).
    ``gpus``: fake GPUs per node (null character devices under ``base/dev``; 0: none).

    It puts together the parts in :mod:`hydra_torchrun_callback._sandbox`: the files
    (``ConfigFiles`` over a ``Layout``), the daemons' start (``start_cluster`` through
    ``Daemons``) and the teardown (``Teardown``).
    """

    base: Path
    nodes: int = 2
    cpus: int = field(default_factory=_machine_cpus)
    gpus: int = 2
    pids: dict[str, int] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen[bytes]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def _layout(self) -> Layout:
        return Layout(self.base, self.nodes, self.gpus)

    @property
    def conf(self) -> Path:
        return self._layout.conf

    @property
    def node_names(self) -> list[str]:
        return self._layout.node_names

    @property
    def munge_socket(self) -> Path:
        return self._layout.munge_socket

    @property
    def mysql_socket(self) -> Path:
        """Where ``mariadb --no-defaults -S <this> -u root`` reaches the accounting database."""
        return self._layout.mysql_socket

    @property
    def gpu_files(self) -> list[Path]:
        return self._layout.gpu_files

    def env(self) -> dict[str, str]:
        """What a client (sbatch, sacct, submitit) needs: SLURM_CONF, with PATH as it is.

        slurm.conf names the munge socket (``AuthInfo``) and slurmdbd, so nothing else is
        needed; without SLURM_CONF, Slurm would look the controller up in DNS.
        """
        return {"SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", os.defpath)}

    @staticmethod
    def missing_tools() -> list[str]:
        """``tool (package)`` for each tool the sandbox needs that is not installed."""
        return [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if which(tool) is None]

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, MariaDB, slurmdbd, slurmctld and the slurmds; wait until every
        node is idle."""
        missing = self.missing_tools()
        if missing:
            raise RuntimeError(
                f"not found: {', '.join(missing)}: apt-get install -y {PACKAGES} "
                "(and util-linux for unshare)"
            )
        if os.geteuid() != 0:
            raise RuntimeError("the SLURM sandbox needs root (namespaces, slurmd as root)")
        if not 0 < self.cpus <= _machine_cpus():
            raise ValueError(
                f"cpus={self.cpus}: a node may declare 1..{_machine_cpus()} CPUs "
                "(more than the machine has puts it in INVAL)"
            )
        self.base = self.base.resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        names = ["slurmctld", "slurmdbd", "mariadbd", *self.node_names]
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        layout = self._layout
        ConfigFiles(layout, self.cpus, ports, db_password=secrets.token_hex(16)).write()
        # Not a job's SLURM_* (when started inside one): the daemons get only ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env())
        deadline = time.monotonic() + timeout
        with open(layout.logs / "daemons.out", "ab") as log:
            try:
                start_cluster(Daemons(layout, env, log, self.pids, self._procs), ports, deadline)
            except BaseException:
                self.stop()
                raise

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, stop the daemons we started (by PID) and what they started,
        and any job step left over (slurmstepd runs apart from slurmd): nothing of the
        sandbox keeps running. ``timeout``: for the jobs to end, then for the daemons."""
        env = {**os.environ, **self.env()}
        layout = self._layout
        if not self.pids and layout.state.exists():
            # Another process started them (the CLI): only what still runs with our config.
            self.pids = recorded_pids(layout)
        Teardown(layout, self.pids).run(env, timeout)
        for proc in self._procs.values():
            proc.poll()  # reaped above: lets Popen know
        self.pids, self._procs = {}, {}
        layout.state.unlink(missing_ok=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[SlurmSandbox]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hydra_torchrun_callback.slurm_sandbox",
        description=(
            "A private SLURM cluster on this machine, set up like a GPU site: munge, "
            "slurmdbd over MariaDB (sacct), task/affinity, fake GPUs (gres.conf). Needs root; "
            "loopback only; every file under --dir. Clients need only SLURM_CONF."
        ),
    )
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, help="folder for every file of the cluster")
    parser.add_argument("--nodes", type=int, default=2, help="slurmd nodes n1..nN (default 2)")
    parser.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="CPUs declared per node (default: the machine's; more is refused)",
    )
    parser.add_argument(
        "--gpus", type=int, default=2, help="fake GPUs per node (null devices; default 2)"
    )
    args = parser.parse_args(argv)
    sandbox = SlurmSandbox(
        Path(args.dir).resolve(),
        nodes=args.nodes,
        cpus=args.cpus or _machine_cpus(),
        gpus=args.gpus,
    )
    if args.action == "start":
        start = time.monotonic()
        sandbox.start()
        print(f"export SLURM_CONF={sandbox.conf}")
        print(
            f"# nodes: {' '.join(sandbox.node_names)} ({sandbox.cpus} CPUs, {sandbox.gpus} "
            f"GPUs each), up in {time.monotonic() - start:.1f} s; stop with: "
            f"python -m hydra_torchrun_callback.slurm_sandbox stop --dir {sandbox.base}"
        )
    else:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
