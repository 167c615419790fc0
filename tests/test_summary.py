"""The per-job summary (table in the Hydra log + JSON beside .hydra/) and the heartbeat."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from hydra_torchrun_callback._node.heartbeat import Heartbeat
from hydra_torchrun_callback._node.records import NodeRecords
from hydra_torchrun_callback._report.job_summary import build_summary, render_table
from hydra_torchrun_callback._wire.records import WorkerRecord
from hydra_torchrun_callback.summary import collect

from conftest import app_env

NPROC = "hydra.callbacks.torchrun.nproc_per_node={}"
GOLDEN = Path(__file__).parent / "golden"


def _summary(out: Path) -> dict:
    return json.loads((out / "torchrun_summary.json").read_text())


def test_success_one_row_per_rank_with_real_pids(app) -> None:
    run = app(NPROC.format(3))
    assert run.proc.returncode == 0, run.output
    summary = _summary(run.out)
    assert (summary["status"], summary["world_size"], summary["root_cause"]) == (
        "COMPLETED",
        3,
        None,
    )
    files = run.rank_files()
    for row in summary["ranks"]:
        rec = files[f"rank{row['rank']}.a0.json"]
        assert (row["pid"], row["host"], row["node"]) == (rec["pid"], rec["host"], 0)
        assert row["status"] == "ok" and row["attempts"] == 1 and row["wall_s"] > 0
    assert sorted(r["rank"] for r in summary["ranks"]) == [0, 1, 2]
    # The table is in the Hydra process's job log (not in a worker's log), once.
    log = (run.out / "probe_app.log").read_text()
    assert log.count("torchrun job summary: COMPLETED") == 1
    header = r"^rank +node +host +pid +attempts +exit status +wall +root cause$"
    assert re.search(header, log, re.M), log
    for rank in range(3):
        pid = files[f"rank{rank}.a0.json"]["pid"]
        assert re.search(rf"^ +{rank} +0 +\S+ +{pid} +1 +ok ", log, re.M)
    assert "torchrun job summary" not in (run.out / "probe_app_rank0.log").read_text()
    assert (run.out / ".hydra").is_dir()  # saved beside it


def test_failure_marks_the_root_cause_row(app) -> None:
    run = app(NPROC.format(3), "fail_rank=1", "fail_delay=1")
    assert run.proc.returncode == 1
    summary = _summary(run.out)
    assert summary["status"] == "FAILED" and summary["root_cause_rank"] == 1
    rows = {r["rank"]: r for r in summary["ranks"]}
    assert rows[1]["status"] == "raised"
    assert rows[1]["root_cause"] == "ValueError: probe failure on rank 1 attempt 0"
    # The peers were blocked in all_reduce; the agent stopped them.
    assert rows[0]["status"] == rows[2]["status"] == "stopped"
    assert rows[0]["root_cause"] is None
    log = (run.out / "probe_app.log").read_text()
    assert re.search(r"raised ValueError .*ValueError: probe failure on rank 1", log)


def test_restart_counts_attempts_and_keeps_the_killed_one(app) -> None:
    run = app(
        NPROC.format(2), "kill_rank=1", "fail_attempts=1", "hydra.callbacks.torchrun.max_restarts=1"
    )
    assert run.proc.returncode == 0, run.output
    summary = _summary(run.out)
    rows = {r["rank"]: r for r in summary["ranks"]}
    assert rows[0]["attempts"] == rows[1]["attempts"] == 2
    assert rows[1]["status"] == "ok" and rows[1]["pid"] == run.rank_files()["rank1.a1.json"]["pid"]
    [past] = rows[1]["history"]
    assert (past["attempt"], past["status"], past["detail"]) == (0, "killed", "SIGKILL")
    assert rows[0]["history"][0]["status"] == "stopped"
    log = (run.out / "probe_app.log").read_text()
    assert re.search(r"rank 1 attempt 0 \(pid \d+\): killed \(SIGKILL\) .*restarted", log)


def test_heartbeat_lists_live_ranks_only_when_asked(app, tmp_path: Path) -> None:
    run = app(NPROC.format(2), "sleep_before=3", "hydra.callbacks.torchrun.heartbeat_interval=1")
    assert run.proc.returncode == 0, run.output
    log = (run.out / "probe_app.log").read_text()
    assert "torchrun heartbeat: 2/2 ranks alive [0-1]" in log
    app(NPROC.format(2), "hydra.run.dir=" + str(tmp_path / "quiet"))
    assert "heartbeat" not in (tmp_path / "quiet" / "probe_app.log").read_text()


def test_summary_off(app) -> None:
    run = app(NPROC.format(2), "hydra.callbacks.torchrun.summary=false")
    assert run.proc.returncode == 0, run.output
    assert not (run.out / "torchrun_summary.json").exists()
    assert "job summary" not in (run.out / "probe_app.log").read_text()


def test_table_layout_matches_golden() -> None:
    """The table's layout, from fixed rows (update the golden file on purpose)."""
    rows = [
        {
            "rank": 0,
            "node": 0,
            "host": "n1",
            "pid": 4100,
            "attempts": 2,
            "status": "stopped",
            "detail": "stopped by the agent before it finished",
            "wall_s": 12.25,
            "history": [],
        },
        {
            "rank": 1,
            "node": 0,
            "host": "n1",
            "pid": 4101,
            "attempts": 2,
            "status": "ok",
            "detail": "",
            "wall_s": 12.0,
            "history": [
                {"attempt": 0, "pid": 4001, "status": "killed", "detail": "SIGKILL", "wall_s": 3.5}
            ],
        },
        {
            "rank": 2,
            "node": 1,
            "host": "n2",
            "pid": 5200,
            "attempts": 2,
            "status": "raised",
            "detail": "ValueError: loss diverged",
            "wall_s": 11.0,
            "history": [],
        },
        {
            "rank": 3,
            "node": 1,
            "host": "n2",
            "pid": 5201,
            "attempts": 2,
            "status": "exited",
            "detail": "exit code 3",
            "wall_s": 11.5,
            "history": [],
        },
    ]
    err = ValueError("torchrun worker rank 2 raised ValueError: loss diverged")
    err.rank = 2  # type: ignore[attr-defined]
    summary = build_summary(
        rows, run_id="job42", nnodes=2, nproc_per_node=2, wall_s=13.04, error=err
    )
    assert render_table(summary) + "\n" == (GOLDEN / "summary_table.txt").read_text()

    # A job stopped while ranks hung: where each one was, per rank and grouped.
    rows[0]["stopped_in"] = "all_reduce (distributed_c10d.py:3252) <- main (train.py:42)"
    rows[3]["stopped_in"] = rows[0]["stopped_in"]
    rows[1]["stopped_in"] = "__next__ (dataloader.py:708) <- main (train.py:38)"
    summary = build_summary(
        rows, run_id="job42", nnodes=2, nproc_per_node=2, wall_s=13.04, error=err
    )
    assert render_table(summary) + "\n" == (GOLDEN / "summary_table_stopped.txt").read_text()


