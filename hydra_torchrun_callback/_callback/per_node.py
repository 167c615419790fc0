"""What each node of a multi-node job writes in the one output dir they share.

All nodes of a job run the same Hydra job in the same output dir (on NFS, as a rule).
Only node 0 writes ``.hydra/`` and ``<job>.log``; node k writes ``<job>_node<k>.log``
and nothing else, so no two hosts append to or rewrite one file.

Under a submitit launcher every node composes its config from the sweep's overrides:
:func:`prepare_multirun` adds two overrides there (in the submitting process) whose
resolvers, registered when this module is imported, answer per node. A single run
started by plain ``srun`` gets the same settings in ``on_run_start`` (:func:`prepare_run`).
It also makes srun steps inside the job inherit ``cpus_per_task``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_torchrun_callback._log import log

__all__ = [
    "adopt_output_dir",
    "node_index",
    "prepare_multirun",
    "prepare_run",
    "register_resolvers",
]

#: Hydra's default job log file; only this one is renamed per node (a user's own
#: logging config is theirs).
DEFAULT_LOG_FILE = "${hydra.runtime.output_dir}/${hydra.job.name}.log"
NODE0_ONLY = "torchrun_node0_only"
NODE_SUFFIX = "torchrun_node_suffix"
#: Slurm 22.05-23.02: srun in a batch script does not read SLURM_CPUS_PER_TASK, so
#: submitit's srun would start each task with one CPU whatever cpus_per_task says.
#: (No ``${...}``, which OmegaConf would read as an interpolation; safe under ``set -eu``.)
SRUN_CPUS_LINE = (
    '[ -z "$(printenv SLURM_CPUS_PER_TASK)" ] || '
    "export SRUN_CPUS_PER_TASK=$(printenv SLURM_CPUS_PER_TASK)"
)


def node_index(env: Optional[dict[str, str]] = None) -> int:
    """This process's node (task) rank in a multi-task job, 0 elsewhere."""
    from hydra_torchrun_callback._node.placement import detect_cluster

    try:
        task = detect_cluster(dict(os.environ) if env is None else env)
    except Exception:  # a half-set environment: the callback reports it, not the resolver
        return 0
    return task.task_rank if task is not None and task.num_tasks > 1 else 0


def _node0_only(value: Any = None) -> Any:
    return value if node_index() == 0 else None


def _node_suffix() -> str:
    from hydra_torchrun_callback._node.placement import inside_torchrun_worker

    if inside_torchrun_worker(os.environ):
        return ""  # a worker: its file is <job>_rank<r>.log, unique in the job already
    node = node_index()
    return f"_node{node}" if node else ""


