"""Multi-node scenarios, run both under submitit_local emulation and on the SLURM sandbox."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from apps.procs import above_warm_server

from conftest import left_behind, read_markers, run_app, start_app


def two_point_sweep(tmp_path: Path, launcher: list[str], env: dict[str, str]) -> float:
    """2 jobs x 2 nodes x 2 workers: ranks spread over nodes, sums match, rank 0's value."""
    start = time.monotonic()
    run = run_app(
        tmp_path,
        *launcher,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "log_lines=1,2",
        multirun=True,
        env=env,
    )
    wall = time.monotonic() - start
    assert run.proc.returncode == 0, run.output
    for job in (0, 1):
        files = run.rank_files(run.out / str(job))
        assert sorted(files) == [f"rank{r}.a0.json" for r in range(4)], run.output
        assert {f["sum"] for f in files.values()} == {6}  # 0+1+2+3: world size 4
        assert {f["world"] for f in files.values()} == {4}
        by_node: dict[str, set[str]] = {}
        for f in files.values():
            by_node.setdefault(f["env"]["GROUP_RANK"], set()).add(f["host"])
            assert f["env"]["LOCAL_WORLD_SIZE"] == "2"
        assert sorted(by_node) == ["0", "1"]  # two nodes, two workers each
        records = [r for r in run.records if r["output_dir"].endswith(f"/{job}")]
        assert sorted(r["task"] for r in records) == [0, 1]
        task0 = next(r for r in records if r["task"] == 0)
        other = next(r for r in records if r["task"] == 1)
        rank0 = files["rank0.a0.json"]
        # What the launcher hands back (task 0's JobReturn) is global rank 0's value,
        # wherever rank 0 ran; the other node's JobReturn carries nothing misleading.
        assert task0["status"] == "COMPLETED" and task0["value"]["rank"] == 0
        assert task0["value"]["pid"] == rank0["pid"]
        assert other["status"] == "COMPLETED" and other["value"] is None
        # One summary per job, written by node 0, with every rank of both nodes.
        summary = json.loads((run.out / str(job) / "torchrun_summary.json").read_text())
        assert summary["status"] == "COMPLETED" and summary["world_size"] == 4
        rows = {row["rank"]: row for row in summary["ranks"]}
        assert sorted(rows) == [0, 1, 2, 3]
        for rank, row in rows.items():
            rec = files[f"rank{rank}.a0.json"]
            assert (row["pid"], row["host"], row["status"]) == (rec["pid"], rec["host"], "ok")
        assert {row["node"] for row in rows.values()} == {0, 1}
        job_log = (run.out / str(job) / "probe_app.log").read_text()
        assert job_log.count("torchrun job summary: COMPLETED") == 1
    return wall


def failure_on_node_1(tmp_path: Path, launcher: list[str], env: dict[str, str]) -> float:
    """A rank on the second node raises while its peers wait in a collective."""
    tag = uuid.uuid4().hex
    env = {**env, "HTR_TEST_TAG": tag}
    run = run_app(
        tmp_path,
        *launcher,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "fail_group=1",
        "fail_local=1",
        "fail_delay=2",
        multirun=True,
        env=env,
    )
    ended = time.time()
    assert run.proc.returncode == 1, run.output
    failed_at = float((run.out / "0" / "failed_at").read_text())
    task0 = next(r for r in run.records if r["task"] == 0)
    assert task0["status"] == "FAILED"
    err = task0["error"]
    assert "ValueError: probe failure on rank" in err and "node 1" in err
    assert "raise ValueError" in err  # the worker's traceback
    assert (
        task0["error_attrs"]["node_rank"] == 1 and task0["error_attrs"]["exc_type"] == "ValueError"
    )
    assert all(r["status"] == "FAILED" for r in run.records)
    assert ended - failed_at < 60, ended - failed_at
    summary = json.loads((run.out / "0" / "torchrun_summary.json").read_text())
    root = [row for row in summary["ranks"] if row["root_cause"]]
    assert summary["status"] == "FAILED" and len(summary["ranks"]) == 4
    assert [(r["rank"], r["node"], r["status"]) for r in root] == [
        (task0["error_attrs"]["rank"], 1, "raised")
    ]
    assert "probe failure" in root[0]["root_cause"]
    assert left_behind(tag) == []  # nothing left behind on any node
    return ended - failed_at