def test_rank_stopped_before_it_started_still_counts_the_attempt(monkeypatch) -> None:
    """The agent restarts the whole group: a rank killed before its task began (no record
    for that attempt) still shows both attempts, the lost one as stopped with no pid."""
    node = NodeRecords()
    try:
        for rank, attempt, pid in ((1, 0, 101), (0, 1, 200), (1, 1, 201)):
            env = {
                "HYDRA_TORCHRUN_RECORDS": node.dir,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "TORCHELASTIC_RESTART_COUNT": str(attempt),
            }
            monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
            record = WorkerRecord(env)
            if attempt == 1:  # attempt 0's rank 1 was SIGKILLed mid-task: no outcome written
                record.finish("ok")
        node.exit_codes[101] = -9
        rows = {r["rank"]: r for r in node.rows(0, "hostA")}
    finally:
        node.close()
    assert rows[0]["attempts"] == rows[1]["attempts"] == 2
    assert [(h["attempt"], h["pid"], h["status"]) for h in rows[0]["history"]] == [
        (0, None, "stopped")
    ]
    assert (rows[0]["pid"], rows[1]["pid"]) == (200, 201)
    assert [(h["attempt"], h["pid"], h["status"], h["detail"]) for h in rows[1]["history"]] == [
        (0, 101, "killed", "SIGKILL")
    ]
    summary = build_summary(
        rows.values(), run_id="r", nnodes=1, nproc_per_node=2, wall_s=1.0, error=None
    )
    assert "\n   0     0  hostA  200         2  ok" in render_table(summary)


def test_heartbeat_line_separates_starting_from_ended() -> None:
    states = {0: "alive", 1: "ended", 4: "alive", 5: "starting"}
    line = Heartbeat(60, 6, lambda: states).line()
    assert line.startswith("torchrun heartbeat: 2/6 ranks alive [0,4] after 0s")
    assert line.endswith("; starting: [2-3,5]; ended: [1]")


def test_sweep_inspected_afterwards(app) -> None:
    """``python -m hydra_torchrun_callback.summary DIR``: one line per job of a sweep."""
    run = app(NPROC.format(2), "fail_rank=-1,1", multirun=True)
    assert run.proc.returncode == 1  # job 1 failed
    cli = [sys.executable, "-m", "hydra_torchrun_callback.summary", str(run.out)]
    proc = subprocess.run(cli, capture_output=True, text=True, env=app_env(), timeout=60)
    assert proc.returncode == 1, proc.stderr  # not every job completed
    sweep, jobs_part = proc.stdout.split("\n\n")
    # First the sweep (its points, as the sweep dir says), then one line per job.
    assert "2 point(s): 1 completed, 1 failed" in sweep
    assert "hydra.callbacks.torchrun.resume=true" in sweep
    head, columns, job0, job1 = jobs_part.splitlines()
    assert head == "2 job(s): 1 COMPLETED, 1 FAILED"
    assert columns.split()[:3] == ["job", "overrides", "status"]
    assert job0.split()[:5] == ["0", "fail_rank=-1", "COMPLETED", "1", "x"]
    assert job1.split()[:3] == ["1", "fail_rank=1", "FAILED"]
    assert job1.endswith("rank 1: ValueError: probe failure on rank 1 attempt 0")
    as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, env=app_env())
    both = json.loads(as_json.stdout)
    assert [p["state"] for p in both["sweep"]["points"]] == ["completed", "failed"]
    jobs = both["jobs"]
    assert [(j["job"], j["status"], j["root_cause_rank"]) for j in jobs] == [
        ("0", "COMPLETED", None),
        ("1", "FAILED", 1),
    ]
    ranks = subprocess.run([*cli, "--ranks"], capture_output=True, text=True, env=app_env())
    assert ranks.stdout.count("torchrun job summary:") == 2
    ok = subprocess.run(
        [*cli[:-1], str(run.out / "0")], capture_output=True, text=True, env=app_env()
    )
    assert ok.returncode == 0 and ok.stdout.startswith("1 job(s): 1 COMPLETED")
    (run.out / "10").mkdir()  # an 11th job sorts after job 1, not between 0 and 1
    shutil.copy(run.out / "0" / "torchrun_summary.json", run.out / "10")
    assert [j["job"] for j in collect(run.out)] == ["0", "1", "10"]
