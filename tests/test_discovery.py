"""Discovery from a real (non-editable) wheel install, and a loud error when it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import APPS, REPO, app_env


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel and installed into a folder of its own."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(base / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    [wheel] = list((base / "dist").glob("hydra_torchrun_callback-*.whl"))
    site = base / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (site / "hydra_plugins" / "hydra_torchrun_callback" / "__init__.py").exists()
    assert (site / "hydra_torchrun_callback" / "py.typed").exists()
    return site


def _env(*paths: Path) -> dict[str, str]:
    env = app_env()
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(APPS)])
    return env


@pytest.mark.parametrize("override", ["hydra/callbacks=torchrun", "+callbacks=torchrun"])
def test_wheel_install_is_discovered(wheel_site: Path, tmp_path: Path, override: str) -> None:
    env = _env(wheel_site)
    where = subprocess.run(
        [sys.executable, "-c", "import hydra_torchrun_callback as m; print(m.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(wheel_site))  # the wheel's copy, not the source tree
    proc = subprocess.run(
        [
            sys.executable,
            str(APPS / "probe_app.py"),
            override,
            "hydra.callbacks.torchrun.nproc_per_node=2",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("rank*.json")) == [
        "rank0.a0.json",
        "rank1.a0.json",
    ]


def test_wheel_install_provides_the_launcher(wheel_site: Path, tmp_path: Path) -> None:
    """``hydra/launcher=torchrun`` and the seed launcher's ``_target_`` come with the wheel."""
    seed_module = wheel_site / "hydra_plugins" / "hydra_torchrun_launcher"
    assert (seed_module / "distributed_launcher.py").exists()
    proc = subprocess.run(
        [
            sys.executable,
            str(APPS / "probe_app.py"),
            "-m",
            "hydra/launcher=torchrun",
            "hydra.launcher.nproc_per_node=2",
            "hydra.launcher._target_=hydra_plugins.hydra_torchrun_launcher."
            "distributed_launcher.TorchDistributedLauncher",
            f"hydra.sweep.dir={tmp_path / 'multi'}",
        ],
        env=_env(wheel_site),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "multi" / "0").glob("rank*.json")) == [
        "rank0.a0.json",
        "rank1.a0.json",
    ]


BLOCKER = """
# Hide the plugin from Hydra's scan (as an editable install's import hook does).
import pkgutil
_walk = pkgutil.walk_packages
def _hidden(*args, **kwargs):
    for info in _walk(*args, **kwargs):
        if not info.name.startswith("hydra_plugins.hydra_torchrun_callback"):
            yield info
pkgutil.walk_packages = _hidden
import sys
class _Block:  # walk_packages imports packages to recurse into them: refuse that too
    def find_spec(self, name, path=None, target=None):
        if name.startswith("hydra_plugins.hydra_torchrun_callback"):
            raise ImportError("simulated: plugin hidden")
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize(
    ("override", "message"),
    [("hydra/callbacks=torchrun", "Could not override 'hydra/callbacks'")],
)
def test_failed_discovery_is_an_error(tmp_path: Path, override: str, message: str) -> None:
    """The recommended form fails loudly when the plugin is hidden; nothing runs.

    (``+callbacks=torchrun`` cannot: Hydra then reads it as a plain config key and
    none of this package's code is loaded to object; the README says so.)
    """
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = _env(tmp_path, REPO)
    proc = subprocess.run(
        [sys.executable, str(APPS / "probe_app.py"), override, f"hydra.run.dir={tmp_path / 'out'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()
