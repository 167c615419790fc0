"""The multi-node scenarios on a real SLURM cluster that these tests start and stop.

One slurmctld + two slurmd (Debian's slurm-wlm) under a temp dir, loopback only, set up
like a GPU site: munge, slurmdbd over MariaDB (real sacct), task/affinity CPU binding and
2 fake GPUs per node (see hydra_torchrun_callback.slurm_sandbox). `.ci/run` installs the
packages and sets HTR_REQUIRE_SLURM=1, so in CI a missing cluster is a failure, not a skip.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hydra_torchrun_callback.slurm_sandbox import SlurmSandbox

import multinode_scenarios as sc
from conftest import app_env, left_behind, run_app, slurm_sandbox_or_skip

SLURM = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.nodes=2",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=60",
]
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmSandbox]:
    sandbox: SlurmSandbox = slurm_sandbox_or_skip(tmp_path_factory, nodes=2)
    start = time.monotonic()
    sandbox.start()
    TIMINGS["cluster start"] = time.monotonic() - start
    try:
        yield sandbox
    finally:
        start = time.monotonic()
        sandbox.stop()
        TIMINGS["cluster stop"] = time.monotonic() - start
        print(
            "\nSLURM sandbox timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items())
        )


def _env(cluster: SlurmSandbox) -> dict[str, str]:
    return app_env(**cluster.env())


def test_cluster_is_real(cluster: SlurmSandbox) -> None:
    out = subprocess.run(
        ["srun", "-N2", "-n2", "hostname"],
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sorted(out.stdout.split()) == ["n1", "n2"], out.stderr


def test_site_features_are_real(cluster: SlurmSandbox, tmp_path: Path) -> None:
    """munge auth, GPUs from gres.conf, CPU binding by task/affinity, jobs in sacct."""
    env = _env(cluster)
    task = r"\$(hostname) \$SLURM_LOCALID \$CUDA_VISIBLE_DEVICES \$SLURM_GPUS_ON_NODE"
    cpus = r"\$(grep Cpus_allowed_list /proc/self/status | cut -f2)"
    script = f'srun sh -c "echo {task} {cpus}"'  # \$: expanded by each task, not the batch
    job = subprocess.run(
        [
            *("sbatch", "--parsable", "-N2", "--ntasks-per-node=2", "--gpus-per-node=2"),
            *("--cpus-per-task=1", f"--output={tmp_path}/out", "--wrap", script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert job.returncode == 0, job.stderr
    job_id, deadline = job.stdout.strip(), time.monotonic() + 120
    squeue = ["squeue", "-h", "-j", job_id, "-o", "%T"]
    while subprocess.run(squeue, env=env, capture_output=True, text=True, timeout=30).stdout:
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.2)
    rows = sorted(tuple(line.split()) for line in (tmp_path / "out").read_text().splitlines())
    assert [r[:4] for r in rows] == [
        ("n1", "0", "0,1", "2"),
        ("n1", "1", "0,1", "2"),
        ("n2", "0", "0,1", "2"),
        ("n2", "1", "0,1", "2"),
    ], rows
    for node in ("n1", "n2"):  # the two tasks of a node were bound to different CPUs
        assert len({r[4] for r in rows if r[0] == node}) == 2, rows
    deadline = time.monotonic() + 30
    while True:  # slurmctld reports to slurmdbd asynchronously
        acct = subprocess.run(
            ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        done = f"{job_id}|COMPLETED|n[1-2]" in acct.stdout.splitlines()
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done, acct


def test_two_point_sweep_on_two_nodes(cluster: SlurmSandbox, tmp_path: Path) -> None:
    TIMINGS["2-node 2-point sweep"] = sc.two_point_sweep(tmp_path, SLURM, _env(cluster))
    hosts = {
        f["host"]
        for f in (tmp_path / "multi" / "0").glob("rank*.json")
        for f in [__import__("json").loads(f.read_text())]
    }
    assert hosts == {"n1", "n2"}  # every rank ran on its own SLURM node


def test_lightning_on_two_nodes(cluster: SlurmSandbox, tmp_path: Path) -> None:
    """Under SLURM Lightning could pick SLURMEnvironment (1 task per node, so world size 2);
    it must take torchrun's (world size 4) and agree with the callback."""
    TIMINGS["Lightning fit, 2 nodes x 2"], facts = sc.lightning_two_nodes(
        tmp_path, SLURM, _env(cluster)
    )
    assert {f["env"]["SLURM_NTASKS"] for f in facts} == {"2"}  # SLURM's view was there
    assert {f["world_size"] for f in facts} == {4}
    assert [f["host"] for f in facts] == ["n1", "n1", "n2", "n2"]


