"""Tools users arrive with: Optuna over DDP trials, Lightning in the workers, hydra-zen.

Each runs the shipped example (or a probe built on it) as a real subprocess with real
workers; the multi-node variants are in test_multinode_local / test_slurm_cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES, AppRun, app_env, run_app, run_example

#: One learning rate that trains, one that diverges (the example raises FloatingPointError).
#: The shipped configs' TPE sampler (seed 0) draws both within its first 3 random trials.
SPACE = ("lr=choice(0.05,50.0)", "hydra.sweeper.n_trials=3")


def _optuna_study(tmp_path: Path, config: str) -> AppRun:
    run = run_app(
        tmp_path,
        *SPACE,
        "epochs=2",
        script=str(EXAMPLES / "ddp_train.py"),
        multirun=True,
        callback=None,  # the config itself selects hydra/callbacks=torchrun
        flags=(f"--config-name={config}",),
        timeout=400,
    )
    assert run.proc.returncode == 0, run.output
    return run


def _check_study(run: AppRun) -> None:
    """Trials that trained were told rank 0's loss; a diverging one was told FAIL (the
    sweeper's "Failed experiment" branch) and the study ran all its trials."""
    trials = [j for j in run.records if j["task"] == 0]
    assert len(trials) == 3
    by_lr = {float(j["overrides"][0].split("=")[1]): j for j in trials}
    ok = by_lr[0.05]
    assert ok["status"] == "COMPLETED" and isinstance(ok["value"], float), ok
    failed_trials = [j for j in trials if j["status"] == "FAILED"]
    assert failed_trials, trials
    for failed in failed_trials:  # every one (lr=50 is drawn more than once)
        assert "FloatingPointError: loss diverged" in failed["error"], failed["error"]
        summary = json.loads((Path(failed["output_dir"]) / "torchrun_summary.json").read_text())
        root = summary["root_cause"] or ""
        assert summary["status"] == "FAILED" and "FloatingPointError" in root, summary
    told_failed = re.findall(r"\[HYDRA\] Failed experiment: (.*)", run.output)
    assert len(told_failed) == len(failed_trials), told_failed
    bad = [line for line in told_failed if "raised FloatingPointError: loss diverged" not in line]
    assert not bad, f"sweeper told: {bad}\n--- output tail ---\n{run.output[-4000:]}"
    # The sweeper's own report: best parameters among completed trials.
    results = yaml.safe_load((run.out / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"lr": 0.05}
    assert results["best_value"] == pytest.approx(ok["value"])


def test_optuna_study_over_ddp_trials(tmp_path: Path) -> None:
    run = _optuna_study(tmp_path, "ddp_optuna")
    _check_study(run)
    # Each completed trial was a 2-worker DDP job whose rank 0 answered.
    ok = next(j for j in run.records if j["status"] == "COMPLETED")
    summary = json.loads((Path(ok["output_dir"]) / "torchrun_summary.json").read_text())
    assert (summary["world_size"], summary["status"]) == (2, "COMPLETED")


def test_optuna_study_with_trials_on_two_emulated_nodes(tmp_path: Path) -> None:
    run = _optuna_study(tmp_path, "ddp_optuna_local")
    _check_study(run)
    ok = next(j for j in run.records if j["status"] == "COMPLETED" and j["task"] == 0)
    summary = json.loads((Path(ok["output_dir"]) / "torchrun_summary.json").read_text())
    assert (summary["nnodes"], summary["world_size"]) == (2, 2)
    assert {r["node"] for r in summary["ranks"]} == {0, 1}


def _example(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = run_example(tmp_path, script, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _lightning_env() -> dict[str, str]:
    env = app_env()
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), env["PYTHONPATH"]])
    return env


def test_lightning_example_fits_in_two_workers(tmp_path: Path) -> None:
    """Seed 001's workflow with no HydraDDP: the example as shipped, one machine."""
    out = tmp_path / "out"
    proc = _example(
        tmp_path,
        "lightning_zen.py",
        "hydra/callbacks=torchrun",
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        f"hydra.run.dir={out}",
    )
    assert "rank 0 of 2 (pid" in proc.stdout
    assert list((out / "checkpoints").glob("epoch=0-step=*.ckpt"))
    assert (out / "lightning_logs" / "version_0" / "metrics.csv").exists()
    assert not (tmp_path / "lightning_logs").exists()  # nothing in the launch directory
    summary = json.loads((out / "torchrun_summary.json").read_text())
    assert summary["status"] == "COMPLETED" and summary["world_size"] == 2


def test_lightning_test_flag_in_workers(tmp_path: Path) -> None:
    """``pl_testing=true`` runs trainer.test; rank 0's metrics are the job's value."""
    run = run_app(
        tmp_path,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "trainer.devices=2",
        "pl_testing=true",
        script="lightning_probe.py",
        env=_lightning_env(),
    )
    assert run.proc.returncode == 0, run.output
    facts = [json.loads((run.out / f"lightning_rank{r}.json").read_text()) for r in range(2)]
    assert facts[0]["ppid"] == facts[1]["ppid"] != facts[0]["pid"]  # siblings under the agent
    for rank, f in enumerate(facts):
        assert (f["cluster_env"], f["lightning_spawns"]) == ("TorchElasticEnvironment", False)
        assert (f["world_size"], f["global_rank"], f["env"]["RANK"]) == (2, rank, str(rank))
    # A re-spawned ``sys.argv`` would be a second Hydra run: a second record, other pids.
    [job] = run.records
    assert job["status"] == "COMPLETED" and set(job["value"]) == {"test_loss"}
    assert job["value"] == facts[0]["metrics"]
    assert not (run.out / "checkpoints").exists()  # testing trains nothing


def test_hydra_zen_launch_single_and_multirun(tmp_path: Path) -> None:
    proc = _example(tmp_path, "zen_launch.py", "--nproc", "3", "--out", "zen")
    jobs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(j["mode"], j["overrides"], j["status"]) for j in jobs] == [
        ("run", [], "COMPLETED"),
        ("multirun", ["scale=1"], "COMPLETED"),
        ("multirun", ["scale=10"], "COMPLETED"),
    ]
    # sum over ranks of scale * (rank + 1) * (4 x 0.5): computed by all_reduce in 3 workers
    assert [j["value"]["sum"] for j in jobs] == [12.0, 12.0, 120.0]
    assert {(j["value"]["rank"], j["value"]["world_size"]) for j in jobs} == {(0, 3)}
    dirs = [
        tmp_path / "zen" / "run",
        tmp_path / "zen" / "sweep" / "0",
        tmp_path / "zen" / "sweep" / "1",
    ]
    for job, job_dir in zip(jobs, dirs, strict=True):
        summary = json.loads((job_dir / "torchrun_summary.json").read_text())
        rank0 = next(r for r in summary["ranks"] if r["rank"] == 0)
        assert rank0["pid"] == job["value"]["pid"]  # the value came from the rank 0 worker
