"""A detached sweep's controller: started by the user's command, which then returns.

- ``submitit_slurm``: the controller is a small SLURM job of its own (one task, one CPU,
  the launcher's partition/account/qos/setup unless ``controller`` says otherwise),
  submitted with submitit. In the job, :class:`ControllerCommand` runs the user's command
  as the controller, without the allocation's ``SLURM_*`` variables (``SLURM_CONF``
  stays): the point jobs it submits from inside the allocation must not inherit them.
  A requeued, preempted or timed-out controller job runs the command again, and a
  controller resumes whatever its sweep dir holds.
- ``submitit_local`` and the basic launcher: a local process in a session of its own
  (closing the terminal does not reach it), its output in ``.torchrun_sweep/controller.log``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from hydra_torchrun_callback._result import TorchrunSetupError
from hydra_torchrun_callback._wire import sweep_files
from hydra_torchrun_callback._wire.protocol import (
    CONTROLLER_JOB_ENV,
    CONTROLLER_LOG,
    SWEEP_ROLE_ENV,
)

__all__ = ["ControllerCommand", "controller_env", "detach"]

#: How long the user's command waits to see a local controller start (or fail).
LOCAL_START_S = 60.0
#: The launcher's SLURM settings the controller job keeps (where and as whom it runs).
_KEPT = ("partition", "qos", "account", "comment", "constraint", "exclude", "signal_delay_s")
#: submitit's executor-wide parameters (unprefixed); the rest are ``slurm_<name>``.
_SHARED = (
    "timeout_min",
    "nodes",
    "tasks_per_node",
    "cpus_per_task",
    "mem_gb",
    "gpus_per_node",
    "name",
    "stderr_to_stdout",
)


def controller_env(env: Mapping[str, str], job_id: str = "") -> dict[str, str]:
    """The controller's environment: the user's, without the allocation's SLURM_* and
    SUBMITIT_* variables (SLURM_CONF stays), marked as the sweep's controller."""
    clean = {
        k: v
        for k, v in env.items()
        if not k.startswith(("SLURM_", "SUBMITIT_")) or k == "SLURM_CONF"
    }
    clean[SWEEP_ROLE_ENV] = "controller"
    if job_id:
        clean[CONTROLLER_JOB_ENV] = job_id
    return clean


class ControllerCommand:
    """What the controller's SLURM job runs: the sweep's command, as its controller.

    Checkpointable for submitit: at the time limit (and on preemption) the job is
    requeued and runs this again, and the controller resumes the sweep."""

    def __init__(self, command: list[str], cwd: str) -> None:
        self.command = command
        self.cwd = cwd

    def __call__(self) -> int:
        job = os.environ.get("SLURM_JOB_ID", "")
        code = subprocess.call(self.command, cwd=self.cwd, env=controller_env(os.environ, job))
        if code != 0:
            raise RuntimeError(f"the sweep's controller exited with status {code}: see its log")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _slurm_parameters(launcher: Mapping[str, Any], asked: Mapping[str, Any]) -> dict[str, Any]:
    """The controller job's submitit parameters: the launcher's site settings, one task
    with one CPU for the launcher's time limit, then what ``controller`` says."""
    params: dict[str, Any] = {
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 1,
        "timeout_min": launcher.get("timeout_min") or 60,
        "name": f"{launcher.get('name') or 'hydra'}-sweep",
        "stderr_to_stdout": True,  # one log: the one the user is told to follow
        "setup": list(launcher.get("setup") or []),
        **{k: launcher[k] for k in _KEPT if launcher.get(k) is not None},
        **dict(asked),
    }
    params.pop("max_num_timeout", None)
    return {(k if k in _SHARED else f"slurm_{k}"): v for k, v in params.items()}


def _submit_slurm(
    config: DictConfig, options: Any, sweep_dir: Path, info: Mapping[str, Any]
) -> dict[str, Any]:
    import submitit

    launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True)
    assert isinstance(launcher, dict)
    asked = dict(options.controller)
    folder = sweep_files.state_dir(sweep_dir) / "controller"
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=int(asked.get("max_num_timeout", 30))
    )
    params = _slurm_parameters({str(k): v for k, v in launcher.items()}, asked)
    try:
        executor.update_parameters(**params)
        job = executor.submit(ControllerCommand(list(info["command"]), str(info["cwd"])))
    except Exception as exc:
        raise TorchrunSetupError(
            f"the sweep's controller could not be submitted as a SLURM job with {params} "
            f"({type(exc).__name__}: {str(exc).strip()[:1500]}). Nothing else was submitted. "
            "Fix: hydra.callbacks.torchrun.controller.<name>=... overrides the controller "
            "job's settings (partition, account, qos, timeout_min, ...), or drop "
            "detach=true to run the sweep in the foreground."
        ) from exc
    return {
        "kind": "slurm",
        "slurm_job": str(job.job_id),
        "log": str(job.paths.stdout),
        "submitted": time.time(),
    }


def _start_local(sweep_dir: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    state = sweep_files.state_dir(sweep_dir)
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / CONTROLLER_LOG
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        proc = subprocess.Popen(
            list(info["command"]),
            cwd=str(info["cwd"]),
            env=controller_env(os.environ),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    deadline = time.monotonic() + LOCAL_START_S
    while time.monotonic() < deadline:
        record = sweep_files.read_controller(sweep_dir) or {}
        if record.get("pid") == proc.pid:
            break
        code = proc.poll()
        if code is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise TorchrunSetupError(
                f"the sweep's detached controller exited at once (status {code}). Its "
                f"log {log_path}:\n{tail}"
            )
        time.sleep(0.1)
    return {"kind": "local", "pid": proc.pid, "host": socket.gethostname(), "log": str(log_path)}


def detach(
    config: DictConfig, options: Any, kind: str, sweep_dir: Path, info: Mapping[str, Any]
) -> NoReturn:
    """Start the sweep's controller elsewhere, say where, and end this command (status 0)."""
    from hydra_torchrun_callback._sweep.control import resume_command

    if kind == "slurm":
        where = _submit_slurm(config, options, sweep_dir, info)
        sweep_files.write_controller(sweep_dir, {**where, "state": "submitted"})
        place = f"SLURM job {where['slurm_job']}"
    else:
        where = _start_local(sweep_dir, info)
        place = f"pid {where['pid']} on {where['host']}"
    lines = [
        "[hydra-torchrun] the sweep runs on, detached; this command is done.",
        f"  sweep dir : {sweep_dir}",
        f"  controller: {place}",
        f"  its log   : {where['log']}",
        f"  follow    : hydra-torchrun-summary {sweep_dir}   (or: tail -f {where['log']})",
        f"  cancel    : hydra-torchrun-cancel {sweep_dir}",
        f"  resume    : {resume_command(info)}",
    ]
    print("\n".join(lines), flush=True)
    sys.stderr.flush()
    raise SystemExit(0)
