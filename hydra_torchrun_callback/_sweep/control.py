"""A sweep's start, in ``on_multirun_start``: check a resume, detach, or become the controller.

The controller is the Hydra process that runs the sweeper and the launcher. Normally it is
the user's own command. With ``detach=true`` the command starts one elsewhere (a detached
local process, or a small SLURM job: :mod:`.controller`) with the same command line, the
sweep dir made absolute and ``HYDRA_TORCHRUN_SWEEP_ROLE=controller``, and returns. A
controller resumes whatever its sweep dir holds, so a requeued controller job picks up
where it stopped. ``resume=true`` makes the user's own command do the same, in the
foreground (or detached again with ``detach=true``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._proc import start_time
from hydra_torchrun_callback._result import TorchrunSetupError
from hydra_torchrun_callback._sweep import scheduler
from hydra_torchrun_callback._sweep.launcher import KINDS, launcher_kind, wrap_launcher
from hydra_torchrun_callback._wire import sweep_files
from hydra_torchrun_callback._wire.protocol import (
    CONTROLLER_JOB_ENV,
    SWEEP_ROLE_ENV,
)

__all__ = ["KINDS", "SweepStart", "begin_sweep", "end_sweep", "resume_command", "wrap"]

OPTION = "hydra.callbacks.torchrun"
#: Overrides the controller's command line gets from us, never from the user's.
_OURS = ("hydra.sweep.dir", f"{OPTION}.detach", f"{OPTION}.resume")
#: How often a controller says it is alive (controller.json's "beat").
BEAT_S = 15.0
#: How long a resume waits for a previous controller that is shutting down.
PREVIOUS_WAIT_S = 90.0
_SAFE = re.compile(r"^[A-Za-z0-9_/.:+@%-]+$")


@dataclass(frozen=True)
class SweepStart:
    """What ``on_multirun_start`` decided: the sweep's id, and whether to read its dir."""

    sweep_dir: Path
    sweep_id: str
    resume: bool


def _identity(config: DictConfig) -> dict[str, Any]:
    overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or []
    assert isinstance(overrides, list)
    return {
        "app": str(config.hydra.job.name),
        "config_name": str(OmegaConf.select(config, "hydra.job.config_name", default="")),
        "task_overrides": [str(o) for o in overrides],
    }


def _override_value(text: str) -> str:
    """A value on a Hydra command line: quoted unless plainly safe (a comma would sweep)."""
    if _SAFE.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_ours(arg: str) -> bool:
    key = arg.lstrip("+~").split("=", 1)[0]
    return key in _OURS


def controller_command(sweep_dir: Path) -> list[str]:
    """This very command, with the sweep dir made absolute (``${now:}`` would differ)."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    kept = [a for a in argv[1:] if not _is_ours(a)]
    return [sys.executable, *kept, f"hydra.sweep.dir={_override_value(str(sweep_dir))}"]


def resume_command(info: Mapping[str, Any]) -> str:
    """The shell command that resumes the sweep described by ``info`` (sweep.json)."""
    command = [*info.get("command", []), f"{OPTION}.resume=true"]
    return f"cd {shlex.quote(str(info.get('cwd', '.')))} && {shlex.join(command)}"


def _refuse_other_sweep(existing: Mapping[str, Any], mine: Mapping[str, Any], where: Path) -> None:
    theirs = {k: existing.get(k) for k in mine}
    if theirs.get("app") != mine["app"] or theirs.get("config_name") != mine["config_name"]:
        raise TorchrunSetupError(
            f"{OPTION}.resume=true: {where} holds a sweep of app {theirs.get('app')!r} "
            f"(config {theirs.get('config_name')!r}), not of {mine['app']!r} (config "
            f"{mine['config_name']!r}). Fix: resume it with the app that started it, or give "
            "this sweep another hydra.sweep.dir."
        )
    if sorted(theirs.get("task_overrides") or []) != sorted(mine["task_overrides"]):
        raise TorchrunSetupError(
            f"{OPTION}.resume=true: the sweep in {where} was started with the task overrides "
            f"{theirs.get('task_overrides')}, this command has {mine['task_overrides']}. "
            "Fix: resume with the same task overrides (only hydra.* overrides may differ), or "
            "give a new sweep another hydra.sweep.dir."
        )


def _previous_alive(controller: Mapping[str, Any]) -> Optional[str]:
    """A description of the sweep's previous controller if it may still run, else None."""
    own_job = os.environ.get(CONTROLLER_JOB_ENV)
    job = controller.get("slurm_job")
    if job:  # SLURM ends every process of a job it no longer lists as live
        if own_job and str(job) == own_job:
            return None  # this controller's own job, requeued: that earlier run is over
        state = scheduler.job_states([str(job)]).get(str(job))
        return f"SLURM job {job} ({state})" if state in scheduler.LIVE_STATES else None
    pid = controller.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return None
    if controller.get("host") == socket.gethostname():
        start = start_time(pid)
        if start is None or start != controller.get("pid_start"):
            return None
        return f"pid {pid} on {controller.get('host')}"
    beat = float(controller.get("beat") or 0)
    if time.time() - beat < 3 * BEAT_S:  # another host: its heartbeat says
        return f"pid {pid} on {controller.get('host')} (seen {time.time() - beat:.0f} s ago)"
    return None


