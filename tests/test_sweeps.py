"""Sweeps that outlive interruptions, on Hydra's basic launcher and submitit_local.

Real Hydra apps in subprocesses (tests/apps/sweep_app.py), real submitit jobs, real
torchrun workers. What the sweeper received is read from outside: the test sweeper
``hydra/sweeper=record`` (tests/sweeper_plugin) writes every JobReturn it gets to
``sweeper_saw.jsonl``; Optuna's own study (SQLite) says which trials failed. The SLURM
versions (a controller that is a SLURM job) are in test_sweep_slurm.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, app_env, start_app

PLUGIN = REPO / "tests" / "sweeper_plugin"
LOCAL = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]


@pytest.fixture(autouse=True)
def _no_detached_controller_left(tmp_path: Path) -> Iterator[None]:
    """A test that failed midway must not leave its detached controller waiting for ever."""
    yield
    record = tmp_path / "multi" / ".torchrun_sweep" / "controller.json"
    if record.exists():
        pid = json.loads(record.read_text()).get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == pid:  # a detached controller (its own session)
                    os.killpg(pid, signal.SIGKILL)


def sweep_env() -> dict[str, str]:
    env = app_env()
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN), env["PYTHONPATH"]])
    return env


def start_sweep(
    tmp_path: Path,
    *overrides: str,
    sweeper: str = "record",
    env: dict[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[str]:
    """``sweep_app.py -m`` with the callback, in ``tmp_path/multi``, in the background."""
    return start_app(
        tmp_path,
        f"hydra/sweeper={sweeper}",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
        *overrides,
        script="sweep_app.py",
        multirun=True,
        env=env or sweep_env(),
        **popen,
    )


def sweep(
    tmp_path: Path, *overrides: str, timeout: float = 240, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """:func:`start_sweep`, waited for."""
    proc = start_sweep(tmp_path, *overrides, **kwargs)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def cancel(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``hydra-torchrun-cancel <sweep dir> args`` (run from the source tree)."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from hydra_torchrun_callback.summary import cancel_main; "
            "raise SystemExit(cancel_main())",
            str(tmp_path / "multi"),
            *args,
        ],
        env=env or sweep_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def saw(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "multi" / "sweeper_saw.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def by_x(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {next(o for o in r["overrides"] if o.startswith("x=")): r for r in rows}


def runs(tmp_path: Path) -> Counter[str]:
    path = tmp_path / "runs.log"
    return (
        Counter(line.split()[0] for line in path.read_text().splitlines())
        if path.exists()
        else Counter()
    )


def point(tmp_path: Path, num: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (tmp_path / "multi" / str(num) / "torchrun_point.json").read_text()
    )
    return data


def summary(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_torchrun_callback.summary", str(tmp_path / "multi"), *args],
        env=sweep_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_killed_point_fails_alone_then_resume_runs_it_again(tmp_path: Path) -> None:
    """submitit_local: the job of one point is SIGKILLed mid-run (its Hydra process and its
    workers, as an OOM kill or a lost node would). Its JobReturn is FAILED with the cause,
    the other points' values reach the sweeper; resume runs only that point, in its dir."""
    (tmp_path / "die_once").touch()
    first = sweep(tmp_path, *LOCAL, "x=1,2,3")
    assert first.returncode == 0, first.stdout[-3000:]
    rows = by_x(saw(tmp_path))
    died = [x for x in rows if rows[x]["status"] == "FAILED"]
    assert len(died) == 1, rows
    lost = rows[died[0]]
    assert lost["error_type"] == "TorchrunPointLost"
    assert "ended without a result: local job" in lost["error"]
    others = sorted(set(rows) - set(died))
    assert [rows[x]["status"] for x in others] == ["COMPLETED", "COMPLETED"]
    assert {rows[x]["value"] for x in others} == {repr(Fraction(int(x[2:]), 3)) for x in others}
    num = int(Path(lost["error"].split("#")[1].split()[0]).name)
    dead_dir = tmp_path / "multi" / str(num)
    assert (dead_dir / "died").exists()
    assert point(tmp_path, num)["state"] == "running"  # its job never recorded an end
    before = runs(tmp_path)
    # (.torchrun_stacks is the running job's own stack-request folder, not a file it wrote)
    first_files = {p.name for p in dead_dir.iterdir()} - {".torchrun_stacks"}

    resumed = sweep(tmp_path, *LOCAL, "x=1,2,3", "hydra.callbacks.torchrun.resume=true")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    rows = by_x(saw(tmp_path)[3:])
    assert [rows[x]["status"] for x in sorted(rows)] == ["COMPLETED"] * 3
    assert {rows[x]["value"] for x in rows} == {
        "Fraction(1, 3)",
        "Fraction(2, 3)",
        "Fraction(1, 1)",
    }
    assert {rows[x]["type"] for x in rows} == {"Fraction"}
    again = runs(tmp_path) - before
    assert again == Counter({died[0][2:]: 1}), again  # only the dead point ran again
    assert sorted(p.name for p in (tmp_path / "multi").iterdir() if p.name.isdigit()) == [
        "0",
        "1",
        "2",
    ]
    assert first_files <= {p.name for p in dead_dir.iterdir()}  # nothing it wrote is gone
    attempts = point(tmp_path, num)["attempts"]
    assert [a["state"] for a in attempts] == ["running", "completed"]
    ids = {json.loads(p.read_text())["run_id"] for p in dead_dir.glob("rank0.*.json")}
    assert len(ids) == 1 and len(list(dead_dir.glob("rank0.*.json"))) == 2  # one run id


