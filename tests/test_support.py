"""The supported-environment check (pure): floors, missing packages, interpreters."""

from __future__ import annotations

import re
from pathlib import Path

from hydra_torchrun_callback._support import FLOORS, MIN_PYTHON, problems

OK = {name: floor for name, (floor, _) in FLOORS.items()}


def test_floors_and_newer_versions_pass() -> None:
    assert problems(OK, (*MIN_PYTHON, 0)) == []
    newer = {**OK, "torch": "2.13.0+cpu", "hydra-core": "1.3.8", "cloudpickle": "3.1.3"}
    assert problems(newer, (3, 13, 0)) == []


def test_each_problem_names_the_fix() -> None:
    found = problems({**OK, "torch": "2.2.2", "omegaconf": None}, (3, 9, 18))
    assert found == [
        "Python 3.9.18 is older than 3.10: run the app with Python >= 3.10",
        "torch 2.2.2 is older than 2.4.1 (needed for restarting a worker group over c10d "
        "(2.3 closes the rendezvous)): pip install 'torch>=2.4.1'",
        "omegaconf is not installed: pip install 'omegaconf>=2.3.0'",
    ]


def test_python_312_needs_cloudpickle_3() -> None:
    assert problems({**OK, "cloudpickle": "2.2.1"}, (3, 11, 7)) == []
    [found] = problems({**OK, "cloudpickle": "2.2.1"}, (3, 12, 1))
    assert found.startswith("cloudpickle 2.2.1 is older than 3.0.0")


def test_floors_match_pyproject() -> None:
    """The runtime check and pip's metadata admit the same versions."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name, (floor, _) in FLOORS.items():
        assert re.search(rf'"{name}>={re.escape(floor)}[,;"]', text), name
    assert f'requires-python = ">={MIN_PYTHON[0]}.{MIN_PYTHON[1]}"' in text


def test_every_module_imports_without_torch() -> None:
    """A job without torch must reach the support check (which names the fix): no module
    of the package may import torch at import time."""
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['torch'] = None\n"
        "import hydra_torchrun_callback as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module('hydra_torchrun_callback.' + m.name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
