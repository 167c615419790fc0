"""hydra-torchrun-launcher's ``_target_``, kept so that configs naming it keep working.

``hydra.launcher._target_:
hydra_plugins.hydra_torchrun_launcher.distributed_launcher.TorchDistributedLauncher``
(copied from that launcher's README) runs on this package's launcher. Uninstall
hydra-torchrun-launcher first: both packages provide this module.
"""

from __future__ import annotations

from hydra_plugins.hydra_torchrun_callback.torchrun_launcher import TorchrunLauncher


class TorchDistributedLauncher(TorchrunLauncher):
    """hydra-torchrun-launcher's class name; behaves as ``hydra/launcher=torchrun``."""
