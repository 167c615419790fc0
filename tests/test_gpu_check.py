"""scripts/gpu_check.sh without a GPU: it refuses cleanly, and --cpu runs its checks.

The GPU checks themselves (NCCL, one GPU per worker, CUDA tensors returned on the CPU)
need NVIDIA GPUs and are run by hand on such a machine: ``bash scripts/gpu_check.sh``.
Here a fake ``nvidia-smi`` and ``CUDA_VISIBLE_DEVICES=`` make the refusals happen on any
machine, with or without GPUs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, app_env

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_script(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=app_env(PYTHON=sys.executable, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fake_nvidia_smi(tmp_path: Path, exit_code: int) -> str:
    """A PATH whose first ``nvidia-smi`` exits with ``exit_code``."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\necho 'GPU 0: fake'\nexit {exit_code}\n")
    tool.chmod(0o755)
    return f"{tool.parent}:{app_env()['PATH']}"


def test_refuses_without_a_working_nvidia_smi(tmp_path: Path) -> None:
    proc = run_script(timeout=60, PATH=fake_nvidia_smi(tmp_path, 9))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: no NVIDIA GPU: 'nvidia-smi -L' failed" in proc.stderr
    assert proc.stdout == ""


def test_refuses_when_torch_sees_no_gpu(tmp_path: Path) -> None:
    proc = run_script(timeout=60, PATH=fake_nvidia_smi(tmp_path, 0), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no NVIDIA GPU visible to torch: torch.cuda.device_count() == 0" in proc.stderr


@pytest.mark.timeout(300)  # about 50 s on the 2-core CI machine: 4 runs, one a 2-node sweep
def test_cpu_mode_runs_every_check() -> None:
    proc = run_script("--cpu", timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    for line in (
        "1 all_reduce, 1 node x 2 worker(s)",
        "2 sweep x=1,2, 2 nodes x 1 worker(s)",
        "3 one device per worker (run1)",
        "3 one device per worker (run2)",
        "4 tensor returned on the CPU (run1)",
        "4 tensor returned on the CPU (run2)",
        "5 warm server: no CUDA, 1 thread (run1)",
        "6 torch at top: forked warm server (run3)",
        "7 thread at import: fresh server (run4)",
    ):
        [found] = [r for r in report.splitlines() if r.startswith(line)]
        assert " PASS (" in found, report
    assert "FAIL" not in report and report.rstrip().endswith("gpu_check: all checks PASS")
