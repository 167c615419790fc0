"""Multirun with the basic launcher: jobs one after another, each its own group."""

from __future__ import annotations

from pathlib import Path


def test_sweep_over_workers_per_node(app) -> None:
    """A scaling study: 1, 2, 3 workers in one -m run (Hydra refuses sweeping hydra.*)."""
    run = app(
        "hydra.callbacks.torchrun.nproc_per_node=${oc.select:nproc,1}",
        "+nproc=1,2,3",
        multirun=True,
    )
    assert run.proc.returncode == 0, run.output
    assert [r["status"] for r in run.records] == ["COMPLETED"] * 3
    ports, run_ids = set(), set()
    for job, n in enumerate((1, 2, 3)):
        files = run.rank_files(run.out / str(job))
        assert sorted(files) == [f"rank{r}.a0.json" for r in range(n)]
        for rec in files.values():
            assert rec["world"] == n and rec["sum"] == n * (n - 1) // 2
            assert rec["output_dir"] == str((run.out / str(job)).resolve())
            ports.add(rec["env"]["MASTER_PORT"])
            run_ids.add(rec["env"]["TORCHELASTIC_RUN_ID"])
        record = run.records[job]
        assert record["value"]["sum"] == n * (n - 1) // 2 and record["value"]["rank"] == 0
        # No RANK/MASTER_PORT/process group state leaked into the Hydra process.
        assert record["leaked_env"] == dict.fromkeys(record["leaked_env"])
        assert record["pg_initialized"] is False
    assert len(run_ids) == 3  # every job is its own group


def test_sweep_task_values_and_plus_callbacks(app, tmp_path: Path) -> None:
    """`+callbacks=torchrun` works too; a failing point does not stop the sweep."""
    run = app(
        "+callbacks=torchrun",
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "fail_rank=-1,1",
        multirun=True,
        callback=None,
    )
    assert [r["status"] for r in run.records] == ["COMPLETED", "FAILED"]
    assert "probe failure on rank 1" in run.records[1]["error"]
    assert run.proc.returncode == 1  # Hydra reports the failed job at the end


def test_forkserver_reused_across_jobs_sees_each_jobs_env(app) -> None:
    """The preloaded forkserver outlives job 0; job 1's workers still get job 1's env."""
    run = app(
        "hydra.callbacks.torchrun.start_method=forkserver",
        "hydra.callbacks.torchrun.nproc_per_node=${oc.select:nproc,1}",
        "+hydra.job.env_set.PROBE_ENV=${oc.select:tag,none}",
        "+nproc=1,2",
        "+tag=first,second",
        multirun=True,
    )
    assert run.proc.returncode == 0, run.output
    envs = {}
    for job in range(4):
        for rec in run.rank_files(run.out / str(job)).values():
            envs.setdefault(job, set()).add(
                (rec["env"]["PROBE_ENV"], rec["env"]["OMP_NUM_THREADS"])
            )
    # Hydra's basic sweeper orders +nproc=1,2 x +tag=first,second as (1,f) (1,s) (2,f) (2,s).
    assert envs == {
        0: {("first", None)},
        1: {("second", None)},
        2: {("first", "1")},
        3: {("second", "1")},
    }
    assert [r["status"] for r in run.records] == ["COMPLETED"] * 4