def _local_points_alive(sweep_dir: Path, sweep_id: str) -> list[str]:
    """The local point jobs (submitit_local) of the sweep still running on this host."""
    alive = []
    for num, entry in sweep_files.read_ledger(sweep_dir, sweep_id).items():
        last = (entry.get("jobs") or [{}])[-1]
        pid = last.get("pid")
        if last.get("executor") != "local" or not isinstance(pid, int):
            continue
        if last.get("host") == socket.gethostname() and start_time(pid) == last.get("pid_start"):
            alive.append(f"point #{num} (pid {pid})")
    return alive


def _wait_for_previous(sweep_dir: Path, sweep_id: str, why: str) -> None:
    """Wait for a previous controller (and its local point jobs) that is shutting down;
    refuse one that runs on: two controllers would run points twice."""
    deadline = time.monotonic() + PREVIOUS_WAIT_S
    said = False
    while True:
        controller = sweep_files.read_controller(sweep_dir) or {}
        alive = _previous_alive(controller)
        if alive is None:
            points = _local_points_alive(sweep_dir, sweep_id)
            alive = f"its local point jobs {', '.join(points)}" if points else None
        if alive is None:
            return
        if time.monotonic() > deadline:
            raise TorchrunSetupError(
                f"{why}: the sweep in {sweep_dir} still runs ({alive}). Fix: follow it "
                f"(hydra-torchrun-summary {sweep_dir}), or stop it first (hydra-torchrun-cancel "
                f"{sweep_dir} --controller-only) and resume it; or give a new sweep another "
                "hydra.sweep.dir."
            )
        if not said:
            log.info("waiting for the sweep's previous controller to end (%s)", alive)
            said = True
        time.sleep(1.0)


