"""The Hydra entry: compose the config, instantiate everything it names, fit, write results.

Nothing here knows about individual tricks: they are config files that set keys which the data
module, the model, the LightningModule and the callbacks already understand.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cifar_speedrun.conf_files import CONF_DIR
from cifar_speedrun.config import command_line, hydra_job, resolvers
from cifar_speedrun.config.settings import TrainSettings
from cifar_speedrun.errors import UserError, describe, find_user_error, full_error
from cifar_speedrun.operations import interrupts, run_lock, storage
from cifar_speedrun.operations.interrupts import RunInterrupted
from cifar_speedrun.recipe.models import build_from_settings
from cifar_speedrun.recipe.module import SpeedrunModule
from cifar_speedrun.records import resume as resume_lib
from cifar_speedrun.records import tracking
from cifar_speedrun.records.csv_log import ResumableCSVLogger
from cifar_speedrun.records.results import ResultsWriter, set_aside_earlier_run


def _describe_data(cfg: DictConfig) -> str:
    if cfg.data.source == "torchvision":
        return "CIFAR-10 official (torchvision)"
    return f"CIFAR-10 image_folder {os.path.basename(str(cfg.data.path))}"


def _hydra_context() -> tuple[str, bool]:
    return " ".join(hydra_job.job_overrides()), hydra_job.is_multirun()


def _warn_if_full_width_on_cpu(cfg: DictConfig, net: torch.nn.Module) -> None:
    """One line with a measured estimate before a full-width run on a machine without CUDA."""
    if torch.cuda.is_available() or cfg.trainer.accelerator not in ("auto", "cpu") or cfg.model.width < 0.5:
        return
    splits = int(OmegaConf.select(cfg, "model.norm.ghost_splits") or 1)  # a multiple suits ghost BN too
    size = splits * max(1, -(-16 // splits))  # 16 images, or the fewest that the splits divide
    probe = torch.randn(size, 3, 32, 32)
    saved = {key: value.clone() for key, value in net.state_dict().items()}  # BN statistics change below
    net.train()
    try:
        net(probe).sum().backward()  # the first call pays one-off costs: time the second
        start = time.perf_counter()
        net(probe).sum().backward()
        per_image = (time.perf_counter() - start) / len(probe)
    except Exception:  # an estimate is advice: never let it stop a valid run
        return
    finally:
        net.zero_grad(set_to_none=True)
        net.load_state_dict(saved)
    images = (cfg.data.subset or 50_000) * cfg.epochs
    hours = images * per_image / 3600
    print(f"[cpu] no CUDA: model.width={cfg.model.width} trains at ~{1 / per_image:.0f} images/s here, so "
          f"{cfg.epochs} epochs take ~{hours:.1f} h; for a CPU-sized run use experiment=cpu_proxy "
          "(or model.width=0.25 data.subset=10000 epochs=3)", flush=True)


def _checkpoint_to_resume(cfg: DictConfig) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint to continue from, loaded as data only and checked against this run's config."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path and cfg.get("resume"):
        ckpt_path = storage.join(str(cfg.paths.checkpoint_dir), "last.ckpt")
        if not storage.exists(ckpt_path):
            raise UserError(
                f"resume=true but there is no {ckpt_path}: run in the interrupted run's folder "
                "(hydra.run.dir=<its dir> resume=true) or give ckpt_path=/path/to/last.ckpt"
            )
    if not ckpt_path:
        return None, None
    if not storage.exists(str(ckpt_path)):
        raise UserError(f"ckpt_path={ckpt_path} does not exist: give the path of a .ckpt file "
                        "(e.g. <run>/checkpoints/last.ckpt)")
    checkpoint = storage.load_checkpoint(str(ckpt_path))
    finished = int(checkpoint.get("epoch", -1)) + 1
    if finished >= math.ceil(float(cfg.epochs)):
        raise UserError(
            f"ckpt_path={ckpt_path} is from a run that already trained {finished} epochs (epochs={cfg.epochs}): "
            f"nothing is left to train. Evaluate it with `python eval.py ckpt_path={ckpt_path}`, or set "
            "epochs higher to train on"
        )
    resume_lib.check_checkpoint_matches(checkpoint, OmegaConf.to_container(cfg, resolve=True), str(ckpt_path))
    return str(ckpt_path), checkpoint


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build from `cfg` and fit, holding the run folder's lock. Returns the results dict (also in results.json)."""
    checkpointing = (cfg.get("callbacks") or {}).get("checkpoint")
    writes_to = {str(cfg.paths.output_dir): "paths.output_dir"}
    if checkpointing is not None and checkpointing.get("dirpath") and not _inside(str(checkpointing.dirpath),
                                                                                  str(cfg.paths.output_dir)):
        writes_to[str(checkpointing.dirpath)] = "paths.checkpoint_dir"
    with run_lock.held(writes_to):  # a job of a multirun, train() called from Python, a shared checkpoint folder
        # Before anything can fail: from here on, the folder's results.json is this run's (or the one it continues).
        aside = set_aside_earlier_run(str(cfg.paths.output_dir), continuing=_continues_this_folder(cfg))
        if aside is not None:
            print(f"[folder] {cfg.paths.output_dir} held an earlier run: its results.json, model.pt and checkpoints "
                  f"are kept in {os.path.basename(aside)}/", flush=True)
        run = command_line.validate(cfg)
        return _fit(cfg, run)


