"""What the Lightning framework costs over a hand-written PyTorch loop, per training epoch.

Both sides train the same DavidNet (same width, initial weights, data, augmentation, optimizer and
LR schedule) for E epochs without evaluation: (a) through our SpeedrunModule and a Trainer built
from the default config (trainer/logger/callbacks as `python train.py` uses them: progress bar,
CSV logger, timer, results writer), (b) in a minimal loop written below. Repetitions alternate
a, b, a, b, ... so drift of the machine hits both alike. Prints the median epoch time of each and
the ratio a/b. Target on a 2-core CPU at width 0.25: <= 1.03.

    python benchmarks/loop_overhead.py [--width 0.25] [--subset 5120] [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common
import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from cifar_speedrun.recipe.module import SpeedrunModule
from cifar_speedrun.recipe.schedule import PiecewiseLinear, resolve_knots


class EpochClock(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def lightning_epochs(cfg, initial_state: dict) -> list[float]:
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    net.load_state_dict(initial_state)
    module = SpeedrunModule.from_config(cfg, net)
    clock = EpochClock()
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [clock]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return clock.times


def raw_epochs(cfg, initial_state: dict) -> list[float]:
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = instantiate(cfg.model).to(device)
    net.load_state_dict(initial_state)
    batches = datamodule.train_dataloader()
    optim = cfg.optim
    optimizer = torch.optim.SGD(net.parameters(), lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                                weight_decay=optim.weight_decay, foreach=True)
    schedule = PiecewiseLinear(resolve_knots(list(optim.schedule.epochs), cfg.epochs), optim.schedule.factors,
                               len(batches))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    times = []
    for _ in range(cfg.epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        net.train()
        for images, labels in batches:
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    _common.keep_large_allocations_off_mmap()  # both sides allocate MBs per step; same heap policy for both
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--subset", type=int, default=5120)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = _common.compose_config([
        "data.source=image_folder", f"data.path={_common.archive_path()}", f"model.width={args.width}",
        f"data.subset={args.subset}", f"epochs={args.epochs}", "optim.schedule.epochs=[0,1,epochs]",
        "trainer.enable_model_summary=false",
    ])
    torch.manual_seed(0)
    initial_state = {k: v.clone() for k, v in instantiate(cfg.model).state_dict().items()}
    lightning_times, raw_times = [], []
    for repeat in range(args.repeats):
        # The first epoch of each run includes one-off costs (allocator, autotune): drop it.
        lightning_times += lightning_epochs(cfg, initial_state)[1:]
        raw_times += raw_epochs(cfg, initial_state)[1:]
        print(f"repeat {repeat + 1}: lightning {statistics.median(lightning_times):.3f}s/epoch, "
              f"raw {statistics.median(raw_times):.3f}s/epoch", flush=True)
    a, b = statistics.median(lightning_times), statistics.median(raw_times)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
    print(f"loop_overhead: width {args.width}, {args.subset} images, batch {cfg.data.batch_size}, {device}: "
          f"lightning {a:.3f}s/epoch, raw {b:.3f}s/epoch, ratio a/b = {a / b:.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
