"""Run any Hydra app's task under torchrun (torch.distributed.elastic) from a callback.

Enable it with ``hydra/callbacks=torchrun`` (or ``+callbacks=torchrun``) on the
command line of any Hydra app; options live at ``hydra.callbacks.torchrun.*``.
``hydra/launcher=torchrun`` is a drop-in for hydra-torchrun-launcher on the same
machinery (options at ``hydra.launcher.*``).
"""

from hydra_torchrun_callback._callback.hooks import TorchrunAbort, TorchrunCallback
from hydra_torchrun_callback._config import TorchrunConf, TorchrunLauncherConf
from hydra_torchrun_callback._options import TorchrunOptionError
from hydra_torchrun_callback._result import (
    TorchrunJobError,
    TorchrunPointLost,
    TorchrunSetupError,
)

__version__ = "0.1.0"

__all__ = [
    "TorchrunAbort",
    "TorchrunCallback",
    "TorchrunConf",
    "TorchrunJobError",
    "TorchrunLauncherConf",
    "TorchrunOptionError",
    "TorchrunPointLost",
    "TorchrunSetupError",
    "__version__",
]