def test_failure_on_second_node(cluster: SlurmSandbox, tmp_path: Path) -> None:
    TIMINGS["failure: raise -> job returned"] = sc.failure_on_node_1(tmp_path, SLURM, _env(cluster))


def test_signalled_job_is_requeued_and_finishes(cluster: SlurmSandbox, tmp_path: Path) -> None:
    env = _env(cluster)

    def scancel_usr2(agents: set[int]) -> None:
        jobs = subprocess.run(
            ["squeue", "-h", "-t", "R", "-o", "%i"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        assert jobs, "no running job to signal"
        for job in jobs:
            subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True, timeout=30)
        # The requeued job runs again once its old credential expires (the sandbox's
        # cred_expire=10; Slurm's default is 120 s).

    TIMINGS["USR2 -> requeue -> done"] = sc.preempted_and_requeued(
        tmp_path, SLURM, env, scancel_usr2
    )


def test_hello_dist_on_two_nodes(cluster: SlurmSandbox, tmp_path: Path) -> None:
    from conftest import REPO

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "slurm_examples" / "hello_dist.py"),
            "-m",
            *SLURM,
            "hydra/callbacks=torchrun",
            "hydra.callbacks.torchrun.nproc_per_node=2",
            f"hydra.sweep.dir={tmp_path}/m",
        ],
        cwd=tmp_path,
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = "".join(p.read_text() for p in (tmp_path / "m" / ".submitit").rglob("*_log.out"))
    for rank in range(4):
        assert f"[Rank {rank}/4] Hello from distributed PyTorch!" in logs
    assert "Node: n1" in logs and "Node: n2" in logs
    assert "[Rank 0] ✓ Collective operation successful!" in logs


def test_scancel_leaves_nothing_behind(cluster: SlurmSandbox, tmp_path: Path) -> None:
    """Fault 5 on the cluster: scancel stops every node's agent and workers."""
    import uuid

    from conftest import processes_with_tag, start_app, wait_started

    tag = uuid.uuid4().hex
    env = {**_env(cluster), "HTR_TEST_TAG": tag}
    out = tmp_path / "m"
    proc = start_app(
        tmp_path,
        *SLURM,
        "hydra/callbacks=torchrun",  # after the launcher's overrides, as the test always had it
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "sleep_before=600",
        f"hydra.sweep.dir={out}",
        multirun=True,
        callback=None,
        env=env,
    )
    try:
        started = wait_started(out / "0", 4, proc)
        assert len(processes_with_tag(tag)) >= 5  # client + 2 agents + 4 workers (+ steps)
        jobs = subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30
        ).stdout.split()
        sent = time.monotonic()
        for job in jobs:
            subprocess.run(["scancel", job], env=env, check=True, timeout=30)
        proc.communicate(timeout=120)
        TIMINGS["scancel -> sweep returned"] = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert left_behind(tag) == []
    assert len(started) == 4


def test_stacks_of_every_rank_on_the_cluster(cluster: SlurmSandbox, tmp_path: Path) -> None:
    """hydra-torchrun-summary --stacks reaches both nodes; scancel dumps every rank."""
    env = _env(cluster)

    def scancel() -> None:
        jobs = subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30
        ).stdout.split()
        for job in jobs:
            subprocess.run(["scancel", job], env=env, check=True, timeout=30)

    start = time.monotonic()
    sc.stacks_on_two_nodes(tmp_path, SLURM, env, stop=scancel)
    TIMINGS["stacks on demand + scancel"] = time.monotonic() - start


def _gpu_of(record: dict[str, Any]) -> tuple[str, str]:
    """(host, physical GPU) a worker binds with the usual ``cuda:LOCAL_RANK``."""
    env = record["env"]
    visible = (env["CUDA_VISIBLE_DEVICES"] or "").split(",")
    return record["host"], visible[int(env["LOCAL_RANK"])]


