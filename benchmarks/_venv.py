"""The venvs the launch benchmark runs in: this interpreter's, and a minimal one.

Launch times depend on what the venv holds: torch imports numpy when it is installed,
Lightning's and others' import hooks add more. "full" is the interpreter running the
benchmark (the project's dev venv: numpy, Lightning, Optuna, matplotlib...); "minimal"
is ``benchmarks/.venv-minimal``: torch and this package's own dependencies (with
submitit), nothing else, built on first use from the package registry (torch at the
version the full venv has, so both measure the same torch).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MINIMAL = HERE / ".venv-minimal"
#: What the report says of a venv: are these distributions installed?
NOTABLE = ("numpy", "lightning", "pytorch-lightning", "optuna", "matplotlib", "scipy")


def _spec() -> list[str]:
    """torch pinned to the full venv's version, then the package's dependencies."""
    from importlib.metadata import version

    import tomllib

    torch = version("torch").split("+")[0]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not d.startswith("torch")]
    return [f"torch=={torch}", *deps, *project["optional-dependencies"]["submitit"]]


def minimal() -> str:
    """The minimal venv's interpreter (built, or rebuilt when the spec changed)."""
    python = MINIMAL / "bin" / "python"
    stamp = MINIMAL / "spec.json"
    spec = _spec()
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == spec:
        return str(python)
    shutil.rmtree(MINIMAL, ignore_errors=True)
    print(f"building {MINIMAL} ({', '.join(spec)})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(MINIMAL)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, spec[0]], check=True)  # torch alone first: its own wheel
    subprocess.run([*pip, *spec[1:]], check=True)
    stamp.write_text(json.dumps(spec))
    return str(python)


VENVS: dict[str, Callable[[], str]] = {"full": lambda: sys.executable, "minimal": minimal}


def describe(python: str) -> str:
    """``<prefix>: N distributions; numpy, lightning installed`` for the report."""
    code = (
        "import sys, json, importlib.metadata as m; "
        "names = {d.metadata['Name'].lower() for d in m.distributions()}; "
        "print(json.dumps([sys.prefix, len(names), sorted(names)]))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    prefix, count, names = json.loads(out.stdout)
    notable = [n for n in NOTABLE if n in names]
    held = ", ".join(notable) + " installed" if notable else f"none of {', '.join(NOTABLE)}"
    return f"`{prefix}`: {count} distributions; {held}"


def has(python: str, module: str) -> bool:
    """Whether the venv's interpreter can import ``module`` (without importing it)."""
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0
