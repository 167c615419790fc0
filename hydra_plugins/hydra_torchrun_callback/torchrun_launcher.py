"""``hydra/launcher=torchrun``: the launcher class Hydra instantiates.

Hydra only instantiates plugins defined under ``hydra_plugins``, so the class lives
here; it stays thin (no torch import at app start) and hands each sweep to
``hydra_torchrun_callback._launcher``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class TorchrunLauncher(Launcher):
    """Run every job of a sweep under torchrun (options: ``hydra.launcher.*``)."""

    def __init__(self, **options: Any) -> None:
        from hydra_torchrun_callback._callback.launcher import launcher_options

        # Bad keys and values fail here, when Hydra builds the launcher: before any job.
        self.options = launcher_options(options)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra_torchrun_callback._callback.launcher import check_setup

        check_setup(config)
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from hydra_torchrun_callback._callback.launcher import launch_jobs

        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        returns: Sequence[JobReturn] = launch_jobs(
            options=self.options,
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=self.config,
            job_overrides=job_overrides,
            initial_job_idx=initial_job_idx,
        )
        return returns
