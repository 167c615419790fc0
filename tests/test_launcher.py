"""Drop-in for hydra-torchrun-launcher: ``-m hydra/launcher=torchrun`` with its keys."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from hydra_torchrun_callback._callback.launcher import launcher_options
from hydra_torchrun_callback._options import TorchrunOptionError

LAUNCHER = "hydra/launcher=torchrun"

#: The config block of hydra-torchrun-launcher's README, as users copied it.
SEED_BLOCK = """
hydra:
  launcher:
    _target_: hydra_plugins.hydra_torchrun_launcher.distributed_launcher.TorchDistributedLauncher
    nnodes: '1:1'
    nproc_per_node: '2'
    rdzv_backend: static
    rdzv_endpoint: ''
    rdzv_id: none
    rdzv_conf: ''
    standalone: false
    max_restarts: 0
    monitor_interval: 5
    start_method: spawn # Support start_method=spawn, required by CUDA
    role: default
    module: false
    no_python: false
    run_path: false
    log_dir: null
    redirects: '0'
    tee: '0'
    node_rank: 0
    master_addr: '127.0.0.1'
    master_port: 29500
    local_addr: null
    training_script: ''
    training_script_args: [ ]
"""


def test_seed_command_runs_each_job_under_torchrun(app) -> None:
    """`python app.py -m hydra/launcher=torchrun hydra.launcher.nproc_per_node=N` (seed 000)."""
    run = app("hydra.launcher.nproc_per_node=2", "fail_rank=-1,1", multirun=True, callback=LAUNCHER)
    assert run.proc.returncode == 1  # job 1 fails; Hydra reports it after the sweep
    ok, failed = sorted(run.records, key=lambda r: r["output_dir"])
    # The app's own callbacks still run, in the Hydra process, around each job.
    assert ok["status"] == "COMPLETED" and ok["value"]["rank"] == 0
    assert ok["hydra_pid"] != ok["value"]["pid"]
    files = run.rank_files(run.out / "0")
    assert sorted(files) == ["rank0.a0.json", "rank1.a0.json"]
    assert {f["env"]["WORLD_SIZE"] for f in files.values()} == {"2"}
    assert ok["value"]["pid"] == files["rank0.a0.json"]["pid"]
    assert failed["status"] == "FAILED"
    assert "rank 1" in failed["error"] and "ValueError: probe failure" in failed["error"]
    for job in ("0", "1"):
        assert json.loads((run.out / job / "torchrun_summary.json").read_text())["ranks"]
    assert ok["leaked_env"]["RANK"] is None and not ok["pg_initialized"]


def test_seed_readme_config_block_works(tmp_path: Path, app) -> None:
    """A config carrying that launcher's README block, its `_target_` included."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "seed.yaml").write_text(
        "defaults:\n  - probe\n  - override hydra/launcher: torchrun\n  - _self_\n"
        + textwrap.dedent(SEED_BLOCK)
    )
    run = app(
        "log_lines=2",
        flags=(f"--config-dir={conf}", "--config-name=seed"),
        multirun=True,
        callback=None,
    )
    assert run.proc.returncode == 0, run.output
    [job] = run.records
    assert job["status"] == "COMPLETED" and job["value"]["sum"] == 1
    files = run.rank_files(run.out / "0")
    assert sorted(files) == ["rank0.a0.json", "rank1.a0.json"]
    # Its default static rendezvous on 29500 became a free port, as on one machine it can.
    assert {f["env"]["MASTER_PORT"] for f in files.values()} != {"29500"}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("hydra.launcher.training_script=train.py", "hydra.launcher.training_script='train.py'"),
        ("hydra.launcher.module=true", "hydra.launcher.module=True"),
        ("hydra.launcher.nproc_per_node=zero", "hydra.launcher.nproc_per_node='zero'"),
        ("hydra.launcher.start_method=thread", "hydra.launcher.start_method='thread'"),
    ],
)
def test_bad_launcher_values_refused_before_any_job(app, override: str, named: str) -> None:
    run = app(override, multirun=True, callback=LAUNCHER)
    assert run.proc.returncode == 1
    assert named in run.output, run.output
    assert "Fix:" in run.output
    assert run.records == [] and not list(run.out.glob("*/rank*.json"))


def test_launcher_and_callback_together_refused(app) -> None:
    run = app("hydra/callbacks=torchrun", multirun=True, callback=LAUNCHER)
    assert run.proc.returncode == 1
    assert "both ask to run the task under torchrun" in run.output
    assert run.records == []


def test_key_mapping() -> None:
    # That launcher's defaults: let the callback decide (free port, fast monitoring).
    assert launcher_options(
        {
            "nnodes": "1:1",
            "nproc_per_node": "4",
            "rdzv_backend": "static",
            "rdzv_id": "none",
            "monitor_interval": 5,
            "node_rank": 0,
            "master_addr": "127.0.0.1",
            "master_port": 29500,
            "module": False,
            "training_script_args": [],
        }
    ) == {
        "nnodes": None,
        "nproc_per_node": "4",
        "rdzv_backend": "c10d",
        "rdzv_id": None,
        "node_rank": None,
        "master_addr": None,
        "master_port": None,
    }
    # Anything set on purpose is kept, e.g. a manual two-node static rendezvous.
    manual = {
        "nnodes": "2",
        "node_rank": 1,
        "rdzv_backend": "static",
        "master_addr": "10.0.0.1",
        "master_port": 29600,
        "monitor_interval": 1,
    }
    assert launcher_options(manual) == manual
    with pytest.raises(TorchrunOptionError, match=r"hydra\.launcher\.max_restarts=-1"):
        launcher_options({"max_restarts": -1})