def preempted_and_requeued(
    tmp_path: Path,
    launcher: list[str],
    env: dict[str, str],
    signal_job: object,
    *extra: str,
    checkpointed: bool = True,
) -> float:
    """The preemption signal reaches the workers, they checkpoint, the job is requeued
    and the next run resumes from the checkpoint and completes, as the same run (its
    HYDRA_TORCHRUN_RUN_ID). ``checkpointed=False``: the workers' checkpoint outlasts the
    preemption grace, so the agent stops them (SIGTERM) before they save it."""
    tag = uuid.uuid4().hex
    env = {**env, "HTR_TEST_TAG": tag}
    out = tmp_path / "multi"
    rec = tmp_path / "recorder.jsonl"
    start = time.monotonic()
    proc = start_app(
        tmp_path,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        *launcher,
        "+hydra.callbacks.recorder._target_=recorder.Recorder",
        f"+hydra.callbacks.recorder.path={rec}",
        f"hydra.sweep.dir={out}",
        *extra,
        script="requeue_app.py",
        multirun=True,
        env=env,
    )
    try:
        job_dir = out / "0"
        deadline = time.monotonic() + 120
        while len(read_markers(job_dir)) < 4:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "workers never started"
            time.sleep(0.2)
        agents = {m["agent_pid"] for m in read_markers(job_dir)}
        signal_job(agents)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    wall = time.monotonic() - start
    assert proc.returncode == 0, output
    ckpts = sorted(job_dir.glob("ckpt_rank*.json"))
    terms = sorted(job_dir.glob("term_rank*.json"))
    if checkpointed:
        assert len(ckpts) == 4  # every worker got the signal and saved its checkpoint
        assert all(json.loads(p.read_text())["signal"] == "SIGUSR2" for p in ckpts)
        assert terms == []
    else:
        assert ckpts == [] and len(terms) == 4  # stopped at the end of the grace
    final = [r for r in (json.loads(x) for x in rec.read_text().splitlines()) if r["task"] == 0]
    assert final[-1]["status"] == "COMPLETED", final
    assert final[-1]["value"]["resumed"] is True and final[-1]["value"]["rank"] == 0
    if checkpointed:  # the requeued job is the same run for the task's loggers
        before, after = final[-1]["value"]["run_ids"]
        assert before == after and after and len(after) == 20, final[-1]["value"]
    assert left_behind(tag) == []
    return wall


def signal_agents(parents: set[int]) -> None:
    """What submitit's local controller does at timeout - signal_delay_s: signal each
    node's Hydra process (the agent; a forkserver worker's parent is the server)."""
    for pid in parents:
        os.kill(above_warm_server(pid), signal.SIGUSR2)


def lightning_two_nodes(
    tmp_path: Path, launcher: list[str], env: dict[str, str]
) -> tuple[float, list[dict[str, Any]]]:
    """Lightning's ddp strategy in the workers of 2 nodes x 2 workers: it takes torchrun's
    environment (no re-spawn, no SLURM disagreement) and writes into the job's dir.
    Returns the wall time and what each rank's Trainer saw."""
    start = time.monotonic()
    # The probe imports the example by name; submitit's job process must find it too.
    examples = str(Path(__file__).resolve().parents[1] / "slurm_examples")
    env = {**env, "PYTHONPATH": os.pathsep.join([examples, env.get("PYTHONPATH", "")])}
    run = run_app(
        tmp_path,
        *launcher,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "trainer.devices=2",
        "trainer.num_nodes=2",
        # Long enough (2-3 s) for the 1 s heartbeat to see both nodes' ranks training: each
        # node publishes its ranks' states once a second.
        "trainer.max_epochs=30",
        "hydra.callbacks.torchrun.heartbeat_interval=1",
        script="lightning_probe.py",
        multirun=True,
        env=env,
    )
    assert run.proc.returncode == 0, run.output
    job = run.out / "0"
    facts = [json.loads((job / f"lightning_rank{r}.json").read_text()) for r in range(4)]
    pids = {f["pid"] for f in facts}
    assert len(pids) == 4 and not pids & {f["ppid"] for f in facts}  # none spawned by a rank
    assert facts[0]["ppid"] == facts[1]["ppid"] and facts[2]["ppid"] == facts[3]["ppid"]
    for rank, f in enumerate(facts):
        assert f["cluster_env"] == "TorchElasticEnvironment" and not f["lightning_spawns"]
        assert (f["world_size"], f["global_rank"]) == (4, rank)
        assert f["env"]["RANK"] == str(rank) and f["env"]["WORLD_SIZE"] == "4"
        assert f["node_rank"] == int(f["env"]["GROUP_RANK"])
    assert {f["node_rank"] for f in facts} == {0, 1}
    assert facts[0]["log_dir"].startswith(str(job)) and facts[0]["ckpt_dir"].startswith(str(job))
    assert list((job / "checkpoints").glob("*.ckpt"))
    assert (job / "lightning_logs" / "version_0" / "metrics.csv").exists()
    # Node 0's heartbeat covers the other node's ranks too (published through the store).
    beats = [
        line
        for line in (job / "lightning_probe.log").read_text().splitlines()
        if "torchrun heartbeat:" in line
    ]
    assert any("torchrun heartbeat: 4/4 ranks alive [0-3]" in line for line in beats), beats
    # One Hydra job per node: a re-run of sys.argv by Lightning would have recorded more.
    assert sorted(r["task"] for r in run.records) == [0, 1]
    task0 = next(r for r in run.records if r["task"] == 0)
    assert task0["status"] == "COMPLETED"
    assert task0["value"] == facts[0]["metrics"] and "val_loss" in task0["value"]
    return time.monotonic() - start, facts


