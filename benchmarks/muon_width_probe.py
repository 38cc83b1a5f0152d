"""Why airbench94_muon stalls at chance on the CPU proxy: the first steps, watched from inside.

airbench94_muon (8 epochs, batch 2000) reaches 94% at full width, but at the proxy width 0.125 its
train loss sat at ln 10 = 2.303 from epoch 0 to 4 (docs/results.md, "Page vs airbench"). This script runs the
recipe's own optimizer (optim.muon_sgd) and schedules by hand for the first steps and prints, per
step, what could hold the loss at chance: the whitening bias (trained with lr 0.053 per example,
i.e. 106 on our mean loss at batch 2000), the share of whitening outputs the GELU lets through, the
logits' spread and the head's weight norm. Variants are plain config overrides, e.g.

    python benchmarks/muon_width_probe.py --steps 40 model.width=0.125
    python benchmarks/muon_width_probe.py --steps 40 model.width=0.125 optim.width_reference_features=null

It is a diagnostic, not a timing: it prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from _common import archive_path, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_speedrun.recipe.models.layers import PatchWhitening
from cifar_speedrun.recipe.optim import read_optimizer
from cifar_speedrun.recipe.schedule import PiecewiseLinear, group_schedules, resolve_knots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps to run (25 an epoch at batch 2000)")
    parser.add_argument("--every", type=int, default=2, help="print every k steps")
    parser.add_argument("--init-grads", action="store_true",
                        help="only print each optimizer group's RMS gradient at initialization (one batch)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=airbench94_muon proxy=cpu")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = ["experiment=airbench94_muon", "proxy=cpu", "data.source=image_folder",
                 f"data.path={archive_path()}", *args.overrides]
    cfg = compose_config(overrides)
    torch.manual_seed(int(cfg.seed))
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    net = instantiate(cfg.model)
    for layer in net.modules():
        if isinstance(layer, PatchWhitening):
            layer.fit_to_data(datamodule.train_images)
            whitening = layer
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    batch_size = int(cfg.data.batch_size)
    built = read_optimizer(optim_cfg).build(net, batch_size, "cpu")
    batches = datamodule.train_dataloader()
    steps_per_epoch = len(batches)
    epochs = float(cfg.epochs)
    run_schedule = PiecewiseLinear(resolve_knots(optim_cfg["schedule"]["epochs"], epochs),
                                   optim_cfg["schedule"]["factors"], steps_per_epoch)
    schedules = group_schedules(built, run_schedule, epochs)  # as the LightningModule schedules them
    for group in built.optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    if args.init_grads:
        images, labels = next(iter(batches))
        F.cross_entropy(net(images).float(), labels, label_smoothing=float(cfg.loss.label_smoothing)).backward()
        rms = {g["name"]: torch.cat([p.grad.flatten() for p in g["params"] if p.grad is not None]).pow(2).mean().sqrt()
               for g in built.optimizer.param_groups}
        print(f"width {cfg.model.width} (head features {head.in_features}): RMS gradient at init " +
              ", ".join(f"{name} {value.item():.3e}" for name, value in rms.items()), flush=True)
        return
    print(f"width {cfg.model.width}: head features {head.in_features}, batch {batch_size}, "
          f"{steps_per_epoch} steps an epoch; lrs " +
          ", ".join(f"{g['name']} {g['lr']:.4g}" for g in built.optimizer.param_groups))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    print("step  loss    |b_white|  max|b|  white>0  logit_sd  |head|  bn_bias_mean(last)  features>0.01")
    label_smoothing = float(cfg.loss.label_smoothing)
    step = 0
    captured: dict[str, torch.Tensor] = {}  # the whitening output and the head's input of the last forward
    whitening.register_forward_hook(lambda m, i, o: captured.__setitem__("white", o.detach()))
    head.register_forward_hook(lambda m, i, o: captured.__setitem__("features", i[0].detach()))
    net.train()
    while step < args.steps:
        for layer in net.modules():
            if hasattr(layer, "set_epoch"):
                layer.set_epoch(step // steps_per_epoch)
        for images, labels in batches:
            logits = net(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            loss.backward()
            for group, schedule in zip(built.optimizer.param_groups, schedules, strict=True):
                group["lr"] = group["initial_lr"] * schedule(step)
            built.optimizer.step()
            net.zero_grad(set_to_none=True)
            if step % args.every == 0 or step == args.steps - 1:
                bias = whitening.bias.detach()
                print(f"{step:4d}  {loss.item():.4f}  {bias.norm().item():9.3f}  {bias.abs().max().item():6.3f}  "
                      f"{(captured['white'] > 0).float().mean().item():7.3f}  {logits.float().std().item():8.4f}  "
                      f"{head.weight.norm().item():6.2f}  {norms[-1].bias.detach().mean().item():18.3f}  "
                      f"{(captured['features'] > 0.01).float().mean().item():13.3f}", flush=True)
            step += 1
            if step >= args.steps or not math.isfinite(loss.item()):
                return


if __name__ == "__main__":
    main()
