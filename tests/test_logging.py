"""Hydra job logging in workers, one file per rank; torchrun's log options."""

from __future__ import annotations

from pathlib import Path

NPROC2 = "hydra.callbacks.torchrun.nproc_per_node=2"


def test_one_log_per_rank_beside_the_job_log(app) -> None:
    run = app(NPROC2, "log_lines=3")
    assert run.proc.returncode == 0, run.output
    job_log = (run.out / "probe_app.log").read_text()
    assert "torchrun placement (local): node 0/1" in job_log  # the Hydra process's own log
    assert "probe line" not in job_log  # workers never write into it
    for rank in (0, 1):
        lines = (run.out / f"probe_app_rank{rank}.log").read_text().splitlines()
        assert len(lines) == 3
        assert all(line.startswith(f"[rank{rank}][") and "probe line" in line for line in lines)
    # The console shows every worker line with its rank.
    assert "[rank0][" in run.proc.stdout and "[rank1][" in run.proc.stdout


def _std_files(log_dir: Path, stream: str) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in log_dir.rglob(f"attempt_0/*/{stream}.log")}


def test_redirects_to_log_dir(app, tmp_path: Path) -> None:
    log_dir = tmp_path / "tlogs"
    run = app(
        NPROC2,
        "hydra.callbacks.torchrun.redirects=3",
        f"hydra.callbacks.torchrun.log_dir={log_dir}",
    )
    assert run.proc.returncode == 0, run.output
    assert "probe stdout rank=" not in run.proc.stdout  # redirected away from the console
    out = _std_files(log_dir, "stdout")
    assert "probe stdout rank=0" in out["0"] and "rank=1" not in out["0"]
    assert "probe stdout rank=1" in out["1"] and "[rank1][" in out["1"]


def test_tee_and_local_ranks_filter(app, tmp_path: Path) -> None:
    log_dir = tmp_path / "tlogs"
    run = app(
        NPROC2,
        "hydra.callbacks.torchrun.tee=1",
        "hydra.callbacks.torchrun.local_ranks_filter=1",
        f"hydra.callbacks.torchrun.log_dir={log_dir}",
    )
    assert run.proc.returncode == 0, run.output
    out = _std_files(log_dir, "stdout")
    assert "probe stdout rank=0" in out["0"] and "probe stdout rank=1" in out["1"]
    assert "probe stdout rank=1" in run.proc.stdout  # teed to the console ...
    assert "probe stdout rank=0" not in run.proc.stdout  # ... for local rank 1 only


def test_redirected_output_is_kept_without_log_dir(app, tmp_path: Path) -> None:
    """Without log_dir, output the user sent to files is kept in the job's output dir
    (torchrun_logs/); nothing is left in the temp dir (the private folder for the rest)."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("hydra_torchrun_*"))
    run = app(NPROC2, "hydra.callbacks.torchrun.redirects=1")
    assert run.proc.returncode == 0, run.output
    assert set(Path(tempfile.gettempdir()).glob("hydra_torchrun_*")) == before
    out = _std_files(run.out / "torchrun_logs", "stdout")
    assert sorted(out) == ["0", "1"]
    assert all("probe stdout rank=" in text for text in out.values())


def test_private_log_dir_is_removed(app, tmp_path: Path) -> None:
    """Nothing sent to files, no log_dir: torch's error files go to a private temp dir,
    removed after; nothing is added to the output dir."""
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("hydra_torchrun_*"))
    run = app(NPROC2)
    assert run.proc.returncode == 0, run.output
    assert set(Path(tempfile.gettempdir()).glob("hydra_torchrun_*")) == before
    assert not (run.out / "torchrun_logs").exists()
