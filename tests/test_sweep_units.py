"""The pure parts of sweeps that outlive interruptions: numbering and decisions on resume,
the sweep dir's files (signed values, attempts), the controller's command and environment."""

from __future__ import annotations

import os
import pickle
import stat
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from hydra_torchrun_callback._options import TorchrunOptionError, parse_options
from hydra_torchrun_callback._sweep import control
from hydra_torchrun_callback._sweep.controller import _slurm_parameters, controller_env
from hydra_torchrun_callback._sweep.plan import Action, Known, assign_numbers, decide
from hydra_torchrun_callback._wire import sweep_files


def known(num: int, *ov: str, **kw: object) -> Known:
    return Known(num, tuple(ov), **kw)  # type: ignore[arg-type]


def test_decide() -> None:
    assert decide(None) is Action.RUN
    assert decide(known(0, "x=1", state="completed", value_ok=True)) is Action.DONE
    # Completed but its value does not verify (tampered, another key): run it again.
    assert decide(known(0, "x=1", state="completed", value_ok=False)) is Action.RUN
    assert decide(known(0, "x=1", state="running", live_job="7_0")) is Action.ATTACH
    assert decide(known(0, "x=1", state=None, live_job="7_0")) is Action.ATTACH  # queued
    assert decide(known(0, "x=1", state="running")) is Action.RUN  # its job is gone
    assert decide(known(0, "x=1", state="failed")) is Action.RUN


def test_numbers_without_resume_are_hydras() -> None:
    claimed: set[int] = set()
    steps = assign_numbers([["x=1"], ["x=2"]], 4, {}, claimed, resume=False)
    assert [(s.num, s.action) for s in steps] == [(4, Action.RUN), (5, Action.RUN)]
    assert claimed == {4, 5}


def test_resume_keeps_each_points_number_and_dir() -> None:
    prior = {
        0: known(0, "x=1", state="completed", value_ok=True),
        1: known(1, "x=2", state="failed"),
        2: known(2, "x=3", state="running", live_job="9_2"),
    }
    steps = assign_numbers([["x=1"], ["x=2"], ["x=3"]], 0, prior, set(), resume=True)
    assert [(s.num, s.action) for s in steps] == [
        (0, Action.DONE),
        (1, Action.RUN),
        (2, Action.ATTACH),
    ]


def test_resume_matches_points_by_overrides_not_position() -> None:
    prior = {0: known(0, "x=1", state="completed", value_ok=True), 1: known(1, "x=2")}
    steps = assign_numbers([["x=2"], ["x=1"]], 0, prior, set(), resume=True)
    assert [(s.overrides, s.num) for s in steps] == [(("x=2",), 1), (("x=1",), 0)]


def test_new_points_never_take_a_known_points_number() -> None:
    """A sweeper that draws new points (Optuna) on resume: they get fresh numbers after
    every known one, so no earlier point's dir is written into (hydra #3328)."""
    prior = {0: known(0, "x=1", state="completed", value_ok=True), 1: known(1, "x=2")}
    claimed: set[int] = set()
    steps = assign_numbers([["x=7"], ["x=8"]], 0, prior, claimed, resume=True)
    assert [s.num for s in steps] == [2, 3]
    later = assign_numbers([["x=9"]], 2, prior, claimed, resume=True)
    assert [s.num for s in later] == [4]
    # The sweeper's own number when nobody holds it.
    assert [s.num for s in assign_numbers([["x=9"]], 10, prior, set(), resume=True)] == [10]


def test_duplicate_points_each_claim_their_own() -> None:
    prior = {0: known(0, "x=1", state="completed", value_ok=True), 1: known(1, "x=1")}
    steps = assign_numbers([["x=1"], ["x=1"]], 0, prior, set(), resume=True)
    assert [(s.num, s.action) for s in steps] == [(0, Action.DONE), (1, Action.RUN)]


