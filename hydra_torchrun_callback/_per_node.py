"""What each node of a multi-node job writes in the one output dir they share.

All nodes of a job run the same Hydra job in the same output dir (on NFS, as a rule).
Only node 0 writes ``.hydra/`` and ``<job>.log``; node k writes ``<job>_node<k>.log``
and nothing else, so no two hosts append to or rewrite one file.

Under a submitit launcher every node composes its config from the sweep's overrides:
:func:`prepare_multirun` adds two overrides there (in the submitting process) whose
resolvers, registered when this module is imported, answer per node. A job started
by plain ``srun`` composes its config itself: :func:`move_node_log` moves the log there.
It also makes srun steps inside the job inherit ``cpus_per_task``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

__all__ = ["adopt_output_dir", "move_node_log", "node_index", "prepare_multirun"]

#: Hydra's default job log file; only this one is renamed per node (a user's own
#: logging config is theirs).
DEFAULT_LOG_FILE = "${hydra.runtime.output_dir}/${hydra.job.name}.log"
NODE0_ONLY = "torchrun_node0_only"
NODE_SUFFIX = "torchrun_node_suffix"
#: Slurm 22.05-23.02: srun in a batch script does not read SLURM_CPUS_PER_TASK, so
#: submitit's srun would start each task with one CPU whatever cpus_per_task says.
#: (No ``${...}``: OmegaConf would read it as an interpolation.)
SRUN_CPUS_LINE = (
    'if [ -n "$SLURM_CPUS_PER_TASK" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi'
)


def node_index(env: Optional[dict[str, str]] = None) -> int:
    """This process's node (task) rank in a multi-task job, 0 elsewhere."""
    from hydra_torchrun_callback._placement import detect_cluster

    try:
        task = detect_cluster(dict(os.environ) if env is None else env)
    except Exception:  # a half-set environment: the callback reports it, not the resolver
        return 0
    return task.task_rank if task is not None and task.num_tasks > 1 else 0


def _node0_only(value: Any = None) -> Any:
    return value if node_index() == 0 else None


def _node_suffix() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:
        return ""  # a worker: its file is <job>_rank<r>.log, unique in the job already
    node = node_index()
    return f"_node{node}" if node else ""


OmegaConf.register_new_resolver(NODE0_ONLY, _node0_only, replace=True)
OmegaConf.register_new_resolver(NODE_SUFFIX, _node_suffix, replace=True)


def prepare_multirun(config: DictConfig) -> None:
    """In the submitting process: make every node's job write only its own files, and
    srun steps inherit ``cpus_per_task``. Overrides a submitit launcher replays on
    each node; other launchers run one node per job and are left alone."""
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    if "submitit" not in launcher:
        return
    overrides: list[str] = []
    hydra = config.hydra
    subdir = OmegaConf.select(config, "hydra.output_subdir", throw_on_missing=False)
    if isinstance(subdir, str) and subdir and "${" not in subdir:
        overrides.append(f"hydra.output_subdir=${{{NODE0_ONLY}:{subdir}}}")
    node = OmegaConf.select(hydra, "job_logging.handlers.file", throw_on_missing=False)
    if node is not None and node._get_node("filename")._value() == DEFAULT_LOG_FILE:
        overrides.append(
            "hydra.job_logging.handlers.file.filename="
            f"${{hydra.runtime.output_dir}}/${{hydra.job.name}}${{{NODE_SUFFIX}:}}.log"
        )
    with read_write(hydra.overrides), open_dict(hydra.overrides):
        known = set(OmegaConf.to_container(hydra.overrides.hydra, resolve=False) or [])
        hydra.overrides.hydra.extend([o for o in overrides if o not in known])
    if launcher.endswith("SlurmLauncher"):
        with read_write(hydra.launcher), open_dict(hydra.launcher):
            setup = list(hydra.launcher.get("setup") or [])
            if SRUN_CPUS_LINE not in setup:
                hydra.launcher.setup = [*setup, SRUN_CPUS_LINE]


def move_node_log(output_dir: str, job_name: str) -> Optional[str]:
    """Plain ``srun``: node k's Hydra process opened ``<job>.log`` like node 0; log to
    ``<job>_node<k>.log`` instead. Returns the new file, None when nothing moved."""
    node = node_index()
    if node == 0:
        return None
    shared = os.path.abspath(os.path.join(output_dir, f"{job_name}.log"))
    own = os.path.join(output_dir, f"{job_name}_node{node}.log")
    moved = None
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == shared:
            handler.acquire()
            try:
                handler.close()
                handler.baseFilename = os.path.abspath(own)
                handler.stream = handler._open()
            finally:
                handler.release()
            moved = own
    return moved


def adopt_output_dir(config: DictConfig, own_dir: str, job_dir: str) -> None:
    """Node k works in node 0's output dir: with plain ``srun`` each task resolved
    ``hydra.run.dir`` itself, and ``${now:}`` there differs between nodes started a
    second apart. Moves this node's log there and removes the dir Hydra made here if it
    holds nothing but Hydra's own files."""
    from hydra.core.hydra_config import HydraConfig

    log = logging.getLogger("hydra_torchrun_callback")
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
    for handler in logging.getLogger().handlers:
        if (
            isinstance(handler, logging.FileHandler)
            and os.path.dirname(handler.baseFilename) == own
        ):
            old = handler.baseFilename
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
    # Hydra opened <job>.log here before the log moved to <job>_node<k>.log: empty.
    opened = os.path.join(own, f"{OmegaConf.select(config, 'hydra.job.name')}.log")
    with contextlib.suppress(OSError):
        if os.path.getsize(opened) == 0:
            os.unlink(opened)
    hydra_files = os.path.join(own, ".hydra")
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(hydra_files, name))
    for folder in (hydra_files, own):
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only if empty: anything else there is kept
