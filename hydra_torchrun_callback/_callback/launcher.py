"""``hydra/launcher=torchrun``: a drop-in for hydra-torchrun-launcher on the callback's machinery.

Commands written for that launcher (``-m hydra/launcher=torchrun
hydra.launcher.nproc_per_node=8 ...``) keep working: its keys are mapped onto the
callback's options and every job of the sweep runs as Hydra's basic launcher runs
it, with the torchrun callback added last to the app's callbacks. So the jobs get
everything the callback gives (rank 0's return value, the root cause of a failure,
per-rank logs, the job summary, SLURM detection).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from hydra_torchrun_callback._callback.hooks import TARGET, TorchrunCallback
from hydra_torchrun_callback._options import TorchrunOptionError, options_here
from hydra_torchrun_callback._result import TorchrunSetupError

__all__ = ["LAUNCHER_PREFIX", "launch_jobs", "launcher_options"]

LAUNCHER_PREFIX = "hydra.launcher"

#: hydra-torchrun-launcher's defaults that mean "let the callback decide".
_SEED_DEFAULTS: dict[str, Any] = {
    "nnodes": "1:1",
    "rdzv_id": "none",
    "monitor_interval": 5,
    "node_rank": 0,
    "master_addr": "127.0.0.1",
    "master_port": 29500,
}
#: torchrun's script-launch keys, meaningless when the task function is what runs.
_SCRIPT_KEYS: dict[str, Any] = {
    "module": False,
    "no_python": False,
    "run_path": False,
    "training_script": "",
    "training_script_args": [],
}


def launcher_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Map ``hydra.launcher`` keys onto the callback's options (validated)."""
    given = {k: v for k, v in raw.items() if k != "_target_"}
    for key, default in _SCRIPT_KEYS.items():
        value = given.pop(key, default)
        if value not in (default, None) and value != list(default or []):
            raise TorchrunOptionError(
                key,
                value,
                "this launcher runs the Hydra task function in every worker, not a script",
                "",
                fix=f"remove {LAUNCHER_PREFIX}.{key} (the app's task function is what runs)",
                prefix=LAUNCHER_PREFIX,
            )
    opts = dict(given)
    single_node = str(given.get("nnodes", "1:1")).strip() in ("1", "1:1")
    for key, default in _SEED_DEFAULTS.items():
        if key in opts and opts[key] == default:
            opts[key] = None
    if single_node:
        opts["nnodes"] = None
    if opts.get("node_rank") is not None and single_node:
        opts["node_rank"] = None
    # static rendezvous at that launcher's default address means "one machine, free port".
    static_default = (
        str(opts.get("rdzv_backend")) == "static"
        and opts.get("master_addr") is None
        and opts.get("master_port") is None
        and not opts.get("rdzv_endpoint")
    )
    if static_default:
        opts["rdzv_backend"] = "c10d"
    if opts.get("monitor_interval") is None:
        opts.pop("monitor_interval", None)
    try:
        options_here(opts)
    except TorchrunOptionError as err:
        raise err.under(LAUNCHER_PREFIX) from None
    return opts


class LauncherCallback(TorchrunCallback):
    """The callback as the launcher uses it: options come from each job's ``hydra.launcher``."""

    def _job_options(self, config: DictConfig) -> dict[str, Any]:
        node = OmegaConf.select(config, LAUNCHER_PREFIX)
        if not isinstance(node, DictConfig):
            return dict(self._options)
        raw = OmegaConf.to_container(node, resolve=True)
        assert isinstance(raw, dict)
        return launcher_options({str(k): v for k, v in raw.items()})


class _WithTorchrun:
    """The app's callbacks with the torchrun callback added last (first to end)."""

    def __init__(self, inner: Any, torchrun: TorchrunCallback) -> None:
        self._inner = inner
        self._torchrun = torchrun

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._inner.on_job_start(config=config, **kwargs)
        self._torchrun.on_job_start(config, **kwargs)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self._torchrun.on_job_end(config, job_return, **kwargs)
        self._inner.on_job_end(config=config, job_return=job_return, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _has_torchrun_callback(config: DictConfig) -> bool:
    callbacks = OmegaConf.select(config, "hydra.callbacks")
    if not isinstance(callbacks, DictConfig):
        return False
    return any(
        isinstance(node, DictConfig) and node.get("_target_") == TARGET
        for node in callbacks.values()
    )


def check_setup(config: DictConfig) -> None:
    """Refuse a sweep that asks for torchrun twice, before any job starts."""
    if _has_torchrun_callback(config):
        raise TorchrunSetupError(
            "hydra/launcher=torchrun and hydra/callbacks=torchrun both ask to run the task "
            "under torchrun. Fix: use one of them: drop hydra/callbacks=torchrun (the "
            "launcher adds it), or drop hydra/launcher=torchrun and set the options under "
            "hydra.callbacks.torchrun (see the README's migration table)."
        )


def launch_jobs(
    *,
    options: Mapping[str, Any],
    hydra_context: Any,
    task_function: Any,
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    callback: Optional[TorchrunCallback] = None,
) -> Any:
    """Run the sweep's jobs one after the other, each under torchrun."""
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher
    from hydra.types import HydraContext

    torchrun = callback or LauncherCallback(**options)
    basic = BasicLauncher()
    basic.setup(
        hydra_context=HydraContext(
            config_loader=hydra_context.config_loader,
            # Duck-typed: Hydra only calls the hooks of its (private) Callbacks class.
            callbacks=_WithTorchrun(hydra_context.callbacks, torchrun),  # type: ignore[arg-type]
        ),
        task_function=task_function,
        config=config,
    )
    return basic.launch(job_overrides, initial_job_idx)