def test_killed_point_fails_alone_on_the_basic_launcher(tmp_path: Path) -> None:
    """Hydra's basic launcher runs points in the sweep's own process: a point whose worker
    is SIGKILLed fails, and the next points run."""
    (tmp_path / "die_once").touch()
    out = sweep(tmp_path, "x=1,2,3", "die=worker")
    assert out.returncode == 0, out.stdout[-3000:]
    rows = by_x(saw(tmp_path))
    assert sorted(r["status"] for r in rows.values()) == ["COMPLETED", "COMPLETED", "FAILED"]
    failed = next(r for r in rows.values() if r["status"] == "FAILED")
    assert failed["error_type"] in ("TorchrunJobError", "TorchrunSetupError"), failed
    assert runs(tmp_path) == Counter({"1": 1, "2": 1, "3": 1})


def test_failed_point_resumed_on_the_basic_launcher(tmp_path: Path) -> None:
    (tmp_path / "fail_2").touch()
    first = sweep(tmp_path, "x=1,2,3")
    assert first.returncode == 0, first.stdout[-3000:]
    rows = by_x(saw(tmp_path))
    assert rows["x=2"]["status"] == "FAILED" and "told to fail" in rows["x=2"]["error"]
    assert point(tmp_path, 1)["state"] == "failed"
    assert "told to fail" in point(tmp_path, 1)["attempts"][-1]["cause"]
    status = summary(tmp_path)
    assert status.returncode == 1
    assert "failed" in status.stdout and "told to fail" in status.stdout
    assert "hydra.callbacks.torchrun.resume=true" in status.stdout

    (tmp_path / "fail_2").unlink()
    resumed = sweep(tmp_path, "x=1,2,3", "hydra.callbacks.torchrun.resume=true")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "point #0 (x=1): completed, its saved value" in resumed.stdout
    rows = by_x(saw(tmp_path)[3:])
    assert {x: r["value"] for x, r in rows.items()} == {
        "x=1": "Fraction(1, 3)",
        "x=2": "Fraction(2, 3)",
        "x=3": "Fraction(1, 1)",
    }
    assert runs(tmp_path) == Counter({"1": 1, "2": 2, "3": 1})
    assert [a["state"] for a in point(tmp_path, 1)["attempts"]] == ["failed", "completed"]
    status = summary(tmp_path)
    assert status.returncode == 0 and "3 point(s): 3 completed" in status.stdout

    # A new point with the same task overrides' sweep: Hydra's own numbering for a plain re-run.
    tampered = tmp_path / "multi" / "0" / "torchrun_result.bin"
    tampered.write_bytes(tampered.read_bytes()[:-1] + b"\0")  # a value that fails its HMAC
    again = sweep(tmp_path, "x=1,2,3", "hydra.callbacks.torchrun.resume=true")
    assert again.returncode == 0, again.stdout[-3000:]
    assert runs(tmp_path) == Counter({"1": 2, "2": 2, "3": 1})  # never unpickled: re-run


