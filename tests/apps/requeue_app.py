"""Test app for preemption: checkpoint on the preemption signal, resume after requeue."""

import json
import os
import signal
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from procs import agent_pid


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: object) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir)
    rank = int(os.environ["RANK"])
    ckpt = out / f"ckpt_rank{rank}.json"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if ckpt.exists():  # requeued: resume from our own checkpoint
        saved = json.loads(ckpt.read_text())
        return {"resumed": True, "rank": rank, "saved_step": saved["step"], "restarts": restarts}

    state = {"step": 0}

    def on_preempt(signum: int, frame: object) -> None:
        ckpt.write_text(json.dumps({**state, "signal": signal.Signals(signum).name}))
        os._exit(0)  # checkpoint saved: leave now, the job is being requeued

    signal.signal(signal.SIGUSR2, on_preempt)
    (out / f"started_rank{rank}.json").write_text(json.dumps({"agent_pid": agent_pid()}))
    for step in range(1, 2400):  # about 2 minutes at most, then fail the test
        state["step"] = step
        time.sleep(0.05)
    raise RuntimeError("never preempted")


if __name__ == "__main__":
    main()
