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
import hashlib
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hydra_torchrun_callback._proc import alive, descendants

__all__ = ["SlurmSandbox", "main"]

CLUSTER = "sandbox"
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
#: Stopped after slurmctld and the slurmds (slurmctld flushes to slurmdbd), in this order.
SERVICES = (("slurmdbd",), ("mariadbd", "munged"))
#: unix socket paths are limited to 108 bytes (sun_path).
_SUN_PATH_MAX = 107
#: MariaDB sized for a sandbox (slurmdbd logs that it would like more: harmless).
_MARIADB_OPTS = (
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=8M",
    "--innodb-lock-wait-timeout=900",
    # A throw-away database: no fsync (creating slurmdbd's tables is then quick).
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--innodb-flush-method=nosync",
)


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


def _which(tool: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(tool, path=path)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
        "hydra-torchrun-callback"
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class SlurmSandbox:
    """Start/stop a private SLURM cluster (with munge, slurmdbd and MariaDB) under ``base``.

    ``cpus``: CPUs declared per node (default: the machine's; more puts a node in INVAL).
    ``gpus``: fake GPUs per node (null character devices under ``base/dev``; 0: none).
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
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    @property
    def munge_socket(self) -> Path:
        return self.base / "munge" / "munged.socket"

    @property
    def mysql_socket(self) -> Path:
        """Where ``mariadb --no-defaults -S <this> -u root`` reaches the accounting database."""
        return self.base / "db" / "mysqld.sock"

    @property
    def gpu_files(self) -> list[Path]:
        return [self.base / "dev" / f"gpu{i}" for i in range(self.gpus)]

    def env(self) -> dict[str, str]:
        """What a client (sbatch, sacct, submitit) needs: SLURM_CONF, with PATH as it is.

        slurm.conf names the munge socket (``AuthInfo``) and slurmdbd, so nothing else is
        needed; without SLURM_CONF, Slurm would look the controller up in DNS.
        """
        return {"SLURM_CONF": str(self.conf), "PATH": os.environ.get("PATH", os.defpath)}

    @staticmethod
    def missing_tools() -> list[str]:
        """``tool (package)`` for each tool the sandbox needs that is not installed."""
        return [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if _which(tool) is None]

    # -- files -----------------------------------------------------------------------------

    def _write_files(self, ports: dict[str, int], db_password: str) -> None:
        b = self.base
        for sub in ("etc", "spool", "state", "log", "run", "dev", "db/tmp"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        (b / "munge").mkdir(mode=0o700, exist_ok=True)
        for name in self.node_names:
            (b / "spool" / f"slurmd-{name}").mkdir(exist_ok=True)
        for sock in (self.munge_socket, self.mysql_socket):
            if len(str(sock)) > _SUN_PATH_MAX:
                raise ValueError(f"sandbox folder too deep for a unix socket path: {sock}")
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        lines = [
            ln for ln in hosts.splitlines() if not any(n in ln.split() for n in self.node_names)
        ]
        # slurmctld and slurmdbd run as host "localhost": what they bind (NoCtldInAddrAny,
        # NoInAddrAny: the address of their hostname) is 127.0.0.1 on any machine.
        # 127.0.2.x for the nodes: clear of Debian's "127.0.1.1 <hostname>" line.
        lines = [
            "127.0.0.1 localhost",
            *lines,
            *(f"127.0.2.{i} {n}" for i, n in enumerate(self.node_names, start=1)),
        ]
        (b / "etc" / "hosts").write_text("\n".join(lines) + "\n")
        (b / "etc" / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        key = b / "munge" / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(1024))
        for dev in self.gpu_files:
            if not dev.is_char_device():
                dev.unlink(missing_ok=True)
                # A null device under a GPU's name: slurmd wants a character device.
                os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        auth_info = f"socket={self.munge_socket}"
        self._write_private(
            b / "db" / "init.sql",
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{db_password}';\n"
            f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{db_password}';\n"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n",
        )
        self._write_private(
            b / "etc" / "slurmdbd.conf",
            "\n".join(
                [
                    "AuthType=auth/munge",
                    f"AuthInfo={auth_info}",
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
                    f"StoragePass={db_password}",
                    "StorageLoc=slurm_acct_db",
                ]
            )
            + "\n",
        )
        gres = ["AutoDetect=off"]
        if self.gpus == 1:
            gres.append(f"Name=gpu File={b}/dev/gpu0")
        elif self.gpus > 1:
            gres.append(f"Name=gpu File={b}/dev/gpu[0-{self.gpus - 1}]")
        (b / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")
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
            f"AuthInfo={auth_info}",
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
            f"AccountingStoragePass={self.munge_socket}",
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
        gres_node = f" Gres=gpu:{self.gpus}" if self.gpus > 0 else ""
        for i, name in enumerate(self.node_names, start=1):
            conf.append(
                f"NodeName={name} NodeHostname={name} NodeAddr=127.0.2.{i} "
                f"Port={ports[name]} CPUs={self.cpus} RealMemory=1000{gres_node} State=UNKNOWN"
            )
        conf.append(
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES "
            "MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(conf) + "\n")

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        """Write a 0600 file (it holds a password; slurmdbd refuses a readable config)."""
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    # -- daemons ---------------------------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], log: IO[bytes], host: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start one daemon in its own session; with ``host``, in private mount + UTS
        namespaces with that hostname and the sandbox's hosts / resolv.conf. ``exec`` keeps
        one PID per daemon, recorded (also in run/sandbox.json) so stop() can end it."""
        argv = [_which(argv[0]) or argv[0], *argv[1:]]  # munged & co. are in /usr/sbin
        if host:
            b = self.base
            script = (
                f"mount --bind {b}/etc/hosts /etc/hosts && "
                f"mount --bind {b}/etc/resolv.conf /etc/resolv.conf && "
                f"hostname {host} && exec {shlex.join(argv)}"
            )
            argv = ["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", script]
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        self.pids[name] = proc.pid
        self._procs[name] = proc
        (self.base / "run" / "sandbox.json").write_text(json.dumps(self.pids))
        return proc

    def _wait(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        """Until ``ready()``; fail as soon as a daemon we started has exited."""
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"SLURM sandbox: {name} exited ({proc.returncode}) while waiting for "
                        f"{what}; see {self.base / 'log'}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SLURM sandbox: {what} not ready in time; see {self.base / 'log'}"
                )
            time.sleep(0.05)

    def _nodes_idle(self, env: dict[str, str]) -> bool:
        cmd = ["sinfo", "-h", "-N", "-o", "%N %t"]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            return False
        states = dict(zip(out.stdout.split()[::2], out.stdout.split()[1::2], strict=False))
        return all(states.get(n) == "idle" for n in self.node_names)

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
        self._write_files(ports, db_password=secrets.token_hex(16))
        # Not a job's SLURM_* (when started inside one): the daemons get only ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env())
        deadline = time.monotonic() + timeout
        b = self.base
        with open(b / "log" / "daemons.out", "ab") as log:
            try:
                self._start_daemons(ports, env, log, deadline)
            except BaseException:
                self.stop()
                raise

    def _template(self) -> Path:
        """Where a ready MariaDB data dir is cached (keyed by the mariadbd and slurmdbd
        binaries it was made with)."""
        stats = [Path(_which(t) or t).resolve().stat() for t in ("mariadbd", "slurmdbd")]
        made_by = [(st.st_size, st.st_mtime_ns) for st in stats]
        key = repr((made_by, _MARIADB_OPTS, CLUSTER)).encode()
        return _cache_dir() / f"mariadb-datadir-{hashlib.sha256(key).hexdigest()[:16]}"

    def _install_datadir(
        self, datadir: Path, ports: dict[str, int], env: dict[str, str], log: IO[bytes]
    ) -> None:
        """A fresh MariaDB data dir, with slurmdbd's tables and the cluster registered.

        Made once (mariadb-install-db, then slurmdbd creates its tables and ``sacctmgr add
        cluster`` the cluster's: 3-6 s on a busy 2-core machine), cached under
        ~/.cache/hydra-torchrun-callback and copied (26 MB) on every start after that.
        """
        shutil.rmtree(datadir, ignore_errors=True)
        template = self._template()
        if not (template / "mysql").is_dir():
            try:
                template.parent.mkdir(parents=True, exist_ok=True)
                work: Path | None = Path(tempfile.mkdtemp(prefix=".mariadb-", dir=template.parent))
            except OSError:  # no cache (read-only home): install into the sandbox
                work = None
            fresh = work / "datadir" if work else datadir
            # --cross-bootstrap: no lookup of this machine's hostname, no grants for it;
            # root may log in over the unix socket only (as the OS root).
            cmd = [_which("mariadb-install-db") or "mariadb-install-db", "--no-defaults"]
            cmd += [f"--datadir={fresh}", "--user=root"]
            cmd += ["--cross-bootstrap", "--skip-test-db", *_MARIADB_OPTS]
            if subprocess.run(cmd, env=env, stdout=log, stderr=log).returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed; see {log.name}")
            if work is None:
                return  # slurmdbd creates its tables, slurmctld registers the cluster
            try:
                self._bootstrap(fresh, ports, env, log)
                with contextlib.suppress(OSError):  # fails if another sandbox was quicker
                    fresh.rename(template)
                if not (template / "mysql").is_dir():
                    shutil.move(fresh, datadir)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if (datadir / "mysql").is_dir():
                return
        shutil.copytree(template, datadir)

    def _bootstrap(
        self, datadir: Path, ports: dict[str, int], env: dict[str, str], log: IO[bytes]
    ) -> None:
        """Let slurmdbd create its tables and the cluster's in ``datadir``; stop cleanly."""
        self._start_db(datadir, ports, env, log, time.monotonic() + 60)
        subprocess.run(
            ["sacctmgr", "-i", "add", "cluster", CLUSTER],
            env=env,
            stdout=log,
            stderr=log,
            timeout=60,
            check=True,
        )
        names = ("slurmdbd", "mariadbd")
        killed = self._terminate([self.pids.pop(n) for n in names], time.monotonic() + 30)
        for name in names:
            self._procs.pop(name).poll()
        if killed:
            raise RuntimeError("SLURM sandbox: MariaDB did not shut down after its set-up")

    def _start_db(
        self,
        datadir: Path,
        ports: dict[str, int],
        env: dict[str, str],
        log: IO[bytes],
        deadline: float,
    ) -> None:
        """MariaDB on ``datadir`` (127.0.0.1 and a unix socket), then slurmdbd."""
        b = self.base
        self.mysql_socket.unlink(missing_ok=True)  # its appearing is the sign it is up
        self._spawn(
            "mariadbd",
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={datadir}",
                f"--socket={self.mysql_socket}",
                f"--port={ports['mariadbd']}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--pid-file={b / 'db' / 'mysqld.pid'}",
                f"--log-error={b / 'log' / 'mariadb.log'}",
                f"--tmpdir={b / 'db' / 'tmp'}",
                # Creates (or re-keys) the slurm user with this start's password.
                f"--init-file={b / 'db' / 'init.sql'}",
                "--user=root",
                *_MARIADB_OPTS,
            ],
            env,
            log,
        )
        self._wait("mariadbd", self.mysql_socket.exists, deadline)
        self._spawn("slurmdbd", ["slurmdbd", "-D"], env, log, host="localhost")
        self._wait("slurmdbd", lambda: _listening(ports["slurmdbd"]), deadline)

    def _start_daemons(
        self, ports: dict[str, int], env: dict[str, str], log: IO[bytes], deadline: float
    ) -> None:
        b = self.base
        munge = b / "munge"
        self.munge_socket.unlink(missing_ok=True)  # its appearing is the sign it is up
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                # --force: the socket's folder is root-only (e.g. pytest's 0700 tmp dirs);
                # only root clients (the daemons, root's sbatch) use it.
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={b / 'log' / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
                "--origin=127.0.0.1",
            ],
            env,
            log,
        )
        self._wait("munged", self.munge_socket.exists, deadline)
        datadir = b / "db" / "data"
        if not (datadir / "mysql").is_dir():
            self._install_datadir(datadir, ports, env, log)
        self._start_db(datadir, ports, env, log, deadline)
        ctld = ["slurmctld", "-D", "-i", "-f", str(self.conf)]
        self._spawn("slurmctld", ctld, env, log, host="localhost")
        for n in self.node_names:
            self._spawn(n, ["slurmd", "-D", "-N", n, "-f", str(self.conf)], env, log, host=n)
        self._wait("nodes idle", lambda: self._nodes_idle(env), deadline)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, stop the daemons we started (by PID) and what they started,
        and any job step left over (slurmstepd runs apart from slurmd): nothing of the
        sandbox keeps running. ``timeout``: for the jobs to end, then for the daemons."""
        env = {**os.environ, **self.env()}
        state = self.base / "run" / "sandbox.json"
        if not self.pids and state.exists():
            # Another process started them (the CLI): only what still runs with our config.
            recorded = {k: int(v) for k, v in json.loads(state.read_text()).items()}
            self.pids = {k: v for k, v in recorded.items() if self._ours(v)}
        if "slurmctld" in self.pids:
            deadline = time.monotonic() + timeout
            with contextlib.suppress(Exception):
                subprocess.run(["scancel", "--full", "--quiet", "-p", "debug"], env=env, timeout=10)
            # Steps end within KillWait (5 s) and report to slurmctld, which must be up then.
            while self._job_processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        deadline = time.monotonic() + timeout
        services = [name for stage in SERVICES for name in stage]
        self._terminate([self.pids[k] for k in self.pids if k not in services], deadline)
        # Steps that outlived scancel (e.g. one retrying to reach a stopped slurmctld) and
        # ignore SIGTERM, as slurmstepd does, and what they still run.
        leftovers = self._job_processes()
        for pid in leftovers + [child for p in leftovers for child in descendants(p)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for stage in SERVICES:
            self._terminate([self.pids[k] for k in stage if k in self.pids], deadline)
        for proc in self._procs.values():
            proc.poll()  # reaped above: lets Popen know
        self.pids, self._procs = {}, {}
        state.unlink(missing_ok=True)

    def _job_processes(self) -> list[int]:
        """Live slurmstepds and job processes of this sandbox (they carry its SLURM_CONF),
        not this process or its ancestors (``stop`` may be called from inside a job)."""
        needle = f"SLURM_CONF={self.conf}".encode()
        mine, pid = set(), os.getpid()
        while pid > 1 and pid not in mine:
            mine.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        found, daemons = [], set(self.pids.values())
        for environ in Path("/proc").glob("[0-9]*/environ"):
            pid = int(environ.parent.name)
            try:
                entries = environ.read_bytes().split(b"\0")
                comm = (environ.parent / "comm").read_text().strip()
            except OSError:
                continue
            in_job = comm == "slurmstepd" or any(e.startswith(b"SLURM_JOB_ID=") for e in entries)
            if pid not in mine and pid not in daemons and needle in entries and in_job:
                found.append(pid)
        return alive(found)

    def _ours(self, pid: int) -> bool:
        """Whether ``pid`` is a daemon of this sandbox (each runs with its SLURM_CONF)."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"SLURM_CONF={self.conf}".encode() in environ

    @staticmethod
    def _terminate(pids: list[int], deadline: float) -> list[int]:
        """SIGTERM ``pids`` and their descendants; SIGKILL what is left at ``deadline``.
        Returns the ones that had to be killed."""
        killed = []
        tree = [p for pid in pids for p in descendants(pid)]
        for pid in pids + tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids + tree:
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
                if not alive([pid]):  # gone, or a zombie its parent has yet to reap
                    break
                time.sleep(0.05)
            else:
                killed.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        return killed

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