def _continues_this_folder(cfg: DictConfig) -> bool:
    """resume=true, or a checkpoint from this run's own folder: its results.json is the record continued."""
    if cfg.get("resume"):
        return True
    ckpt_path = cfg.get("ckpt_path")
    return bool(ckpt_path) and storage.is_local(str(ckpt_path)) and _inside(str(ckpt_path), str(cfg.paths.output_dir))


def _inside(path: str, folder: str) -> bool:
    """`path` is `folder` or below it (its lock covers it)."""
    if not (storage.is_local(path) and storage.is_local(folder)):
        return False
    real_path, real_folder = os.path.realpath(path), os.path.realpath(folder)
    return real_path == real_folder or real_path.startswith(real_folder.rstrip(os.sep) + os.sep)


def _fit(cfg: DictConfig, run: TrainSettings) -> dict[str, Any]:
    """The run `cfg` describes; the recipe (net, optimizer, schedule, TTA) built from `run`, the same
    config as check_train typed it, so each number is used as it was checked."""
    storage.check_writable(str(cfg.paths.output_dir), "paths.output_dir (hydra.run.dir)")
    checkpointing = (cfg.get("callbacks") or {}).get("checkpoint")
    if checkpointing is not None and checkpointing.get("dirpath"):
        storage.check_writable(str(checkpointing.dirpath), "paths.checkpoint_dir (callbacks.checkpoint.dirpath)")
    storage.check_writable(str(cfg.data.cache_dir), "paths.cache_dir (data.cache_dir)")
    for name, logger in (cfg.get("logger") or {}).items():  # a logger's own folder: one line, not its library's
        if logger is not None and logger.get("save_dir"):  # traceback, a 'log -1' or W&B's silent temp folder
            storage.check_writable(str(logger.save_dir), f"logger.{name}.save_dir")
    for folder in (str(cfg.paths.output_dir), str(cfg.paths.checkpoint_dir)):
        storage.remove_stale(folder)  # temporary files of a run of this folder that was killed
    ckpt_path, checkpoint = _checkpoint_to_resume(cfg)
    tracking.check_wandb(cfg)
    overrides, _ = _hydra_context()
    _say_if_epochs_replace_a_rows(cfg)
    tricks = list(cfg.get("applied_tricks") or {})
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.trainer.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    net = build_from_settings(run.model)
    _warn_if_full_width_on_cpu(cfg, net)
    keys = tracking.run_keys(cfg, parameters=sum(p.numel() for p in net.parameters()))
    run_config = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": int(cfg.seed),
        "tricks": tricks,
        "overrides": overrides,
        "data_source": _describe_data(cfg),
        "run_keys": keys,
        "wandb_group": resolvers.wandb_group(str(cfg.task_name)),
    }
    module = SpeedrunModule.from_config(cfg, net, run_config=run_config, run=run)  # prints [optim] when built
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(tracking.StartLine(cfg, tricks, str(cfg.paths.output_dir)))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    for logger in loggers:  # a resumed run keeps the metrics of the epochs its checkpoint holds
        if isinstance(logger, ResumableCSVLogger):
            logger.keep_through_step(int(checkpoint.get("global_step", 0)) if checkpoint else None)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        if trainer.is_global_zero:
            tracking.log_run_config(loggers, cfg, keys)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        # on_fit_end already wrote results.json; reuse that record instead of writing it again
        writer = next(cb for cb in callbacks if isinstance(cb, ResultsWriter))
        result = writer.result or writer.record(trainer, module, "ok")
        final = {f"final/{key}": float(result[key]) for key in ("test_acc", "train_seconds", "time_to_target")
                 if result.get(key) is not None}
        if trainer.is_global_zero:
            tracking.log_final(loggers, final, trainer.global_step)
            print(tracking.end_line(result, writer.path, fast_dev_run=bool(trainer.fast_dev_run)), flush=True)
        return result
    finally:
        _finish_loggers(loggers)


