"""Test app for elastic jobs: ``+steps=N`` training steps, one all_reduce every
``+step_s`` seconds (``+hold_s``: in the first group, every rank then sits idle that
long after step 3, in no collective); rank 0 checkpoints the step after each, and a
re-formed group resumes from that checkpoint, as a real training script does.

Each worker start appends a line to ``starts.jsonl`` in the job's output dir: its node
(the submitit task), RANK, WORLD_SIZE, GROUP_RANK, TORCHELASTIC_RESTART_COUNT, the step it
resumed from, the pid of its node's Hydra process (what a test kills to lose a node) and
its host.
Rank 0 returns what the last group saw.
"""

import json
import os
import socket
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from procs import agent_pid


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: DictConfig) -> dict:
    import torch
    import torch.distributed as dist

    out = Path(HydraConfig.get().runtime.output_dir)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = out / "ckpt.json"
    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    start = {
        "node": int(os.environ.get("SUBMITIT_LOCAL_GLOBALID") or os.environ["SLURM_PROCID"]),
        "rank": rank,
        "world": world,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "restart": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
        "resumed_at": step,
        "hydra_pid": agent_pid(),
        "host": socket.gethostname(),
        "at": time.time(),
    }
    with open(out / "starts.jsonl", "a") as f:
        f.write(json.dumps(start) + "\n")
    steps, step_s = int(cfg.get("steps", 40)), float(cfg.get("step_s", 0.5))
    # Only the first group holds (a restarted worker's TORCHELASTIC_RESTART_COUNT may still
    # be 0: an agent restarted for a membership change spends no restart).
    hold_s = float(cfg.get("hold_s", 0)) if step == 0 else 0.0
    while step < steps:
        if step == 3 and hold_s:
            time.sleep(hold_s)
        total = torch.ones(1)
        dist.all_reduce(total)
        step += 1
        if rank == 0:
            tmp = ckpt.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            tmp.replace(ckpt)
        time.sleep(step_s)
    dist.destroy_process_group()
    return {"world": world, "restart": start["restart"], "resumed_at": start["resumed_at"]}


if __name__ == "__main__":
    main()
