"""Sweeps that outlive interruptions on a real SLURM cluster (3 nodes) that these tests
start and stop: the detached controller is a SLURM job of its own that submits the point
jobs from inside its allocation; cancelled mid-sweep and resumed, it re-attaches to the
running point jobs (none submitted twice); requeued (``scontrol requeue``) or preempted
(SIGUSR2), it resumes by itself. ``.ci/run`` sets HTR_REQUIRE_SLURM=1: a missing cluster
fails there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_sweeps import PLUGIN, by_x, cancel, runs, saw, start_sweep, sweep_env, wait_for

from hydra_torchrun_callback.slurm_sandbox import SlurmSandbox

from conftest import REPO, slurm_sandbox_or_skip

SLURM = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.nodes=2",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=30",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmSandbox]:
    with slurm_sandbox_or_skip(tmp_path_factory, nodes=3).running() as sandbox:
        yield sandbox


@pytest.fixture(autouse=True)
def nothing_left_queued(cluster: SlurmSandbox) -> Iterator[None]:
    """Each test starts on an empty cluster: whatever a failed test left queued or running
    (a controller, point jobs waiting for their release file) is cancelled after it, so
    one failure does not starve the next tests of the cluster's 6 CPUs."""
    yield
    env = env_of(cluster)
    subprocess.run(["scancel", "--user=root"], env=env, timeout=30, check=False)
    wait_for(lambda: not queued(cluster), 60, "the cluster to empty")


def queued(cluster: SlurmSandbox) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %T"],
        env=env_of(cluster),
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split()


def env_of(cluster: SlurmSandbox) -> dict[str, str]:
    env = sweep_env()
    env.update(cluster.env())
    assert str(PLUGIN) in env["PYTHONPATH"] and str(REPO) in env["PYTHONPATH"]
    return env


