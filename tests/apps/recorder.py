"""Test callback: records, in the Hydra process, what the job returned and leaked."""

import json
import os
import sys
from typing import Any

from hydra.experimental.callback import Callback

LEAK_KEYS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "OMP_NUM_THREADS",
)


class Recorder(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        torch_imported = "torch" in sys.modules  # before this callback imports it
        try:
            import torch.distributed as dist
        except ImportError:  # the torch-less compat cells
            dist = None

        value = job_return._return_value
        entry = {
            "status": job_return.status.name,
            "value": value if isinstance(value, (dict, int, float, str, type(None))) else None,
            "value_type": type(value).__name__,
            "value_len": len(value) if isinstance(value, bytes) else None,
            "error": str(value) if isinstance(value, BaseException) else None,
            "error_attrs": {
                k: v for k, v in vars(value).items() if isinstance(v, (int, str, type(None)))
            }
            if isinstance(value, BaseException)
            else None,
            "hydra_pid": os.getpid(),
            "torch_imported": torch_imported,
            "leaked_env": {k: os.environ.get(k) for k in LEAK_KEYS},
            "pg_initialized": dist is not None and dist.is_available() and dist.is_initialized(),
            "output_dir": config.hydra.runtime.output_dir,
            "overrides": list(job_return.overrides or []),
            "task": int(
                os.environ.get("SUBMITIT_LOCAL_GLOBALID", os.environ.get("SLURM_PROCID", "0"))
            ),
            "host": __import__("socket").gethostname(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
