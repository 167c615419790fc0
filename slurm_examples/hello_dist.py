"""hello_dist: the smallest useful distributed check.

Every rank prints its rank, world size, local rank and pid; an all_reduce of
the ranks is checked against the expected sum; rank 0 reports success and its
result becomes the Hydra job's return value.

    python slurm_examples/hello_dist.py hydra/callbacks=torchrun \
        hydra.callbacks.torchrun.nproc_per_node=4
"""

from __future__ import annotations

import logging
import os

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def pick_backend(name: str) -> str:
    if name != "auto":
        return name
    return "nccl" if torch.cuda.is_available() else "gloo"


@hydra.main(version_base=None, config_path="../conf", config_name="hello_dist")
def main(cfg: DictConfig) -> dict[str, object]:
    backend = pick_backend(cfg.backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend)  # torchrun's environment: no arguments needed
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    prefix = f"[Rank {rank}/{world}]"
    print(f"{prefix} {cfg.message}", flush=True)
    print(
        f"{prefix} Local rank: {local_rank}  Node: {os.uname().nodename}  PID: {os.getpid()}",
        flush=True,
    )
    total = torch.tensor([rank], device=device)
    dist.all_reduce(total)
    expected = world * (world - 1) // 2
    ok = int(total.item()) == expected
    if rank == 0:
        print(f"[Rank 0] Sum of all ranks: {int(total.item())}", flush=True)
        print(f"[Rank 0] Expected sum: {expected}", flush=True)
        print(
            f"[Rank 0] {'✓ Collective operation successful!' if ok else '✗ MISMATCH'}", flush=True
        )
        log.info("all %d processes completed (backend %s)", world, backend)
    dist.barrier()
    dist.destroy_process_group()
    if not ok:
        raise RuntimeError(f"all_reduce gave {int(total.item())}, expected {expected}")
    return {"world_size": world, "sum": int(total.item()), "backend": backend}


if __name__ == "__main__":
    main()
