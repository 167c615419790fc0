"""A small DDP training app: synthetic regression data, a tiny MLP.

gloo on CPU, nccl on GPU (chosen automatically; each worker uses the GPU given
by LOCAL_RANK). Global rank 0 returns the final mean loss, so sweepers can
optimise it:

    python slurm_examples/ddp_train.py -m lr=0.1,0.01 hydra/callbacks=torchrun \
        hydra.callbacks.torchrun.nproc_per_node=2

or let Optuna search it (conf/ddp_optuna.yaml; each trial is a DDP job):

    python slurm_examples/ddp_train.py --config-name ddp_optuna -m
"""

from __future__ import annotations

import logging
import math
import os

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)


def synthetic_data(cfg: DictConfig) -> TensorDataset:
    gen = torch.Generator().manual_seed(cfg.seed)  # the same data on every rank
    x = torch.randn(cfg.n_samples, cfg.n_features, generator=gen)
    w = torch.randn(cfg.n_features, 1, generator=gen)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(cfg.n_samples, 1, generator=gen)
    return TensorDataset(x, y)


@hydra.main(version_base=None, config_path="../conf", config_name="ddp_train")
def main(cfg: DictConfig) -> float:
    use_cuda = torch.cuda.is_available() and cfg.backend in ("auto", "nccl")
    backend = "nccl" if use_cuda else ("gloo" if cfg.backend == "auto" else cfg.backend)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    data = synthetic_data(cfg)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler)
    model = nn.Sequential(
        nn.Linear(cfg.n_features, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1)
    ).to(device)
    ddp = DDP(model, device_ids=[local_rank] if use_cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr)
    loss_fn = nn.MSELoss()

    epoch_loss = torch.zeros(1, device=device)
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        total, batches = torch.zeros(1, device=device), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = loss_fn(ddp(x), y)
            loss.backward()
            opt.step()
            total += loss.detach()
            batches += 1
        epoch_loss = total / max(batches, 1)
        dist.all_reduce(epoch_loss)
        epoch_loss /= world
        if not math.isfinite(epoch_loss.item()):
            # Every rank sees the same reduced loss, so all stop here. Raising (not
            # returning nan) makes it a failed job: a sweeper such as Optuna records
            # a failed trial and moves on.
            raise FloatingPointError(f"loss diverged at epoch {epoch} with lr={cfg.lr}")
        if rank == 0:
            log.info("epoch %d mean loss %.5f", epoch, epoch_loss.item())
    final = float(epoch_loss.item())
    dist.destroy_process_group()
    return final


if __name__ == "__main__":
    main()