def test_point_value_is_signed_for_one_point(tmp_path: Path) -> None:
    env = {"HYDRA_TORCHRUN_SECRET_FILE": str(tmp_path / "key")}
    key = sweep_files.point_key("sweep-a", 3, ["x=1"])
    data = pickle.dumps(Fraction(1, 3))
    sweep_files.seal_value(tmp_path, key, data, env)
    path = tmp_path / "torchrun_result.bin"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sweep_files.open_value(tmp_path, key, env) == data
    # Another point, sweep or overrides: the same bytes do not verify.
    for other in (
        sweep_files.point_key("sweep-b", 3, ["x=1"]),
        sweep_files.point_key("sweep-a", 4, ["x=1"]),
        sweep_files.point_key("sweep-a", 3, ["x=2"]),
    ):
        assert sweep_files.open_value(tmp_path, other, env) is None
    blob = path.read_bytes()
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # one bit flipped
    assert sweep_files.open_value(tmp_path, key, env) is None
    other_key = {"HYDRA_TORCHRUN_SECRET_FILE": str(tmp_path / "other-key")}
    path.write_bytes(blob)
    assert sweep_files.open_value(tmp_path, key, other_key) is None


def test_attempts_accumulate_in_the_point_record(tmp_path: Path) -> None:
    base = {"sweep_id": "s", "num": 0, "overrides": ["x=1"]}
    sweep_files.record_attempt(tmp_path, base, attempt_id="a", state="running")
    sweep_files.record_attempt(tmp_path, base, attempt_id="a", state="failed", cause="boom")
    sweep_files.record_attempt(tmp_path, base, attempt_id="b", state="running")
    record = sweep_files.read_point(tmp_path)
    assert record is not None and record["state"] == "running"
    assert [(a["attempt_id"], a["state"]) for a in record["attempts"]] == [
        ("a", "failed"),
        ("b", "running"),
    ]
    # A new sweep in the same dir starts the record afresh.
    sweep_files.record_attempt(tmp_path, {**base, "sweep_id": "t"}, attempt_id="c", state="running")
    record = sweep_files.read_point(tmp_path)
    assert record is not None and [a["attempt_id"] for a in record["attempts"]] == ["c"]


def test_ledger_keeps_every_submission_of_this_sweep_only(tmp_path: Path) -> None:
    sweep_files.add_submission(tmp_path, "s", 0, ["x=1"], {"executor": "slurm", "job_id": "5_0"})
    sweep_files.add_submission(tmp_path, "s", 0, ["x=1"], {"executor": "slurm", "job_id": "8_0"})
    sweep_files.add_submission(tmp_path, "old", 1, ["x=2"], {"executor": "slurm", "job_id": "1"})
    ledger = sweep_files.read_ledger(tmp_path, "s")
    assert list(ledger) == [0]
    assert [j["job_id"] for j in ledger[0]["jobs"]] == ["5_0", "8_0"]


def test_controller_environment_drops_the_allocation() -> None:
    env = controller_env(
        {
            "SLURM_JOB_ID": "12",
            "SLURM_CPUS_PER_TASK": "1",
            "SLURM_CONF": "/etc/slurm/slurm.conf",
            "SUBMITIT_EXECUTOR": "slurm",
            "PATH": "/bin",
            "SBATCH_PARTITION": "cpu",
        },
        "12",
    )
    assert env == {
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "PATH": "/bin",
        "SBATCH_PARTITION": "cpu",
        "HYDRA_TORCHRUN_SWEEP_ROLE": "controller",
        "HYDRA_TORCHRUN_CONTROLLER_JOB": "12",
    }


def test_controller_job_keeps_the_sites_settings_and_takes_overrides() -> None:
    launcher = {
        "partition": "gpu",
        "account": "proj",
        "qos": "normal",
        "setup": ["module load cuda"],
        "gpus_per_node": 8,
        "nodes": 4,
        "timeout_min": 600,
        "name": "train",
        "mem_gb": 400,
    }
    params = _slurm_parameters(launcher, {"partition": "cpu", "timeout_min": 4320})
    assert params == {
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 1,
        "timeout_min": 4320,
        "name": "train-sweep",
        "stderr_to_stdout": True,
        "slurm_setup": ["module load cuda"],
        "slurm_partition": "cpu",
        "slurm_account": "proj",
        "slurm_qos": "normal",
    }


