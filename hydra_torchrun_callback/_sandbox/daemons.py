"""Which daemons a SLURM sandbox starts, with which arguments, in which order: munged,
MariaDB and slurmdbd (over a cached data dir), slurmctld, then one slurmd per node."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hydra_torchrun_callback._sandbox.files import CLUSTER
from hydra_torchrun_callback._sandbox.processes import Daemons, which

__all__ = ["start_cluster"]

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


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
        "hydra-torchrun-callback"
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start_munged(daemons: Daemons, deadline: float) -> None:
    """A private munged on the sandbox's socket and key."""
    layout = daemons.layout
    munge = layout.munge_dir
    layout.munge_socket.unlink(missing_ok=True)  # its appearing is the sign it is up
    daemons.spawn(
        "munged",
        [
            "munged",
            "--foreground",
            # --force: the socket's folder is root-only (e.g. pytest's 0700 tmp dirs);
            # only root clients (the daemons, root's sbatch) use it.
            "--force",
            f"--socket={layout.munge_socket}",
            f"--key-file={munge / 'munge.key'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={layout.logs / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
            "--origin=127.0.0.1",
        ],
    )
    daemons.wait("munged", layout.munge_socket.exists, deadline)


@dataclass
class _Accounting:
    """MariaDB and slurmdbd: MariaDB's data dir (made once, cached, copied), then both."""

    daemons: Daemons
    ports: dict[str, int]

    def start(self, deadline: float) -> None:
        datadir = self.daemons.layout.datadir
        if not (datadir / "mysql").is_dir():
            self._install_datadir(datadir)
        self._start(datadir, deadline)

    @staticmethod
    def _template() -> Path:
        """Where a ready MariaDB data dir is cached (keyed by the mariadbd and slurmdbd
        binaries it was made with)."""
        stats = [Path(which(t) or t).resolve().stat() for t in ("mariadbd", "slurmdbd")]
        made_by = [(st.st_size, st.st_mtime_ns) for st in stats]
        key = repr((made_by, _MARIADB_OPTS, CLUSTER)).encode()
        return _cache_dir() / f"mariadb-datadir-{hashlib.sha256(key).hexdigest()[:16]}"

    def _install_datadir(self, datadir: Path) -> None:
        """A fresh MariaDB data dir, with slurmdbd's tables and the cluster registered.

        Made once (mariadb-install-db, then slurmdbd creates its tables and ``sacctmgr add
        cluster`` the cluster's: 3-6 s on a busy 2-core machine), cached under
        ~/.cache/hydra-torchrun-callback and copied (26 MB) on every start after that.
        """
        log = self.daemons.log
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
            cmd = [which("mariadb-install-db") or "mariadb-install-db", "--no-defaults"]
            cmd += [f"--datadir={fresh}", "--user=root"]
            cmd += ["--cross-bootstrap", "--skip-test-db", *_MARIADB_OPTS]
            if subprocess.run(cmd, env=self.daemons.env, stdout=log, stderr=log).returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed; see {log.name}")
            if work is None:
                return  # slurmdbd creates its tables, slurmctld registers the cluster
            try:
                self._bootstrap(fresh)
                with contextlib.suppress(OSError):  # fails if another sandbox was quicker
                    fresh.rename(template)
                if not (template / "mysql").is_dir():
                    shutil.move(fresh, datadir)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if (datadir / "mysql").is_dir():
                return
        shutil.copytree(template, datadir)

    def _bootstrap(self, datadir: Path) -> None:
        """Let slurmdbd create its tables and the cluster's in ``datadir``; stop cleanly."""
        self._start(datadir, time.monotonic() + 60)
        subprocess.run(
            ["sacctmgr", "-i", "add", "cluster", CLUSTER],
            env=self.daemons.env,
            stdout=self.daemons.log,
            stderr=self.daemons.log,
            timeout=60,
            check=True,
        )
        if self.daemons.retire(("slurmdbd", "mariadbd"), time.monotonic() + 30):
            raise RuntimeError("SLURM sandbox: MariaDB did not shut down after its set-up")

    def _start(self, datadir: Path, deadline: float) -> None:
        """MariaDB on ``datadir`` (127.0.0.1 and a unix socket), then slurmdbd."""
        layout = self.daemons.layout
        db = layout.base / "db"
        layout.mysql_socket.unlink(missing_ok=True)  # its appearing is the sign it is up
        self.daemons.spawn(
            "mariadbd",
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={datadir}",
                f"--socket={layout.mysql_socket}",
                f"--port={self.ports['mariadbd']}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--pid-file={db / 'mysqld.pid'}",
                f"--log-error={layout.logs / 'mariadb.log'}",
                f"--tmpdir={db / 'tmp'}",
                # Creates (or re-keys) the slurm user with this start's password.
                f"--init-file={db / 'init.sql'}",
                "--user=root",
                *_MARIADB_OPTS,
            ],
        )
        self.daemons.wait("mariadbd", layout.mysql_socket.exists, deadline)
        self.daemons.spawn("slurmdbd", ["slurmdbd", "-D"], host="localhost")
        self.daemons.wait("slurmdbd", lambda: _listening(self.ports["slurmdbd"]), deadline)


def _nodes_idle(names: list[str], env: dict[str, str]) -> bool:
    cmd = ["sinfo", "-h", "-N", "-o", "%N %t"]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    states = dict(zip(out.stdout.split()[::2], out.stdout.split()[1::2], strict=False))
    return all(states.get(n) == "idle" for n in names)


def start_cluster(daemons: Daemons, ports: dict[str, int], deadline: float) -> None:
    """munged, MariaDB and slurmdbd, slurmctld, then one slurmd per node, each in its own
    namespaces; until every node is idle."""
    layout = daemons.layout
    _start_munged(daemons, deadline)
    _Accounting(daemons, ports).start(deadline)
    conf = str(layout.conf)
    daemons.spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", conf], host="localhost")
    for n in layout.node_names:
        daemons.spawn(n, ["slurmd", "-D", "-N", n, "-f", conf], host=n)
    daemons.wait("nodes idle", lambda: _nodes_idle(layout.node_names, daemons.env), deadline)
