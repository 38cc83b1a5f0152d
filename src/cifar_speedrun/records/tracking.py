"""What a run tells people: its name, group, tags and flat keys for W&B, and its start and end lines.

An ablation is read in W&B by grouping and filtering runs, so every run carries, besides the
resolved config, a few flat keys that say what it is: `experiment`, `stage`, `sweep`, `tricks` (one
string) and a boolean per trick (`trick/ema`), `seed`, `params`, and `config_key`, the report's
configuration key (every override except the seed), which groups the seeds of one configuration.
Run names put what differs between the jobs of a sweep (stage, tricks, seed) first.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from cifar_speedrun.config import hydra_job
from cifar_speedrun.config.hydra_job import (
    config_key,
    is_plumbing,
    job_overrides,
)
from cifar_speedrun.devices import device_name
from cifar_speedrun.errors import UserError


def run_keys(cfg: DictConfig, parameters: int | None = None) -> dict[str, Any]:
    """The flat keys W&B's grouping, filters and parallel-coordinates panels need."""
    from cifar_speedrun.config.command_line import available_options

    choices = hydra_job.choices()
    tricks = list(cfg.get("applied_tricks") or {})
    keys: dict[str, Any] = {
        "experiment": choices.get("experiment") or "none",
        "stage": choices.get("stage") or "none",
        "sweep": choices.get("sweep") or "none",
        "tricks": ",".join(tricks) or "none",
        "seed": int(cfg.seed),
        "config_key": config_key(job_overrides()),
    }
    if parameters is not None:
        keys["params"] = int(parameters)
    keys.update({f"trick/{name}": name in tricks for name in available_options("trick")})
    return keys


def _readable(node: Any) -> Any:
    """The config without `_target_`s, with absolute paths shortened to their last part."""
    if isinstance(node, dict):
        return {key: _readable(value) for key, value in node.items() if key != "_target_"}
    if isinstance(node, list):
        return [_readable(value) for value in node]
    if isinstance(node, str) and os.path.isabs(node):
        return Path(node).name
    return node


def readable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved Hydra config as a user reads it: what is trained, not where files live."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    for key in [key for key in container if (is_plumbing(key) and key != "tags") or key == "applied_tricks"]:
        container.pop(key)
    callbacks = container.get("callbacks") or {}
    container["callbacks"] = {name: {k: v for k, v in (settings or {}).items()
                                     if k not in ("output_dir", "dirpath", "root_dir", "filename")}
                              for name, settings in callbacks.items() if settings is not None}
    return _readable(container)


def log_run_config(loggers: list[Any], cfg: DictConfig, keys: dict[str, Any]) -> None:
    """Once per run: the flat keys, then the readable config (nested: W&B shows `data.batch_size`)."""
    for logger in loggers:
        logger.log_hyperparams({**keys, **readable_config(cfg)})


def log_final(loggers: list[Any], values: dict[str, float], step: int) -> None:
    """final/* are one value per run: W&B's run summary, not a lone point in its history."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update(values)
        else:
            logger.log_metrics(values, step=step)


# ------------------------------------------------------------------------------------------------
# W&B reachability: fail in a second with the fix, instead of hanging on a login or a dead network
# ------------------------------------------------------------------------------------------------


def _wandb_settings(cfg: DictConfig) -> DictConfig | None:
    loggers = cfg.get("logger") or {}
    for settings in loggers.values():
        if settings is not None and "WandbLogger" in str(settings.get("_target_", "")):
            return settings
    return None


def _resolves(host: str, port: int, timeout: float) -> None:
    """socket.create_connection with a bound on the DNS lookup too (getaddrinfo has no timeout)."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 1)
    if not outcome:
        raise OSError(f"no answer in {timeout:.0f}s")
    if outcome[0] is not None:
        raise outcome[0]


def check_wandb(cfg: DictConfig, timeout: float = 5.0) -> None:
    """With logger=wandb in online mode: an API key and a reachable server, or one line with the fix."""
    settings = _wandb_settings(cfg)
    if settings is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("logger=wandb needs the wandb package: pip install -e '.[wandb]'") from None
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun") or settings.get("offline") or settings.get("mode") == "offline":
        return
    fix = ("set WANDB_MODE=offline to log to files in the run's folder (upload later with `wandb sync`), "
           "or use logger=csv")
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlparse(base)
    host = parsed.hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY"):
        import netrc

        try:
            known = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            known = False
        if not known:
            raise UserError(f"logger=wandb has no W&B API key for {host} (no WANDB_API_KEY, no `wandb login`): "
                            f"run `wandb login`, or {fix}")
    try:
        _resolves(host, parsed.port or (443 if parsed.scheme != "http" else 80), timeout)
    except OSError as error:
        raise UserError(f"logger=wandb cannot reach {host} ({error}): {fix}") from None


# ------------------------------------------------------------------------------------------------
# The start and end lines
# ------------------------------------------------------------------------------------------------


def _count(number: int) -> str:
    return f"{number:,}"


