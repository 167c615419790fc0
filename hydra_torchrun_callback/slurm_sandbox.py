"""A real SLURM cluster on one machine, for tests and for trying multi-node on a laptop.

One ``slurmctld`` and N ``slurmd`` (Debian's slurm-wlm, MULTIPLE_SLURMD build),
every file under one folder, loopback traffic only. Each ``slurmd`` runs in its
own mount + UTS namespace with its own hostname (``n1``, ``n2`` ...) and a
private hosts file, so jobs see distinct node names that resolve to distinct
loopback addresses, as torch's c10d rendezvous needs. Needs root.

    python -m hydra_torchrun_callback.slurm_sandbox start --nodes 2 --dir /tmp/sb
    export SLURM_CONF=/tmp/sb/etc/slurm.conf PATH=/tmp/sb/bin:$PATH
    python -m hydra_torchrun_callback.slurm_sandbox stop --dir /tmp/sb
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hydra_torchrun_callback._proc import descendants

__all__ = ["SlurmSandbox", "main"]

#: sacct stand-in: submitit polls ``sacct -o JobID,State,NodeList --parsable2 -j IDS``.
#: Without accounting, real sacct fails and a job that dies without a result makes
#: submitit wait forever; this answers from ``scontrol show job``.
SACCT = r"""#!/usr/bin/env python3
import subprocess, sys
args = sys.argv[1:]
ids = args[args.index("-j") + 1].split(",") if "-j" in args else []
print("JobID|State|NodeList")
for jid in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid.split("_")[0]],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        name = f.get("JobId", "")
        if f.get("ArrayJobId") and f.get("ArrayTaskId"):
            name = f["ArrayJobId"] + "_" + f["ArrayTaskId"]
        print("|".join([name, f.get("JobState", "UNKNOWN"), f.get("NodeList", "")]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SlurmSandbox:
    """Start/stop a private SLURM cluster under ``base``."""

    base: Path
    nodes: int = 2
    cpus: int = 2
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def env(self) -> dict[str, str]:
        """What a client (sbatch, submitit) needs: SLURM_CONF and the sacct stand-in."""
        return {
            "SLURM_CONF": str(self.conf),
            "PATH": f"{self.base / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def _write_files(self) -> None:
        for sub in ("etc", "spool", "state", "log", "run", "bin"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (self.base / "spool" / f"slurmd-{name}").mkdir(exist_ok=True)
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        lines = [
            ln for ln in hosts.splitlines() if not any(n in ln.split() for n in self.node_names)
        ]
        # 127.0.2.x: clear of Debian's "127.0.1.1 <hostname>" line.
        lines += [f"127.0.2.{i} {n}" for i, n in enumerate(self.node_names, start=1)]
        (self.base / "etc" / "hosts").write_text("\n".join(lines) + "\n")
        (self.base / "etc" / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        sacct = self.base / "bin" / "sacct"
        sacct.write_text(SACCT)
        sacct.chmod(0o755)
        b = self.base
        ctl_port = _free_port()
        conf = [
            "ClusterName=sandbox",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
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
        for i, name in enumerate(self.node_names, start=1):
            conf.append(
                f"NodeName={name} NodeHostname={name} NodeAddr=127.0.2.{i} "
                f"Port={_free_port()} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            )
        conf.append(
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES "
            "MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(conf) + "\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemons and wait until every node is idle."""
        for tool in ("slurmctld", "slurmd", "sinfo", "unshare"):
            if shutil.which(tool) is None:
                raise RuntimeError(
                    f"{tool} not found: apt-get install -y slurmctld slurmd slurm-client "
                    "(and util-linux for unshare)"
                )
        if os.geteuid() != 0:
            raise RuntimeError("the SLURM sandbox needs root (namespaces, slurmd as root)")
        self._write_files()
        env = {**os.environ, **self.env()}
        log = open(self.base / "log" / "daemons.out", "ab")  # noqa: SIM115
        ctld = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(self.conf)],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        self.pids["slurmctld"] = ctld.pid
        for name in self.node_names:
            b = self.base
            script = (
                f"mount --bind {b}/etc/hosts /etc/hosts && "
                f"mount --bind {b}/etc/resolv.conf /etc/resolv.conf && "
                f"hostname {name} && exec slurmd -D -N {name} -f {self.conf}"
            )
            proc = subprocess.Popen(
                ["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", script],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
            self.pids[name] = proc.pid
        (self.base / "run" / "sandbox.json").write_text(json.dumps(self.pids))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True
            ).stdout.split()
            states = dict(zip(out[::2], out[1::2], strict=False))
            if all(states.get(n) == "idle" for n in self.node_names):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"SLURM sandbox nodes not idle after {timeout}s; see {self.base / 'log'}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel jobs, stop the daemons we started (by PID) and what they started."""
        env = {**os.environ, **self.env()}
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "--quiet", "-p", "debug"], env=env, timeout=10)
        if not self.pids:
            state = self.base / "run" / "sandbox.json"
            if state.exists():
                self.pids = {k: int(v) for k, v in json.loads(state.read_text()).items()}
        tree = [p for pid in self.pids.values() for p in descendants(pid)]
        for pid in list(self.pids.values()) + tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in list(self.pids.values()) + tree:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pids = {}

    @contextlib.contextmanager
    def running(self) -> Iterator[SlurmSandbox]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hydra_torchrun_callback.slurm_sandbox")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, help="folder for every file of the cluster")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs declared per node")
    args = parser.parse_args(argv)
    sandbox = SlurmSandbox(Path(args.dir).resolve(), nodes=args.nodes, cpus=args.cpus)
    if args.action == "start":
        sandbox.start()
        print(f"export SLURM_CONF={sandbox.conf} PATH={sandbox.base / 'bin'}:$PATH")
        print(
            f"# nodes: {' '.join(sandbox.node_names)}; stop with: "
            f"python -m hydra_torchrun_callback.slurm_sandbox stop --dir {sandbox.base}"
        )
    else:
        sandbox.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
