"""Steady-state body: a small MLP trained with DDP over gloo; rank 0 times every step.

The same function runs under bare torchrun (``python ddp_body.py STEPS WARMUP``) and as the
task of ddp_app.py (ours). Seeds and data are fixed, so both systems do identical work:
the launcher can only show up through the workers' environment (threads, affinity,
allocator, process model). Rank 0 writes its per-step seconds (warm-up excluded),
torch's thread count, its own CPU seconds over the timed steps, and the CPU seconds that
every other process of the run (the launcher side: torchrun's agent, or the Hydra process,
the warm server and multiprocessing's resource tracker) used meanwhile, read from each
process's kernel CPU clock (nanoseconds), to ``$BENCH_OUT/steps_<pid>.json``. The launcher
side's CPU counts work done, so, unlike step times on 2 busy cores, it does not grow when
the machine is busy.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time

IN, HIDDEN, OUT, BATCH, BATCHES = 256, 256, 10, 128, 8


def _cpu_s(pid: int) -> float | None:
    """A process's CPU seconds (all its threads) from its kernel CPU clock, in nanoseconds:
    /proc's utime/stime count 10 ms ticks, too coarse for a window of a few seconds."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9  # CPUCLOCK_SCHED of pid
    except OSError:  # gone
        return None


def _launcher_cpu(workers: set[int]) -> dict[int, float]:
    """CPU seconds so far of every live process of this run (``$BENCH_TAG``) but the workers."""
    from _runner import TAG_VAR, tagged

    tag = os.environ.get(TAG_VAR, "")
    found = {}
    for pid in tagged(tag) if tag else ():
        cpu = None if pid in workers else _cpu_s(pid)
        if cpu is not None:
            found[pid] = cpu
    return found


def _launcher_delta(before: dict[int, float], workers: set[int]) -> tuple[float, int]:
    """CPU the launcher side used since ``before`` and how many of its processes exited
    meanwhile (their share is lost: the figure is then a lower bound)."""
    after = _launcher_cpu(workers)
    used = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
    return used, len(set(before) - set(after))


def _self_cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


class _GcClock:
    """Time the cyclic garbage collector spends while it is installed (``gc.callbacks``):
    a worker-side cost per step that, unlike step time, does not move with the machine's
    load much. It scales with the objects the collector tracks: what the worker imported
    and unpickled before the task, unless those were frozen (``gc.freeze``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1


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
    pids: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    workers = set(pids)
    times: list[float] = []
    loss = torch.zeros(())
    window: dict[str, float] = {}
    gc_clock = _GcClock()
    launcher_before: dict[int, float] = {}
    try:
        for step in range(warmup + steps):
            x, y = data[step % BATCHES]
            if step == warmup and rank == 0:
                launcher_before = _launcher_cpu(workers)
                gc.callbacks.append(gc_clock)
                window.update(own=_self_cpu_s(), start=time.perf_counter())
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()  # DDP all-reduces the gradients here
            opt.step()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        if gc_clock in gc.callbacks:
            gc.callbacks.remove(gc_clock)
    final = float(loss.item())
    out = os.environ.get("BENCH_OUT")
    if rank == 0 and out:
        record: dict[str, object] = {
            "step_s": times,
            "threads": torch.get_num_threads(),
            "loss": final,
        }
        if window:  # no timed step: no window
            end, own = time.perf_counter(), _self_cpu_s()
            used, exited = _launcher_delta(launcher_before, workers)
            record.update(
                window_s=end - window["start"],
                own_cpu_s=own - window["own"],
                launcher_cpu_s=used,
                launcher_exited=exited,
                gc_s=gc_clock.seconds,
                gc_collections=gc_clock.collections,
                gc_tracked=len(gc.get_objects()),
                gc_frozen=gc.get_freeze_count(),
            )
        with open(os.path.join(out, f"steps_{os.getpid()}.json"), "w") as f:
            json.dump(record, f)
    # Shut down the way torch's docs ask, so neither system's run dies in teardown: every
    # rank is done communicating before any rank destroys the group, and nothing (DDP's
    # reducer) still holds the gloo group when the interpreter finalizes. Without this, a
    # bare-torchrun rank 1 once aborted at exit on a loaded CI machine ("terminate called
    # without an active exception", SIGABRT) while rank 0 was still writing its record.
    dist.barrier()
    del model, opt
    gc.collect()
    dist.destroy_process_group()
    return final


if __name__ == "__main__":
    train(*(int(a) for a in sys.argv[1:3]))