class StartLine(Callback):
    """One line, once the data is on the device, saying exactly what will run."""

    def __init__(self, cfg: DictConfig, tricks: list[str], output_dir: str) -> None:
        self.model_name = str(cfg.model.get("_target_", "model")).rsplit(".", 1)[-1]
        self.width = cfg.model.get("width")
        self.epochs = float(cfg.epochs)
        self.tricks = tricks
        self.output_dir = output_dir
        self.line: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        batches = datamodule.train_dataloader()
        train_images, test_images = datamodule.num_train_images, datamodule.num_test_images
        val_images = getattr(datamodule, "num_val_images", 0)
        val = f"val {_count(val_images)} (held out) / " if val_images else ""
        steps = len(batches)
        used = steps * batches.batch_size * batches.world_size
        parameters = sum(p.numel() for p in pl_module.net.parameters())
        device = pl_module.device
        where = device_name(device)
        active, inactive = tricks_in_effect(self.tricks, str(trainer.precision))
        off = f" (not in effect at {trainer.precision}: {', '.join(inactive)})" if inactive else ""
        self.line = (
            f"[run] {self.model_name} width {self.width} ({_count(parameters)} parameters) · "
            f"train {_count(train_images)} / {val}test {_count(test_images)} images · {steps} steps of "
            f"{batches.batch_size * batches.world_size} an epoch ({_count(train_images - used)} images dropped "
            f"each epoch) · {self.epochs:g} epochs · {where}, {trainer.precision}, {_step_words(pl_module)} · tricks: "
            f"{', '.join(active) or 'none'}{off} · output: {self.output_dir}"
        )
        if trainer.fast_dev_run:  # debug=fdr: Lightning runs a few batches, whatever the epochs and data say
            batches_run = int(trainer.fast_dev_run)
            self.line = (
                f"[run] debug=fdr (Lightning's fast_dev_run): {batches_run} training batch"
                f"{'es' if batches_run > 1 else ''} of {batches.batch_size * batches.world_size} and {batches_run} "
                f"evaluation batch{'es' if batches_run > 1 else ''} of {self.model_name} width {self.width} "
                f"({_count(parameters)} parameters), to find a crash, not the configured {self.epochs:g} epochs "
                f"over {_count(train_images)} images; its accuracy means nothing · {where}, {trainer.precision} · "
                f"output: {self.output_dir}")
        if trainer.is_global_zero:
            print(self.line, flush=True)


def _step_words(module: L.LightningModule) -> str:
    """How the training step runs (module.SpeedrunModule.uses_graph_step; step.py)."""
    uses_graph = getattr(module, "uses_graph_step", None)
    if not callable(uses_graph) or not uses_graph():
        return "step eager"
    return "step captured as a CUDA graph" if module.device.type == "cuda" else "step graph-ready (uncaptured on CPU)"


# Tricks whose whole effect is a training precision: at full precision nothing of them runs (the CPU
# proxy keeps fp32 whatever tricks a recipe lists; conf/proxy/cpu.yaml).
_PRECISION_TRICKS = ("mixed_precision",)
_FULL_PRECISION = ("32-true", "32", "64-true", "64")


def tricks_in_effect(tricks: list[str], precision: str) -> tuple[list[str], list[str]]:
    """(the tricks that change this run, the listed ones that do not at this precision)."""
    inactive = [t for t in tricks if t in _PRECISION_TRICKS and precision in _FULL_PRECISION]
    return [t for t in tricks if t not in inactive], inactive


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def end_line(result: dict[str, Any], results_path: str, fast_dev_run: bool = False) -> str:
    if fast_dev_run:
        return (f"[done] debug=fdr: one batch of training and of evaluation ran without error (no accuracy: it "
                f"means nothing after one batch) · results: {results_path}")
    accuracy = result.get("test_acc")
    seconds = result.get("train_seconds")
    acc = f"{100 * accuracy:.2f}%" if accuracy is not None else "–"
    secs = f"{seconds:.1f} s" if seconds is not None else "–"
    val = f"val acc {100 * result['val_acc']:.2f}% · " if result.get("val_acc") is not None else ""
    return f"[done] {val}test acc {acc} · train {secs} · results: {results_path}"


# Lightning's promotional tips and start-up chatter: the start line says what matters instead.
_NOISE = ("💡 Tip", "GPU available:", "TPU available:", "HPU available:", "`Trainer.fit` stopped",
          "Loading `train_dataloader` to estimate", "You are using a CUDA device")
# Deprecation warnings from library internals that a user can do nothing about.
_KNOWN_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                   r"The '\w+_dataloader' does not have many workers",
                   r"Found \d+ module\(s\) in eval mode at the start of training",
                   # Short runs: train metrics are logged per epoch and the lr by callbacks.LearningRateLogger.
                   r"The number of training batches \(\d+\) is smaller than the logging interval",
                   # A resumed run's own checkpoint folder (last.ckpt is replaced atomically).
                   r"Checkpoint directory .* exists and is not empty")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(_NOISE)


def quiet_console() -> None:
    """Filter Lightning's tips and known library deprecation warnings out of the console."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)




class LearningRateLogger(Callback):
    """The learning rate of every parameter group (lr/weights, lr/biases), every `every_n_steps` steps.

    Read from the optimizer's param_groups, which hold Python floats: unlike Lightning's
    LearningRateMonitor, which turns each value into a tensor on the device, it never waits on it.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps taken, this one included
        every = self.every_n_steps or trainer.log_every_n_steps
        if step != 1 and step % max(1, every):
            return
        values = {}
        rates = getattr(pl_module, "learning_rates", None)
        if callable(rates) and rates(step):  # the module's host-side schedule: its lrs may be device tensors
            values = {f"lr/{name}": float(lr) for name, lr in rates(step).items()}
        else:
            for optimizer in trainer.optimizers:
                for index, group in enumerate(optimizer.param_groups):
                    values[f"lr/{group.get('name') or f'group{index}'}"] = float(group["lr"])
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
