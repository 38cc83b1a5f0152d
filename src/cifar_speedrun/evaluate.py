"""Evaluate a trained model on the test set: python eval.py ckpt_path=<run>/checkpoints/last.ckpt [+trick=tta]

Everything comes from the file: the network is rebuilt from the config stored with it (a Lightning
checkpoint's hyperparameters, or model.pt's own config) through the project's registry of model
families, the weights are the ones the run evaluated (with `ema` or `lookahead`, the averaged ones
once averaging has started), and the data settings (source, path, test subset, normalization) are
the run's own unless the command line gives them, so `eval.py ckpt_path=...` alone reproduces the
run's accuracy. TTA is as the run was trained unless `+trick=tta` or `tta.flip=...` says otherwise.
The accuracy goes to the eval run's own results.json (logs/eval/runs/<time>/), never into the
training run's folder.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cifar_speedrun.conf_files import CONF_DIR, evaluation_tricks
from cifar_speedrun.config import command_line, hydra_job, resolvers
from cifar_speedrun.config.settings import check_eval
from cifar_speedrun.devices import device_name
from cifar_speedrun.errors import UserError, find_user_error, full_error
from cifar_speedrun.operations import run_lock, storage
from cifar_speedrun.operations.layout import CIFAR10_CLASSES
from cifar_speedrun.operations.sources import load_cifar10_uint8, select_subset
from cifar_speedrun.recipe.augment import PAGE_MEAN, PAGE_STD, EvalBatches, channel_stats, standardize
from cifar_speedrun.recipe.tta import tta_logits
from cifar_speedrun.records import tracking
from cifar_speedrun.records.model_file import DATA_FROM_RUN, build_model, check_record, is_model_file, load_weights

# Config groups of train.py that eval.py accepts, and what each option means here.
TRAINER_DEVICES = {"default": "auto", "cpu": "cpu"}
# train.py's groups that shape training only: eval.py refuses them by name (the checkpoint fixes them).
TRAINING_GROUPS = ("model", "optim", "logger", "callbacks", "experiment", "stage", "sweep", "proxy", "debug",
                   "hparams_search")


def _load_blob(path: str) -> Any:
    return storage.load_data_file(
        path, "ckpt_path={path} does not exist: give <run>/checkpoints/last.ckpt or <run>/model.pt",
        "ckpt_path={path} is not a checkpoint or model file of this project ({error}): give "
        "<run>/checkpoints/last.ckpt or <run>/model.pt")


def _trained_model(path: str) -> dict[str, Any]:
    """Model config, weights, normalization, data settings and training facts from a checkpoint or model
    file, every field checked as data (model_file.check_record) before it is used."""
    blob = _load_blob(path)
    if is_model_file(blob):
        record = {"model": blob.get("model_config"), "state_dict": blob.get("state_dict"), "mean": blob.get("mean"),
                  "std": blob.get("std"), "classes": blob.get("classes"), "tta": blob.get("tta") or {},
                  "trained": blob.get("about") or {}, "data": dict(blob.get("data") or {}),
                  "precision": blob.get("precision")}
        check_record(record, path)
        return record
    hparams = blob.get("hyper_parameters") if isinstance(blob, dict) else None
    run_config = (hparams or {}).get("run_config") or {} if isinstance(hparams, dict) else {}
    config = run_config.get("config") or {} if isinstance(run_config, dict) else {}
    if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict) or "model" not in config:
        raise UserError(f"ckpt_path={path} is not a checkpoint written by this project's train.py (no model config "
                        "inside): give <run>/checkpoints/last.ckpt or <run>/model.pt")
    state = {key[len("net."):]: value for key, value in blob["state_dict"].items()
             if isinstance(key, str) and key.startswith("net.")}
    recorded = config.get("data") if isinstance(config.get("data"), dict) else {}
    data = {key: value for key, value in recorded.items() if key in DATA_FROM_RUN}
    datamodule_state = blob.get("Cifar10DataModule")
    if isinstance(datamodule_state, dict) and isinstance(datamodule_state.get("source_id"), str):
        data["source_id"] = datamodule_state["source_id"]
    normalize = data.get("normalize", "page")
    callbacks = blob.get("callbacks") if isinstance(blob.get("callbacks"), dict) else {}
    timer = callbacks.get("TrainTimer") if isinstance(callbacks.get("TrainTimer"), dict) else {}
    history = timer.get("history") if isinstance(timer.get("history"), list) else []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    trained = {"epochs": int(blob["epoch"]) + 1 if isinstance(blob.get("epoch"), int) else None,
               "seed": run_config.get("seed"), "tricks": run_config.get("tricks", []),
               "data": run_config.get("data_source"), "test_acc": last.get("test_acc")}
    record = {"model": config["model"], "state_dict": state, "mean": None if normalize == "computed" else PAGE_MEAN,
              "std": None if normalize == "computed" else PAGE_STD, "tta": hparams.get("tta") or {},
              "trained": trained, "data": data, "precision": trainer.get("precision")}
    check_record(record, path)
    return record


def _given_on_command_line() -> set[str]:
    """The `data.*` keys this eval run's command line sets (they win over the checkpoint's)."""
    return {override.lstrip("+~").split("=", 1)[0] for override in hydra_job.job_overrides()}


def data_settings(cfg: DictConfig, recorded: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """The data to evaluate on: the run's recorded settings, except the keys the command line gives."""
    settings = {key: cfg.data.get(key) for key in DATA_FROM_RUN}
    for key, value in recorded.items():
        if key in DATA_FROM_RUN and f"data.{key}" not in given:
            settings[key] = value
    return settings