def detached(tmp_path: Path, cluster: SlurmSandbox, *overrides: str) -> tuple[str, str]:
    """Start a detached sweep; (the command's output, the controller's SLURM job id)."""
    start = time.monotonic()
    proc = start_sweep(
        tmp_path, *SLURM, "hydra.callbacks.torchrun.detach=true", *overrides, env=env_of(cluster)
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert time.monotonic() - start < 60
    line = next(line for line in out.splitlines() if "controller: SLURM job" in line)
    return out, line.split("SLURM job")[1].split()[0]


def squeue(cluster: SlurmSandbox, job: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"],
        env=env_of(cluster),
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()


def controller(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "multi" / ".torchrun_sweep" / "controller.json"
    return json.loads(path.read_text()) if path.exists() else {}


def job_diagnosis(tmp_path: Path, cluster: SlurmSandbox, job: str) -> str:
    """What SLURM and the controller's log say about a job that did not do what a test
    waited for (a failure in CI must say why)."""
    shown = subprocess.run(
        ["scontrol", "show", "job", job],
        env=env_of(cluster),
        capture_output=True,
        text=True,
        timeout=30,
    )
    log = controller(tmp_path).get("log")
    tail = Path(log).read_text(errors="replace")[-4000:] if log and Path(log).exists() else ""
    return (
        f"scontrol show job {job}:\n{shown.stdout}{shown.stderr}\ncontroller.json: "
        f"{controller(tmp_path)}\ncontroller log tail:\n{tail}"
    )


def ledger_jobs(tmp_path: Path) -> dict[int, list[str]]:
    folder = tmp_path / "multi" / ".torchrun_sweep" / "points"
    return {
        int(p.stem): [j["job_id"] for j in json.loads(p.read_text())["jobs"]]
        for p in folder.glob("*.json")
    }


def point_jobs_running(tmp_path: Path, cluster: SlurmSandbox, count: int) -> list[str]:
    try:
        wait_for(lambda: len(runs(tmp_path)) == count, 180, f"{count} points to start")
    except AssertionError as exc:
        job = str(controller(tmp_path).get("slurm_job") or "")
        raise AssertionError(
            f"{exc}; queued: {queued(cluster)}\n{job_diagnosis(tmp_path, cluster, job)}"
        ) from None
    jobs = [j for ids in ledger_jobs(tmp_path).values() for j in ids]
    assert len(jobs) == count
    wait_for(lambda: all(squeue(cluster, j) == "RUNNING" for j in jobs), 60, "points running")
    return jobs


def test_controller_is_a_slurm_job_that_submits_from_its_allocation(
    tmp_path: Path, cluster: SlurmSandbox
) -> None:
    out, job = detached(tmp_path, cluster, "x=1,2")
    assert "hydra-torchrun-cancel" in out
    wait_for(lambda: controller(tmp_path).get("state") == "finished", 240, "the sweep's end")
    rows = by_x(saw(tmp_path))
    assert {x: r["value"] for x, r in rows.items()} == {
        "x=1": "Fraction(1, 3)",
        "x=2": "Fraction(2, 3)",
    }
    assert controller(tmp_path)["slurm_job"] == job
    assert controller(tmp_path)["host"] in cluster.node_names  # it ran on a SLURM node
    for num in (0, 1):
        facts = [
            json.loads(p.read_text()) for p in (tmp_path / "multi" / str(num)).glob("rank*.json")
        ]
        assert len(facts) == 2 and {f["world_size"] for f in facts} == {2}  # 2 nodes each
        for fact in facts:
            env = fact["env"]
            # The point jobs did not inherit the controller's allocation.
            assert job not in (env.get("SLURM_JOB_ID"), env.get("SLURM_JOBID")), env
            assert env["SLURM_JOB_NAME"] == "sweep_app"  # not the controller's "-sweep" job
            assert "HYDRA_TORCHRUN_SWEEP_ROLE" not in env


def test_controller_cancelled_then_resume_reattaches(tmp_path: Path, cluster: SlurmSandbox) -> None:
    _, job = detached(tmp_path, cluster, "x=1,2", "wait_release=true")
    points = point_jobs_running(tmp_path, cluster, 2)
    submitted = ledger_jobs(tmp_path)
    stopped = cancel(tmp_path, "--controller-only", env=env_of(cluster))
    assert stopped.returncode == 0 and f"controller SLURM job {job}" in stopped.stdout, stopped
    wait_for(lambda: squeue(cluster, job) in ("", "CANCELLED"), 60, "the controller's end")
    assert [squeue(cluster, j) for j in points] == ["RUNNING", "RUNNING"]  # they run on

    status = subprocess.run(
        [sys.executable, "-m", "hydra_torchrun_callback.summary", str(tmp_path / "multi")],
        env=env_of(cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "controller: not running" in status.stdout and "2 running" in status.stdout, status

    resume = start_sweep(
        tmp_path,
        *SLURM,
        "x=1,2",
        "wait_release=true",
        "hydra.callbacks.torchrun.resume=true",
        env=env_of(cluster),
    )
    time.sleep(5)
    (tmp_path / "release").touch()
    out, _ = resume.communicate(timeout=240)
    assert resume.returncode == 0, out[-3000:]
    assert out.count("its job still runs, waiting for it") == 2, out[-3000:]
    rows = by_x(saw(tmp_path))
    assert {x: r["value"] for x, r in rows.items()} == {
        "x=1": "Fraction(1, 3)",
        "x=2": "Fraction(2, 3)",
    }
    assert ledger_jobs(tmp_path) == submitted  # none submitted twice
    assert runs(tmp_path) == Counter({"1": 1, "2": 1})


@pytest.mark.parametrize(
    "interrupt",
    [
        pytest.param(["scontrol", "requeue"], id="scontrol-requeue"),
        # SLURM's preemption / time-limit warning: submitit requeues the (checkpointable)
        # controller job.
        pytest.param(["scancel", "--signal=USR2"], id="preempted-USR2"),
    ],
)
def test_interrupted_controller_resumes_by_itself(
    tmp_path: Path, cluster: SlurmSandbox, interrupt: list[str]
) -> None:
    env = env_of(cluster)
    _, job = detached(tmp_path, cluster, "x=1,2", "wait_release=true")
    point_jobs_running(tmp_path, cluster, 2)
    first = controller(tmp_path)
    subprocess.run([*interrupt, job], env=env, check=True, timeout=30)
    wait_for(lambda: squeue(cluster, job) == "PENDING", 120, "the requeued controller")

    def restarted() -> bool:
        # A requeued job waits for its old credential to expire before it runs again (the
        # sandbox's cred_expire=10; 120 s by default): released sooner, it would die with
        # "Job credential revoked".
        record = controller(tmp_path)
        return record.get("started", 0) > first["started"] and record.get("state") == "running"

    try:
        wait_for(restarted, 180, "the controller to start again")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{job_diagnosis(tmp_path, cluster, job)}") from None
    (tmp_path / "release").touch()
    wait_for(lambda: controller(tmp_path).get("state") == "finished", 240, "the sweep's end")
    rows = by_x(saw(tmp_path))
    assert [r["status"] for r in rows.values()] == ["COMPLETED", "COMPLETED"]
    assert {x: r["value"] for x, r in rows.items()} == {
        "x=1": "Fraction(1, 3)",
        "x=2": "Fraction(2, 3)",
    }
    assert all(len(ids) == 1 for ids in ledger_jobs(tmp_path).values()), ledger_jobs(tmp_path)
    assert runs(tmp_path) == Counter({"1": 1, "2": 1})


def test_dead_point_fails_alone_on_slurm(tmp_path: Path, cluster: SlurmSandbox) -> None:
    """A point's 2-node job loses its node-0 task (SIGKILLed: an OOM kill, a lost node): that
    point is FAILED with SLURM's state and exit code; the other point's value arrives."""
    (tmp_path / "die_once").touch()
    proc = start_sweep(tmp_path, *SLURM, "x=1,2", env=env_of(cluster))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    rows = by_x(saw(tmp_path))
    failed = [r for r in rows.values() if r["status"] == "FAILED"]
    done = [r for r in rows.values() if r["status"] == "COMPLETED"]
    assert len(failed) == 1 and len(done) == 1, rows
    assert failed[0]["error_type"] == "TorchrunPointLost"
    assert "ended without a result: slurm job" in failed[0]["error"]
    assert "(exit code " in failed[0]["error"], failed[0]["error"]


def test_controller_that_cannot_be_placed_is_refused(tmp_path: Path, cluster: SlurmSandbox) -> None:
    proc = start_sweep(
        tmp_path,
        *SLURM,
        "x=1,2",
        "hydra.callbacks.torchrun.detach=true",
        "+hydra.callbacks.torchrun.controller.partition=nosuch",
        env=env_of(cluster),
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "the sweep's controller could not be submitted as a SLURM job" in out, out[-3000:]
    assert "nosuch" in out and "Nothing else was submitted" in out
    assert not (tmp_path / "multi" / ".torchrun_sweep" / "points").exists()  # no point job
    assert not runs(tmp_path)


def test_cancel_stops_the_controller_and_its_jobs(tmp_path: Path, cluster: SlurmSandbox) -> None:
    _, job = detached(tmp_path, cluster, "x=1,2", "wait_release=true")
    points = point_jobs_running(tmp_path, cluster, 2)
    stopped = cancel(tmp_path, env=env_of(cluster))
    assert stopped.returncode == 0, stopped
    assert f"controller SLURM job {job}: scancel" in stopped.stdout
    assert "point jobs" in stopped.stdout
    wait_for(
        lambda: all(squeue(cluster, j) in ("", "CANCELLED") for j in [job, *points]),
        60,
        "the controller and its jobs to end",
    )
    assert controller(tmp_path)["state"] == "cancelled"
