"""Test app shaped like most training scripts: torch (and numpy) imported at module top.

Each rank records where its warm server came from (``import_probe`` records which
processes imported the app's modules) (a fork of the Hydra process, or a
fresh interpreter), runs a collective, a parallel torch op (OpenMP) and a numpy matmul
(OpenBLAS) in the worker, and rank 0 returns the all_reduce sum. Environment switches make
the Hydra process unsafe to fork at import: ``TOP_APP_THREAD=1`` starts a Python thread,
``TOP_APP_OMP=1`` runs a parallel torch op (OpenMP's pool then runs).
"""

import atexit
import json
import multiprocessing
import os
import threading
import time

import hydra
import import_probe  # each process that imports it appends its pid to $HTR_IMPORT_PROBE
import numpy
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

if os.environ.get("TOP_APP_THREAD") == "1":
    threading.Thread(target=time.sleep, args=(3600,), name="app-prefetch", daemon=True).start()
if os.environ.get("TOP_APP_OMP") == "1":
    _x = torch.randn(1500, 1500)
    _x = _x @ _x
if os.environ.get("TOP_APP_RANK_AT_IMPORT") == "1":  # what Lightning does at import
    from lightning_utilities.core.rank_zero import rank_zero_only

    rank_zero_only.rank = int(os.environ.get("RANK", 0))  # type: ignore[attr-defined]

atexit.register(print, "top_import_app: exit handler ran")  # still runs after a quick exit
# Buffered (stdout is a pipe): the fork must not write it a second time.
print(f"top_import_app: imported in pid {os.getpid()}")


def _cmdline(pid: int) -> list[str]:
    raw = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: SIM115
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parent(pid: int) -> int:
    stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    return int(stat.rsplit(")", 1)[1].split()[1])


@hydra.main(version_base=None, config_path="conf", config_name="top_import")
def main(cfg: DictConfig) -> object:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    big = torch.randn(1500, 1500)
    parallel = float((big @ big).abs().sum() > 0)  # OpenMP in the worker: no hang
    blas = float(numpy.ones((600, 600)) @ numpy.ones(600) @ numpy.ones(600))
    server = os.getppid()
    extra = {}
    if os.environ.get("TOP_APP_RANK_AT_IMPORT") == "1":
        from lightning_utilities.core.rank_zero import rank_zero_only

        extra["rank_zero_only"] = rank_zero_only.rank  # type: ignore[attr-defined]
    if os.environ.get("TOP_APP_NESTED") == "1":  # a forkserver context of the task's own
        child = multiprocessing.get_context("forkserver").Process(target=os.getpid)
        child.start()
        child.join(120)
        extra["nested_exitcode"] = child.exitcode
    record = {
        **extra,
        "rank": rank,
        "world": dist.get_world_size(),
        "sum": total.item(),
        "parallel": parallel,
        "blas": blas,
        "pid": os.getpid(),
        "server": server,
        "server_cmd": _cmdline(server),
        "server_parent": _parent(server),
        "probe_module": import_probe.__name__,
        "threads": sorted(t.name for t in threading.enumerate()),
        "x": cfg.x,
    }
    out = HydraConfig.get().runtime.output_dir
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()
    return {"sum": total.item(), "x": cfg.x}


if __name__ == "__main__":
    main()