def test_detached_sweep_returns_at_once_and_completes(tmp_path: Path) -> None:
    start = time.monotonic()
    out = sweep(
        tmp_path,
        *LOCAL,
        "x=1,2",
        "wait_release=true",
        "hydra.callbacks.torchrun.detach=true",
        timeout=120,
    )
    took = time.monotonic() - start
    # communicate() returned: the controller holds none of the command's output.
    assert out.returncode == 0, out.stdout[-3000:]
    assert took < 60, took
    multi = tmp_path / "multi"
    assert f"sweep dir : {multi}" in out.stdout
    assert "hydra-torchrun-cancel" in out.stdout and "controller.log" in out.stdout
    controller = json.loads((multi / ".torchrun_sweep" / "controller.json").read_text())
    os.kill(controller["pid"], 0)  # alive, on its own
    assert f"pid {controller['pid']}" in out.stdout
    wait_for(lambda: len(runs(tmp_path)) == 2, 120, "both points to start")
    status = summary(tmp_path)
    assert "controller: alive" in status.stdout, status.stdout
    assert status.stdout.count("running") >= 2, status.stdout

    (tmp_path / "release").touch()
    path = multi / ".torchrun_sweep" / "controller.json"
    wait_for(lambda: json.loads(path.read_text())["state"] == "finished", 120, "the sweep's end")
    rows = by_x(saw(tmp_path))
    assert {x: r["value"] for x, r in rows.items()} == {
        "x=1": "Fraction(1, 3)",
        "x=2": "Fraction(2, 3)",
    }
    wait_for(lambda: not Path(f"/proc/{controller['pid']}").exists(), 60, "the controller's exit")
    done = summary(tmp_path)
    assert done.returncode == 0 and "2 point(s): 2 completed" in done.stdout
    assert "controller: not running" in done.stdout


def test_cancelled_local_controller_then_resumed(tmp_path: Path) -> None:
    """The basic launcher, detached: cancel stops the controller (and the point it ran);
    resume in the foreground runs what did not complete, in the same dirs."""
    out = sweep(
        tmp_path, "x=1,2", "wait_release=true", "hydra.callbacks.torchrun.detach=true", timeout=120
    )
    assert out.returncode == 0, out.stdout[-3000:]
    wait_for(lambda: len(runs(tmp_path)) == 1, 120, "the first point to start")
    stopped = cancel(tmp_path)
    assert stopped.returncode == 0 and "SIGTERM" in stopped.stdout, stopped
    pid = json.loads((tmp_path / "multi" / ".torchrun_sweep" / "controller.json").read_text())[
        "pid"
    ]
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, "the controller to end")
    (tmp_path / "release").touch()
    resumed = sweep(tmp_path, "x=1,2", "wait_release=true", "hydra.callbacks.torchrun.resume=true")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    rows = by_x(saw(tmp_path))
    assert {x: r["status"] for x, r in rows.items()} == {"x=1": "COMPLETED", "x=2": "COMPLETED"}
    assert runs(tmp_path)["1"] == 2 and runs(tmp_path)["2"] == 1
    assert [a["state"] for a in point(tmp_path, 0)["attempts"]] == ["running", "completed"]


