"""The app and the verdicts of scripts/gpu_check.sh (read that first).

As a Hydra app (``python scripts/gpu_check_app.py hydra/callbacks=torchrun ...``) every
worker takes GPU ``cuda:LOCAL_RANK`` (LOCAL_RANK counts the host's workers, also when
emulated nodes share the host), checks an NCCL all_reduce and reports its device; rank 0
returns the reports and CUDA tensors. ``cpu=true``: gloo and CPU tensors, the same code
otherwise. :class:`Report`, a Hydra callback, writes what the
Hydra process got back (one JSON line per job); ``--report`` checks those lines.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


@dataclass
class GpuCheckConf:
    x: int = 0  # the swept key: rank 0's tensor is arange(4) + x
    cpu: bool = False  # gloo and CPU tensors: tests the harness on a machine without GPUs


ConfigStore.instance().store(name="gpu_check", node=GpuCheckConf)

# What most training scripts do at import (checks 6 and 7), chosen by GPU_CHECK_AT_IMPORT:
# "torch" imports torch (the warm server is then a fork of the Hydra process);
# "available" also asks torch.cuda.is_available() (as `DEVICE = "cuda" if ... else "cpu"`
# does: it loads the CUDA driver, after which a fork cannot use CUDA: a fresh server, a log
# line says why); "cuda" initialises CUDA; "thread" starts a thread instead (the unsafe
# case without a GPU, for --cpu).
AT_IMPORT = os.environ.get("GPU_CHECK_AT_IMPORT", "")
if AT_IMPORT:
    import torch

    if AT_IMPORT == "available":
        torch.cuda.is_available()
    elif AT_IMPORT == "cuda":
        torch.cuda.init()
    elif AT_IMPORT == "thread":
        threading.Thread(target=time.sleep, args=(3600,), name="at-import", daemon=True).start()


def device_report(cpu: bool) -> dict[str, Any]:
    """What a worker says about itself; ``key``, its GPU, must differ between the workers
    of one host (``cpu``: the GPU it would take)."""
    import torch

    local_rank = int(os.environ["LOCAL_RANK"])
    info: dict[str, Any] = {
        "rank": int(os.environ["RANK"]),
        "node_rank": int(os.environ["GROUP_RANK"]),
        "local_rank": local_rank,
        "host": socket.gethostname(),
        "key": f"cuda:{local_rank}",
    }
    if not cpu:
        current = torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(current), "uuid", None)
        info.update(current_device=current, uuid=None if uuid is None else str(uuid))
        info["key"] = f"GPU {uuid}" if uuid is not None else f"cuda:{current}"
    info["warm"] = warm_report()
    return info


def _maps_cuda(pid: int) -> bool:
    """Whether the process has the CUDA driver library mapped (a context needs it)."""
    with open(f"/proc/{pid}/maps") as f:
        return "libcuda.so" in f.read()


def _status(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith(key + ":"))


def warm_report() -> dict[str, Any]:
    """The warm server this worker was forked from (start_method=forkserver, the
    default): it must hold no CUDA context and have one thread when it forks. ``kind``:
    "fresh" (a spawned interpreter) or "fork" (a fork of the Hydra process, whose
    command line it has: the app imported torch at the top)."""
    server = os.getppid()
    with open(f"/proc/{server}/cmdline", "rb") as f:
        cmdline = f.read()
    with open(f"/proc/{_status(server, 'PPid')}/cmdline", "rb") as f:
        parent_cmdline = f.read()
    if b"multiprocessing.forkserver" in cmdline:
        kind = "fresh"
    elif cmdline == parent_cmdline:
        kind = "fork"
    else:
        return {"server": None}
    threads = int(_status(server, "Threads"))
    return {
        "server": server,
        "kind": kind,
        "threads": threads,
        "server_cuda": _maps_cuda(server),
        "worker_cuda": _maps_cuda(os.getpid()),
    }


@hydra.main(version_base=None, config_path=None, config_name="gpu_check")
def main(cfg: DictConfig) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    if not cfg.cpu:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    started = time.perf_counter()
    dist.init_process_group("gloo" if cfg.cpu else "nccl")
    initialised = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(total)
    got = total.item()  # waits for the collective
    reduced = time.perf_counter()
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, device_report(cfg.cpu))
    dist.destroy_process_group()
    if rank != 0:
        return {}
    tensor = torch.arange(4.0, device=device) + cfg.x
    return {
        "x": cfg.x,
        "world_size": world,
        "backend": "gloo" if cfg.cpu else "nccl",
        "all_reduce": got,
        "expected": world * (world + 1) / 2,
        "init_s": initialised - started,
        "all_reduce_s": reduced - initialised,
        "workers": reports,
        "source_device": str(device),
        "tensor": tensor,
        "nested": {"parts": [(tensor * 2,)]},
    }


def _describe(tensor: Any) -> dict[str, Any]:
    kind = type(tensor)
    described = {"type": f"{kind.__module__}.{kind.__qualname__}"}
    if hasattr(tensor, "device"):
        described.update(device=str(tensor.device), values=tensor.tolist())
    return described


class Report(Callback):
    """In the Hydra process: write what the job returned, one JSON line, to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        torch = sys.modules.get("torch")
        # First, before anything here could touch CUDA: did getting the value do it?
        cuda_initialised = bool(torch is not None and torch.cuda.is_initialized())
        value = job_return._return_value
        entry: dict[str, Any] = {
            "status": job_return.status.name,
            "error": str(value) if isinstance(value, BaseException) else None,
            "task": int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0")),
            "cuda_initialised_in_hydra_process": cuda_initialised,
        }
        if isinstance(value, dict) and "tensor" in value:
            entry["value"] = {k: v for k, v in value.items() if k not in ("tensor", "nested")}
            entry["tensor"] = _describe(value["tensor"])
            entry["nested"] = _describe(value["nested"]["parts"][0][0])
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def verdict(
    records_path: str, what: str, jobs: int, world: int, cpu: bool
) -> tuple[str, list[str]]:
    """One check over one run's records: (what was seen, problems; none = PASS).

    ``what``: "collective" (the all_reduce), "devices" (one device per worker and host),
    "return" (rank 0's tensors reached the Hydra process on the CPU, CUDA untouched),
    "warm" (the server the workers were forked from has no CUDA and one thread),
    "warm-fork" / "warm-fresh" (the same, and the server is a fork of the Hydra process /
    a fresh interpreter; a fresh one says why in the job's log)."""
    try:
        with open(records_path) as f:
            records = [json.loads(line) for line in f]
    except OSError:
        return "", ["no job reached its end (no records)"]
    problems = [f"job failed: {r['error']}" for r in records if r["status"] != "COMPLETED"]
    results = [r for r in records if "value" in r]
    if len(results) != jobs:
        problems.append(f"{len(results)} job result(s), expected {jobs}")
    seen_text = ""
    for r in results:
        v, job = r["value"], f"x={r['value']['x']}"
        if what == "collective":
            seen_text = (
                f"world {v['world_size']}, {v['backend']}: init_process_group "
                f"{v['init_s']:.2f} s, all_reduce {1000 * v['all_reduce_s']:.1f} ms"
            )
            if (v["world_size"], v["all_reduce"]) != (world, v["expected"]):
                problems.append(
                    f"{job}: world {v['world_size']} (expected {world}), "
                    f"all_reduce gave {v['all_reduce']} (expected {v['expected']})"
                )
        elif what == "devices":
            if sorted(w["rank"] for w in v["workers"]) != list(range(world)):
                problems.append(f"{job}: reports from ranks {[w['rank'] for w in v['workers']]}")
            owner: dict[tuple[str, str], int] = {}
            for w in v["workers"]:
                first = owner.setdefault((w["host"], w["key"]), w["rank"])
                if first != w["rank"]:
                    problems.append(f"{job}: ranks {first} and {w['rank']} share {w['key']}")
            seen_text = f"{len(v['workers'])} workers on {len(owner)} distinct devices"
        elif what == "return":
            want = [float(i + v["x"]) for i in range(4)]
            for name, values in (("tensor", want), ("nested", [2 * e for e in want])):
                got = r[name]
                if (got["type"], got.get("device"), got.get("values")) != (
                    "torch.Tensor",
                    "cpu",
                    values,
                ):
                    problems.append(
                        f"{job}: {name} made on {v['source_device']} came back as {got}, "
                        f"expected a torch.Tensor on cpu holding {values}"
                    )
            if not cpu and not v["source_device"].startswith("cuda"):
                problems.append(f"{job}: rank 0's tensor was on {v['source_device']}, not CUDA")
            if r["cuda_initialised_in_hydra_process"]:
                problems.append(f"{job}: reading the value initialised CUDA in the Hydra process")
            seen_text = f"made on {v['source_device']}, came back on {r['tensor'].get('device')}"
        elif what.startswith("warm"):
            servers = {w["warm"]["server"] for w in v["workers"]}
            if None in servers:
                problems.append(f"{job}: workers were not forked from a warm server")
                continue
            kinds = {w["warm"]["kind"] for w in v["workers"]}
            want = what.partition("-")[2]
            if want and kinds != {want}:
                problems.append(f"{job}: the warm server is {kinds}, expected {want}")
            if want == "fresh" and not _logged_fallback(records_path):
                problems.append(f"{job}: no 'not safe to fork' line in the job's log")
            for w in v["workers"]:
                warm = w["warm"]
                if warm["server_cuda"] or warm["threads"] != 1:
                    problems.append(
                        f"{job}: rank {w['rank']}'s server {warm['server']} has "
                        f"{warm['threads']} thread(s), CUDA library mapped: {warm['server_cuda']}"
                    )
                if not cpu and not warm["worker_cuda"]:  # else the check proves nothing
                    problems.append(f"{job}: rank {w['rank']} has no libcuda mapped")
            seen_text = f"{len(servers)} {'/'.join(sorted(kinds))} server(s): 1 thread, no CUDA"
    return seen_text, problems


def _logged_fallback(records_path: str) -> bool:
    """Whether the run's log (beside its records) says why the server was not a fork."""
    try:
        with open(records_path.removesuffix(".jsonl") + ".log") as f:
            return "this process is not safe to fork" in f.read()
    except OSError:
        return False


def print_report(out: str, cpu: bool, specs: list[str]) -> int:
    """One line per check; ``specs``: LABEL RUN WHAT JOBS WORLD TIME, repeated (RUN "-":
    skipped, WHAT its reason). 1 if a check failed."""
    failed = False
    for i in range(0, len(specs), 6):
        label, run, what, jobs, world, took = specs[i : i + 6]
        if run == "-":
            print(f"{label:<46} SKIP ({what})")
            continue
        seen, problems = verdict(f"{out}/{run}.jsonl", what, int(jobs), int(world), cpu)
        failed = failed or bool(problems)
        line = f"PASS ({seen})" if not problems else "FAIL: " + "; ".join(problems)
        print(f"{label:<46} {line}" + (f"  [{took}]" if took else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:  # --report OUT_DIR CPU(0|1) SPECS...
        sys.exit(print_report(sys.argv[2], sys.argv[3] == "1", sys.argv[4:]))
    main()
