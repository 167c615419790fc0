"""Hydra's launcher suites as a peer runs them: collected only by ``test_hydra_suites.py``,
which runs this file in a pytest process of its own with no conftest, so this package is
first imported inside the suite (by Hydra's plugin discovery, during the first test) and
Hydra's ``hydra_restore_singletons`` fixture then rolls OmegaConf's resolvers and the
ConfigStore back to a state from before that import, after every test.

``HTR_PEER_SUITE`` picks the launcher: ``basic`` (Hydra's own), ``submitit1`` or
``submitit2`` (hydra-submitit-launcher's suites on submitit_local, 1 or 2 tasks per node).
"""

from __future__ import annotations

import os
import sys

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

#: Whether anything imported the package before the first test (it must not have).
IMPORTED_BEFORE_SUITE = "hydra_torchrun_callback" in sys.modules

SUITE = os.environ.get("HTR_PEER_SUITE", "basic")
CALLBACK = ["hydra/callbacks=torchrun", "hydra.callbacks.torchrun.nproc_per_node=2"]
# hydra-submitit-launcher's own parametrisation (its tests/test_submitit_launcher.py),
# the callback added.
SUITES = {
    "basic": ("basic", []),
    "submitit1": ("submitit_local", ["hydra.launcher.timeout_min=2"]),
    "submitit2": (
        "submitit_local",
        ["hydra.launcher.timeout_min=2", "hydra.launcher.tasks_per_node=2"],
    ),
}
LAUNCHER, LAUNCHER_OVERRIDES = SUITES[SUITE]
# Two tasks per node are two emulated nodes: one worker each keeps the world at 2.
NPROC = ["hydra.callbacks.torchrun.nproc_per_node=1"] if SUITE == "submitit2" else []


def test_package_not_imported_before_the_suite() -> None:
    assert not IMPORTED_BEFORE_SUITE, "the check needs a process that has not imported it yet"


@pytest.mark.parametrize(
    ("launcher_name", "overrides"), [(LAUNCHER, [*LAUNCHER_OVERRIDES, *CALLBACK, *NPROC])]
)
class TestPeerLauncherSuite(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    ("task_launcher_cfg", "extra_flags"),
    [({}, ["-m", f"hydra/launcher={LAUNCHER}", *LAUNCHER_OVERRIDES, *CALLBACK, *NPROC])],
)
class TestPeerIntegrationSuite(IntegrationTestSuite):
    pass
