"""Test app for the torchrun parity tests: each rank does what torch's launcher test
scripts do (``test/distributed/launcher/bin/``): writes the environment it sees
(``test_script.py``), initialises a gloo group with a given ``init_method`` and checks an
all_reduce (``test_script_init_method.py``), reports ``is_torchelastic_launched()``
(``test_script_is_torchelastic_launched.py``), prints ``creating <RANK>``
(``test_script.sh``), and raises when asked (``--fail``)."""

import json
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="conf", config_name="parity")
def main(cfg: DictConfig) -> object:
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "-1"))
    record = {
        "env": dict(os.environ),  # the tests check what torchrun gives its workers
        "is_torchelastic_launched": dist.is_torchelastic_launched(),
        "pid": os.getpid(),
    }
    print(f"creating {rank}", flush=True)
    if cfg.fail and rank == cfg.fail_rank:
        raise RuntimeError(f"parity failure on rank {rank}")
    if cfg.init_method:
        world = int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", init_method=cfg.init_method, rank=rank, world_size=world)
        one_hot = torch.zeros(world)
        one_hot[rank] = 1
        dist.all_reduce(one_hot)
        record["all_reduce"] = one_hot.tolist()
        dist.destroy_process_group()
    out = HydraConfig.get().runtime.output_dir
    with open(os.path.join(out, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(record, f)
    os.replace(os.path.join(out, f"rank{rank}.json.tmp"), os.path.join(out, f"rank{rank}.json"))
    return {"rank": rank, "world": os.environ.get("WORLD_SIZE")}


if __name__ == "__main__":
    main()
