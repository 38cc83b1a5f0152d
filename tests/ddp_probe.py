"""Run by tests/test_reliability.py: a tiny DDP fit (2 CPU processes, gloo) that records, per rank,
the training indices it drew each epoch and the test accuracy it computed.

    python tests/ddp_probe.py <output_dir> <archive> <cache_dir>

Lightning's DDP launcher re-runs this script for rank 1, so it composes the config itself (not
under @hydra.main) and resolves it before fitting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from cifar_speedrun.conf_files import CONF_DIR
from cifar_speedrun.config.resolvers import register_resolvers
from cifar_speedrun.train import train


class RecordIndices(L.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder, self.epochs = Path(folder), []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        batches = trainer.datamodule.train_dataloader()
        self.epochs.append(batches.last_indices.tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "epochs": self.epochs,
                  "test_acc": float(trainer.callback_metrics["test/acc"]),
                  "test_images_on_rank": len(trainer.datamodule.val_dataloader().labels)}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out, archive, cache = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.source=image_folder",
            f"data.path={archive}", f"paths.cache_dir={cache}", "model.width=0.125", "data.subset=1000",
            "data.batch_size=128", "data.test_subset=500", "epochs=2", "optim.schedule.epochs=[0,0.5,2]",
            "trainer.enable_progress_bar=false"])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(Path(__file__).resolve().parents[1])
        cfg.paths.output_dir = str(out)
        del cfg["hydra"]
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    HydraConfig.instance().cfg = None  # launch rank 1 as a plain re-run of this script
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": "ddp_probe.RecordIndices", "folder": str(out)}
    train(cfg)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
