"""torchrun parity, checked with torch's own launcher tests.

The scenarios of pytorch's ``test/distributed/launcher/test_run.py`` (formerly
``run_test.py``: the torchrun CLI) and ``test_api.py`` (``launch_agent``), run here as a
user runs them: ``python parity_app.py hydra/callbacks=torchrun ...``, a real Hydra app
whose ranks do what torch's ``bin/`` scripts do (see ``apps/parity_app.py``). Each test
names the torch case it mirrors.

Cases that do not apply to a Hydra task, and why:

- ``test_launch_user_script_bash`` / ``test_launch_user_script_default_nproc`` /
  ``test_launch_with_env_vars``' ``--no-python`` / ``--module`` and
  ``test_launch_run_path``: they choose how a *script* is started; here the Hydra task
  function is what runs (``hydra/launcher=torchrun`` refuses those keys: test_launcher).
- ``test_nproc_gpu_launch_configurations`` / ``..._xpu_...``: need accelerators (this
  machine has none; ``tests/test_cuda_results.py`` and ``scripts/gpu_check.sh`` cover GPUs).
- ``test_launch_elastic_agent_raise_exception``, ``test_launch_shutdown``,
  ``test_api.py``'s three cases: they patch torch's agent or rendezvous handler with
  mocks to see a call; we assert what a user sees instead (the signals variable in the
  workers, a failed job's exit code and root cause).
- ``test_is_not_torchelastic_launched``: a plain run of the task (no callback), below.
- ``test_virtual_local_rank``'s compiled-code comparison needs GPUs; the environment
  torch gives each worker (LOCAL_RANK=0, its own device visible) is checked here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import APPS, app_env, free_port, start_app

T = "hydra.callbacks.torchrun"
SCRIPT = str(APPS / "parity_app.py")
WORKER_ENV = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_NAME",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_ERROR_FILE",
    "OMP_NUM_THREADS",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


def torch_version() -> tuple[int, ...]:
    from importlib import metadata

    from hydra_torchrun_callback._support import _parse

    return _parse(metadata.version("torch"))


def command(out: Path, *overrides: str) -> list[str]:
    return [SCRIPT, "hydra/callbacks=torchrun", f"hydra.run.dir={out}", *overrides]


def run(
    tmp_path: Path, *overrides: str, env: dict[str, str] | None = None, name: str = "out"
) -> tuple[subprocess.CompletedProcess[str], dict[int, dict[str, Any]]]:
    """Run the app once; its exit and each rank's record (by RANK)."""
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, *command(out, *overrides)],
        cwd=tmp_path,
        env=app_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=240,
    )
    return proc, ranks(out)