def test_controller_command_is_this_command_with_an_absolute_sweep_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        sys,
        "orig_argv",
        [
            "python3",
            "-u",
            "app.py",
            "-m",
            "lr=0.1,0.2",
            "hydra.sweep.dir=runs/${now:%H}",
            "hydra.callbacks.torchrun.detach=true",
            "++hydra.callbacks.torchrun.resume=false",
        ],
    )
    command = control.controller_command(Path("/data/runs/a b,c"))
    assert command == [
        sys.executable,
        "-u",
        "app.py",
        "-m",
        "lr=0.1,0.2",
        "hydra.sweep.dir='/data/runs/a b,c'",
    ]
    info = {"command": command, "cwd": "/home/me/proj"}
    assert control.resume_command(info).startswith("cd /home/me/proj && ")
    assert control.resume_command(info).endswith("hydra.callbacks.torchrun.resume=true")


def test_sweep_options_are_checked() -> None:
    opts = parse_options({"detach": True, "resume": "true", "controller": {"timeout_min": 60}})
    assert opts.detach and opts.resume and dict(opts.controller) == {"timeout_min": 60}
    assert parse_options({}).preemption_grace == 30.0
    with pytest.raises(TorchrunOptionError, match="preemption_grace"):
        parse_options({"preemption_grace": 0})
    with pytest.raises(TorchrunOptionError, match="controller"):
        parse_options({"controller": "cpu"})
    with pytest.raises(TorchrunOptionError, match="detach"):
        parse_options({"detach": "sometimes"})


def test_run_identity_is_stable_per_point_and_per_slurm_job(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from hydra_torchrun_callback._sweep.points import run_identity, sweep_id

    sweep_files.write_sweep(tmp_path, {"id": "abc"})
    point = OmegaConf.create(
        {
            "hydra": {
                "mode": "RunMode.MULTIRUN",
                "sweep": {"dir": str(tmp_path)},
                "job": {"num": 3},
                "runtime": {"output_dir": str(tmp_path / "3")},
            }
        }
    )
    sweep = sweep_id(point)
    assert sweep == "abc"
    first = run_identity(point, {}, sweep)
    assert first == run_identity(point, {"SLURM_JOB_ID": "99"}, sweep)  # a requeue, a resume
    assert len(first) == 20 and int(first, 16) >= 0
    point.hydra.job.num = 4
    assert run_identity(point, {}, sweep) != first
    single = OmegaConf.create(
        {"hydra": {"mode": "RunMode.RUN", "runtime": {"output_dir": str(tmp_path / "a")}}}
    )
    requeued = OmegaConf.create(
        {"hydra": {"mode": "RunMode.RUN", "runtime": {"output_dir": str(tmp_path / "b")}}}
    )
    job = {"SLURM_JOB_ID": "42"}
    # ${now:} in the run dir changes on requeue; the SLURM job id does not.
    assert run_identity(single, job, None) == run_identity(requeued, job, None)
    assert run_identity(single, {}, None) != run_identity(requeued, {}, None)
    assert os.path.isabs(str(tmp_path))


def test_a_lost_points_error_travels_whole() -> None:
    """What a sweeper gets for a dead point: a TorchrunJobError with the scheduler's facts,
    intact across pickling (submitit and Hydra pickle JobReturns)."""
    from hydra_torchrun_callback import TorchrunJobError, TorchrunPointLost

    error = TorchrunPointLost(
        "sweep point #1 (x=2) ended without a result",
        job_id="7_1",
        state="FAILED",
        exit_code="0:9",
        log_tail="Killed",
    )
    back = pickle.loads(pickle.dumps(error))
    assert isinstance(back, TorchrunJobError) and str(back) == str(error)
    assert (back.job_id, back.state, back.exit_code, back.log_tail) == (
        "7_1",
        "FAILED",
        "0:9",
        "Killed",
    )
