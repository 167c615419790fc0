"""The task body every benchmarked system runs, and the same body as a plain torchrun script.

init_process_group("gloo"), one all_reduce of the rank, check the sum, destroy the group,
return the sum. Each rank writes its milestones (epoch seconds) to ``$BENCH_OUT`` so the
harness can say where the time goes: ``created`` (this process's creation: /proc, 10 ms
ticks; under a forkserver, the fork), ``entered`` (the body starts), ``imported`` (torch and
torch.distributed imported), ``pg_init``, ``first_collective`` and ``end``.
"""

from __future__ import annotations

import json
import os
import time


def body() -> int:
    entered = time.time()
    import torch
    import torch.distributed as dist

    imported = time.time()
    dist.init_process_group("gloo")
    pg_init = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([rank])
    dist.all_reduce(t)
    first = time.time()
    if int(t.item()) != world * (world - 1) // 2:
        raise RuntimeError(f"all_reduce gave {int(t.item())}")
    dist.destroy_process_group()
    out = os.environ.get("BENCH_OUT")
    if out:
        from _clock import process_start

        marks = {
            "rank": rank,
            "created": process_start(),
            "entered": entered,
            "imported": imported,
            "pg_init": pg_init,
            "first_collective": first,
            "end": time.time(),
        }
        with open(os.path.join(out, f"rank{rank}_{os.getpid()}.json"), "w") as f:
            json.dump(marks, f)
    return int(t.item())


if __name__ == "__main__":
    body()
