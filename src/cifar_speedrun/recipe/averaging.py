"""Averages of the weights, as the recipes use them: Page's EMA and airbench's lookahead.

Each is a Lightning callback (the average is swapped in for every evaluation, copied into the model at
the end and kept in checkpoints), and its update is part of the training step: module.SpeedrunModule
calls `after_optimizer_step` right after the optimizer step (with any other LightningModule the
callback does it from on_train_batch_end).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from pydantic import Field

from cifar_speedrun.typed_sections import Section, check


class _GuardedAveraging(WeightAveraging):
    """Lightning's WeightAveraging with its update done here: no host sync, a few foreach kernels.

    Lightning's callback updates through torch's AveragedModel.update_parameters, which tests
    `n_averaged == 0` on the device every update (a host sync on a GPU) and detaches every tensor
    one by one. Here the number of updates is counted on the host (`updates`, kept in checkpoints),
    the first update copies the weights and later ones apply `average_step` to the floating-point
    tensors, all in `torch._foreach_*` calls under no_grad; `n_averaged` is advanced on the device
    for torch's bookkeeping without being read.

    It also leaves the model alone until the average holds an update: Lightning creates the
    averaged copy when fit starts (the initial weights), swaps it in for every evaluation and copies
    it over the model at the end, even when no update has happened yet: a short run, or an average
    that starts after some epochs (lookahead), would be evaluated and saved with its initial weights.
    """

    _swapped = False
    updates = 0
    # Set by a module whose training step calls `after_optimizer_step` itself (module.SpeedrunModule);
    # with any other LightningModule the callback runs it from on_train_batch_end.
    driven_by_step = False
    _pairs: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None

    def average_step(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        """averaged <- f(averaged, current) for the floating-point tensors (the subclass's rule)."""
        raise NotImplementedError

    def _tensor_pairs(self, pl_module: L.LightningModule) -> tuple[list[torch.Tensor], ...]:
        """(averaged floats, current floats, averaged others, current others), gathered once."""
        if self._pairs is None:
            assert self._average_model is not None
            averaged = list(self._average_model.module.parameters())
            current = list(pl_module.parameters())
            if self._use_buffers:
                averaged += list(self._average_model.module.buffers())
                current += list(pl_module.buffers())
            floats = [i for i, t in enumerate(averaged) if t.is_floating_point()]
            others = [i for i in range(len(averaged)) if i not in set(floats)]
            self._pairs = ([averaged[i] for i in floats], [current[i] for i in floats],
                           [averaged[i] for i in others], [current[i] for i in others])
        return self._pairs

    @torch.no_grad()
    def update_average(self, pl_module: L.LightningModule) -> None:
        averaged, current, averaged_other, current_other = self._tensor_pairs(pl_module)
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            self.average_step(averaged, current)
        if averaged_other:
            torch._foreach_copy_(averaged_other, current_other)  # integer buffers (BN's batch count) follow
        assert self._average_model is not None
        self._average_model.n_averaged.add_(1)
        self.updates += 1

    @torch.no_grad()
    def _copy_average_to_current(self, pl_module: L.LightningModule) -> None:
        averaged, current, averaged_other, current_other = self._tensor_pairs(pl_module)
        torch._foreach_copy_(current, averaged)
        if averaged_other:
            torch._foreach_copy_(current_other, averaged_other)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._pairs = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.driven_by_step:
            self.after_optimizer_step(trainer, pl_module)

    def after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The average's part of a training step, right after the optimizer step (every few steps)."""
        step_idx = trainer.global_step - 1  # Lightning's convention: 0-based index of the step just taken
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self.update_average(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self.update_average(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    def _has_average(self) -> bool:
        return self._average_model is not None and self.updates > 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.updates = int(state_dict.get("updates", 0))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self._has_average()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_average():
            super().on_train_end(trainer, pl_module)
        elif self._average_model is not None and trainer.is_global_zero:
            # A run shorter than the averaging's start: say so, or its accuracy reads as the trick's.
            name = type(self).__name__
            print(f"[{name.lower()}] the average never started ({self.updates} updates in "
                  f"{trainer.global_step} steps): this run was evaluated and saved with its own weights, so its "
                  f"accuracy says nothing about {name}; train longer than its start", flush=True)

    def results_entry(self) -> dict[str, Any]:
        """results.json's `<name>_updates`: how many times the average was updated (0: it never started)."""
        return {f"{type(self).__name__.lower()}_updates": self.updates}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The checkpoint's `state_dict` is what the run evaluates at this point.

        Lightning writes the average there unconditionally, so before the first update (a run shorter
        than the averaging's start) eval.py of `last.ckpt` scored the initial weights. Without an
        update the current weights stay in `state_dict`; the averaging state (no update yet) is kept
        beside them, so a resumed run starts its average as this one would have.
        """
        if self._has_average() or self._average_model is None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            return
        average_state = self._average_model.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["averaging_state"] = {name: value for name, value in average_state.items()
                                         if not name.startswith("module.")}


class EMASettings(Section):
    """callbacks.ema (trick=ema): a callback has no section in settings.py, so its own is declared here."""

    momentum: float = Field(ge=0, lt=1, description="Page: 0.99 per step")
    every_n_steps: int = Field(ge=1, description="Page: 5")
    use_buffers: bool


class LookaheadSettings(Section):
    """callbacks.lookahead (trick=lookahead), with airbench94's values as the hints."""

    decay_base: float = Field(ge=0, lt=1, description="airbench94: 0.95")
    decay_pow: float = Field(ge=0, description="airbench94: 3")
    every_n_steps: int = Field(ge=1, description="airbench94: 5")
    start_epochs: int = Field(ge=0, description="airbench94: 3")
    use_buffers: bool


class EMA(_GuardedAveraging):
    """Exponential moving average of the weights, evaluated in place of the raw weights (Page part 8).

    Built on Lightning's WeightAveraging (torch AveragedModel underneath). Page's EMA has momentum
    0.99 per batch but updates only every 5 batches, so each update uses decay = 0.99**5
    (cifar10-fast update_ema: rho = momentum**update_freq): average <- decay * average + (1 - decay) *
    current, in one foreach kernel. The first update copies the weights (Page starts from a copy of
    the initial weights; after a few updates the difference is gone). With `use_buffers` (the yaml's choice) the
    BN running statistics are averaged the same way, as Page averages the whole state_dict, so the
    averaged network is evaluated with statistics that match its weights. Each evaluation swaps the
    averaged weights in and back out; at the end of training they are copied into the model, so the
    final test accuracy and any saved model are the EMA's.
    """

    def __init__(self, *, momentum: float, every_n_steps: int, use_buffers: bool) -> None:
        settings = check(EMASettings, {"momentum": momentum, "every_n_steps": every_n_steps,
                                       "use_buffers": use_buffers}, "callbacks.ema")
        self.momentum, self.every_n_steps = settings.momentum, settings.every_n_steps
        self.decay = self.momentum**self.every_n_steps
        super().__init__(use_buffers=use_buffers)

    def average_step(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.every_n_steps == 0


class Lookahead(_GuardedAveraging):
    """airbench's Lookahead: an average of the weights that is copied back into the network.

    From epoch `start_epochs` on, every `every_n_steps` steps: average <- lerp(average, weights, 1 - decay),
    then weights <- average; and at every epoch end weights <- average. The decay grows over the run,
    decay = decay_base**every_n_steps * (step / total_steps)**decay_pow (airbench94: 0.95**5 x
    (step/total)^3), so early updates barely average and late ones average strongly; the first
    update only starts the average. The final weights are the averaged ones. BN statistics are
    averaged with the weights. Built on the same Lightning/torch averaging as `EMA`.
    """

    def __init__(self, *, decay_base: float, decay_pow: float, every_n_steps: int, start_epochs: int,
                 use_buffers: bool) -> None:
        settings = check(LookaheadSettings, {"decay_base": decay_base, "decay_pow": decay_pow,
                                             "every_n_steps": every_n_steps, "start_epochs": start_epochs,
                                             "use_buffers": use_buffers}, "callbacks.lookahead")
        self.decay_base, self.decay_pow = settings.decay_base, settings.decay_pow
        self.every_n_steps, self.start_epochs = settings.every_n_steps, settings.start_epochs
        self.decay = 0.0  # the decay of the next update
        self._epoch = 0
        super().__init__(use_buffers=use_buffers)

    def average_step(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)

    def decay_at(self, step: int, total_steps: int) -> float:
        return self.decay_base**self.every_n_steps * (step / max(1, total_steps)) ** self.decay_pow

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return (step_idx is not None and self._epoch >= self.start_epochs
                and (step_idx + 1) % self.every_n_steps == 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    def after_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = getattr(pl_module, "total_steps", None) or trainer.estimated_stepping_batches
        self.decay = self.decay_at(trainer.global_step, int(total))
        before = self._latest_update_step
        super().after_optimizer_step(trainer, pl_module)
        if self._latest_update_step != before:
            self._copy_average_to_current(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._has_average():
            self._copy_average_to_current(pl_module)
