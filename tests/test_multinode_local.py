"""Multi-node under submitit_local emulation: each local task is one torchrun node."""

from __future__ import annotations

import time
from pathlib import Path

import multinode_scenarios as sc
from conftest import app_env

LOCAL = [
    "hydra/launcher=submitit_local",
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.timeout_min=60",
]


def test_two_point_sweep(tmp_path: Path) -> None:
    sc.two_point_sweep(tmp_path, LOCAL, app_env())


def test_failure_on_second_node(tmp_path: Path) -> None:
    sc.failure_on_node_1(tmp_path, LOCAL, app_env())


def test_preempted_and_requeued(tmp_path: Path) -> None:
    sc.preempted_and_requeued(tmp_path, LOCAL, app_env(), sc.signal_agents)


def test_preemption_grace_is_an_option(tmp_path: Path) -> None:
    """Workers whose checkpoint takes 20 s, with preemption_grace=2: the agent stops them
    (SIGTERM) after 2 s and the job is requeued; the requeued job completes."""
    start = time.monotonic()
    sc.preempted_and_requeued(
        tmp_path,
        LOCAL,
        app_env(),
        sc.signal_agents,
        "hydra.callbacks.torchrun.preemption_grace=2",
        "+checkpoint_s=20",
        checkpointed=False,
    )
    assert time.monotonic() - start < 60


def test_preemption_reaches_forkserver_workers(tmp_path: Path) -> None:
    """forkserver workers are not the agent's children (the server's): the signal still
    reaches them, by the pids they recorded."""
    forkserver = [*LOCAL, "hydra.callbacks.torchrun.start_method=forkserver"]
    sc.preempted_and_requeued(tmp_path, forkserver, app_env(), sc.signal_agents)


def test_lightning_on_two_emulated_nodes(tmp_path: Path) -> None:
    sc.lightning_two_nodes(tmp_path, LOCAL, app_env())


def test_stacks_of_every_rank_on_two_nodes(tmp_path: Path) -> None:
    sc.stacks_on_two_nodes(tmp_path, LOCAL, app_env())


def test_only_node_0_writes_the_shared_files(tmp_path: Path) -> None:
    """Nodes share one output dir (NFS): node 1 logs to its own file, never to node 0's."""
    from conftest import run_app

    run = run_app(tmp_path, *LOCAL, multirun=True, timeout=300)
    assert run.proc.returncode == 0, run.output
    job = run.out / "0"
    shared, own = (job / "probe_app.log").read_text(), (job / "probe_app_node1.log").read_text()
    assert "node 0/2" in shared and "node 1/2" not in shared
    assert "node 1/2" in own and "node 0/2" not in own
    assert (job / ".hydra" / "config.yaml").is_file()


def test_each_node_composes_its_own_files(tmp_path: Path) -> None:
    """The overrides the callback adds for submitit, as node 1 resolves them."""
    import subprocess
    import sys

    code = """
import os
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
import hydra_torchrun_callback._callback.per_node as pn
with initialize_config_dir(config_dir=os.environ["CONF"], version_base=None):
    cfg = compose("probe", return_hydra_config=True, overrides=[
        "hydra/launcher=submitit_local", "hydra.mode=MULTIRUN"])
    pn.prepare_multirun(cfg)
    given = OmegaConf.to_container(cfg.hydra.overrides.hydra, resolve=False)
    extra = [o for o in given if "torchrun" in o]
    node = compose("probe", return_hydra_config=True, overrides=extra)
    OmegaConf.update(node, "hydra.runtime.output_dir", "/out", force_add=True)
    print(repr(node.hydra.output_subdir), node.hydra.job_logging.handlers.file.filename)
"""
    from conftest import APPS

    env = {**app_env(), "CONF": str(APPS / "conf")}
    for globalid, expected in (("0", "'.hydra' "), ("1", "None ")):
        env.update(
            SUBMITIT_LOCAL_JOB_ID="9", SUBMITIT_LOCAL_GLOBALID=globalid, SUBMITIT_LOCAL_NTASKS="2"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(expected), out.stdout
        assert out.stdout.strip().endswith(".log" if globalid == "0" else "_node1.log")


def test_nodes_agree_on_one_output_dir_with_now(tmp_path: Path) -> None:
    """Two tasks started by hand (as plain srun does) resolve ``${now:...%f}`` in
    hydra.run.dir at different times: node 1 works in node 0's dir and removes its own."""
    import json
    import time
    import uuid

    from conftest import start_app

    procs = []
    job = uuid.uuid4().hex[:8]
    for node in (0, 1):
        env = {
            **app_env(),
            "SUBMITIT_LOCAL_JOB_ID": job,
            "SUBMITIT_LOCAL_GLOBALID": str(node),
            "SUBMITIT_LOCAL_NTASKS": "2",
        }
        procs.append(
            start_app(
                tmp_path,
                f"hydra.run.dir={tmp_path}/out/${{now:%H-%M-%S-%f}}",
                env=env,
                stderr=None,  # to the test's own stderr, as before: only stdout is piped
            )
        )
        time.sleep(0.5)  # node 1 starts later: its ${now:} differs
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    (only,) = list((tmp_path / "out").iterdir())  # node 1's own dir is gone
    ranks = [json.loads(p.read_text()) for p in only.glob("rank*.json")]
    assert sorted(r["env"]["RANK"] for r in ranks) == ["0", "1"]
    assert {r["output_dir"] for r in ranks} == {str(only)}
    assert "node 1/2" in (only / "probe_app_node1.log").read_text()
    assert "works in node 0's output dir" in (only / "probe_app_node1.log").read_text()
    assert "node 1/2" not in (only / "probe_app.log").read_text()