def ranks(out: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def start(tmp_path: Path, name: str, *overrides: str, env: dict[str, str]) -> Any:
    """One agent's Hydra app in the background (a node of a hand-wired job)."""
    return start_app(
        tmp_path,
        f"hydra.run.dir={tmp_path / name}",
        *overrides,
        script="parity_app.py",
        env=app_env(**env),
    )


def finish(procs: list[Any]) -> list[str]:
    outputs = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        outputs.append(output)
        assert proc.returncode == 0, output[-4000:]
    return outputs


def test_worker_environment(tmp_path: Path) -> None:
    """test_launch_user_script_python (bin/test_script.py reads each variable)."""
    proc, seen = run(tmp_path, f"{T}.nproc_per_node=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(seen) == [0, 1]
    run_ids = set()
    for rank, record in seen.items():
        env = record["env"]
        missing = [k for k in WORKER_ENV if not env.get(k)]
        assert not missing, missing
        assert (env["LOCAL_RANK"], env["ROLE_RANK"], env["GROUP_RANK"]) == (
            str(rank),
            str(rank),
            "0",
        )
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["GROUP_WORLD_SIZE"]) == (
            "2",
            "2",
            "1",
        )
        assert env["ROLE_NAME"] == "default" and env["ROLE_WORLD_SIZE"] == "2"
        assert env["TORCHELASTIC_ERROR_FILE"].endswith(f"/{rank}/error.json")
        run_ids.add(env["TORCHELASTIC_RUN_ID"])
        if torch_version() >= (2, 10):  # torch's launch_agent exports it since 2.10
            assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
        assert record["is_torchelastic_launched"] is True  # test_is_torchelastic_launched
    assert len(run_ids) == 1


def test_is_not_torchelastic_launched(tmp_path: Path) -> None:
    """test_is_not_torchelastic_launched: the same task without the callback."""
    out = tmp_path / "plain"
    proc = subprocess.run(
        [sys.executable, SCRIPT, f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ranks(out)[-1]["is_torchelastic_launched"] is False


@pytest.mark.parametrize(
    ("nproc", "expected"),
    [("3", 3), ("auto", len(os.sched_getaffinity(0)))],
    ids=["number", "auto"],
)
def test_nproc_configurations(tmp_path: Path, nproc: str, expected: int) -> None:
    """test_nproc_launch_number_configurations / test_nproc_launch_auto_configurations
    (no accelerator here: auto is the CPUs this process may use)."""
    proc, seen = run(tmp_path, f"{T}.nproc_per_node={nproc}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(seen) == list(range(expected))


def test_nproc_unknown_configuration(tmp_path: Path) -> None:
    """test_nproc_launch_unknown_configurations: a clear error, and no worker started."""
    proc, seen = run(tmp_path, f"{T}.nproc_per_node=unknown")
    assert proc.returncode == 1
    assert f"{T}.nproc_per_node='unknown' is not valid" in proc.stderr
    assert seen == {}


def test_launch_elastic_single_agent(tmp_path: Path) -> None:
    """test_launch_elastic: nnodes 1:2 over c10d with one agent; the round closes at
    last_call_timeout with the one node there."""
    port = free_port()
    proc, seen = run(
        tmp_path,
        f"{T}.nnodes=1:2",
        f"{T}.nproc_per_node=2",
        f"{T}.rdzv_backend=c10d",
        f"{T}.rdzv_endpoint=localhost:{port}",
        f"{T}.rdzv_id=parity_single",
        f"{T}.rdzv_conf='join_timeout=60,last_call_timeout=1,timeout=60'",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(seen) == [0, 1]
    assert {r["env"]["WORLD_SIZE"] for r in seen.values()} == {"2"}


def test_launch_elastic_multiple_agents(tmp_path: Path) -> None:
    """test_launch_elastic_multiple_agents: two agents, one endpoint and rdzv_id."""
    port = free_port()
    common = (
        f"{T}.nnodes=1:2",
        f"{T}.nproc_per_node=2",
        f"{T}.rdzv_backend=c10d",
        f"{T}.rdzv_endpoint=localhost:{port}",
        f"{T}.rdzv_id=parity_two",
        f"{T}.rdzv_conf='join_timeout=60,last_call_timeout=5'",
    )
    procs = [start(tmp_path, f"node{i}", *common, env={}) for i in range(2)]
    finish(procs)
    seen = {**ranks(tmp_path / "node0"), **ranks(tmp_path / "node1")}
    assert sorted(seen) == [0, 1, 2, 3]
    assert {r["env"]["WORLD_SIZE"] for r in seen.values()} == {"4"}
    assert {r["env"]["GROUP_WORLD_SIZE"] for r in seen.values()} == {"2"}


def test_launch_standalone(tmp_path: Path) -> None:
    """test_launch_standalone."""
    proc, seen = run(tmp_path, f"{T}.standalone=true", f"{T}.nproc_per_node=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(seen) == [0, 1]


def test_init_method_env(tmp_path: Path) -> None:
    """test_init_method_env_with_torchelastic: init_process_group(init_method="env://")."""
    proc, seen = run(tmp_path, f"{T}.nproc_per_node=2", "init_method=env://")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [seen[r]["all_reduce"] for r in (0, 1)] == [[1.0, 1.0]] * 2


def test_init_method_tcp_on_static_master_port(tmp_path: Path) -> None:
    """test_init_method_tcp_with_torchelastic: under the static backend master_port is
    every worker's MASTER_PORT, so tcp://localhost:<master_port> works."""
    port = free_port()
    proc, seen = run(
        tmp_path,
        f"{T}.nproc_per_node=2",
        f"{T}.rdzv_backend=static",
        f"{T}.master_addr=localhost",
        f"{T}.master_port={port}",
        f"init_method=tcp://localhost:{port}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {r["env"]["MASTER_PORT"] for r in seen.values()} == {str(port)}
    assert [seen[r]["all_reduce"] for r in (0, 1)] == [[1.0, 1.0]] * 2


def test_worker_raise_exception(tmp_path: Path) -> None:
    """test_launch_elastic_worker_raise_exception: a ChildFailedError under torchrun; a
    failed job with the root cause here."""
    proc, seen = run(tmp_path, f"{T}.nproc_per_node=2", "fail=true", "fail_rank=1")
    assert proc.returncode == 1
    assert "RuntimeError: parity failure on rank 1" in proc.stderr
    assert 1 not in seen


@pytest.mark.parametrize("value", ["2:20:30", "3:2", "0", "a:b"])
def test_min_max_nodes_parse_errors(tmp_path: Path, value: str) -> None:
    """test_min_max_nodes_parse: what torch's parse_min_max_nnodes refuses, refused by
    the app with the option named, before any worker starts."""
    proc, seen = run(tmp_path, f"{T}.nnodes='{value}'")
    assert proc.returncode == 1
    assert f"{T}.nnodes='{value}' is not valid" in proc.stderr
    assert "MIN:MAX" in proc.stderr and seen == {}


def test_log_line_prefix_template(tmp_path: Path) -> None:
    """test_capture_logs_using_default_logs_specs: TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE
    prefixes each tee'd line."""
    proc, _ = run(
        tmp_path,
        f"{T}.nproc_per_node=2",
        f"{T}.redirects=3",
        f"{T}.tee=3",
        env={"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]: "},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        assert f"[rank{rank}]: creating {rank}" in proc.stdout + proc.stderr


def test_logs_specs_entry_point(tmp_path: Path) -> None:
    """test_is_torchelastic_launched_with_logs_spec_defined and
    test_logs_logs_spec_entrypoint_must_be_defined: a LogsSpecs class found through the
    ``torchrun.logs_specs`` entry points of an installed distribution (a real one, put
    on the path here); a name nobody registered is refused before any worker starts."""
    site = tmp_path / "site"
    dist = site / "parity_logs-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: parity-logs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[torchrun.logs_specs]\n"
        "parity = torch.distributed.elastic.multiprocessing:DefaultLogsSpecs\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([app_env()["PYTHONPATH"], str(site)])}
    proc, seen = run(tmp_path, f"{T}.nproc_per_node=2", f"{T}.logs_specs=parity", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(r["is_torchelastic_launched"] for r in seen.values()) and len(seen) == 2
    proc, seen = run(tmp_path, f"{T}.logs_specs=DOESNOT_EXIST", env=env, name="missing")
    assert proc.returncode == 1 and seen == {}
    assert f"{T}.logs_specs='DOESNOT_EXIST' is not valid" in proc.stderr
    assert re.search(r"installed: [^)]*parity", proc.stderr), proc.stderr


def test_signals_to_handle_reach_the_workers(tmp_path: Path) -> None:
    """test_api.py's test_launch_agent_sets_signals_env_var, seen from the workers."""
    signals = "SIGTERM,SIGUSR1,SIGUSR2"
    proc, seen = run(tmp_path, f"{T}.nproc_per_node=2", f"{T}.signals_to_handle='{signals}'")
    if torch_version() < (2, 10):
        assert proc.returncode == 1 and seen == {}
        assert "its torchrun has no signals_to_handle (it came in torch 2.10.0)" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {r["env"]["TORCHELASTIC_SIGNALS_TO_HANDLE"] for r in seen.values()} == {signals}


def test_virtual_local_rank(tmp_path: Path) -> None:
    """test_virtual_local_rank, without GPUs: every worker is local rank 0 and sees its
    own device as the only one (torch sets CUDA_VISIBLE_DEVICES to its local rank)."""
    proc, seen = run(tmp_path, f"{T}.nproc_per_node=2", f"{T}.virtual_local_rank=true")
    if torch_version() < (2, 10):
        assert proc.returncode == 1 and seen == {}
        assert "virtual_local_rank" in proc.stderr and "torch 2.10.0" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [seen[r]["env"]["LOCAL_RANK"] for r in (0, 1)] == ["0", "0"]
    assert [seen[r]["env"]["CUDA_VISIBLE_DEVICES"] for r in (0, 1)] == ["0", "1"]


def test_duplicate_stdout_filters(tmp_path: Path) -> None:
    """--duplicate-stdout-filters: matching lines of every rank's tee'd stdout also go
    to filtered_stdout.log in log_dir (torch filters the tee'd stream, so tee is set)."""
    logs = tmp_path / "logs"
    proc, _ = run(
        tmp_path,
        f"{T}.nproc_per_node=2",
        f"{T}.tee=3",  # torch duplicates the tee'd stream
        f"{T}.log_dir={logs}",
        f"{T}.duplicate_stdout_filters=[creating]",
    )
    if torch_version() < (2, 10):
        assert proc.returncode == 1
        assert "duplicate_stdout_filters" in proc.stderr and "torch 2.10.0" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-4000:]
    (filtered,) = logs.glob("*/attempt_0/filtered_stdout.log")
    lines = filtered.read_text().splitlines()
    for rank in (0, 1):  # each line once, with torch's rank prefix
        assert sum(line.endswith(f"creating {rank}") for line in lines) == 1, lines
    assert len(lines) == 2, lines


# -- PET_* environment, as Kubeflow's training operator sets it up for a PyTorchJob pod --


def test_pet_kubeflow_static_pods(tmp_path: Path) -> None:
    """Two "pods" set up as a PyTorchJob's: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK
    with the master's address and port (MASTER_* and PET_MASTER_*), no option given:
    torchrun's static rendezvous, node ranks from the pods."""
    port = free_port()
    pod = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
    }
    procs = [
        start(tmp_path, f"pod{i}", env={**pod, "PET_NODE_RANK": str(i), "RANK": str(i)})
        for i in range(2)
    ]
    finish(procs)
    for i in range(2):
        (record,) = ranks(tmp_path / f"pod{i}").values()
        env = record["env"]
        assert (env["RANK"], env["GROUP_RANK"], env["WORLD_SIZE"]) == (str(i), str(i), "2")
        assert env["MASTER_PORT"] == str(port)


def test_pet_kubeflow_elastic_pods(tmp_path: Path) -> None:
    """An elastic PyTorchJob: PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID, PET_NNODES
    MIN:MAX and PET_MAX_RESTARTS."""
    port = free_port()
    pod = {
        "PET_NNODES": "1:2",
        "PET_NPROC_PER_NODE": "1",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": f"localhost:{port}",
        "PET_RDZV_ID": "parity_kubeflow",
        "PET_MAX_RESTARTS": "3",
        "PET_RDZV_CONF": "last_call_timeout=5",
    }
    finish([start(tmp_path, f"pod{i}", env=pod) for i in range(2)])
    seen = {**ranks(tmp_path / "pod0"), **ranks(tmp_path / "pod1")}
    assert sorted(seen) == [0, 1]
    assert {r["env"]["TORCHELASTIC_MAX_RESTARTS"] for r in seen.values()} == {"3"}
    assert {r["env"]["TORCHELASTIC_RUN_ID"] for r in seen.values()} == {"parity_kubeflow"}


def test_pet_precedence(tmp_path: Path) -> None:
    """The user's option beats PET_*, which beats the package's default (a worker per
    GPU, one here)."""
    proc, seen = run(tmp_path, env={"PET_NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(seen) == [0, 1]
    proc, seen = run(
        tmp_path, f"{T}.nproc_per_node=1", env={"PET_NPROC_PER_NODE": "2"}, name="mine"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(seen) == [0]


def test_bad_pet_value_names_the_variable(tmp_path: Path) -> None:
    proc, seen = run(tmp_path, env={"PET_MAX_RESTARTS": "many"})
    assert proc.returncode == 1 and seen == {}
    assert "PET_MAX_RESTARTS='many'" in proc.stderr
    assert "unset PET_MAX_RESTARTS" in proc.stderr


def test_pet_contradicting_a_submitit_placement_is_refused(tmp_path: Path) -> None:
    """Two emulated nodes (submitit_local, 2 tasks) with PET_NNODES=3: refused, naming
    the variable and the placement; the job never re-placed."""
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "-m",
            "hydra/callbacks=torchrun",
            "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=3",
            f"hydra.sweep.dir={out}",
        ],
        cwd=tmp_path,
        env=app_env(PET_NNODES="3"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1
    text = proc.stdout + proc.stderr
    assert "PET_NNODES='3' contradicts the submitit placement of this job (2 tasks" in text
    assert "unset PET_NNODES" in text
    assert not list(out.rglob("rank*.json"))


@pytest.mark.skipif(torch_version() < (2, 12), reason="these options need torch >= 2.12")
def test_options_reach_torchs_launch_config() -> None:
    """What cannot run here reaches torch as torchrun's config_from_args passes it:
    numa_binding needs GPUs (this machine has none), shutdown_timeout and the events
    handler act only on stops and events. Checked on the LaunchConfig we build."""
    from torch.numa.binding import AffinityMode

    from hydra_torchrun_callback._node.agent import _launch_config
    from hydra_torchrun_callback._node.placement import resolve_placement
    from hydra_torchrun_callback._options import parse_options

    opts = parse_options(
        {
            "numa_binding": "socket",
            "shutdown_timeout": 7,
            "event_log_handler": "console",
            "duplicate_stderr_filters": ["oom"],
            "virtual_local_rank": True,
        }
    )
    config = _launch_config(opts, resolve_placement(opts, {}, 2), "/nonexistent")
    assert config.numa_options.affinity_mode == AffinityMode.SOCKET
    assert (config.shutdown_timeout, config.event_log_handler) == (7, "console")
    assert (config.duplicate_stderr_filters, config.virtual_local_rank) == (["oom"], True)
    assert config.signals_to_handle == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
