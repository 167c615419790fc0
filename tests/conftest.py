"""Shared helpers: run the test apps as real Hydra subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Tests never touch the user's own job-store key file: one key for the whole session
# (app subprocesses, submitit and SLURM jobs inherit the variable).
os.environ.setdefault(
    "HYDRA_TORCHRUN_SECRET_FILE", str(Path(tempfile.mkdtemp(prefix="htr-key-")) / "secret")
)

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "tests" / "apps"
EXAMPLES = REPO / "slurm_examples"


def processes_with_tag(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``HTR_TEST_TAG=tag``."""
    needle = f"HTR_TEST_TAG={tag}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if int(environ.parent.name) == os.getpid():
                continue
            state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def left_behind(tag: str, timeout: float = 15) -> list[int]:
    """Processes still carrying ``tag`` after up to ``timeout`` s: exiting processes (a
    forkserver and workers dying by their death signal, a SLURM step's tasks) take a
    moment to be scheduled on a loaded machine; a real leftover lives on (the test apps
    sleep for minutes)."""
    deadline = time.monotonic() + timeout
    while (left := processes_with_tag(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def read_markers(job_dir: Path) -> list[dict[str, Any]]:
    """The started markers written so far that parse (one may be half written)."""
    found = []
    for path in job_dir.glob("started_rank*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def wait_started(
    job_dir: Path, count: int, proc: subprocess.Popen[str], timeout: float = 120
) -> list[dict[str, Any]]:
    """Wait until ``count`` ranks wrote their started marker; return the markers."""
    deadline = time.monotonic() + timeout
    while len(read_markers(job_dir)) < count:
        assert proc.poll() is None, "the app ended before its workers started"
        assert time.monotonic() < deadline, "workers never started"
        time.sleep(0.1)
    time.sleep(0.3)  # from its marker to its blocking call, a rank runs a few lines
    return read_markers(job_dir)


def app_env(**extra: str) -> dict[str, str]:
    """Environment for app subprocesses: the source tree first, test helpers importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "OMP_NUM_THREADS",
    ):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(APPS), env.get("PYTHONPATH", "")])
    env["HYDRA_FULL_ERROR"] = "0"
    env.update(extra)
    return env


def slurm_sandbox_or_skip(factory: pytest.TempPathFactory, nodes: int) -> Any:
    """A SLURM sandbox (not started yet) in a fresh temp dir; the test skips where it cannot
    run (not root, packages missing), and fails there under HTR_REQUIRE_SLURM=1 (CI)."""
    from hydra_torchrun_callback.slurm_sandbox import PACKAGES, SlurmSandbox

    missing = SlurmSandbox.missing_tools()
    if os.geteuid() != 0 or missing:
        why = f"not root; missing: {', '.join(missing) or 'nothing'}"
        if os.environ.get("HTR_REQUIRE_SLURM") == "1":
            pytest.fail(f"HTR_REQUIRE_SLURM=1 but the SLURM sandbox cannot run ({why})")
        pytest.skip(f"needs root and Debian's {PACKAGES} ({why})")
    return SlurmSandbox(factory.mktemp(f"slurm{nodes}"), nodes=nodes)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a master_port or a store's port picked by hand)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app_command(
    script: str,
    *overrides: str,
    multirun: bool = False,
    callback: str | None = "hydra/callbacks=torchrun",
    flags: tuple[str, ...] = (),
) -> list[str]:
    """``python APPS/script [flags] [-m] [callback] overrides...``: how every test runs an app.

    ``flags`` (``--config-dir=...``) go before the overrides: argparse wants them there.
    """
    cmd = [sys.executable, str(APPS / script), *flags]
    if multirun:
        cmd.append("-m")
    if callback:
        cmd.append(callback)
    return [*cmd, *overrides]


def start_app(
    cwd: Path,
    *overrides: str,
    script: str = "probe_app.py",
    multirun: bool = False,
    callback: str | None = "hydra/callbacks=torchrun",
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.STDOUT,
    text: bool = True,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start a test app in the background from ``cwd``; the caller waits for it.

    The command is ``run_app``'s without its additions (no recorder, no run/sweep dir: pass
    them as overrides). ``env``: ``app_env()`` unless given. Output: one pipe (stdout, with
    stderr in it) unless ``stdout``/``stderr`` say otherwise (a file, ``stderr=None`` to
    inherit); ``text=False`` for bytes. Anything else Popen takes (``start_new_session``,
    ``pass_fds``) goes through ``popen``.
    """
    return subprocess.Popen(
        _app_command(script, *overrides, multirun=multirun, callback=callback, flags=flags),
        cwd=cwd,
        env=app_env() if env is None else env,
        stdout=stdout,
        stderr=stderr,
        text=text,
        **popen,
    )


def run_example(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a shipped example as its README says, from ``tmp_path``."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=tmp_path,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@dataclass
class AppRun:
    proc: subprocess.CompletedProcess[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    out: Path = Path()

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    def rank_files(self, job_dir: Path | None = None) -> dict[str, dict[str, Any]]:
        base = job_dir or self.out
        return {p.name: json.loads(p.read_text()) for p in sorted(base.glob("rank*.json"))}


def run_app(
    tmp_path: Path,
    *overrides: str,
    script: str = "probe_app.py",
    multirun: bool = False,
    callback: str | None = "hydra/callbacks=torchrun",
    timeout: float = 240,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> AppRun:
    """Run a test app with the callback and the recorder; return what it left.

    ``flags`` (``--config-dir=...``) go before the overrides: argparse wants them there.
    """
    rec = tmp_path / "recorder.jsonl"
    out = tmp_path / ("multi" if multirun else "out")
    cmd = _app_command(
        script,
        "+hydra.callbacks.recorder._target_=recorder.Recorder",
        f"+hydra.callbacks.recorder.path={rec}",
        f"hydra.{'sweep' if multirun else 'run'}.dir={out}",
        *overrides,
        multirun=multirun,
        callback=callback,
        flags=flags,
    )
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env or app_env(), capture_output=True, text=True, timeout=timeout
    )
    records = [json.loads(line) for line in rec.read_text().splitlines()] if rec.exists() else []
    return AppRun(proc=proc, records=records, out=out)


@pytest.fixture
def app(tmp_path: Path) -> Any:
    def _run(*overrides: str, **kwargs: Any) -> AppRun:
        return run_app(tmp_path, *overrides, **kwargs)

    return _run
