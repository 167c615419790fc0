"""The launcher the callback wraps around the user's, for sweeps that outlive interruptions.

Never named by users: ``on_multirun_start`` puts it in ``hydra.launcher`` for the sweeper
to instantiate, and it puts the user's launcher back at once (see
``hydra_torchrun_callback._sweep.launcher``). Hydra only instantiates launchers defined
under ``hydra_plugins``, so the class lives here; it stays thin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class SweepLauncher(Launcher):
    """The user's launcher, with dead points failing alone and resume (see the module)."""

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.run: Optional[Any] = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra_torchrun_callback._sweep.launcher import SweepRun

        self.run = SweepRun(self.params, hydra_context, task_function, config)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.run is not None
        returns: Sequence[JobReturn] = self.run.launch(job_overrides, initial_job_idx)
        return returns