def register_resolvers() -> None:
    """Register this module's two resolvers, if missing; cheap, so it runs wherever they
    may be needed. Registering once at import is not enough: Hydra's
    ``Singleton.set_state`` (its test fixtures, its launchers' job processes) replaces
    OmegaConf's resolver table with one captured earlier, perhaps before this import,
    while the module stays imported. Called at import, by the plugin entry (Hydra
    re-runs it at every plugin scan), and by the callback before it adds the overrides
    that use them: a launcher captures the table after that, for its jobs."""
    for name, resolver in ((NODE0_ONLY, _node0_only), (NODE_SUFFIX, _node_suffix)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()


def _default_log_file(handler: Any) -> bool:
    """Hydra's default file handler, its filename not yet resolved (not the user's own)."""
    if not isinstance(handler, DictConfig):
        return False
    filename = handler._get_node("filename")
    return filename is not None and filename._value() == DEFAULT_LOG_FILE


def _node_overrides(config: DictConfig) -> list[str]:
    """Overrides that make node k's job write only ``<job>_node<k>.log`` (resolved on
    each node: node 0 keeps ``.hydra/`` and ``<job>.log``)."""
    overrides: list[str] = []
    subdir = OmegaConf.select(config, "hydra.output_subdir", throw_on_missing=False)
    if isinstance(subdir, str) and subdir and "${" not in subdir:
        overrides.append(f"hydra.output_subdir=${{{NODE0_ONLY}:{subdir}}}")
    node = OmegaConf.select(config, "hydra.job_logging.handlers.file", throw_on_missing=False)
    if _default_log_file(node):
        overrides.append(
            "hydra.job_logging.handlers.file.filename="
            f"${{hydra.runtime.output_dir}}/${{hydra.job.name}}${{{NODE_SUFFIX}:}}.log"
        )
    return overrides


def prepare_multirun(config: DictConfig) -> None:
    """In the process that launches the sweep: every launcher builds each job's config
    from the sweep's ``hydra.overrides.hydra`` (submitit does it on each node), so two
    overrides there make every node's job write only its own files. Under submitit_slurm,
    srun steps also inherit ``cpus_per_task``."""
    register_resolvers()  # before the launcher captures Hydra's state for its jobs
    hydra = config.hydra
    with read_write(hydra.overrides), open_dict(hydra.overrides):
        known = set(OmegaConf.to_container(hydra.overrides.hydra, resolve=False) or [])
        hydra.overrides.hydra.extend([o for o in _node_overrides(config) if o not in known])
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    if launcher.endswith("SlurmLauncher"):
        with read_write(hydra.launcher), open_dict(hydra.launcher):
            if hydra.launcher.get("setup") is None:
                hydra.launcher.setup = []
            # Appended to the config's own list: the user's lines stay unresolved.
            setup = OmegaConf.to_container(hydra.launcher.setup, resolve=False)
            if SRUN_CPUS_LINE not in (setup or []):
                hydra.launcher.setup.append(SRUN_CPUS_LINE)


def prepare_run(config: DictConfig) -> None:
    """Single run (plain ``srun``): ``on_run_start`` gets the config Hydra is about to run
    the job with; on node k, no ``.hydra/`` and the log goes to ``<job>_node<k>.log``."""
    register_resolvers()
    node = node_index()
    if node == 0:
        return
    hydra = config.hydra
    with read_write(hydra), open_dict(hydra):
        if OmegaConf.select(config, "hydra.output_subdir", throw_on_missing=False) is not None:
            hydra.output_subdir = None
        file = OmegaConf.select(config, "hydra.job_logging.handlers.file", throw_on_missing=False)
        if _default_log_file(file):
            file.filename = f"${{hydra.runtime.output_dir}}/${{hydra.job.name}}_node{node}.log"


def adopt_output_dir(config: DictConfig, own_dir: str, job_dir: str) -> bool:
    """Node k works in node 0's output dir when its own differs: with plain ``srun`` each
    task resolves ``hydra.run.dir`` itself, and ``${now:}`` there differs between nodes
    started a second apart. Moves this node's own log there and removes the dir Hydra
    made here if that leaves it empty; deletes nothing else. False (nothing done) when the
    dirs are the same, or node 0's is not reachable from here (node-local dirs)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        if not os.path.isdir(job_dir) or os.path.samefile(own_dir, job_dir):
            return False
    except OSError:
        return False
    log.warning(
        "node %d works in node 0's output dir %s (its own, %s, differs: ${now:} in "
        "hydra.run.dir was resolved at another time on each node)",
        node_index(),
        job_dir,
        own_dir,
    )
    held: Any = HydraConfig.instance().cfg if HydraConfig.initialized() else None
    for cfg in (config, held):  # the job's config, and HydraConfig's copy of its hydra node
        if cfg is not None:
            with read_write(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = job_dir
    if os.path.realpath(os.getcwd()) == os.path.realpath(own_dir):
        os.chdir(job_dir)  # hydra.job.chdir=True: the job runs in its output dir
    own = os.path.realpath(own_dir)
    mine = f"_node{node_index()}.log"  # only this node's own log file is moved
    for handler in logging.getLogger().handlers:
        old = getattr(handler, "baseFilename", "")
        if not isinstance(handler, logging.FileHandler) or not old.endswith(mine):
            continue
        if os.path.dirname(os.path.realpath(old)) != own:
            continue
        handler.acquire()
        try:
            handler.close()
            handler.baseFilename = os.path.join(job_dir, os.path.basename(old))
            handler.stream = handler._open()
            with open(old) as lines:  # what this node logged so far
                handler.stream.write(lines.read())
            os.unlink(old)
        finally:
            handler.release()
    with contextlib.suppress(OSError):
        os.rmdir(own)  # only if empty: anything else there is kept
    return True