def _device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N (one line for anything else: eval.py runs on a CPU or a CUDA device)."""
    import re as _re

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"device={name!r} is not a device here: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but this machine has no CUDA device: use device=cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


_AUTOCAST = {"16-mixed": torch.float16, "16": torch.float16, "bf16-mixed": torch.bfloat16}
_TRUE = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "64-true": torch.float64, "64": torch.float64}


def precision_context(precision: str | None, device: torch.device) -> tuple[Any, torch.dtype | None, str]:
    """How to evaluate as a run of `precision` did, as Lightning runs it: (autocast context, a dtype for
    the weights of a '-true' precision or None, what actually runs). fp16 autocast exists on CUDA only:
    a 16-mixed run evaluated on a CPU runs in fp32 and says so."""
    from contextlib import nullcontext

    name = str(precision or "32-true")
    if name in _AUTOCAST and not (name in ("16-mixed", "16") and device.type != "cuda"):
        return torch.autocast(device.type, dtype=_AUTOCAST[name]), None, name
    if name in _TRUE and not (_TRUE[name] == torch.float16 and device.type != "cuda"):
        return nullcontext(), _TRUE[name], name
    return nullcontext(), None, "32-true" if name in ("32-true", "32") else f"32-true (the run's {name} needs CUDA)"


def evaluate(cfg: DictConfig, given: set[str] | None = None) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` on the test set; `given`: the keys the command line set (default: Hydra's)."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError("eval.py needs ckpt_path=<run>/checkpoints/last.ckpt (or <run>/model.pt)")
    evaluation = evaluation_tricks()  # tricks that set only tta.* keys (conf/trick/)
    extra = [name for name in (cfg.get("applied_tricks") or {}) if name not in evaluation]
    if extra:
        raise UserError(f"trick {extra[0]!r} changes training, not evaluation: eval.py takes only "
                        f"{', '.join(evaluation)} (the model is evaluated as it was trained)")
    check_eval(cfg)
    path = str(cfg.ckpt_path)
    trained = _trained_model(path)
    tta = dict(trained["tta"])
    tta.update({key: value for key, value in OmegaConf.to_container(cfg.tta).items() if value is not None})
    device = _device(str(cfg.device))
    net = build_model(trained["model"], path, trained["state_dict"])
    load_weights(net, trained["state_dict"], path)
    net = net.to(device).eval()

    data_cfg = data_settings(cfg, trained["data"], _given_on_command_line() if given is None else given)
    if data_cfg["source"] == "image_folder" and not data_cfg["path"]:
        raise UserError("the run used data.source=image_folder without a recorded data.path: give data.path=<archive>")
    data = load_cifar10_uint8(str(data_cfg["source"]), cfg.data.root, data_cfg["path"], str(cfg.data.cache_dir))
    recorded_id = trained["data"].get("source_id")
    if recorded_id and recorded_id != data.source_id:
        print(f"[eval] note: this is not the data the run was evaluated on (the run's {recorded_id}, now "
              f"{data.source_id}): the accuracy is on other data", flush=True)
    mean, std = trained["mean"], trained["std"]
    if mean is None:  # the run standardized with its train set's own statistics: the same data's
        mean, std = channel_stats(data.train_x)
    test_x, test_y = data.test_x, data.test_y
    if data_cfg["test_subset"]:
        index = select_subset(test_y, int(data_cfg["test_subset"]), "per_class", int(cfg.seed), "data.test_subset")
        test_x, test_y = test_x[index], test_y[index]
    # The test batches as the run's data module made them (standardized, fp16 on CUDA with
    # half_precision, channels_last), under the run's precision: the same numbers come out.
    autocast, weights_dtype, precision = precision_context(cfg.precision or trained["precision"], device)
    images_dtype = torch.float16 if data_cfg.get("half_precision") and device.type == "cuda" else torch.float32
    if weights_dtype is not None:
        net, images_dtype = net.to(weights_dtype), weights_dtype
    channels_last = bool(data_cfg.get("channels_last"))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    test = standardize(test_x.to(device), mean, std).to(images_dtype)
    correct = 0
    with torch.no_grad(), autocast:
        for images, labels in EvalBatches(test, test_y, int(cfg.data.eval_batch_size), channels_last):
            logits = tta_logits(net, images, bool(tta.get("flip", False)), bool(tta.get("translate", False)),
                                str(tta.get("reduce", "logits")), tta.get("least_confident"))
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
    source = str(data_cfg["source"])
    result = {
        "status": "ok", "kind": "eval", "test_acc": correct / len(test_y), "test_images": len(test_y),
        "ckpt_path": os.path.abspath(path) if storage.is_local(path) else path, "tta": tta,
        "trained": trained["trained"], "data_source": f"CIFAR-10 {source}"
        + (f" {os.path.basename(str(data_cfg['path']))}" if source == "image_folder" else ""),
        "data": {key: data_cfg.get(key) for key in DATA_FROM_RUN}, "precision": precision,
        "device": device_name(device),
        "classes": list(CIFAR10_CLASSES),
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    results_path = storage.join(str(cfg.paths.output_dir), "results.json")
    storage.write_json_atomic(result, results_path)
    views = "+".join(name for name in ("flip", "translate") if tta.get(name)) or "none"
    if views != "none" and tta.get("least_confident") is not None:
        views += f" on the {100 * tta['least_confident']:g}% least confident"
    print(f"[eval] test acc {100 * result['test_acc']:.2f}% on {len(test_y):,} images (tta: {views}; {precision}; "
          f"data: {result['data_source']}) · results: {results_path}", flush=True)
    return result


def _refuse_a_training_folder(folder: str, setting: str = "hydra.run.dir", shown: str | None = None) -> None:
    """A folder (or, for a sweep, one of its job folders) that holds a training run is not eval.py's to write."""
    path = storage.join(folder, "results.json")
    try:
        trained = storage.exists(path) and "history" in storage.read_json(path)
    except Exception:
        trained = False
    if trained:
        inside = f" ({folder})" if shown is not None else ""
        raise UserError(f"{setting}={shown or folder} holds a training run{inside} (its results.json, model.pt, "
                        f"checkpoints): eval.py writes its own results.json, so give it another folder (or leave "
                        f"{setting} out)")


