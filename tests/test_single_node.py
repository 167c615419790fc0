"""One machine, single-run mode: the task runs once per worker, never in the Hydra process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import AppRun, app_env


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_each_worker_runs_task_once_with_torchrun_env(app, tmp_path: Path, nproc: int) -> None:
    run: AppRun = app(f"hydra.callbacks.torchrun.nproc_per_node={nproc}", "log_lines=2")
    assert run.proc.returncode == 0, run.output
    files = run.rank_files()
    # Exactly one record per rank, all from attempt 0: the body ran once in each worker.
    assert sorted(files) == [f"rank{r}.a0.json" for r in range(nproc)]
    [job] = run.records
    assert job["status"] == "COMPLETED"
    pids = {f["pid"] for f in files.values()}
    assert len(pids) == nproc and job["hydra_pid"] not in pids  # never in the Hydra process
    run_ids = set()
    for r in range(nproc):
        rec = files[f"rank{r}.a0.json"]
        env = rec["env"]
        assert env["RANK"] == str(r) and env["LOCAL_RANK"] == str(r)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == str(nproc)
        assert env["GROUP_RANK"] == "0" and env["ROLE_RANK"] == str(r)
        assert env["MASTER_ADDR"] and env["MASTER_PORT"]
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert env["TORCHELASTIC_MAX_RESTARTS"] == "0"
        run_ids.add(env["TORCHELASTIC_RUN_ID"])
        # init_process_group("gloo") with no other argument worked and all ranks joined.
        assert rec["sum"] == nproc * (nproc - 1) // 2 and rec["world"] == nproc
        assert env["OMP_NUM_THREADS"] == ("1" if nproc > 1 else None)
    assert len(run_ids) == 1
    # Global rank 0's return value is the job's return value (seen by on_job_end).
    assert job["value"]["rank"] == 0 and job["value"]["pid"] == files["rank0.a0.json"]["pid"]
    # Nothing of the workers leaked into the Hydra process.
    assert job["leaked_env"] == dict.fromkeys(job["leaked_env"])
    assert job["pg_initialized"] is False


def test_hydra_state_in_workers(app, tmp_path: Path) -> None:
    run = app(
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "hydra.job.chdir=true",
        "+hydra.job.env_set.PROBE_ENV=hello",
    )
    assert run.proc.returncode == 0, run.output
    out = run.out.resolve()
    # .hydra/ written once per job, by the Hydra process only.
    assert sorted(p.name for p in (out / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    saved_hydra = yaml.safe_load((out / ".hydra" / "hydra.yaml").read_text())["hydra"]
    saved_cfg = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    stamps = set()
    for rec in run.rank_files().values():
        assert rec["output_dir"] == str(out)
        assert rec["cwd"] == str(out)  # hydra.job.chdir honoured
        assert rec["original_cwd"] == str(tmp_path)
        assert rec["env"]["PROBE_ENV"] == "hello"  # hydra.job.env_set applied
        # HydraConfig.get() in the worker equals the job's hydra config.
        assert rec["hydra_cfg"]["runtime"]["output_dir"] == saved_hydra["runtime"]["output_dir"]
        assert rec["hydra_cfg"]["job"] == saved_hydra["job"]
        assert rec["hydra_cfg"]["overrides"] == saved_hydra["overrides"]
        stamps.add(rec["stamp"])
    # ${now:...} resolved once: every rank agrees; only one output dir exists.
    assert len(stamps) == 1
    assert saved_cfg["stamp"] == "${now:%H-%M-%S-%f}"
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [run.out]


def test_chdir_false_keeps_launch_cwd(app, tmp_path: Path) -> None:
    run = app("hydra.callbacks.torchrun.nproc_per_node=1", "hydra.job.chdir=false")
    assert run.proc.returncode == 0, run.output
    [rec] = run.rank_files().values()
    assert rec["cwd"] == str(tmp_path)


def test_now_interpolation_matches_hydra_process(app, tmp_path: Path) -> None:
    """Hydra #2070: the run dir uses ${now:} and the workers must not make a second one."""
    run = app(
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "hydra.run.dir=" + str(tmp_path / "runs" / "${now:%H-%M-%S-%f}"),
        "stamp=${now:%H-%M-%S-%f}",
    )
    assert run.proc.returncode == 0, run.output
    [run_dir] = list((tmp_path / "runs").iterdir())
    files = run.rank_files(run_dir)
    assert len(files) == 2
    # The task key uses the same pattern as the run dir: the Hydra process resolved it.
    assert {rec["stamp"] for rec in files.values()} == {run_dir.name}


