"""The sweep's launcher, wrapped: a dead point fails alone; a resumed sweep re-attaches.

Hydra instantiates the launcher after ``on_multirun_start``, from ``hydra.launcher``. The
callback puts a small node there (:func:`wrap_launcher`) naming
``hydra_plugins...SweepLauncher``; that plugin puts the user's node back at once (so
``multirun.yaml`` and every job see the launcher as the user wrote it), instantiates it,
and hands each batch to :class:`SweepRun`:

- **basic** launcher: points run one by one in this process, as Hydra runs them.
- **submitit** (local, slurm): points are submitted as one job array per batch, as
  hydra-submitit-launcher does, with its own parameters, and the jobs run its own
  ``__call__``; but a job that ends without a result (killed, OOM, ``scancel``, node
  lost, time limit after its requeues) becomes a FAILED ``JobReturn`` with the cause,
  instead of an exception that ends the sweep and loses the other points' values.

With ``resume=true`` each point is first looked up in the sweep dir (:mod:`.plan`
decides): a completed point returns its saved, signed value without a job; a point whose
SLURM job is still queued or running is waited for; others run again in their own dir.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_torchrun_callback._log import log
from hydra_torchrun_callback._proc import start_time
from hydra_torchrun_callback._result import TorchrunPointLost
from hydra_torchrun_callback._sweep import scheduler
from hydra_torchrun_callback._sweep.plan import Action, Known, Step, assign_numbers
from hydra_torchrun_callback._wire import sweep_files

__all__ = ["KINDS", "SweepRun", "launcher_kind", "wrap_launcher"]

WRAPPER_TARGET = "hydra_plugins.hydra_torchrun_callback.sweep_launcher.SweepLauncher"
#: Launchers whose sweeps the callback can keep alive: Hydra's basic one, submitit's two.
KINDS = {
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher": "basic",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": "local",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": "slurm",
}
#: Lines of a lost point's log quoted in its cause.
LOG_TAIL_LINES = 20

#: token -> the user's ``hydra.launcher`` node, between the callback and the plugin.
_ORIGINALS: dict[str, DictConfig] = {}


def launcher_kind(config: DictConfig) -> Optional[str]:
    return KINDS.get(str(OmegaConf.select(config, "hydra.launcher._target_", default="")))


def wrap_launcher(config: DictConfig, sweep_id: str, resume: bool) -> None:
    """Have the sweeper instantiate :class:`SweepRun`'s plugin around the user's launcher."""
    token = secrets.token_hex(8)
    kind = launcher_kind(config)
    assert kind is not None
    with read_write(config.hydra), open_dict(config.hydra):
        _ORIGINALS[token] = config.hydra.launcher
        config.hydra.launcher = {
            "_target_": WRAPPER_TARGET,
            "_recursive_": False,
            "token": token,
            "kind": kind,
            "sweep_id": sweep_id,
            "resume": resume,
        }


@dataclass
class _Started:
    step: Step
    job: Any
    fresh: bool


class SweepRun:
    """One sweep's launches, batch after batch, around the user's launcher."""

    def __init__(
        self,
        params: dict[str, Any],
        hydra_context: Any,
        task_function: Any,
        config: DictConfig,
    ) -> None:
        from hydra.core.plugins import Plugins

        original = _ORIGINALS.pop(str(params["token"]))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.launcher = original
        self.kind = str(params["kind"])
        self.sweep_id = str(params["sweep_id"])
        self.resume = bool(params["resume"])
        self.config = config
        self.hydra_context = hydra_context
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        self.inner = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self._claimed: set[int] = set()
        self._configs: dict[int, DictConfig] = {}

    # -- what the sweep dir knows ----------------------------------------------------------
    def _job_config(self, num: int, overrides: Sequence[str]) -> DictConfig:
        """The point's config as its job composes it (for its dir and its JobReturn)."""
        if num not in self._configs:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
                cfg.hydra.job.id = f"job_id_for_{num}"
            self._configs[num] = cfg
        return self._configs[num]

    def _job_dir(self, num: int, overrides: Sequence[str]) -> Path:
        from hydra.core.hydra_config import HydraConfig

        cfg = self._job_config(num, overrides)
        held = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the dirs
        try:
            path = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        finally:
            HydraConfig.instance().cfg = held
        return path.absolute()

    def _known(self) -> dict[int, Known]:
        ledger = sweep_files.read_ledger(self.sweep_dir, self.sweep_id)
        last = {
            num: entry["jobs"][-1]
            for num, entry in ledger.items()
            if entry.get("jobs") and entry["jobs"][-1].get("executor") == "slurm"
        }
        live = scheduler.live_jobs([str(j.get("job_id")) for j in last.values()])
        known = {}
        for num, entry in ledger.items():
            overrides = tuple(str(o) for o in entry.get("overrides", []))
            job_dir = self._job_dir(num, overrides)
            record = sweep_files.read_point(job_dir)
            mine = (
                record is not None
                and record.get("sweep_id") == self.sweep_id
                and record.get("num") == num
                and tuple(record.get("overrides", [])) == overrides
            )
            state = str(record.get("state")) if mine and record else None
            key = sweep_files.point_key(self.sweep_id, num, overrides)
            value_ok = state == "completed" and sweep_files.open_value(job_dir, key) is not None
            job = str(last[num].get("job_id")) if num in last else None
            known[num] = Known(num, overrides, state, value_ok, job if job in live else None)
        return known

    # -- one batch -------------------------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        batch = [list(o) for o in job_overrides]
        known = self._known() if self.resume else {}
        steps = assign_numbers(batch, initial_job_idx, known, self._claimed, self.resume)
        results: dict[int, Any] = {}
        if self.resume:
            for step in steps:
                if step.action is not Action.RUN or step.num != initial_job_idx + step.index:
                    log.info(
                        "resume: point #%d (%s): %s",
                        step.num,
                        " ".join(step.overrides),
                        {
                            "done": "completed, its saved value",
                            "attach": "its job still runs, waiting for it",
                            "run": "runs again in its own dir",
                        }[step.action.value],
                    )
        for step in steps:
            if step.action is Action.DONE:
                restored = self._restored(step)
                if restored is not None:
                    results[step.index] = restored
                else:  # the value vanished or no longer verifies: run it again
                    steps[step.index] = Step(step.index, step.num, step.overrides, Action.RUN)
        to_run = [s for s in steps if s.action is Action.RUN]
        if self.kind == "basic":
            for run in _consecutive(to_run):  # one launch per run of numbers, as Hydra's
                for step in run:
                    self._ledger(
                        step,
                        {"executor": "basic", "host": socket.gethostname(), "pid": os.getpid()},
                    )
                returns = self.inner.launch([list(s.overrides) for s in run], run[0].num)
                for step, ret in zip(run, returns, strict=True):
                    results[step.index] = ret
        else:
            started = self._submit(to_run)
            started += self._attach([s for s in steps if s.action is Action.ATTACH])
            for item in sorted(started, key=lambda s: s.step.index):
                results[item.step.index] = self._collect(item)
        return [results[i] for i in range(len(steps))]

    def _ledger(self, step: Step, submission: dict[str, Any]) -> None:
        sweep_files.add_submission(
            self.sweep_dir, self.sweep_id, step.num, step.overrides, submission
        )

    # -- submitit --------------------------------------------------------------------------
    def _executor(self) -> Any:
        """The submitit executor hydra-submitit-launcher would build from its parameters."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import (  # type: ignore[import-untyped]
            BaseQueueConf,
        )

        params = dict(self.inner.params)  # type: ignore[attr-defined]
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self.kind}_max_num_timeout"] = params.pop("max_num_timeout")
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor = submitit.AutoExecutor(cluster=self.kind, **init)
        executor.update_parameters(
            **{(k if k in shared else f"{self.kind}_{k}"): v for k, v in params.items()}
        )
        return executor

    def _submit(self, steps: list[Step]) -> list[_Started]:
        if not steps:
            return []
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides

        executor = self._executor()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(self.sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitit '%s' sweep output dir : %s", self.kind, self.config.hydra.sweep.dir)
        params = []
        for step in steps:
            log.info("\t#%d : %s", step.num, " ".join(filter_overrides(list(step.overrides))))
            params.append(
                (
                    list(step.overrides),
                    "hydra.sweep.dir",
                    step.num,
                    f"job_id_for_{step.num}",
                    Singleton.get_state(),
                )
            )
        folder = str(self.inner.params["submitit_folder"])  # type: ignore[attr-defined]
        with _deferred_stop():  # a SIGTERM now (scancel, requeue) waits for the ledger
            jobs: list[Any] = executor.map_array(self.inner, *zip(*params, strict=True))
            for step, job in zip(steps, jobs, strict=True):
                where = {"executor": self.kind, "job_id": job.job_id, "folder": folder}
                if self.kind == "local":  # its pid, to wait for it on resume (this host)
                    where.update(_local_process(str(job.job_id)))
                self._ledger(step, where)
        return [_Started(step, job, True) for step, job in zip(steps, jobs, strict=True)]

    def _attach(self, steps: list[Step]) -> list[_Started]:
        if not steps:
            return []
        import submitit

        ledger = sweep_files.read_ledger(self.sweep_dir, self.sweep_id)
        started = []
        for step in steps:
            last = ledger[step.num]["jobs"][-1]
            assert step.known is not None and step.known.live_job is not None
            log.info("resume: waiting for point #%d's job %s", step.num, step.known.live_job)
            job: Any = submitit.SlurmJob(folder=last["folder"], job_id=step.known.live_job)
            started.append(_Started(step, job, False))
        return started

    def _collect(self, item: _Started) -> Any:
        """The point's JobReturn; a job that ended without one is a FAILED point."""
        if item.fresh:
            while True:
                try:
                    return item.job.results()[0]
                except Exception as exc:  # UncompletedJobError, FailedJobError, ...
                    # An elastic job that went on without a lost task: the first COMPLETED
                    # JobReturn, task 0's (node 0's) unless task 0 was the one lost (every
                    # node of an elastic job with a shared store returns rank 0's value).
                    value = _survivor_result(item.job)
                    if value is not None:
                        return value
                    if not self._wait_if_requeued(item):
                        return self._lost(item, exc)
        try:
            item.job.wait()
        except Exception as exc:
            return self._lost(item, exc)
        restored = self._restored(item.step)
        if restored is not None:
            return restored
        return self._ended_without_value(item)

    def _wait_if_requeued(self, item: _Started, poll_s: float = 5.0) -> bool:
        """A SLURM job that ended without a result but that SLURM still lists was requeued
        (a node failed, ``JobRequeue``): submitit took its NODE_FAIL as the end. Wait
        until SLURM is done with it; True if it was requeued (its next run's result is
        then read as any other)."""
        if self.kind != "slurm":
            return False
        job_id = str(getattr(item.job, "job_id", ""))
        try:
            if not scheduler.live_jobs([job_id]):
                return False
            log.warning(
                "point #%d: SLURM requeued its job %s (a node failed): waiting for its next run",
                item.step.num,
                job_id,
            )
            while scheduler.live_jobs([job_id]):
                time.sleep(poll_s)
        except Exception as exc:  # squeue cannot say: the point is lost as it looks
            log.warning("point #%d: cannot ask SLURM about job %s: %s", item.step.num, job_id, exc)
            return False
        return True

    def _ended_without_value(self, item: _Started) -> Any:
        """An attached job that ended: its own record says how, else it was lost."""
        from hydra.core.utils import JobStatus

        from hydra_torchrun_callback._result import TorchrunJobError

        step = item.step
        record = sweep_files.read_point(self._job_dir(step.num, step.overrides)) or {}
        last = (
            (record.get("attempts") or [{}])[-1] if record.get("sweep_id") == self.sweep_id else {}
        )
        if last.get("slurm_job") == str(item.job.job_id) and last.get("state") == "failed":
            error = TorchrunJobError(str(last.get("cause") or "the point failed"))
            return self._return(step, JobStatus.FAILED, error)
        if last.get("slurm_job") == str(item.job.job_id) and last.get("state") == "completed":
            return self._lost(item, None, "it completed, but its value could not be saved")
        return self._lost(item, None)

    # -- JobReturns the sweeper gets without a job ------------------------------------------
    def _return(self, step: Step, status: Any, value: Any) -> Any:
        from hydra.core.utils import JobReturn

        cfg = self._job_config(step.num, step.overrides)
        task_cfg = copy.deepcopy(cfg)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        return JobReturn(
            overrides=list(step.overrides),
            cfg=task_cfg,
            hydra_cfg=OmegaConf.create({"hydra": cfg.hydra}),
            working_dir=str(self._job_dir(step.num, step.overrides)),
            task_name=str(cfg.hydra.job.name),
            status=status,
            _return_value=value,
        )

    def _restored(self, step: Step) -> Any:
        """A completed point's JobReturn from its signed value (None if it does not verify)."""
        from hydra.core.utils import JobStatus

        from hydra_torchrun_callback._wire import pickling

        job_dir = self._job_dir(step.num, step.overrides)
        record = sweep_files.read_point(job_dir)
        if record is None or record.get("state") != "completed":
            return None
        data = sweep_files.open_value(
            job_dir, sweep_files.point_key(self.sweep_id, step.num, step.overrides)
        )
        if data is None:
            return None
        try:
            value = pickling.loads(data)
        except Exception as exc:
            log.warning("point #%d: its saved value cannot be loaded here (%s)", step.num, exc)
            return None
        return self._return(step, JobStatus.COMPLETED, value)

    def _lost(self, item: _Started, exc: Optional[BaseException], why: str = "") -> Any:
        from hydra.core.utils import JobStatus

        step, job = item.step, item.job
        job_id = str(getattr(job, "job_id", "?"))
        state, code = "", ""
        if self.kind == "slurm":
            state, code = scheduler.ended_as(job_id)
        state = state or str(getattr(job, "state", "") or "UNKNOWN")
        process = getattr(job, "_process", None)
        if not code and process is not None and process.poll() is not None:
            code = str(process.returncode)
        record = sweep_files.read_point(self._job_dir(step.num, step.overrides)) or {}
        last = (
            (record.get("attempts") or [{}])[-1] if record.get("sweep_id") == self.sweep_id else {}
        )
        # The cause this very job recorded (not an earlier attempt's).
        recorded = last.get("cause") if last.get("slurm_job") in (job_id, None) else None
        log_path = getattr(getattr(job, "paths", None), "stderr", None)
        tail = _tail(Path(str(log_path))) if log_path else ""
        why = (
            why
            or recorded
            or (str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else "")
        )
        message = (
            f"sweep point #{step.num} ({' '.join(step.overrides)}) ended without a result: "
            f"{self.kind} job {job_id} is {state}"
            + (f" (exit code {code})" if code else "")
            + (f": {why}" if why else "")
            + (f"\nLast lines of its log {log_path}:\n{tail}" if tail else "")
        )
        log.error("%s", message)
        error = TorchrunPointLost(
            message, job_id=job_id, state=state, exit_code=code or None, log_tail=tail
        )
        if exc is not None:
            error.__cause__ = exc
        return self._return(step, JobStatus.FAILED, error)


