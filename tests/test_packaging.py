"""What users download: sdist and wheel build, pass twine's checks, and the wheel holds the
package, its Hydra plugins and typing marker, the license, and nothing from tests/."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out


def test_twine_check_passes(dist: Path) -> None:
    files = sorted(str(p) for p in dist.iterdir())
    assert len(files) == 2, files  # one sdist, one wheel
    run = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *files],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_wheel_contents_and_metadata(dist: Path) -> None:
    [wheel] = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {p.relative_to(REPO).as_posix() for p in REPO.glob("hydra_torchrun_callback/*.py")}
    plugins = {p.relative_to(REPO).as_posix() for p in REPO.glob("hydra_plugins/*/*.py")}
    assert modules | plugins | {"hydra_torchrun_callback/py.typed"} <= set(names)
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared with others
    own = [n for n in names if ".dist-info/" not in n]
    assert all(n.startswith(("hydra_torchrun_callback/", "hydra_plugins/")) for n in own), own
    assert not [n for n in names if "tests/" in n or n.startswith(("conf/", "benchmarks/"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(meta_name))
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["License-Expression"] == "MIT"
    requires = meta.get_all("Requires-Dist") or []
    assert "torch<3,>=2.4.1" in requires, requires
    classifiers = meta.get_all("Classifier") or []
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hydra-torchrun-summary" in zipfile.ZipFile(wheel).read(entry).decode()
