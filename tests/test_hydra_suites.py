"""Hydra's own launcher test suites, with the callback added to the basic launcher.

They check return values, output dirs, overrides and job names for us: every job
here runs its task in a torchrun worker (one worker, to keep the suite fast).
"""

from __future__ import annotations

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

CALLBACK = ["hydra/callbacks=torchrun", "hydra.callbacks.torchrun.nproc_per_node=1"]


@pytest.mark.parametrize(("launcher_name", "overrides"), [("basic", CALLBACK)])
class TestBasicLauncherWithTorchrun(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    ("task_launcher_cfg", "extra_flags"), [({}, ["-m", "hydra/launcher=basic", *CALLBACK])]
)
class TestBasicLauncherIntegrationWithTorchrun(IntegrationTestSuite):
    pass
