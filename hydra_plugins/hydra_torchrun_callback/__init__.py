"""Hydra discovery entry: registers ``hydra/callbacks=torchrun``, ``+callbacks=torchrun``
and the drop-in ``hydra/launcher=torchrun``.

Hydra imports every ``hydra_plugins`` module at each app start, so this stays
thin: it only stores the options dataclasses and registers the per-node resolvers (no
torch import). Hydra re-runs this module at each plugin scan, after a restore of its
singletons among others, which puts both back.
"""

from hydra.core.config_store import ConfigStore

from hydra_torchrun_callback._callback.per_node import register_resolvers
from hydra_torchrun_callback._config import TorchrunConf, TorchrunLauncherConf

_cs = ConfigStore.instance()
# Hydra's own optional group: works even when the app has a `callbacks` group of its own.
_cs.store(
    group="hydra/callbacks", name="torchrun", node=TorchrunConf, package="hydra.callbacks.torchrun"
)
# The short form from the docs of most Hydra callbacks.
_cs.store(group="callbacks", name="torchrun", node=TorchrunConf, package="hydra.callbacks.torchrun")
# Drop-in for hydra-torchrun-launcher: its keys, on the callback's machinery.
_cs.store(group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="torchrun")
# The resolvers of the per-node overrides: a restored resolver table may lack them.
register_resolvers()