def _say_if_epochs_replace_a_rows(cfg: DictConfig) -> None:
    """`epochs=` on the command line replaces the epochs a chosen stage or experiment trains (every row of a
    stage sweep alike): a line says so, since Page's rows differ in their epochs on purpose."""
    from cifar_speedrun.conf_files import epochs_set_by

    if not any(override.lstrip("+~").split("=", 1)[0] == "epochs" for override in hydra_job.job_overrides()):
        return
    for group in ("stage", "experiment"):
        choice = hydra_job.choices().get(group)
        own = epochs_set_by(group, choice) if choice else None
        if own is not None and own != float(cfg.epochs):
            print(f"[epochs] epochs={float(cfg.epochs):g} from the command line replaces the {own:g} epochs {group}="
                  f"{choice} trains (its schedule follows the new length)", flush=True)
            return


def _results_path(cfg: DictConfig) -> str:
    return storage.join(str(cfg.paths.output_dir), "results.json")


def _record_failure(cfg: DictConfig, error: BaseException, status: str = "failed") -> None:
    """A job that failed before training leaves a results.json saying why.

    An existing results.json is never replaced here: either the ResultsWriter wrote it (with the
    epochs that finished, and the failure) or it is an earlier run's record (a refused resume must
    not destroy the history it would have continued).
    """
    try:
        path = _results_path(cfg)
        if storage.exists(path):
            return
        overrides, _ = _hydra_context()
        storage.write_json_atomic({
            "status": status, "error": describe(error), "test_acc": None,
            "train_seconds": None, "time_to_target": None, "history": [], "seed": cfg.get("seed"),
            "tricks": list(cfg.get("applied_tricks") or {}), "overrides": overrides,
        }, path)
    except BaseException as secondary:  # never mask the original error
        print(f"warning: could not write results.json ({describe(secondary)})", file=sys.stderr)


def _results_state(cfg: DictConfig) -> str | None:
    """What results.json says now, for the error line, so the message and the file agree."""
    try:
        record = storage.read_json(_results_path(cfg))
    except Exception:
        return "results.json could not be written" if storage.is_local(str(cfg.paths.output_dir)) else None
    history = record.get("history") or []
    if not history:
        return None
    return (f"results.json: status '{record.get('status')}' with {len(history)} evaluated epoch"
            f"{'s' if len(history) != 1 else ''}, last test acc {100 * history[-1]['test_acc']:.2f}%")


