"""The package's one logger: its records reach Hydra's console and job log (from the agent
in a fork of the warm server too, through the agent pipe)."""

from __future__ import annotations

import logging

__all__ = ["log"]

log = logging.getLogger("hydra_torchrun_callback")
