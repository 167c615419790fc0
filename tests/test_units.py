"""Pure parts: option parsing, placement, per-rank logging config, call diversion."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from hydra_torchrun_callback import TorchrunConf, TorchrunOptionError
from hydra_torchrun_callback._callback.divert import DivertError, Outcome, divert
from hydra_torchrun_callback._node.placement import (
    HostShare,
    host_share,
    plan_workers,
    resolve_placement,
)
from hydra_torchrun_callback._node.warm import fork_verdict
from hydra_torchrun_callback._options import parse_options
from hydra_torchrun_callback._worker.entry import rank_logging_config

GOLDEN = Path(__file__).parent / "golden"


def test_defaults_match_golden_yaml() -> None:
    """The option surface users see in `--cfg hydra` (update the golden file on purpose)."""
    rendered = OmegaConf.to_yaml(OmegaConf.structured(TorchrunConf))
    assert rendered == (GOLDEN / "torchrun_defaults.yaml").read_text()


def test_nnodes_forms() -> None:
    assert parse_options({"nnodes": "2"}).max_nodes == 2
    opts = parse_options({"nnodes": "1:4"})
    assert (opts.min_nodes, opts.max_nodes) == (1, 4)
    with pytest.raises(TorchrunOptionError, match="nnodes='3:1'"):
        parse_options({"nnodes": "3:1"})


@pytest.mark.parametrize(
    ("spec", "gpus", "cpus", "expected"),
    [
        (None, 0, 8, 1),
        (None, 4, 8, 4),
        ("auto", 0, 8, 8),
        ("auto", 2, 8, 2),
        ("cpu", 2, 8, 8),
        ("gpu", 2, 8, 2),
        ("3", 0, 8, 3),
    ],
)
def test_nproc_resolution(spec: str | None, gpus: int, cpus: int, expected: int) -> None:
    """Unset: one per GPU, one without GPUs, never one per core (GPU counts given, not probed)."""
    plan = plan_workers(spec, HostShare(1, 0, gpus, None), cpus)
    assert (plan.nproc, plan.local_offset, plan.local_world_size) == (expected, 0, expected)
    assert plan.threads == max(cpus // expected, 1)


def test_nproc_gpu_without_gpu() -> None:
    with pytest.raises(TorchrunOptionError, match="needs a visible CUDA device"):
        plan_workers("gpu", HostShare(1, 0, 0, None), 8)


def _slurm_task(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """A task's variables as Slurm 22.05 sets them for ``-N2 --ntasks-per-node=2``."""
    return {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        **extra,
    }