def _how_to_continue(cfg: DictConfig) -> str:
    """After an interruption: the resume command when a checkpoint exists, else what is true."""
    checkpointing = (cfg.get("callbacks") or {}).get("checkpoint")
    if checkpointing is None:
        return "checkpoints are off (callbacks.checkpoint=null): start the run again to train it"
    last = storage.join(str(checkpointing.get("dirpath") or cfg.paths.checkpoint_dir), "last.ckpt")
    try:
        kept = storage.exists(last)
    except Exception:  # an unreachable remote folder: say nothing that may be false
        kept = False
    if not kept:
        return "no checkpoint had been written when it stopped, so there is none to resume from: start the run again"
    return (f"the checkpoint of the last finished epoch is kept: resume with: python train.py "
            f"hydra.run.dir={cfg.paths.output_dir} resume=true")


def _finish_loggers(loggers: list[Any]) -> None:
    """Close W&B; a failure there loses nothing (results.json is already written) and says so."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            try:
                wandb.finish()
            except Exception as error:  # network gone mid-run, disk full in the offline folder, ...
                print(f"warning: W&B could not finish ({type(error).__name__}: {error}); results.json is written. "
                      "Next time set WANDB_MODE=offline and upload with `wandb sync`", file=sys.stderr)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    """One job. In a multirun a failed job is recorded and the sweep goes on; alone, it exits non-zero.

    Returns the job's results record (None when it failed): a sweeper reads what this job did from it,
    never from a results.json an earlier run may have left in the folder.

    An interruption (SIGTERM, SIGINT) stops the whole process, multirun included, with 128 + signal.
    """
    _, multirun = _hydra_context()
    try:
        return train(cfg)
    except RunInterrupted as interrupt:
        _record_failure(cfg, interrupt, status="interrupted")
        state = _results_state(cfg)
        print(f"error: {interrupt}{f' ({state})' if state else ''}; {_how_to_continue(cfg)}", file=sys.stderr,
              flush=True)
        raise SystemExit(interrupt.exit_code) from None
    except Exception as error:
        if not isinstance(find_user_error(error), run_lock.FolderRefused):  # nothing may be written there
            _record_failure(cfg, error)
        if full_error():
            raise
        user_error = find_user_error(error)
        state = _results_state(cfg)
        suffix = f" ({state})" if state else ""
        if user_error is not None:
            print(f"error: {user_error}{suffix}", file=sys.stderr, flush=True)
            if not multirun:
                raise SystemExit(2) from None
            return None
        # Training failed (NaN loss, OOM, ...): results.json says so.
        print(f"error: run failed: {describe(error)}{suffix or ' (results.json has status failed)'}; "
              "HYDRA_FULL_ERROR=1 shows the traceback", file=sys.stderr, flush=True)
        if not multirun:
            raise SystemExit(1) from None
    finally:
        _release_memory()
    return None


def main() -> None:
    """Console entry: signals, quick checks of the command line, resume's own settings, then Hydra."""
    interrupts.raise_on_signals()
    resolvers.register_resolvers()
    tracking.quiet_console()
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        args = sys.argv[1:]
        command_line.check_arguments(args)
        args = resume_lib.resume_arguments(args)
        command_line.check_group_overrides(args)
        sys.argv[1:] = run_lock.pin_run_folder(args, command_line.check_composition(args, "train"))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunInterrupted as interrupt:
        print(f"error: {interrupt}; nothing was started", file=sys.stderr, flush=True)
        raise SystemExit(interrupt.exit_code) from None
    try:
        hydra_main()
    except RunInterrupted as interrupt:  # between the jobs of a multirun, or in Hydra's own code
        print(f"error: {interrupt}; nothing more was started", file=sys.stderr, flush=True)
        raise SystemExit(interrupt.exit_code) from None
