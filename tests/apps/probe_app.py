"""Test app: every rank records what it sees; rank 0 returns a value."""

import json
import logging
import os
import signal
import socket
import threading

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig, OmegaConf
from procs import agent_pid

log = logging.getLogger(__name__)
ENV_KEYS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "PROBE_ENV",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


@hydra.main(version_base=None, config_path="conf", config_name="probe")
def main(cfg: DictConfig) -> object:
    rank = int(os.environ.get("RANK", "-1"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    hc = HydraConfig.get()
    record = {
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "output_dir": hc.runtime.output_dir,
        "original_cwd": get_original_cwd(),
        "stamp": cfg.stamp,
        "hydra_cfg": OmegaConf.to_container(hc, resolve=False, enum_to_str=True),
        "attempt": attempt,
        "host": socket.gethostname(),
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    marker = os.path.join(hc.runtime.output_dir, f"started_rank{rank}.json")
    with open(marker + ".tmp", "w") as f:
        json.dump({"agent_pid": agent_pid(), "pid": os.getpid()}, f)
    os.replace(marker + ".tmp", marker)
    if cfg.sleep_before:
        import time

        time.sleep(cfg.sleep_before)
    for i in range(cfg.log_lines):
        log.info("probe line %d from pid %d", i, os.getpid())
    print(f"probe stdout rank={rank}", flush=True)
    if cfg.kill_rank == rank and attempt < cfg.fail_attempts:
        os.kill(os.getpid(), signal.SIGKILL)
    group = int(os.environ.get("GROUP_RANK", "-1"))
    local = int(os.environ.get("LOCAL_RANK", "-1"))
    node_fails = cfg.fail_group == group and cfg.fail_local == local
    if (cfg.fail_rank == rank or node_fails) and attempt < cfg.fail_attempts:
        import time

        if cfg.fail_delay:
            time.sleep(cfg.fail_delay)
        with open(os.path.join(hc.runtime.output_dir, "failed_at"), "w") as f:
            f.write(str(time.time()))
        pad = "!" * int(cfg.fail_pad_mb * 1024 * 1024)  # a huge message (a tensor's repr...)
        raise ValueError(f"probe failure on rank {rank} attempt {attempt}{pad}")
    if cfg.collective:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        t = torch.tensor([rank])
        dist.all_reduce(t)
        record["sum"] = int(t.item())
        record["world"] = dist.get_world_size()
        if cfg.hang_rank >= 0:
            # One rank dies without a traceback; the others block in a collective it
            # will never join: the job must still end, in bounded time.
            if rank == cfg.hang_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            dist.all_reduce(t)
        dist.destroy_process_group()
    with open(os.path.join(hc.runtime.output_dir, f"rank{rank}.a{attempt}.json"), "w") as f:
        json.dump(record, f)
    if cfg.returns == "unpicklable":
        return threading.Lock()
    if cfg.returns == "none":
        return None
    if cfg.returns == "bytes":
        return b"x" * (cfg.return_mb * 1024 * 1024)
    return {"rank": rank, "attempt": attempt, "sum": record.get("sum"), "pid": os.getpid()}


if __name__ == "__main__":
    main()
