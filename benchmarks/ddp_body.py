"""Steady-state body: a small MLP trained with DDP over gloo; rank 0 times every step.

The same function runs under bare torchrun (``python ddp_body.py STEPS WARMUP``) and as the
task of ddp_app.py (ours). Seeds and data are fixed, so both systems do identical work:
the launcher can only show up through the workers' environment (threads, affinity,
allocator, process model). Rank 0 writes its per-step seconds (warm-up excluded) and
torch's thread count to ``$BENCH_OUT/steps_<pid>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

IN, HIDDEN, OUT, BATCH, BATCHES = 256, 256, 10, 128, 8


def train(steps: int = 300, warmup: int = 20) -> float:
    """Run ``warmup + steps`` optimizer steps; return the final loss (the same everywhere)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank and in every system
    model = DistributedDataParallel(
        torch.nn.Sequential(
            torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUT)
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard, fixed
    data = [
        (torch.randn(BATCH, IN, generator=gen), torch.randint(0, OUT, (BATCH,), generator=gen))
        for _ in range(BATCHES)
    ]
    loss_fn = torch.nn.CrossEntropyLoss()
    times: list[float] = []
    loss = torch.zeros(())
    for step in range(warmup + steps):
        x, y = data[step % BATCHES]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()  # DDP all-reduces the gradients here
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    final = float(loss.item())
    out = os.environ.get("BENCH_OUT")
    if rank == 0 and out:
        record = {"step_s": times, "threads": torch.get_num_threads(), "loss": final}
        with open(os.path.join(out, f"steps_{os.getpid()}.json"), "w") as f:
            json.dump(record, f)
    dist.destroy_process_group()
    return final


if __name__ == "__main__":
    train(*(int(a) for a in sys.argv[1:3]))