def test_optuna_trial_killed_the_study_goes_on(tmp_path: Path) -> None:
    """Optuna on submitit_local, one trial's job SIGKILLed: that trial fails (Optuna logs
    "Failed experiment" with our cause), the study runs all its trials and reports a best.
    (Optuna's SQLite storage is not used: optuna 2.10 and SQLAlchemy 2 do not mix.)"""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    (tmp_path / "die_once").touch()
    out = sweep(
        tmp_path,
        *LOCAL,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.max_failure_rate=0.5",
        "hydra.sweeper.sampler.seed=0",
        "x=range(1,20)",
        "returns=float",
        sweeper="optuna",
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert out.stdout.count("Failed experiment: sweep point #") == 1, out.stdout[-3000:]
    assert "ended without a result: local job" in out.stdout
    states = Counter(point(tmp_path, n)["state"] for n in range(4))
    assert states == Counter({"completed": 3, "running": 1}), states  # the killed one
    assert (tmp_path / "multi" / "optimization_results.yaml").exists()
    assert "best_value" in (tmp_path / "multi" / "optimization_results.yaml").read_text()


def test_bad_sweep_options_are_refused_before_anything_runs(tmp_path: Path) -> None:
    nothing = sweep(tmp_path, "x=1,2", "hydra.callbacks.torchrun.resume=true")
    assert nothing.returncode != 0
    assert "holds no sweep started with hydra/callbacks=torchrun" in nothing.stdout
    assert not runs(tmp_path)

    assert sweep(tmp_path, "x=1,2").returncode == 0
    other = sweep(tmp_path, "x=1,2,3", "hydra.callbacks.torchrun.resume=true")
    assert other.returncode != 0
    assert "was started with the task overrides ['x=1,2']" in other.stdout, other.stdout
    assert runs(tmp_path) == Counter({"1": 1, "2": 1})
    another = start_app(
        tmp_path,
        f"hydra.sweep.dir={tmp_path / 'multi'}",
        "fail_rank=-1,0",
        "hydra.callbacks.torchrun.resume=true",
        multirun=True,
        env=sweep_env(),
    )
    text, _ = another.communicate(timeout=120)
    assert another.returncode != 0 and "holds a sweep of app 'sweep_app'" in text, text

    single = start_app(
        tmp_path, "hydra.callbacks.torchrun.detach=true", script="sweep_app.py", env=sweep_env()
    )
    text, _ = single.communicate(timeout=120)
    assert single.returncode != 0 and "is for sweeps: add -m" in text
    assert runs(tmp_path) == Counter({"1": 1, "2": 1})

    bad = sweep(tmp_path, "x=1", "hydra.callbacks.torchrun.controller=oops")
    assert bad.returncode != 0 and "controller" in bad.stdout


def test_wandb_run_continues_across_a_resume(tmp_path: Path) -> None:
    """The README's W&B recipe: ``wandb.init(id=os.environ["HYDRA_TORCHRUN_RUN_ID"],
    resume="allow")``. A point that failed and was resumed logs both attempts to one run
    (offline mode: the runs' folders name the run id)."""
    pytest.importorskip("wandb")
    (tmp_path / "fail_1").touch()
    env = {"WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    first = sweep(tmp_path, "x=1", "wandb=true", env={**sweep_env(), **env})
    assert first.returncode == 0 and by_x(saw(tmp_path))["x=1"]["status"] == "FAILED"
    (tmp_path / "fail_1").unlink()
    again = sweep(
        tmp_path,
        "x=1",
        "wandb=true",
        "hydra.callbacks.torchrun.resume=true",
        env={**sweep_env(), **env},
    )
    assert again.returncode == 0, again.stdout[-3000:]
    job = tmp_path / "multi" / "0"
    ids = {json.loads(p.read_text())["run_id"] for p in job.glob("rank0.*.json")}
    assert len(ids) == 1
    runs_dirs = sorted(p.name for p in (job / "wandb").glob("offline-run-*"))
    assert len(runs_dirs) == 2 and {d.rsplit("-", 1)[1] for d in runs_dirs} == ids, runs_dirs


def test_resume_waits_for_a_sweep_still_running(tmp_path: Path) -> None:
    """A resume started while the sweep's own (foreground) command still runs waits for it,
    then hands back what it completed: no point runs twice."""
    first = start_sweep(tmp_path, "x=1,2", "wait_release=true")
    wait_for(lambda: len(runs(tmp_path)) == 1, 120, "the first point to start")
    second = start_sweep(
        tmp_path, "x=1,2", "wait_release=true", "hydra.callbacks.torchrun.resume=true"
    )
    time.sleep(5)
    assert second.poll() is None  # waiting, not refused
    (tmp_path / "release").touch()
    out1, _ = first.communicate(timeout=120)
    out2, _ = second.communicate(timeout=120)
    assert first.returncode == 0, out1[-3000:]
    assert second.returncode == 0, out2[-3000:]
    assert "waiting for the sweep's previous controller to end" in out2
    assert runs(tmp_path) == Counter({"1": 1, "2": 1})
    rows = saw(tmp_path)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 4


def test_relative_sweep_dir_and_chdir(tmp_path: Path) -> None:
    """hydra.job.chdir=true with the default, relative sweep dir: the points still find
    their sweep (from the job's own dir) and resume hands their values back."""

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        proc = start_app(
            tmp_path,
            "hydra/sweeper=record",
            "hydra.sweep.dir=multi",
            "hydra.job.chdir=true",
            "x=1,2",
            *extra,
            script="sweep_app.py",
            multirun=True,
            env=sweep_env(),
        )
        out, _ = proc.communicate(timeout=240)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")

    assert run().returncode == 0
    assert point(tmp_path, 0)["state"] == "completed"
    again = run("hydra.callbacks.torchrun.resume=true")
    assert again.returncode == 0, again.stdout[-3000:]
    assert runs(tmp_path) == Counter({"1": 1, "2": 1})
    assert [r["value"] for r in saw(tmp_path)[2:]] == ["Fraction(1, 3)", "Fraction(2, 3)"]
