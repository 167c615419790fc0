"""What this package runs on, checked before any job starts.

pip enforces ``requires-python`` and the dependency ranges at install time, but
an environment can drift afterwards (``pip install torch==2.1`` later, a
``PYTHONPATH`` pointing at a checkout, a cluster module loading an older torch).
The callback then must refuse the job with the fix, not half-work: an
``AttributeError`` deep in torch's launcher would otherwise reach Hydra, which
turns it into a warning and runs the task undistributed.

The floors are the versions the test suite's minimum-versions cell passes on
(``scripts/compat.sh``); keep them equal to ``pyproject.toml``'s.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Optional

__all__ = ["FLOORS", "MIN_PYTHON", "installed_versions", "problems", "require_supported"]

#: Oldest Python the suite passes on.
MIN_PYTHON = (3, 10)

#: Distribution -> (oldest version the suite passes on, why that one).
FLOORS: dict[str, tuple[str, str]] = {
    "torch": ("2.4.1", "restarting a worker group over c10d (2.3 closes the rendezvous)"),
    "hydra-core": ("1.3.2", "the callback API and HydraConfig in workers"),
    "omegaconf": ("2.3.0", "resolver cache and read_write/open_dict"),
    "cloudpickle": ("2.2.1", "pickling the task by value (3.0 on Python >= 3.12)"),
}

#: Python >= 3.12 needs cloudpickle 3 (2.x cannot pickle 3.12 code objects).
CLOUDPICKLE_FLOOR_PY312 = "3.0.0"


def _parse(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '2.5.0a0' -> (2, 5, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def installed_versions(names: tuple[str, ...] = tuple(FLOORS)) -> dict[str, Optional[str]]:
    """Installed version of each distribution (None when it is missing)."""
    from importlib import metadata

    found: dict[str, Optional[str]] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def problems(versions: Mapping[str, Optional[str]], python: tuple[int, ...]) -> list[str]:
    """Each unsupported part of this environment, with its fix (pure: easy to test)."""
    found: list[str] = []
    if python[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        running = ".".join(map(str, python[:3]))
        found.append(f"Python {running} is older than {need}: run the app with Python >= {need}")
    for name, (floor, why) in FLOORS.items():
        if name == "cloudpickle" and python[:2] >= (3, 12):
            floor = CLOUDPICKLE_FLOOR_PY312
        have = versions.get(name)
        if have is None:
            found.append(f"{name} is not installed: pip install '{name}>={floor}'")
        elif _parse(have) < _parse(floor):
            found.append(
                f"{name} {have} is older than {floor} (needed for {why}): "
                f"pip install '{name}>={floor}'"
            )
    return found


def require_supported() -> None:
    """Raise :class:`TorchrunSetupError` naming every unsupported part and its fix."""
    from hydra_torchrun_callback._result import TorchrunSetupError

    found = problems(installed_versions(), tuple(sys.version_info[:3]))
    if found:
        raise TorchrunSetupError(
            "hydra/callbacks=torchrun cannot run in this environment: "
            + "; ".join(found)
            + ". No worker was started and the task did not run."
        )
