"""Hydra's own launcher test suites, with the callback added, run as a peer runs them.

``peer_suites/suites.py`` holds the suites: Hydra's ``LauncherTestSuite`` and
``IntegrationTestSuite`` on the basic launcher (two workers per job), and
hydra-submitit-launcher's parametrisation of them on ``submitit_local`` (one node, and two
tasks per node: two emulated nodes). Each runs in a pytest process of its own with no
conftest, so the package is first imported inside the suite and Hydra's singleton
restores (resolvers, ConfigStore) act on it as they do in a peer's CI: test order in
this session cannot hide a registration lost to a restore (issue 25).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, app_env

SUITES = REPO / "tests" / "peer_suites" / "suites.py"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("suite", ["basic", "submitit1", "submitit2"])
def test_peer_launcher_suites(suite: str, tmp_path: Path) -> None:
    env = app_env(HTR_PEER_SUITE=suite)
    env["PYTHONPATH"] = str(REPO)  # the package, not the test helpers (no conftest)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "--noconftest",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            f"--rootdir={tmp_path}",
            str(SUITES),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20, summary
    assert not re.search(r"failed|error", summary), summary
