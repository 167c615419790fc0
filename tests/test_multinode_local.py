"""Multi-node under submitit_local emulation: each local task is one torchrun node."""

from __future__ import annotations

from pathlib import Path

import multinode_scenarios as sc
from conftest import app_env

LOCAL = [
    "hydra/launcher=submitit_local",
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.timeout_min=60",
]


def test_two_point_sweep(tmp_path: Path) -> None:
    sc.two_point_sweep(tmp_path, LOCAL, app_env())


def test_failure_on_second_node(tmp_path: Path) -> None:
    sc.failure_on_node_1(tmp_path, LOCAL, app_env())


def test_preempted_and_requeued(tmp_path: Path) -> None:
    sc.preempted_and_requeued(tmp_path, LOCAL, app_env(), sc.signal_agents)


def test_lightning_on_two_emulated_nodes(tmp_path: Path) -> None:
    sc.lightning_two_nodes(tmp_path, LOCAL, app_env())


def test_stacks_of_every_rank_on_two_nodes(tmp_path: Path) -> None:
    sc.stacks_on_two_nodes(tmp_path, LOCAL, app_env())
