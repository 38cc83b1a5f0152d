"""The training recipe as a LightningModule: loss, optimizer and LR schedule, the step, metrics.

Loss scaling (Page part 1 / cifar10-fast): Page sums the loss over the batch and divides the learning
rate by the batch size N (lr = 0.4/512, weight decay = 5e-4 * 512). We take the mean loss instead and
use lr = 0.4, weight decay = 5e-4. The SGD update is identical:

    Page:  (λ/N) * (Σ_i g_i + (α N) w)  =  λ * (mean_i g_i + α w)  :  ours

(momentum is linear in the gradient, so the equality holds step by step). The mean keeps the logged
loss per example and lets `label_smoothing` and friends use PyTorch's standard losses unchanged.
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.models import ModelFamily
from cifar_speedrun.recipe.optim import OptimizerSettings, read_optimizer
from cifar_speedrun.recipe.schedule import PiecewiseLinear, check_schedule, group_schedules, resolve_knots
from cifar_speedrun.recipe.step import LearningRates, TrainStep, autocast_dtype
from cifar_speedrun.recipe.train_metrics import EpochMetrics
from cifar_speedrun.recipe.tta import TTASettings, tta_logits


def _hook(net: nn.Module, name: str) -> Any:
    """A model family's hook (models/base.py); for any other net (a test's nn.Linear), the base behaviour."""
    return getattr(net, name) if isinstance(net, ModelFamily) else partial(getattr(ModelFamily, name), net)


class SpeedrunModule(L.LightningModule):
    """A net trained with a recipe from the config; every knob comes from the config, nothing is trick-specific.

    The training step is written out (Lightning's manual optimization): forward, loss, zero_grad,
    backward, optimizer step, LR schedule step, then the weight averaging (EMA / lookahead), as a
    plain loop does it. Lightning's automatic optimization wraps the same work in a closure and a
    dozen hooks, about 0.3 ms of Python a step (benchmarks/step_cost.py), which on a GPU is time the
    device waits. So Trainer-level gradient clipping and accumulation do not apply (config.validate
    refuses them).

    `step_mode` (conf: step.mode) says how the step runs: `eager` launches it op by op through
    Lightning's optimizer wrapper with torch's LambdaLR; `graph` runs step.TrainStep, the same step
    with the learning rates on the device, captured once as a CUDA graph and replayed on CUDA (run
    as is on a CPU, where tests check it gives the eager step's weights).
    """

    def __init__(
        self,
        net: nn.Module,
        optim: OptimizerSettings | dict[str, Any],
        batch_size: int,
        *,
        label_smoothing: float,
        tta: TTASettings | dict[str, Any],
        compile: bool,
        compile_mode: str,
        channels_last: bool,
        nan_check_every: int,
        step_mode: str = "eager",
        run_config: dict[str, Any] | None = None,
        epochs: float | None = None,
    ) -> None:
        """The run's settings, as `from_config` hands them over: `optim` and `tta` as the typed sections the
        config check made (a plain dict, from a test or a script, is checked here, once)."""
        super().__init__()
        self.automatic_optimization = False  # the step below is the whole step
        self.optim = read_optimizer(optim)
        self.tta = TTASettings.read(tta)
        # The checkpoint keeps plain data only (it is loaded with weights_only=True): the sections as dicts.
        self.save_hyperparameters(ignore=["net", "optim", "tta"], logger=False)
        self.hparams["optim"] = self.optim.model_dump(by_alias=True)
        self.hparams["tta"] = self.tta.model_dump()
        knots = list(self.optim.schedule.epochs)
        if epochs is None and any(isinstance(k, str) for k in knots):
            raise UserError(f"optim.schedule.epochs={knots} is written in `epochs`: give the run's epochs too")
        self.epochs = None if epochs is None else float(epochs)
        self.schedule_knots = resolve_knots(knots, math.nan if epochs is None else float(epochs))
        check_schedule(self.schedule_knots, list(self.optim.schedule.factors))
        self.net = net
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.batch_size = int(batch_size)
        self.effective: dict[str, Any] = {}  # the optimizer's numbers in use, once it is built (configure_optimizers)
        self.total_steps: int | None = None
        self.label_smoothing = float(label_smoothing)
        self.compile_net = compile
        self.compile_mode = str(compile_mode)
        self.nan_check_every = max(1, int(nan_check_every))
        # Training loss and accuracy as device sums and a NaN watch on them (train_metrics.py): no
        # per-step host sync, five kernels a step. Test metrics run once per evaluation batch.
        self.epoch_metrics = EpochMetrics(self.nan_check_every)
        self._epoch_summary: tuple[int, dict[str, float]] | None = None
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro", validate_args=False)
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro", validate_args=False)
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.warmup_seconds: float | None = None
        self.whitening_fit_seconds = 0.0
        self.schedule: PiecewiseLinear | None = None
        self.step_mode = str(step_mode)
        self.group_rates: list[tuple[str, float, PiecewiseLinear]] = []  # (group name, base lr, schedule)
        self.train_step: TrainStep | None = None  # step_mode graph: built when training starts
        self.averaging: list[Any] = []  # callbacks the step calls after each optimizer step (EMA, lookahead)

    @classmethod
    def from_config(cls, cfg: Any, net: nn.Module | None = None, *, optim: Any = None,
                    batch_size: int | None = None, epochs: float | None | str = "run",
                    run_config: dict[str, Any] | None = None, run: Any = None) -> SpeedrunModule:
        """The module a composed config describes: the one place config keys become its arguments.

        `run` is the config as config.settings.check_train typed it (train.py passes it, so what was
        checked is what is used). Without it (tests, benchmarks) the sections are read from `cfg` and each
        is checked once here: the optimizer and TTA sections by their own classes, the net by its family.
        `net` defaults to the config's model; `optim`, `batch_size` and `epochs` replace the config's.
        """
        from omegaconf import OmegaConf

        def plain(node: Any) -> Any:
            return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

        if net is None:
            if run is not None:
                from cifar_speedrun.recipe.models import build_from_settings

                net = build_from_settings(run.model)
            else:
                from hydra.utils import instantiate

                net = instantiate(cfg.model)
        if run is not None:
            sections = {"optim": run.optim, "batch_size": run.data.batch_size, "label_smoothing":
                        run.loss.label_smoothing, "tta": run.tta, "compile": run.compile.enabled,
                        "compile_mode": run.compile.mode, "channels_last": run.channels_last,
                        "nan_check_every": run.nan_check_every, "step_mode": run.step.mode, "epochs": run.epochs}
        else:
            sections = {"optim": plain(cfg.optim), "batch_size": int(cfg.data.batch_size), "label_smoothing":
                        float(cfg.loss.label_smoothing), "tta": plain(cfg.tta), "compile": bool(cfg.compile.enabled),
                        "compile_mode": str(cfg.compile.mode), "channels_last": bool(cfg.channels_last),
                        "nan_check_every": int(cfg.nan_check_every), "step_mode": str(cfg.step.mode),
                        "epochs": float(cfg.epochs)}
        if optim is not None:
            sections["optim"] = plain(optim)
        if batch_size is not None:
            sections["batch_size"] = int(batch_size)
        if epochs != "run":
            sections["epochs"] = epochs
        return cls(net=net, run_config=run_config, **sections)

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.compile_net:
            # In place: parameter names (and checkpoints) stay as without compile. The net has no graph
            # break in any model family, mode or precision (tests/test_step.py counts them).
            self.net.compile(mode=None if self.compile_mode == "default" else self.compile_mode)

    def on_fit_start(self) -> None:
        # The averaging callbacks (EMA, lookahead) are run by training_step after each optimizer step,
        # not from their own per-batch hook: the step is one place (forward ... averaging).
        self.averaging = [cb for cb in self.trainer.callbacks if callable(getattr(cb, "after_optimizer_step", None))]
        for callback in self.averaging:
            callback.driven_by_step = True
        # Layers that are fitted to the data (patch whitening) see the standardized training images.
        datamodule = getattr(self.trainer, "datamodule", None)
        images = getattr(datamodule, "train_images", None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        if images is not None:
            _hook(self.net, "fit_to_data")(images)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.whitening_fit_seconds = time.perf_counter() - start  # counted as training time (tracking.TrainTimer)
        if self.compile_net or self.device.type == "cuda":
            self.warm_up(datamodule)

    def warm_up(self, datamodule: Any) -> None:
        """Compile (torch.compile) and autotune (cudnn.benchmark) before the clock starts.

        One training-mode forward/backward and one eval-mode forward on batches of the real shapes,
        under the trainer's autocast; the weights, BN statistics and gradients are restored after, so
        the run is unchanged. The seconds it takes are reported as `warmup_seconds` (compile time).
        """
        if datamodule is None:
            return
        train_batches = datamodule.train_dataloader()
        crop = datamodule.augment.crop_size
        shape = (train_batches.batch_size, train_batches.images.shape[1], crop, crop)
        dtype = train_batches.images.dtype
        saved = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        start = time.perf_counter()
        x = torch.zeros(shape, device=self.device, dtype=dtype)
        if self.hparams.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.zeros(shape[0], dtype=torch.long, device=self.device)
        with self.trainer.precision_plugin.forward_context():
            self.net.train()
            self.loss(self.net(x), y).backward()
            self.net.eval()
            with torch.no_grad():
                tta_logits(self.net, x[: min(len(x), 1000)], self.tta.flip, self.tta.translate)
        self.net.train()
        self.net.zero_grad(set_to_none=True)
        self.net.load_state_dict(saved)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_seconds = time.perf_counter() - start
    # ---------------------------------------------------------------- steps
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def on_train_epoch_start(self) -> None:
        self.epoch_metrics.start_epoch(self.device, self.global_step)
        # Layers with an epoch-dependent state (airbench's whitening bias trains for 3 epochs only).
        _hook(self.net, "set_epoch")(self.current_epoch)

    def on_train_start(self) -> None:
        if self.uses_graph_step():
            self.train_step = self._build_train_step()
            return
        scheduler = self.lr_schedulers()
        if scheduler is not None and scheduler.last_epoch != self.global_step:
            # A checkpoint without the LambdaLR's state (written by step.mode=graph, whose schedule lives on
            # the device): the schedule continues at the step the run has reached, not at step 0.
            scheduler.last_epoch = self.global_step - 1
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        optimizer = self.optimizers()
        if self.train_step is not None:
            # The whole step below as one unit (step.py): one graph replay on CUDA. Lightning counts
            # the optimizer step through the hooks its LightningOptimizer.step() calls around a step.
            optimizer._on_before_step()
            self.train_step(images, labels)
            optimizer._on_after_step()
            self.epoch_metrics.count(len(labels))
        else:
            logits = self.net(images)
            loss = self.loss(logits, labels)
            self.epoch_metrics.update(loss, logits, labels)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)  # through the precision plugin: fp16's loss scaling included
            optimizer.step()  # counts the global step; with fp16, the scaler's step and update
            self.lr_schedulers().step()
        bad = self.epoch_metrics.check(self.global_step)
        if bad is not None:
            self._raise_not_finite(bad)
        for averaging in self.averaging:  # EMA / lookahead, every few steps, without a host sync
            averaging.after_optimizer_step(self.trainer, self)
        # Nothing returned: Lightning would detach and keep the loss (one more op a step) for nobody.

    def uses_graph_step(self) -> bool:
        """step.mode=graph, or auto on a single CUDA device (config.validate refuses graph where it cannot run)."""
        if self.step_mode == "graph":
            return True
        if self.step_mode != "auto" or self._trainer is None:
            return False
        return self.device.type == "cuda" and self.trainer.world_size == 1

    def _build_train_step(self) -> TrainStep:
        optimizer = self.optimizers().optimizer
        total = int(self.trainer.max_epochs or 1) * self.steps_per_epoch
        rates = LearningRates([self._rate_of(name) for name, _, _ in self.group_rates], total, self.device)
        rates.bind(optimizer, self.global_step)
        precision = str(self.trainer.precision)
        return TrainStep(self.net, self.loss, optimizer, rates, self.epoch_metrics,
                         scaler=getattr(self.trainer.precision_plugin, "scaler", None),
                         autocast=autocast_dtype(precision), capture=self.device.type == "cuda")

    def _rate_of(self, name: str) -> Any:
        return lambda step: self.learning_rates(step)[name]

    def learning_rates(self, step: int) -> dict[str, float]:
        """Each parameter group's lr for optimizer step `step` (0-based), computed on the host as
        torch's LambdaLR computes it: the group's base lr times its schedule at that step."""
        return {name: base * schedule(step) for name, base, schedule in self.group_rates}

    def epoch_train_metrics(self) -> dict[str, float]:
        """This epoch's mean train loss and accuracy (summed over DDP ranks), read once at its end.

        Called by the TrainTimer callback and by on_train_epoch_end (every rank calls it, so the
        reduction runs everywhere); the second call reuses the first's numbers.
        """
        if self._epoch_summary is None or self._epoch_summary[0] != self.current_epoch:
            reduce = None
            if self._trainer is not None and self.trainer.world_size > 1:
                def reduce(counts: torch.Tensor) -> torch.Tensor:
                    return self.trainer.strategy.reduce(counts, reduce_op="sum")
            metrics, bad = self.epoch_metrics.finish_epoch(reduce)
            if bad is not None:
                self._raise_not_finite(bad)
            self._epoch_summary = (self.current_epoch, metrics)
        return self._epoch_summary[1]

    def on_train_epoch_end(self) -> None:
        metrics = self.epoch_train_metrics()  # raises when the loss went NaN/inf in this epoch
        self.log_dict({"train/loss": metrics["train_loss"], "train/acc": metrics["train_acc"]}, on_epoch=True)

    def _raise_not_finite(self, window: tuple[int, int]) -> None:
        """The loss went NaN/inf in steps first..last (1-based; the watch reads the device only every
        nan_check_every steps): name the window, its epoch and the largest lr in it."""
        first, last = window
        lr = max((self.learning_rate_at(step - 1) for step in range(first, last + 1)), default=float("nan"))
        raise FloatingPointError(
            f"loss became NaN/inf at step {first}-{last} (epoch {(first - 1) // max(1, self.steps_per_epoch)}, "
            f"lr {lr:.4g}): lower optim.lr or the schedule's peak, or check the data"
        )

    def learning_rate_at(self, step: int) -> float:
        """The run's peak-group lr at step `step`: the effective lr times the schedule (for messages)."""
        if self.schedule is None or "lr" not in self.effective:
            return float("nan")
        return self.effective["lr"] * self.schedule(step)

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch if self.schedule is not None else 1

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        """Evaluation, as the run is scored: TTA included. Dataloader 0 is the test set, 1 the held-out
        validation images (data.val_split), logged as test/* and val/*."""
        images, labels = batch
        logits = self.tta.logits(self.net, images)
        name, accuracy, loss = ("test", self.test_acc, self.test_loss) if dataloader_idx == 0 else (
            "val", self.val_acc, self.val_loss)
        loss.update(F.cross_entropy(logits, labels))
        accuracy.update(logits, labels)
        self.log(f"{name}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, add_dataloader_idx=False)
        self.log(f"{name}/loss", loss, on_step=False, on_epoch=True, add_dataloader_idx=False)

    test_step = validation_step

    # ---------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        device_type = self.device.type if isinstance(self.device, torch.device) else "cpu"
        graph = self.uses_graph_step()
        built = self.optim.build(self.net, self.batch_size, device_type, tensor_lr=graph)  # the one build
        self.effective = {**built.effective, "schedule_epochs": self.schedule_knots,
                          "schedule_factors": list(self.optim.schedule.factors)}
        total_steps = int(self.trainer.estimated_stepping_batches)
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        steps_per_epoch = max(1, math.ceil(total_steps / max_epochs))
        # A fractional run (airbench: 9.9 epochs) stops inside its last epoch, at the schedule's end.
        epochs = self.epochs if self.epochs is not None else float(max_epochs)
        self.total_steps = math.ceil(epochs * steps_per_epoch - 1e-9)
        self.schedule = PiecewiseLinear(self.schedule_knots, list(self.optim.schedule.factors), steps_per_epoch)
        schedules = group_schedules(built, self.schedule, epochs)
        self.group_rates = [(str(group.get("name") or f"group{index}"), float(group["lr"]), schedule)
                            for index, (group, schedule) in enumerate(zip(built.optimizer.param_groups, schedules,
                                                                          strict=True))]
        if self._trainer is not None and self.trainer.is_global_zero:
            print(self.describe_optimizer(), flush=True)
        if graph:  # the step keeps the schedule on the device itself (step.LearningRates)
            return {"optimizer": built.optimizer}
        scheduler = torch.optim.lr_scheduler.LambdaLR(built.optimizer, schedules)
        return {"optimizer": built.optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def describe_optimizer(self) -> str:
        """The `[optim]` line: the numbers the built optimizer uses, its schedule, the run's tricks and data."""
        numbers = ", ".join(f"{key} {value:.4g}" for key, value in self.effective.items()
                            if isinstance(value, float) and key not in ("schedule_epochs", "schedule_factors"))
        run_config = self.hparams.get("run_config") or {}
        return (f"[optim] {self.optim.builder}: {numbers}, batch {self.batch_size}; lr schedule: epochs "
                f"{[round(k, 4) for k in self.schedule_knots]} -> factors {list(self.optim.schedule.factors)}; "
                f"tricks: {', '.join(run_config.get('tricks') or []) or 'none'}; data: "
                f"{run_config.get('data_source', '?')}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.total_steps is not None and self.global_step >= self.total_steps:
            self.trainer.should_stop = True