# The sandbox's nodes have 2 fake GPUs each (gres.conf over null devices), so SLURM itself
# sets CUDA_VISIBLE_DEVICES / SLURM_GPUS_ON_NODE; the CPU build of torch cannot use them,
# so the probe runs gloo and we check which GPU each worker would bind (cuda:LOCAL_RANK).
@pytest.mark.parametrize(
    ("layout", "tasks_on_host"),
    [
        # The everyday idiom: one task per GPU.
        (["hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=2"], 2),
        # The same, nproc_per_node given as torchrun counts it (per node).
        (
            [
                "hydra.launcher.tasks_per_node=2",
                "hydra.launcher.gpus_per_node=2",
                "hydra.callbacks.torchrun.nproc_per_node=2",
            ],
            2,
        ),
        # One task per node, the agent starts one worker per GPU.
        (["hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=2"], 1),
        # SLURM binds one GPU to each task: each task sees only its own.
        (["hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_task=1"], 2),
    ],
    ids=["tasks=gpus", "tasks=gpus,nproc=2", "one-task", "gpus_per_task"],
)
def test_one_worker_per_allocated_gpu(
    cluster: SlurmSandbox, tmp_path: Path, layout: list[str], tasks_on_host: int
) -> None:
    run = run_app(
        tmp_path,
        *[o for o in SLURM if "tasks_per_node" not in o],
        *layout,
        "collective=true",
        multirun=True,
        env=_env(cluster),
        timeout=300,
    )
    assert run.proc.returncode == 0, run.output
    ranks = list(run.rank_files(run.out / "0").values())
    assert len(ranks) == 4 and {r["env"]["WORLD_SIZE"] for r in ranks} == {"4"}
    assert {r["sum"] for r in ranks} == {0 + 1 + 2 + 3}
    gpus = [_gpu_of(r) for r in ranks]
    assert sorted(gpus) == [("n1", "0"), ("n1", "1"), ("n2", "0"), ("n2", "1")], gpus
    for host in ("n1", "n2"):
        here = [r for r in ranks if r["host"] == host]
        assert len({r["env"]["SLURM_LOCALID"] for r in here}) == tasks_on_host
        if tasks_on_host == 2:
            # task/affinity: the two tasks of a node were bound to different CPUs.
            assert not set(here[0]["cpus"]) & set(here[1]["cpus"]), here
        else:  # two workers share the task's CPUs: OMP_NUM_THREADS is each one's share
            share = max(len(here[0]["cpus"]) // 2, 1)
            assert {r["env"]["OMP_NUM_THREADS"] for r in here} == {str(share)}, here


def test_layout_that_cannot_be_served_fails_before_workers(
    cluster: SlurmSandbox, tmp_path: Path
) -> None:
    """4 workers on a node with 2 GPUs: refused on every node, naming the options."""
    run = run_app(
        tmp_path,
        *[o for o in SLURM if "tasks_per_node" not in o],
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.gpus_per_node=2",
        "hydra.callbacks.torchrun.nproc_per_node=4",
        multirun=True,
        env=_env(cluster),
        timeout=300,
    )
    assert run.proc.returncode != 0
    assert "nproc_per_node" in run.output and "two workers would share a GPU" in run.output
    assert not list(run.out.rglob("started_rank*.json"))  # no worker ever started


def test_two_steps_of_one_allocation_never_share_a_rendezvous(
    cluster: SlurmSandbox, tmp_path: Path
) -> None:
    """Plain srun in a batch script: two 2-node steps at once (before: both took one port
    and one rdzv id; one failed with EADDRINUSE while its worker ran in the other job).
    Each step's nodes also agree on one output dir though ``${now:}`` is in it."""
    import json

    from conftest import APPS

    app = f"{sys.executable} {APPS / 'probe_app.py'} hydra/callbacks=torchrun"
    script = tmp_path / "two_steps.sh"
    script.write_text(
        "#!/bin/bash\n"
        # ${now:} in the run dir: each node resolves it at its own time; they must agree.
        f"srun -N2 -n2 --overlap {app} 'hydra.run.dir={tmp_path}/a/${{now:%H-%M-%S-%f}}' &\n"
        f"srun -N2 -n2 --overlap {app} 'hydra.run.dir={tmp_path}/b/${{now:%H-%M-%S-%f}}' &\n"
        "wait -n && wait -n\n"
    )
    proc = subprocess.run(
        ["sbatch", "--wait", "-N2", "-o", str(tmp_path / "job.out"), str(script)],
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log
    runs = {}
    for step in ("a", "b"):
        (job_dir,) = list((tmp_path / step).iterdir())  # one output dir for both nodes
        ranks = [json.loads(p.read_text()) for p in job_dir.glob("rank*.json")]
        assert sorted(r["host"] for r in ranks) == ["n1", "n2"], log
        assert {r["env"]["WORLD_SIZE"] for r in ranks} == {"2"}
        (runs[step],) = {r["env"]["TORCHELASTIC_RUN_ID"] for r in ranks}
    assert runs["a"] != runs["b"]  # job<id>.s0 and job<id>.s1