def stacks_cli(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``hydra-torchrun-summary --stacks ROOT`` as a user runs it from another shell."""
    return subprocess.run(
        [sys.executable, "-m", "hydra_torchrun_callback.summary", "--stacks", str(root), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stacks_on_two_nodes(
    tmp_path: Path, launcher: list[str], env: dict[str, str], stop: Any = None
) -> None:
    """Where is every rank of a hung 2-node job: on demand (the job goes on), then when it
    stops (rank 3 raises, or ``stop()``: scancel), in each rank's log and the summary."""
    from conftest import wait_started

    out = tmp_path / "multi"
    proc = start_app(
        tmp_path,
        "hydra.callbacks.torchrun.nproc_per_node=2",
        *launcher,
        "collective=false",
        "fail_rank=3",
        f"hydra.sweep.dir={out}",
        script="hang_app.py",
        multirun=True,
        env=env,
    )
    job = out / "0"
    try:
        wait_started(job, 4, proc)
        asked = time.monotonic()
        cli = stacks_cli(out, env)  # the sweep dir: it finds the running job in it
        answered = time.monotonic() - asked
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "4/4 rank(s) dumped, 2/2 node(s) answered" in cli.stdout, cli.stdout
        assert "ranks 0-2: wait_for_data (hang_app.py:" in cli.stdout, cli.stdout
        assert "rank 3: wait_for_release (hang_app.py:" in cli.stdout, cli.stdout
        assert answered < 12, answered  # a dump's wait is 3 s; the CLI gives up at 15 s
        assert proc.poll() is None  # asking did not stop anything
        if stop is None:
            (job / "release").touch()
        else:
            stop()
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output
    logs = {r: (job / f"hang_app_rank{r}.log").read_text() for r in range(4)}
    for rank, text in logs.items():
        assert f"stacks of rank {rank} (pid" in text and ", on request," in text, text
        assert "in prefetch_loop" in text  # every thread, not only the main one
    stopped = range(3) if stop is None else range(4)
    for rank in stopped:
        assert ", when the job stopped it," in logs[rank], logs[rank]
    assert not (job / ".torchrun_stacks").exists()  # node 0 cleaned up
    summary = json.loads((job / "torchrun_summary.json").read_text())
    rows = {row["rank"]: row for row in summary["ranks"]}
    if stop is not None:  # every node reported where its ranks were
        assert sorted(rows) == [0, 1, 2, 3], summary
        assert {row["node"] for row in rows.values()} == {0, 1}
        for rank in range(3):
            assert rows[rank]["stopped_in"].startswith("wait_for_data (hang_app.py:"), rows
        assert rows[3]["stopped_in"].startswith("wait_for_release (hang_app.py:"), rows
    else:
        assert rows[3]["root_cause"] and "data shard missing" in rows[3]["root_cause"]
        for rank in range(3):
            assert rows[rank]["stopped_in"].startswith("wait_for_data (hang_app.py:"), rows
            assert rows[rank]["frame"]["function"] == "wait_for_data"
        node_log = (job / "hang_app.log").read_text()
        assert "ranks 0-2: wait_for_data (hang_app.py:" in node_log, node_log
