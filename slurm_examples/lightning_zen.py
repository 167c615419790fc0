"""Lightning DDP inside the torchrun workers, configured with hydra-zen (no HydraDDP).

The workflow of rai-toolbox's HydraDDP how-to (trainer and module as configs, fit or
test chosen by a flag), without a special strategy: the callback starts the
workers, and Lightning's ``ddp`` strategy finds torchrun's environment
(``TorchElasticEnvironment``), so it neither spawns processes nor re-runs
``sys.argv``, even under SLURM. Logs and checkpoints land in the job's output dir.

One machine, 2 workers::

    python slurm_examples/lightning_zen.py hydra/callbacks=torchrun \\
        hydra.callbacks.torchrun.nproc_per_node=2 trainer.devices=2

Test instead of fit: add ``pl_testing=true``. Two emulated nodes x 2 workers::

    python slurm_examples/lightning_zen.py -m hydra/callbacks=torchrun \\
        hydra/launcher=submitit_local hydra.launcher.tasks_per_node=2 \\
        hydra.callbacks.torchrun.nproc_per_node=2 trainer.devices=2 trainer.num_nodes=2

On SLURM: ``hydra/launcher=submitit_slurm hydra.launcher.nodes=2`` instead.
``trainer.devices`` must equal the workers per node and ``trainer.num_nodes`` the
node count (Lightning checks that their product is torchrun's WORLD_SIZE).
Global rank 0's metrics (a dict of floats) become the Hydra job's return value.
"""

from __future__ import annotations

import os
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra_zen import builds, make_config, store, zen
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

OUTPUT_DIR = "${hydra:runtime.output_dir}"


class TinyRegressor(pl.LightningModule):
    """A small MLP on synthetic data (the same data on every rank; Lightning shards it)."""

    def __init__(self, n_samples: int = 1024, n_features: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n_samples, n_features, generator=gen)
        w = torch.randn(n_features, 1, generator=gen)
        self.data = TensorDataset(x, torch.tanh(x @ w))
        self.net = nn.Sequential(nn.Linear(n_features, 16), nn.ReLU(), nn.Linear(16, 1))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def _loader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=64)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader()


TrainerConf = builds(
    pl.Trainer,
    strategy="ddp",
    accelerator="cpu",
    devices=1,  # = hydra.callbacks.torchrun.nproc_per_node
    num_nodes=1,  # = the number of nodes
    max_epochs=2,
    default_root_dir=OUTPUT_DIR,  # logs and checkpoints in the job's output dir
    logger=builds(CSVLogger, save_dir=OUTPUT_DIR, name="lightning_logs"),
    callbacks=[builds(ModelCheckpoint, dirpath=OUTPUT_DIR + "/checkpoints")],
    enable_progress_bar=False,
    enable_model_summary=False,
    populate_full_signature=False,
)
ModuleConf = builds(TinyRegressor, populate_full_signature=True)
Config = make_config(trainer=TrainerConf, module=ModuleConf, pl_testing=False)


def task(trainer: pl.Trainer, module: pl.LightningModule, pl_testing: bool) -> dict[str, float]:
    """Fit (or test) in every worker; rank 0's metrics become the job's return value."""
    if pl_testing:
        trainer.test(module)
    else:
        trainer.fit(module)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.global_rank == 0:
        print(f"rank 0 of {trainer.world_size} (pid {os.getpid()}): {metrics}", flush=True)
    return metrics


store(Config, name="lightning_zen")


@hydra.main(config_name="lightning_zen", config_path=None, version_base="1.3")
def main(cfg: Any) -> dict[str, float]:
    # zen() instantiates trainer and module from the config and calls task with them.
    return zen(task)(cfg)


if __name__ == "__main__":
    store.add_to_hydra_store()
    main()
