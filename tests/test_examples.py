"""The shipped examples run as documented and return what they promise."""

from __future__ import annotations

from pathlib import Path

from conftest import run_example as _run


def test_hello_dist_parity(tmp_path: Path) -> None:
    proc = _run(
        tmp_path,
        "hello_dist.py",
        "hydra/callbacks=torchrun",
        "hydra.callbacks.torchrun.nproc_per_node=3",
        f"hydra.run.dir={tmp_path}/o",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(3):
        assert f"[Rank {rank}/3] Hello from distributed PyTorch!" in proc.stdout
        assert f"[Rank {rank}/3] Local rank: {rank}" in proc.stdout
    assert "[Rank 0] Sum of all ranks: 3" in proc.stdout
    assert "✓ Collective operation successful!" in proc.stdout


def test_ddp_train_sweep_returns_rank0_loss(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    proc = _run(
        tmp_path,
        "ddp_train.py",
        "-m",
        "lr=0.1,0.01",
        "epochs=3",
        "hydra/callbacks=torchrun",
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "+hydra.callbacks.recorder._target_=recorder.Recorder",
        f"+hydra.callbacks.recorder.path={rec}",
        f"hydra.sweep.dir={tmp_path}/m",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    jobs = [json.loads(line) for line in rec.read_text().splitlines()]
    assert [j["status"] for j in jobs] == ["COMPLETED", "COMPLETED"]
    losses = [j["value"] for j in jobs]
    assert all(isinstance(v, float) and 0 < v < 2 for v in losses)
    assert losses[0] < losses[1]  # lr=0.1 learns faster in 3 epochs than lr=0.01


def test_ddp_train_local_emulation_config(tmp_path: Path) -> None:
    """conf/ddp_train_local.yaml: 2 emulated nodes x 2 workers per sweep point."""
    import json

    rec = tmp_path / "rec.jsonl"
    proc = _run(
        tmp_path,
        "ddp_train.py",
        "--config-name",
        "ddp_train_local",
        "-m",
        "lr=0.1,0.01",
        "epochs=2",
        "+hydra.callbacks.recorder._target_=recorder.Recorder",
        f"+hydra.callbacks.recorder.path={rec}",
        f"hydra.sweep.dir={tmp_path}/m",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = [json.loads(line) for line in rec.read_text().splitlines()]
    task0 = [j for j in jobs if j["task"] == 0]
    assert len(task0) == 2 and all(isinstance(j["value"], float) for j in task0)
    assert all(j["value"] is None for j in jobs if j["task"] == 1)