def _set_aside_an_earlier_evaluation(folder: str) -> None:
    """eval.py writes its own results.json: an earlier evaluation's is moved into `earlier-<time>/`; a training
    run's folder is refused (its record, model.pt and checkpoints belong together and are not eval's to move)."""
    from cifar_speedrun.records.results import set_aside_earlier_run

    _refuse_a_training_folder(folder)
    aside = set_aside_earlier_run(folder, continuing=False)
    if aside is not None:
        print(f"[eval] {folder} held an earlier evaluation: kept in {os.path.basename(aside)}/", flush=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    try:
        with run_lock.held({str(cfg.paths.output_dir): "paths.output_dir (hydra.run.dir)"}):
            _set_aside_an_earlier_evaluation(str(cfg.paths.output_dir))
            evaluate(cfg)
    except Exception as error:
        user_error = find_user_error(error)
        if full_error() or user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


_GROUP = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<group>[a-z_]+)=(?P<value>.*)$")


def eval_arguments(args: list[str]) -> list[str]:
    """train.py's group choices that a user carries over to eval.py: the ones that mean something here
    become eval.py's own keys (`trainer=cpu` -> `device=cpu`); the ones that shape training are
    refused by name, since the checkpoint already fixes them."""
    out = []
    for arg in args:
        match = _GROUP.match(arg)
        if not match or match["prefix"] == "~":
            out.append(arg)
            continue
        group, value = match["group"], match["value"].strip()
        if group == "trainer":
            if value not in TRAINER_DEVICES:
                raise UserError(f"trainer={value}: eval.py runs on one device; use device=cpu, device=cuda or "
                                "device=cuda:N")
            out.append(f"device={TRAINER_DEVICES[value]}")
        elif group in TRAINING_GROUPS:
            raise UserError(f"{group}={value} shapes training; eval.py builds the model, data and TTA as the "
                            "checkpoint records them: drop it (data.test_subset=N evaluates on N test images)")
        else:
            out.append(arg)
    return out


def main() -> None:
    resolvers.register_resolvers()
    tracking.quiet_console()
    try:
        args = eval_arguments(sys.argv[1:])
        given = [arg.split("=", 1)[1].strip() for arg in args if arg.split("=", 1)[0] == "ckpt_path"]
        if not any(arg.startswith("-") for arg in args) and (not given or given[-1] in ("", "null", "???")):
            raise UserError("eval.py needs ckpt_path=<run>/checkpoints/last.ckpt (or <run>/model.pt)")
        command_line.check_arguments(args)
        command_line.check_group_overrides(args)
        where = command_line.check_composition(args, "eval")
        if where is not None:  # before Hydra writes its .hydra/ (and a sweep's multirun.yaml) over a training run's
            _refuse_a_training_folder(where.folder, "hydra.sweep.dir" if where.multirun else "hydra.run.dir")
            if where.multirun and os.path.isdir(where.folder):
                for job in sorted(os.listdir(where.folder)):
                    if os.path.isdir(os.path.join(where.folder, job)):
                        _refuse_a_training_folder(os.path.join(where.folder, job), "hydra.sweep.dir",
                                                  shown=where.folder)
        sys.argv[1:] = run_lock.pin_run_folder(args, where)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_main()
