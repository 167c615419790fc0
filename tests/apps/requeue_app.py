"""Test app for preemption: checkpoint on the preemption signal, resume after requeue.

``+checkpoint_s=N``: the checkpoint takes N seconds (longer than a short
``preemption_grace``: the agent then stops the worker with SIGTERM, which it records in
``term_rank<r>.json``). Every run records its ``HYDRA_TORCHRUN_RUN_ID``.
"""

import json
import os
import signal
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from procs import agent_pid


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    rank = int(os.environ["RANK"])
    ckpt = out / f"ckpt_rank{rank}.json"
    term = out / f"term_rank{rank}.json"
    run_id = os.environ.get("HYDRA_TORCHRUN_RUN_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if ckpt.exists() or term.exists():  # requeued: resume from our own checkpoint
        saved = json.loads(ckpt.read_text()) if ckpt.exists() else {"step": 0, "run_id": None}
        return {
            "resumed": True,
            "rank": rank,
            "saved_step": saved["step"],
            "restarts": restarts,
            "run_ids": [saved["run_id"], run_id],
        }

    state = {"step": 0, "run_id": run_id}

    def on_preempt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, on_term)
        time.sleep(float(cfg.get("checkpoint_s", 0)))
        ckpt.write_text(json.dumps({**state, "signal": signal.Signals(signum).name}))
        os._exit(0)  # checkpoint saved: leave now, the job is being requeued

    def on_term(signum: int, frame: object) -> None:
        term.write_text(json.dumps({"at": time.time()}))
        os._exit(1)

    signal.signal(signal.SIGUSR2, on_preempt)
    (out / f"started_rank{rank}.json").write_text(json.dumps({"agent_pid": agent_pid()}))
    for step in range(1, 2400):  # about 2 minutes at most, then fail the test
        state["step"] = step
        time.sleep(0.05)
    raise RuntimeError("never preempted")


if __name__ == "__main__":
    main()