def test_large_return_value(app) -> None:
    run = app("hydra.callbacks.torchrun.nproc_per_node=2", "returns=bytes", "return_mb=20")
    assert run.proc.returncode == 0, run.output
    [job] = run.records
    assert job["status"] == "COMPLETED" and job["value_len"] == 20 * 1024 * 1024


def test_none_return_value(app) -> None:
    run = app("hydra.callbacks.torchrun.nproc_per_node=2", "returns=none")
    assert run.proc.returncode == 0, run.output
    assert run.records[0]["status"] == "COMPLETED" and run.records[0]["value"] is None


def test_script_without_main_guard(app) -> None:
    """Workers never re-import the app's __main__, so an unguarded `main()` call is fine."""
    run = app("hydra.callbacks.torchrun.nproc_per_node=2", script="unguarded_app.py")
    assert run.proc.returncode == 0, run.output
    assert [r["value"] for r in run.records] == ["rank 0"]


def test_run_as_module(tmp_path: Path) -> None:
    """`python -m package.app` works the same way."""
    import subprocess
    import sys

    from conftest import APPS, app_env

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "probe_app",
            "hydra/callbacks=torchrun",
            "hydra.callbacks.torchrun.nproc_per_node=2",
            f"hydra.run.dir={tmp_path / 'o'}",
        ],
        cwd=APPS,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "o").glob("rank*.json")) == [
        "rank0.a0.json",
        "rank1.a0.json",
    ]


@pytest.mark.parametrize(
    ("overrides", "env", "in_hydra"),
    [
        ((), {}, False),  # the default: the agent runs in a fork of the warm server
        (("hydra.callbacks.torchrun.start_method=spawn",), {}, True),
        ((), {"HYDRA_TORCHRUN_AGENT_IN_SERVER": "0"}, True),  # the documented way back
    ],
    ids=["forkserver", "spawn", "agent-in-hydra-process"],
)
def test_where_torch_is_imported(app, overrides, env, in_hydra: bool) -> None:
    """With the warm start the agent runs in a fork of the preloaded server, so the Hydra
    process never imports torch (one import per node instead of two); the job is the same."""
    run: AppRun = app("hydra.callbacks.torchrun.nproc_per_node=2", *overrides, env=app_env(**env))
    assert run.proc.returncode == 0, run.output
    [job] = run.records
    assert job["status"] == "COMPLETED" and job["value"]["rank"] == 0
    assert job["torch_imported"] is in_hydra
    assert sorted(run.rank_files()) == ["rank0.a0.json", "rank1.a0.json"]
    # The agent's log lines (placement, summary) still reach the job's log file.
    log = (run.out / "probe_app.log").read_text()
    assert "torchrun placement" in log


def test_agent_log_records_follow_the_jobs_logging_config(app) -> None:
    """The agent's records (sent from its process when it is a fork of the warm server)
    are filtered as the job's logging config says: a logger it quiets stays quiet."""
    run: AppRun = app(
        "hydra.callbacks.torchrun.nproc_per_node=1",
        "+hydra.job_logging.loggers.hydra_torchrun_callback.level=WARNING",
    )
    assert run.proc.returncode == 0, run.output
    log = (run.out / "probe_app.log").read_text()
    assert "torchrun placement" not in log and "torchrun job summary" not in log, log
