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
