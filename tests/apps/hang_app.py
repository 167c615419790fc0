"""Test app: a real hang. One rank waits for data that never comes; the others block
in a gloo all_reduce it never joins (or wait too, without a collective)."""

import json
import os
import threading
import time

import hydra
import import_probe
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from procs import agent_pid


def wait_for_data(seconds: float) -> None:
    time.sleep(seconds)


def wait_for_release(path: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)


def prefetch_loop(stop: threading.Event) -> None:
    stop.wait()


@hydra.main(version_base=None, config_path="conf", config_name="hang")
def main(cfg: DictConfig) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # A second thread, as a data loader would have: dumps cover every thread.
    threading.Thread(target=prefetch_loop, args=(threading.Event(),), daemon=True).start()
    out = HydraConfig.get().runtime.output_dir
    # Read the config first: once its marker exists, a rank goes straight to its block.
    fail, sleeper, collective, hold = cfg.fail_rank, cfg.sleeper, cfg.collective, cfg.hold
    marker = os.path.join(out, f"started_rank{rank}.json")
    with open(marker + ".tmp", "w") as f:
        json.dump({"pid": import_probe.imported_by(), "agent_pid": agent_pid()}, f)
    os.replace(marker + ".tmp", marker)
    if rank == fail:
        # Raises once the test creates <output dir>/release (after it looked around).
        wait_for_release(os.path.join(out, "release"), hold)
        raise RuntimeError(f"rank {rank}: data shard missing")
    if rank == sleeper or not collective:
        wait_for_data(hold)
    else:
        dist.all_reduce(torch.ones(1))  # blocks: the sleeper never joins


if __name__ == "__main__":
    main()