def begin_sweep(config: DictConfig, options: Any) -> Optional[SweepStart]:
    """Check what the sweep asks for; detach (raises ``SystemExit(0)``) or return how to
    wrap the launcher (None: a launcher the callback leaves alone)."""
    controller = os.environ.get(SWEEP_ROLE_ENV) == "controller"
    kind = launcher_kind(config)
    target = OmegaConf.select(config, "hydra.launcher._target_", default="?")
    if kind is None:
        if (options.detach or options.resume) and not controller:
            name = "detach" if options.detach else "resume"
            raise TorchrunSetupError(
                f"{OPTION}.{name}=true works with Hydra's basic launcher and "
                f"hydra-submitit-launcher's submitit_local and submitit_slurm; this sweep's "
                f"launcher is {target}. Fix: use one of those, or drop {OPTION}.{name}."
            )
        return None
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    mine = _identity(config)
    existing = sweep_files.read_sweep(sweep_dir)
    resume = options.resume or controller
    if resume and existing is not None:
        _refuse_other_sweep(existing, mine, sweep_dir)
    if options.resume and not controller and existing is None:
        raise TorchrunSetupError(
            f"{OPTION}.resume=true: {sweep_dir} holds no sweep started with "
            "hydra/callbacks=torchrun (no .torchrun_sweep/sweep.json). Fix: give the "
            "hydra.sweep.dir the sweep ran in (hydra-torchrun-summary lists it), or drop "
            "resume=true to start a new sweep."
        )
    if existing is not None and existing.get("id"):
        # Two controllers of one sweep dir would run points twice (a resume, or a new
        # sweep over a live one).
        why = f"{OPTION}.resume=true" if resume else "a new sweep"
        _wait_for_previous(sweep_dir, str(existing["id"]), why)
    if resume and existing is not None:
        was = existing.get("launcher")
        if was == "slurm" and kind != "slurm":
            raise TorchrunSetupError(
                f"{OPTION}.resume=true: the sweep in {sweep_dir} ran its points as SLURM jobs "
                f"(submitit_slurm); this command's launcher is {target}, which cannot wait "
                "for those still queued or running. Fix: resume with "
                "hydra/launcher=submitit_slurm."
            )
    info = (
        dict(existing)
        if resume and existing is not None
        else {
            "id": secrets.token_hex(12),
            "created": time.time(),
            **mine,
            "launcher": kind,
        }
    )
    info["command"] = controller_command(sweep_dir)
    info["cwd"] = os.getcwd()
    info["launcher"] = kind
    sweep_files.write_sweep(sweep_dir, info)
    if options.detach and not controller:
        from hydra_torchrun_callback._sweep.controller import detach

        detach(config, options, kind, sweep_dir, info)
    _become_controller(sweep_dir, kind, detached=controller)
    return SweepStart(sweep_dir, str(info["id"]), resume and existing is not None)


def wrap(config: DictConfig, start: SweepStart) -> None:
    wrap_launcher(config, start.sweep_id, start.resume)


# -- the controller's own record -----------------------------------------------------------
class _ControllerRecord:
    """controller.json of the controller this process is: alive (beat), then how it ended."""

    def __init__(self, sweep_dir: Path, record: dict[str, Any]) -> None:
        self.sweep_dir = sweep_dir
        self.record = record
        self.ended = threading.Event()
        self._write("running")
        threading.Thread(target=self._beat, name="torchrun-sweep-beat", daemon=True).start()

    def _write(self, state: str) -> None:
        with contextlib.suppress(OSError):
            sweep_files.write_controller(
                self.sweep_dir, {**self.record, "state": state, "beat": time.time()}
            )

    def _beat(self) -> None:
        while not self.ended.wait(BEAT_S):
            self._write("running")

    def end(self, state: str) -> None:
        if not self.ended.is_set():
            self.ended.set()
            self._write(state)


_current: Optional[_ControllerRecord] = None


def _become_controller(sweep_dir: Path, kind: str, detached: bool) -> None:
    """Say where this controller runs (the user's own command too: a resume or a new sweep
    must not start a second one), keep saying it is alive, say how it ended."""
    global _current
    import atexit

    before = sweep_files.read_controller(sweep_dir) or {}
    fresh = before if before.get("state") in ("submitted", "starting") else {}
    slurm_job = os.environ.pop(CONTROLLER_JOB_ENV, None) if detached else None
    if detached:
        os.environ.pop(SWEEP_ROLE_ENV, None)  # the point jobs it starts are not controllers
        with contextlib.suppress(ValueError):  # SLURM's time-limit warning: requeue, not death
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if _current is not None:
        _current.end("finished")
    _current = _ControllerRecord(
        sweep_dir,
        {
            "kind": ("slurm" if slurm_job else "local") if detached else "foreground",
            "launcher": kind,
            "pid": os.getpid(),
            "pid_start": start_time(os.getpid()),
            "host": socket.gethostname(),
            "slurm_job": slurm_job,
            "log": fresh.get("log") if detached else None,
            "started": time.time(),
        },
    )
    atexit.register(_current.end, "exited")  # an exception, a signal Python handles


def end_sweep() -> None:
    """``on_multirun_end`` in a controller: the sweep finished."""
    if _current is not None:
        _current.end("finished")