@pytest.mark.parametrize(
    ("spec", "gpu_env", "expected"),
    [
        # --gpus-per-node=2, both tasks of a node see both GPUs: one each, LOCAL_RANK host-wide.
        (None, {"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, [(1, 0, 2), (1, 1, 2)]),
        ("2", {"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, [(1, 0, 2), (1, 1, 2)]),
        # 4 GPUs a node, 2 tasks: two workers each.
        (
            "gpu",
            {"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
            [(2, 0, 4), (2, 2, 4)],
        ),
        # --gpus-per-task=1: each task sees only its own GPU, LOCAL_RANK counts within it.
        (None, {"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0"}, [(1, 0, 1), (1, 0, 1)]),
        # No GPUs: one worker per task, LOCAL_RANK host-wide as torchrun gives it on a host.
        (None, {}, [(1, 0, 2), (1, 1, 2)]),
        ("4", {}, [(2, 0, 4), (2, 2, 4)]),
    ],
)
def test_layouts_split_the_host_among_its_tasks(
    spec: str | None, gpu_env: dict[str, str], expected: list[tuple[int, int, int]]
) -> None:
    from hydra_torchrun_callback._node.placement import detect_cluster

    got = []
    for localid in (0, 1):
        env = _slurm_task(2 + localid, localid, 1, **gpu_env)
        plan = plan_workers(spec, host_share(env, detect_cluster(env)), cpus=4)
        got.append((plan.nproc, plan.local_offset, plan.local_world_size))
    assert got == expected


@pytest.mark.parametrize(
    ("spec", "gpu_env", "message"),
    [
        # 3 tasks on a node with 2 GPUs: someone would share a GPU.
        (None, {"SLURM_GPUS_ON_NODE": "2"}, "cannot be split evenly among the tasks"),
        ("4", {"SLURM_GPUS_ON_NODE": "6"}, "cannot be split evenly among them"),
        ("6", {"SLURM_GPUS_ON_NODE": "3"}, "two workers would share a GPU"),
        ("gpu", {}, "needs a visible CUDA device"),
    ],
)
def test_layouts_that_cannot_be_served_are_refused(
    spec: str | None, gpu_env: dict[str, str], message: str
) -> None:
    from hydra_torchrun_callback._node.placement import detect_cluster

    env = _slurm_task(0, 0, 0, **{**gpu_env, "SLURM_STEP_TASKS_PER_NODE": "3"})
    with pytest.raises(TorchrunOptionError, match=message) as err:
        plan_workers(spec, host_share(env, detect_cluster(env)), cpus=4)
    assert "nproc_per_node" in str(err.value)


def test_tasks_per_node_lists() -> None:
    from hydra_torchrun_callback._node.placement import tasks_on_node

    assert [tasks_on_node("2(x3),1", i) for i in range(5)] == [2, 2, 2, 1, None]
    assert tasks_on_node("4", 0) == 4
    assert tasks_on_node("junk", 0) is None


def test_cpu_threads_are_the_task_share() -> None:
    """8 CPUs bound to a task running 2 workers: 4 threads each (OMP_NUM_THREADS)."""
    plan = plan_workers("2", HostShare(1, 0, 0, None), cpus=8)
    assert plan.threads == 4
    assert plan_workers("4", HostShare(1, 0, 0, None), cpus=2).threads == 1


def test_std_and_rdzv_conf_forms() -> None:
    opts = parse_options({"redirects": "0:3,1:1", "tee": 2, "rdzv_conf": "timeout=60,x=y"})
    assert opts.redirects == {0: 3, 1: 1} and opts.tee == 2
    assert opts.rdzv_configs == {"timeout": "60", "x": "y"}
    assert parse_options({"rdzv_conf": {"timeout": 5}}).rdzv_configs == {"timeout": 5}
    with pytest.raises(TorchrunOptionError, match="rdzv_conf"):
        parse_options({"rdzv_conf": "novalue"})


def test_local_placement_is_standalone_on_a_free_port() -> None:
    p = resolve_placement(parse_options({}), {}, 2, pick_port=lambda: 4242)
    assert (p.rdzv_backend, p.rdzv_endpoint, p.max_nodes, p.port_picked) == (
        "c10d",
        "localhost:4242",
        1,
        True,
    )
    other = resolve_placement(parse_options({}), {}, 2, pick_port=lambda: 4243)
    assert other.run_id != p.run_id  # concurrent jobs never merge
    fixed = resolve_placement(parse_options({"master_port": 5000}), {}, 1)
    assert fixed.rdzv_endpoint == "localhost:5000" and not fixed.port_picked


def test_manual_placement_follows_torchrun() -> None:
    opts = parse_options({"nnodes": 2, "rdzv_endpoint": "n1:29400", "rdzv_id": "job7"})
    p = resolve_placement(opts, {}, 4)
    assert (p.rdzv_endpoint, p.run_id, p.max_nodes, p.source) == ("n1:29400", "job7", 2, "manual")
    static = resolve_placement(
        parse_options(
            {
                "nnodes": 2,
                "rdzv_backend": "static",
                "master_addr": "h",
                "master_port": 1234,
                "node_rank": 1,
                "rdzv_id": "j",
            }
        ),
        {},
        1,
    )
    assert static.rdzv_endpoint == "h:1234" and static.rdzv_configs["rank"] == 1
    with pytest.raises(TorchrunOptionError, match="rdzv_endpoint"):
        resolve_placement(parse_options({"nnodes": 2}), {}, 1)
    with pytest.raises(TorchrunOptionError, match="rdzv_id"):
        resolve_placement(parse_options({"nnodes": 2, "rdzv_endpoint": "h:1"}), {}, 1)


def test_rank_logging_config() -> None:
    conf = {
        "formatters": {"simple": {"format": "[%(name)s] %(message)s"}},
        "handlers": {"file": {"filename": "/o/app.log"}, "console": {"stream": "x"}},
    }
    out = rank_logging_config(conf, 3)
    assert out["formatters"]["simple"]["format"] == "[rank3][%(name)s] %(message)s"
    assert out["handlers"]["file"]["filename"] == "/o/app_rank3.log"
    assert conf["handlers"]["file"]["filename"] == "/o/app.log"  # input untouched


def test_divert_function_delivers_once_then_restores() -> None:
    def outer() -> object:
        captured = 5

        def task(cfg: object) -> object:
            return ("real", captured, cfg)

        return task

    task = outer()
    code = task.__code__
    divert(task, Outcome(value="from rank 0"))
    assert task("cfg") == "from rank 0"
    assert task.__code__ is code and task("cfg") == ("real", 5, "cfg")
    divert(task, Outcome(error=KeyError("k")))
    with pytest.raises(KeyError):
        task("cfg")
    assert task("c") == ("real", 5, "c")


def test_divert_partial_object_and_restore() -> None:
    class Obj:
        def __call__(self, cfg: object) -> str:
            return "real"

    obj = Obj()
    d = divert(obj, Outcome(value=1))
    d.restore()  # restoring without a call (the hook path) puts it back too
    assert type(obj) is Obj and obj(None) == "real"
    part = functools.partial(lambda cfg, k: k, k=3)
    divert(part, Outcome(value=9))
    assert part(None) == 9 and part(None) == 3


def test_divert_refuses_builtins() -> None:
    with pytest.raises(DivertError):
        divert(print, Outcome())


# -- cluster detection (pure: fed environment dicts) ------------------------------------
from hydra_torchrun_callback._node.placement import (  # noqa: E402
    candidate_ports,
    derived_port,
    detect_cluster,
)

STEP = {
    "SLURM_JOB_ID": "77",
    "SLURM_PROCID": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NODELIST": "node[001-002,007],gpu12",
}


def test_srun_step_is_a_cluster_task() -> None:
    task = detect_cluster(STEP)
    assert task is not None
    assert (task.kind, task.job_id, task.num_tasks, task.task_rank) == ("slurm", "77", 2, 1)
    assert task.hostnames == ("node001", "node002", "node007", "gpu12")
    assert task.master_addr == "node001"


def test_array_job_id() -> None:
    task = detect_cluster({**STEP, "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"})
    assert task is not None and task.job_id == "70_3"


def test_inherited_allocation_is_not_multinode() -> None:
    """An salloc shell or a batch script: job-level variables only."""
    salloc = {"SLURM_JOB_ID": "5", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "n[1-4]"}
    assert detect_cluster(salloc) is None
    assert detect_cluster(STEP, "none") is None


def test_forced_detection_names_missing_variables() -> None:
    with pytest.raises(TorchrunOptionError, match="SLURM_PROCID, SLURM_STEP_NUM_TASKS"):
        detect_cluster({"SLURM_JOB_ID": "5"}, "slurm")


def test_submitit_local_task() -> None:
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "4242",
        "SUBMITIT_LOCAL_GLOBALID": "0",
        "SUBMITIT_LOCAL_NTASKS": "2",
    }
    task = detect_cluster(env)
    assert task is not None and (task.kind, task.num_tasks, task.master_addr) == (
        "submitit-local",
        2,
        "localhost",
    )


def test_cluster_placement_and_user_overrides() -> None:
    p = resolve_placement(parse_options({}), STEP, 4)
    assert (p.node_rank, p.max_nodes, p.run_id) == (1, 2, "job77")
    assert p.rdzv_endpoint == f"node001:{derived_port('job77')}"
    assert p.rdzv_configs["is_host"] is False
    mine = resolve_placement(parse_options({"master_port": 4000, "rdzv_id": "x"}), STEP, 1)
    assert mine.rdzv_endpoint == "node001:4000" and mine.run_id == "x"  # explicit wins
    with pytest.raises(TorchrunOptionError, match="this job has 2 tasks"):
        resolve_placement(parse_options({"nnodes": 3}), STEP, 1)


def test_elastic_cluster_placement() -> None:
    """nnodes=MIN:MAX on a cluster: MAX is the job's tasks, MIN reaches torch, and the
    rendezvous notices a lost node sooner unless the user said otherwise."""
    three = {**STEP, "SLURM_STEP_NUM_TASKS": "3"}
    fixed = resolve_placement(parse_options({}), three, 1)
    assert (fixed.min_nodes, fixed.max_nodes) == (3, 3)
    assert "last_call_timeout" not in fixed.rdzv_configs  # torch's defaults, as before
    p = resolve_placement(parse_options({"nnodes": "2:3"}), three, 1)
    assert (p.min_nodes, p.max_nodes) == (2, 3)
    assert p.rdzv_configs["keep_alive_interval"] == 2
    assert p.rdzv_configs["last_call_timeout"] == 5
    mine = resolve_placement(
        parse_options({"nnodes": "1:3", "rdzv_conf": "last_call_timeout=30"}), three, 1
    )
    assert mine.min_nodes == 1 and mine.rdzv_configs["last_call_timeout"] == "30"


def test_elastic_job_under_submitit_keeps_its_store_in_the_submitit_folder() -> None:
    """An elastic submitit job's rendezvous and store are files in submitit's folder (its
    %j resolved, one directory per SLURM requeue); fixed-size jobs, a per-task folder, no
    submitit, or a master_port the user set keep node 0's TCPStore."""
    three = {**STEP, "SLURM_STEP_NUM_TASKS": "3", "SUBMITIT_FOLDER": "/shared/sweep/.submitit/%j"}
    p = resolve_placement(parse_options({"nnodes": "2:3"}), three, 1)
    assert p.store_dir == "/shared/sweep/.submitit/77/.torchrun_store/job77.r0"
    assert p.rdzv_endpoint == p.store_dir + "/rendezvous"
    assert p.rdzv_configs["store_type"] == "file" and "is_host" not in p.rdzv_configs
    assert p.store_ports == ()
    requeued = resolve_placement(
        parse_options({"nnodes": "2:3"}), {**three, "SLURM_RESTART_COUNT": "2"}, 1
    )
    assert requeued.store_dir is not None and requeued.store_dir.endswith("job77.r2")
    named = resolve_placement(parse_options({"nnodes": "2:3", "rdzv_id": "my run"}), three, 1)
    assert named.store_dir is not None and named.store_dir.endswith("/job77.my_run.r0")
    for opts, env in (
        ({}, three),  # fixed size: node 0 hosts, as before
        ({"nnodes": "2:3"}, {**three, "SUBMITIT_FOLDER": "/shared/%j/%t"}),
        ({"nnodes": "2:3"}, {**three, "SUBMITIT_FOLDER": ""}),
        ({"nnodes": "2:3", "master_port": 29400}, three),
    ):
        tcp = resolve_placement(parse_options(opts), env, 1)
        assert tcp.store_dir is None and tcp.rdzv_configs["is_host"] is False, (opts, env)
        assert tcp.rdzv_endpoint.startswith("node001:")


def test_run_ids_differ_per_step_and_hydra_job() -> None:
    """Two srun steps of one allocation, or two Hydra jobs of one srun sweep, never share
    a rendezvous (id or first port)."""
    ids = {
        resolve_placement(parse_options({}), {**STEP, **extra}, 1, job_num=num).run_id
        for extra in ({}, {"SLURM_STEP_ID": "0"}, {"SLURM_STEP_ID": "1"})
        for num in (0, 1, 2)
    }
    assert len(ids) == 9 and "job77.s1.j2" in ids
    ports = {candidate_ports(run_id)[0] for run_id in ids}
    assert len(ports) == 9


def test_derived_ports_differ_between_jobs() -> None:
    ports = {derived_port(str(j)) for j in range(1000, 1200)}
    assert len(ports) > 195 and all(15000 <= p < 32000 for p in ports)
    assert derived_port("1234") == derived_port("1234")


def test_option_error_survives_pickling_and_renaming() -> None:
    """submitit pickles a failed job's error; the drop-in launcher renames the option."""
    import pickle

    with pytest.raises(TorchrunOptionError) as caught:
        parse_options({"nnodes": "3:1"})
    err = caught.value
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.option, back.value) == (str(err), "nnodes", "3:1")
    moved = err.under("hydra.launcher")
    assert str(moved) == str(err).replace("hydra.callbacks.torchrun.", "hydra.launcher.")
    assert str(pickle.loads(pickle.dumps(moved))) == str(moved)


@pytest.mark.parametrize(
    ("node_list", "hosts"),
    [
        ("n1", ["n1"]),
        ("n1,gpu12", ["n1", "gpu12"]),
        ("node[001-003,007],gpu12", ["node001", "node002", "node003", "node007", "gpu12"]),
        ("n[1-2]-ib[0,3]", ["n1-ib0", "n1-ib3", "n2-ib0", "n2-ib3"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("rack1-[08-10].x", ["rack1-08.x", "rack1-09.x", "rack1-10.x"]),
    ],
)
def test_node_list_expansion(node_list: str, hosts: list[str]) -> None:
    """Plain srun needs no submitit; where submitit is installed, both parsers agree."""
    from hydra_torchrun_callback._node.placement import parse_node_list

    assert parse_node_list(node_list) == hosts
    try:
        from submitit.slurm.slurm import _parse_node_list
    except ImportError:  # the torch-less compat cells install no submitit
        return
    assert list(_parse_node_list(node_list)) == hosts


def test_gpus_from_the_allocation_without_cuda() -> None:
    share = host_share({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, None)
    assert (share.host_gpus, share.visible_gpus) == (4, 4)
    assert host_share({"CUDA_VISIBLE_DEVICES": "2"}, None).host_gpus == 1
    assert host_share({"CUDA_VISIBLE_DEVICES": ""}, None).host_gpus == 0
    assert host_share({"CUDA_VISIBLE_DEVICES": "-1"}, None).host_gpus == 0
    assert host_share({"SLURM_GPUS_ON_NODE": "8"}, None).host_gpus == 8
    assert host_share({"SLURM_JOB_GPUS": "4,5"}, None).host_gpus == 2
    # One task: what it sees (SLURM sets CUDA_VISIBLE_DEVICES per step) is what it has.
    assert (
        host_share({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"}, None).host_gpus == 2
    )
    assert host_share({}, None).host_gpus is None


def test_cpus_are_the_affinity_mask() -> None:
    import os

    from hydra_torchrun_callback._node.placement import usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))


def test_local_addr_may_name_an_interface() -> None:
    from hydra_torchrun_callback._node.placement import interface_address

    assert interface_address("lo") == "127.0.0.1"
    assert interface_address("no-such-if0") is None
    assert interface_address("10.0.0.5") is None  # an address stays as it is


def test_slurm_sweeps_get_the_srun_cpus_line() -> None:
    """Under submitit_slurm the callback adds a setup line so srun steps inherit
    cpus_per_task; it must survive OmegaConf (no ${...} in it) and not be added twice."""
    from hydra_torchrun_callback._callback.per_node import SRUN_CPUS_LINE, prepare_multirun

    cfg = OmegaConf.create(
        {
            "hydra": {
                "launcher": {
                    "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
                    "SlurmLauncher",
                    "setup": ["module load cuda", "export X=\\${SLURM_JOB_ID}"],
                },
                "overrides": {"hydra": ["hydra/launcher=submitit_slurm"]},
                "output_subdir": ".hydra",
            }
        }
    )
    prepare_multirun(cfg)
    prepare_multirun(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["hydra"]["launcher"]["setup"] == [
        "module load cuda",
        "export X=${SLURM_JOB_ID}",  # the user's escaped line reaches sbatch as written
        SRUN_CPUS_LINE,
    ]
    assert resolved["hydra"]["overrides"]["hydra"][-1] == "hydra.output_subdir=.hydra"


def test_hidden_gpus_mean_cpu_workers() -> None:
    """CUDA_VISIBLE_DEVICES='' on a GPU node (what the refusal suggests for CPU-only
    workers): one CPU worker per task, no division by zero."""
    from hydra_torchrun_callback._node.placement import detect_cluster

    for localid in (0, 1):
        env = _slurm_task(localid, localid, 0, SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="")
        plan = plan_workers(None, host_share(env, detect_cluster(env)), cpus=4)
        assert (plan.nproc, plan.local_offset, plan.local_world_size) == (1, localid, 2)


def test_a_workstation_may_share_its_gpus() -> None:
    """No scheduler: 2 gloo workers on a 1-GPU workstation (debugging DDP) still run; only
    GPUs the scheduler allocated are enforced."""
    share = host_share({"CUDA_VISIBLE_DEVICES": "0"}, None)
    assert plan_workers("2", share, cpus=4).nproc == 2
    assert host_share({"CUDA_VISIBLE_DEVICES": "MIG-1,MIG-2"}, None).host_gpus == 1


def test_task_cpus_are_capped_by_the_allocation() -> None:
    from hydra_torchrun_callback._node.placement import detect_cluster, task_cpus

    assert task_cpus({"SLURM_CPUS_PER_TASK": "4"}, 64, None) == 4  # SLURM did not pin it
    assert task_cpus({}, 8, None) == 8
    local = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "1",
        "SUBMITIT_LOCAL_GLOBALID": "0",
        "SUBMITIT_LOCAL_NTASKS": "2",
    }
    assert task_cpus(local, 8, detect_cluster(local)) == 4  # emulated nodes share the machine


# -- torchrun's PET_* environment (torch's argparse_util.env / check_env) --


def test_pet_fills_only_unset_options() -> None:
    env = {"PET_NPROC_PER_NODE": "4", "PET_MAX_RESTARTS": "2", "PET_STANDALONE": "1"}
    opts = parse_options({"max_restarts": 0, "nproc_per_node": None}, env)
    assert (opts.nproc_per_node, opts.max_restarts, opts.standalone) == ("4", 0, True)
    assert dict(opts.from_env) == {
        "nproc_per_node": "PET_NPROC_PER_NODE",
        "standalone": "PET_STANDALONE",
    }
    assert parse_options({}).nproc_per_node is None  # no env given: none read
    # logs_specs and numa_binding have no PET_ variable, as in torchrun.
    assert parse_options({}, {"PET_NUMA_BINDING": "node"}).numa_binding is None


def test_pet_errors_name_the_variable() -> None:
    with pytest.raises(TorchrunOptionError, match=r"PET_MAX_RESTARTS='x'.*unset PET_MAX_RESTARTS"):
        parse_options({}, {"PET_MAX_RESTARTS": "x"})
    with pytest.raises(TorchrunOptionError, match="torchrun reads flags as integers"):
        parse_options({}, {"PET_VIRTUAL_LOCAL_RANK": "yes"})


def test_options_newer_than_the_installed_torch() -> None:
    """Set on an older torch: refused naming the option and the version; unset: fine."""
    with pytest.raises(TorchrunOptionError, match=r"torch 2\.4\.1 is installed.*2\.10\.0"):
        parse_options({"virtual_local_rank": True}, torch_version="2.4.1")
    with pytest.raises(TorchrunOptionError, match="shutdown_timeout"):
        parse_options({"shutdown_timeout": 5}, torch_version="2.11.0+cpu")
    assert parse_options({}, torch_version="2.4.1").signals_to_handle.startswith("SIGTERM")
    assert parse_options({"shutdown_timeout": 5}, torch_version="2.13.0").shutdown_timeout == 5


def test_new_option_values() -> None:
    opts = parse_options(
        {"duplicate_stdout_filters": "a,,b,c", "signals_to_handle": "SIGTERM,SIGUSR1"}
    )
    assert opts.duplicate_stdout_filters == ("a,b", "c")  # torch's ",," escape
    for option, value in [
        ("signals_to_handle", "SIGTERM,SIGNOPE"),
        ("numa_binding", "everywhere"),
        ("shutdown_timeout", "0"),
        ("duplicate_stderr_filters", [1]),
        ("logs_specs", "no_such_entry_point"),
    ]:
        with pytest.raises(TorchrunOptionError, match=option):
            parse_options({option: value})


def test_unset_backend_is_static_for_hand_wired_nodes() -> None:
    """torchrun's default (static) where a user gave only a master address/port."""
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "10.0.0.1"}
    p = resolve_placement(parse_options({}, env), {}, 1)
    assert (p.rdzv_backend, p.rdzv_endpoint, p.node_rank, p.run_id) == (
        "static",
        "10.0.0.1:29500",
        1,
        "none",
    )
    assert resolve_placement(parse_options({}), {}, 1).rdzv_backend == "c10d"


@pytest.mark.parametrize(
    ("variable", "value", "fact"),
    [
        ("PET_NNODES", "3", "2 tasks"),
        ("PET_NODE_RANK", "0", "this task is node 1"),
        ("PET_MASTER_ADDR", "elsewhere", "first node is node001"),
        ("PET_RDZV_ENDPOINT", "elsewhere:29400", "places the rendezvous itself"),
        ("PET_RDZV_BACKEND", "static", "meet over c10d"),
    ],
)
def test_pet_never_replaces_a_slurm_job(variable: str, value: str, fact: str) -> None:
    opts = parse_options({}, {variable: value})
    with pytest.raises(TorchrunOptionError, match=rf"{variable}=.*contradicts the SLURM.*{fact}"):
        resolve_placement(opts, STEP, 1)
    # Values that agree with the placement are fine.
    agree = parse_options({}, {"PET_NNODES": "2", "PET_NODE_RANK": "1"})
    assert resolve_placement(agree, STEP, 1).node_rank == 1


# -- warm start: may the Hydra process be forked into the warm server? ----------------
def _fork_verdict(**state: Any) -> str | None:
    base: dict[str, Any] = {
        "main_thread": True,
        "python_threads": [],
        "native_threads": 0,
        "cuda": False,
    }
    return fork_verdict(**{**base, **state})


def test_fork_verdict() -> None:
    assert _fork_verdict() is None
    assert _fork_verdict(main_thread=False) == "the job does not run on the main thread"
    assert _fork_verdict(python_threads=["b", "a"], native_threads=0) == (
        "Python threads are running: a, b"
    )
    cuda = _fork_verdict(cuda=True)
    assert cuda is not None and cuda.startswith("CUDA is in use (the CUDA driver is loaded")
    omp = _fork_verdict(native_threads=2)
    assert omp is not None and omp.startswith("2 native thread(s) are running (OpenMP's pool")
