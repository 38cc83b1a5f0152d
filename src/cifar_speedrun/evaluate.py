"""Evaluate a trained model on the test set: python eval.py ckpt_path=<run>/checkpoints/last.ckpt [+trick=tta]

The network is rebuilt from the config stored with it (a Lightning checkpoint's hyperparameters, or
model.pt's own config), so no training overrides have to be repeated; the weights are the ones the
run evaluated (with `ema`, the averaged ones). TTA is as the run was trained unless `+trick=tta` or
`tta.flip=...` says otherwise. The accuracy goes to the eval run's own results.json
(logs/eval/runs/<time>/), never into the training run's folder.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cifar_speedrun import config as config_lib
from cifar_speedrun import schema, storage, tracking
from cifar_speedrun.data import CIFAR10_CLASSES, PAGE_MEAN, PAGE_STD, channel_stats, load_cifar10_uint8, select_subset
from cifar_speedrun.errors import UserError, find_user_error
from cifar_speedrun.model_file import checked_model_config, is_model_file
from cifar_speedrun.module import tta_logits

# Tricks that change how a trained network is evaluated; the others change training.
EVAL_TRICKS = ("tta",)


def _trained_model(path: str) -> dict[str, Any]:
    """Model config, weights, normalization and training facts from a checkpoint or a model file."""
    if not storage.exists(path):
        raise UserError(f"ckpt_path={path} does not exist: give <run>/checkpoints/last.ckpt or <run>/model.pt")
    import io

    try:
        blob = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"ckpt_path={path} is not a checkpoint or model file of this project "
                        f"({type(error).__name__}): give <run>/checkpoints/last.ckpt or <run>/model.pt") from None
    if is_model_file(blob):
        return {"model": blob["model_config"], "state_dict": blob["state_dict"], "mean": blob["mean"],
                "std": blob["std"], "tta": blob.get("tta") or {}, "trained": blob.get("about") or {}}
    hparams = blob.get("hyper_parameters") if isinstance(blob, dict) else None
    run_config = (hparams or {}).get("run_config") or {}
    config = run_config.get("config") or {}
    if "state_dict" not in blob or "model" not in config:
        raise UserError(f"ckpt_path={path} is not a checkpoint written by this project's train.py (no model config "
                        "inside): give <run>/checkpoints/last.ckpt or <run>/model.pt")
    state = {key[len("net."):]: value for key, value in blob["state_dict"].items() if key.startswith("net.")}
    normalize = (config.get("data") or {}).get("normalize", "page")
    history = ((blob.get("callbacks") or {}).get("TrainTimer") or {}).get("history") or []
    trained = {"epochs": int(blob.get("epoch", -1)) + 1, "seed": run_config.get("seed"),
               "tricks": run_config.get("tricks", []), "data": run_config.get("data_source"),
               "test_acc": history[-1]["test_acc"] if history else None}
    return {"model": config["model"], "state_dict": state, "mean": None if normalize == "computed" else PAGE_MEAN,
            "std": None if normalize == "computed" else PAGE_STD, "tta": hparams.get("tta") or {},
            "trained": trained}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise UserError("eval.py needs ckpt_path=<run>/checkpoints/last.ckpt (or <run>/model.pt)")
    extra = [name for name in (cfg.get("applied_tricks") or {}) if name not in EVAL_TRICKS]
    if extra:
        raise UserError(f"trick {extra[0]!r} changes training, not evaluation: eval.py takes only "
                        f"{', '.join(EVAL_TRICKS)} (the model is evaluated as it was trained)")
    schema.check(cfg, schema.EVAL)
    path = str(cfg.ckpt_path)
    trained = _trained_model(path)
    tta = dict(trained["tta"])
    tta.update({key: value for key, value in OmegaConf.to_container(cfg.tta).items() if value is not None})
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else str(cfg.device)))
    net = instantiate(checked_model_config(trained["model"], path))
    net.load_state_dict(trained["state_dict"])
    net = net.to(device).eval()

    data = load_cifar10_uint8(cfg.data.source, cfg.data.root, cfg.data.path, cfg.data.cache_dir)
    mean, std = trained["mean"], trained["std"]
    if mean is None:  # the run standardized with its train set's own statistics: the same data's
        mean, std = channel_stats(data.train_x)
    test_x, test_y = data.test_x, data.test_y
    if cfg.data.get("test_subset"):
        index = select_subset(test_y, int(cfg.data.test_subset), "per_class", int(cfg.seed))
        test_x, test_y = test_x[index], test_y[index]
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_y), int(cfg.data.eval_batch_size)):
            images = (test_x[start:start + int(cfg.data.eval_batch_size)].to(device).float() - mean_t) / std_t
            logits = tta_logits(net, images, bool(tta.get("flip", False)), bool(tta.get("translate", False)),
                                str(tta.get("reduce", "logits")))
            correct += int((logits.argmax(dim=1).cpu() == test_y[start:start + len(images)]).sum())
    result = {
        "status": "ok", "kind": "eval", "test_acc": correct / len(test_y), "test_images": len(test_y),
        "ckpt_path": os.path.abspath(path) if storage.is_local(path) else path, "tta": tta,
        "trained": trained["trained"], "data_source": f"CIFAR-10 {cfg.data.source}"
        + (f" {os.path.basename(str(cfg.data.path))}" if cfg.data.source == "image_folder" else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "classes": list(CIFAR10_CLASSES),
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    results_path = storage.join(str(cfg.paths.output_dir), "results.json")
    storage.write_json_atomic(result, results_path)
    views = "+".join(name for name in ("flip", "translate") if tta.get(name)) or "none"
    print(f"[eval] test acc {100 * result['test_acc']:.2f}% on {len(test_y):,} images (tta: {views}) · "
          f"results: {results_path}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path=str(config_lib.CONF_DIR), config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except Exception as error:
        user_error = find_user_error(error)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main() -> None:
    config_lib.register_resolvers()
    tracking.quiet_console()
    try:
        config_lib.check_group_overrides(sys.argv[1:])
        if not os.environ.get("HYDRA_FULL_ERROR"):
            config_lib.check_composition(sys.argv[1:], "eval")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_main()