@contextlib.contextmanager
def _deferred_stop() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP wait until the block is done (main thread only): the
    jobs just submitted are in the ledger before the controller stops, so a resume
    re-attaches to them instead of submitting them again. (SIGKILL cannot wait.)"""
    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _local_process(job_id: str) -> dict[str, Any]:
    """A submitit_local job's process (its id is its pid) and its start time."""
    start = start_time(int(job_id)) if job_id.isdigit() else None
    if start is None:
        return {}
    return {"pid": int(job_id), "pid_start": start, "host": socket.gethostname()}


def _consecutive(steps: list[Step]) -> list[list[Step]]:
    """Steps grouped into runs of consecutive job numbers."""
    runs: list[list[Step]] = []
    for step in steps:
        if runs and runs[-1][-1].num + 1 == step.num:
            runs[-1].append(step)
        else:
            runs.append([step])
    return runs


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _survivor_result(job: Any) -> Any:
    """The JobReturn of the first task of a multi-task job that left one, if the job
    COMPLETED there, else None (a failed job's point is lost with the scheduler's state
    and log, as any other). That task led the job's end: the lowest one not lost."""
    from hydra.core.utils import JobStatus

    try:
        tasks = int(getattr(job, "num_tasks", 1))
    except (TypeError, ValueError):
        return None
    for task in range(tasks if tasks > 1 else 0):
        try:
            sub = job.task(task)
            # A lost task left no result file: submitit would wait for it.
            if not Path(sub.paths.result_pickle).exists():
                continue
            value = sub.result()
        except Exception:
            continue
        return value if getattr(value, "status", None) == JobStatus.COMPLETED else None
    return None
