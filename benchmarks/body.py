"""The task body every benchmarked system runs, and the same body as a plain torchrun script.

init_process_group("gloo"), one all_reduce of the rank, check the sum, destroy the group,
return the sum. Each rank records when its first collective completed.
"""

from __future__ import annotations

import json
import os
import time


def body() -> int:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([rank])
    dist.all_reduce(t)
    done = time.time()
    if int(t.item()) != world * (world - 1) // 2:
        raise RuntimeError(f"all_reduce gave {int(t.item())}")
    dist.destroy_process_group()
    out = os.environ.get("BENCH_OUT")
    if out:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"first_collective": done}, f)
    return int(t.item())


if __name__ == "__main__":
    body()
