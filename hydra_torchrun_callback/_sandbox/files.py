"""Where each file of a SLURM sandbox lives, and the configuration files it writes."""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CLUSTER", "ConfigFiles", "Layout"]

#: The cluster's name (slurm.conf's ClusterName, registered in slurmdbd).
CLUSTER = "sandbox"
#: unix socket paths are limited to 108 bytes (sun_path).
_SUN_PATH_MAX = 107


def _write_private(path: Path, text: str) -> None:
    """Write a 0600 file (it holds a password; slurmdbd refuses a readable config)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# -- where the files are ---------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each file of a sandbox lives, all under ``base``."""

    base: Path
    nodes: int
    gpus: int

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def munge_dir(self) -> Path:
        return self.base / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munged.socket"

    @property
    def mysql_socket(self) -> Path:
        return self.base / "db" / "mysqld.sock"

    @property
    def datadir(self) -> Path:
        """MariaDB's data dir."""
        return self.base / "db" / "data"

    @property
    def gpu_files(self) -> list[Path]:
        return [self.base / "dev" / f"gpu{i}" for i in range(self.gpus)]

    @property
    def logs(self) -> Path:
        return self.base / "log"

    @property
    def state(self) -> Path:
        """The PIDs of the daemons (JSON), for a ``stop`` from another process."""
        return self.base / "run" / "sandbox.json"


# -- the files it writes ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigFiles:
    """Writes the sandbox's folders and files, one method per file: hosts and resolv.conf
    for the nodes, the munge key, the fake GPUs, MariaDB's init.sql, slurmdbd.conf,
    gres.conf and slurm.conf."""

    layout: Layout
    cpus: int
    ports: dict[str, int]
    db_password: str

    def write(self) -> None:
        self._make_dirs()
        self._write_hosts()
        self._write_munge_key()
        self._make_gpu_devices()
        self._write_db_init()
        self._write_slurmdbd_conf()
        self._write_gres_conf()
        self._write_slurm_conf()

    def _make_dirs(self) -> None:
        b = self.layout.base
        for sub in ("etc", "spool", "state", "log", "run", "dev", "db/tmp"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        self.layout.munge_dir.mkdir(mode=0o700, exist_ok=True)
        for name in self.layout.node_names:
            (b / "spool" / f"slurmd-{name}").mkdir(exist_ok=True)
        for sock in (self.layout.munge_socket, self.layout.mysql_socket):
            if len(str(sock)) > _SUN_PATH_MAX:
                raise ValueError(f"sandbox folder too deep for a unix socket path: {sock}")

    def _write_hosts(self) -> None:
        """The hosts file and resolv.conf bind-mounted over the daemons' (jobs inherit them)."""
        names = self.layout.node_names
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        lines = [ln for ln in hosts.splitlines() if not any(n in ln.split() for n in names)]
        # slurmctld and slurmdbd run as host "localhost": what they bind (NoCtldInAddrAny,
        # NoInAddrAny: the address of their hostname) is 127.0.0.1 on any machine.
        # 127.0.2.x for the nodes: clear of Debian's "127.0.1.1 <hostname>" line.
        lines = [
            "127.0.0.1 localhost",
            *lines,
            *(f"127.0.2.{i} {n}" for i, n in enumerate(names, start=1)),
        ]
        etc = self.layout.base / "etc"
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    def _write_munge_key(self) -> None:
        key = self.layout.munge_dir / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(1024))

    def _make_gpu_devices(self) -> None:
        for dev in self.layout.gpu_files:
            if not dev.is_char_device():
                dev.unlink(missing_ok=True)
                # A null device under a GPU's name: slurmd wants a character device.
                os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))

    def _write_db_init(self) -> None:
        """MariaDB runs it on every start: the slurm user, with this start's password."""
        password = self.db_password
        _write_private(
            self.layout.base / "db" / "init.sql",
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
            f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n",
        )

    def _write_slurmdbd_conf(self) -> None:
        b, ports = self.layout.base, self.ports
        conf = [
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.layout.munge_socket}",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={ports['slurmdbd']}",
            "CommunicationParameters=NoInAddrAny",
            "SlurmUser=root",
            f"PidFile={b}/run/slurmdbd.pid",
            f"LogFile={b}/log/slurmdbd.log",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={ports['mariadbd']}",
            "StorageUser=slurm",
            f"StoragePass={self.db_password}",
            "StorageLoc=slurm_acct_db",
        ]
        _write_private(b / "etc" / "slurmdbd.conf", "\n".join(conf) + "\n")

    def _write_gres_conf(self) -> None:
        b, gpus = self.layout.base, self.layout.gpus
        gres = ["AutoDetect=off"]
        if gpus == 1:
            gres.append(f"Name=gpu File={b}/dev/gpu0")
        elif gpus > 1:
            gres.append(f"Name=gpu File={b}/dev/gpu[0-{gpus - 1}]")
        (b / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")

    def _write_slurm_conf(self) -> None:
        b, ports, names = self.layout.base, self.ports, self.layout.node_names
        conf = [
            f"ClusterName={CLUSTER}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ports['slurmctld']}",
            # slurmctld binds 127.0.0.1, not every address of the machine. (NoInAddrAny would
            # bind each slurmd to its 127.0.2.x, but also srun inside jobs, and slurmstepd
            # answers srun at 127.0.0.1, the source address the kernel picks on loopback.)
            "CommunicationParameters=NoCtldInAddrAny",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: how long slurmd refuses a job id it just killed, and so how long
            # a requeued job waits before it may start again (120 s by default; a requeue
            # released sooner dies with "Job credential revoked").
            f"AuthInfo=socket={self.layout.munge_socket},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/affinity",
            "GresTypes=gpu",
            "AccountingStorageTRES=gres/gpu",  # sacct's AllocTRES shows gres/gpu=N
            "JobAcctGatherType=jobacct_gather/linux",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            # The munge socket for talking to slurmdbd (AuthInfo is not used for that).
            f"AccountingStoragePass={self.layout.munge_socket}",
            f"AccountingStoragePort={ports['slurmdbd']}",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=5",
            "MinJobAge=600",
            "SchedulerParameters=sched_interval=1",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/slurmd-%n",
            f"SlurmctldPidFile={b}/run/slurmctld.pid",
            f"SlurmdPidFile={b}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd-%n.log",
        ]
        gres_node = f" Gres=gpu:{self.layout.gpus}" if self.layout.gpus > 0 else ""
        for i, name in enumerate(names, start=1):
            conf.append(
                f"NodeName={name} NodeHostname={name} NodeAddr=127.0.2.{i} "
                f"Port={ports[name]} CPUs={self.cpus} RealMemory=1000{gres_node} State=UNKNOWN"
            )
        conf.append(
            f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP"
        )
        self.layout.conf.write_text("\n".join(conf) + "\n")
