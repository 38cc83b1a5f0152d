"""What one training step costs the host, against a plain loop of the same recipe (issue 18).

A GPU runs ahead of the host only while the host enqueues a step faster than the GPU computes it.
The host side can be measured on a CPU by making the compute negligible (a tiny width and batch),
for each recipe:

  project   `train()` as `python train.py experiment=<name> ...` runs it: Trainer, SpeedrunModule,
            every default callback (timer, results, checkpoint, lr logger, model file) and the csv logger.
  recipe    the same recipe as a plain loop: the same net and initial weights, the data module's own
            batches, the same loss (label smoothing included), the recipe's own optimizer (optim.py)
            and LR schedule, its weight averaging (EMA / lookahead, every 5 steps) done inline, and
            nothing else. This is what airbench's single-file script does per step.
  sgd       the loop issue 18 measured against: same net and batches, plain cross-entropy,
            torch.optim.SGD(foreach=True), zero_grad, backward, step.

Over the same steps (epochs 1..E-1, each epoch's last step left out: its interval holds the
epoch's end), it prints host ms/step (median and mean: the mean counts the steps that average, log
or check; sides alternate over `--repeats` runs, since this machine's speed drifts), aten ops/step
(each a kernel launch on a GPU) and host syncs/step by op, counted in a run of their own (the
counting hook slows every op), and the ratios project / recipe. `--proxy-steps N` also times N
steps at the proxy width (0.125, the recipe's batch).

    python benchmarks/step_cost.py [--experiments page_baseline page_final airbench94 airbench94_muon]
                                   [--width 0.03] [--batch 32] [--steps-per-epoch 30] [--epochs 5]
                                   [--repeats 3] [--proxy-steps 0] [--threads 1] [override ...]
Targets (issue 18): project / recipe <= 1.15 host time and <= 1.25 ops, 0 syncs per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from op_count import OpCounter

from cifar_speedrun.recipe.optim import read_optimizer
from cifar_speedrun.recipe.schedule import PiecewiseLinear, group_schedules, resolve_knots
from cifar_speedrun.train import train

DEFAULT_EXPERIMENTS = ["page_baseline", "page_final", "airbench94", "airbench94_muon"]


def compose(experiment: str, args: argparse.Namespace, extra: list[str], width: float, batch: int,
            steps_per_epoch: int) -> DictConfig:
    overrides = [f"experiment={experiment}", "trainer=cpu", "trainer.precision=32-true", "data.source=image_folder",
                 f"data.path={_common.archive_path()}", f"model.width={width}", f"data.batch_size={batch}",
                 f"data.subset={batch * steps_per_epoch}", "data.test_subset=100", f"epochs={args.epochs}",
                 f"trainer.check_val_every_n_epoch={args.epochs}", "trainer.enable_progress_bar=false", *extra]
    return _common.compose_config(overrides)


def measured_steps(epochs: int, steps_per_epoch: int) -> set[tuple[int, int]]:
    """(epoch, step) pairs both sides measure: epochs 1.., each epoch's last step left out."""
    return {(e, s) for e in range(1, epochs) for s in range(steps_per_epoch - 1)}


# ------------------------------------------------------------------------------------------------ project
def project(cfg: DictConfig, count: bool) -> dict[str, Any]:
    """Host ms per step (StepClock); with `count`, aten ops and syncs per step instead (op_count.StepOps:
    its Python hook on every op would slow the very steps being timed, so times and counts come from
    separate runs)."""
    with open_dict(cfg):
        cfg.callbacks.step_clock = {"_target_": "step_clock.StepClock", "skip_epochs": 1,
                                    "keep_all": True}
        if count:
            cfg.callbacks.step_ops = {"_target_": "op_count.StepOps", "skip_epochs": 1}
    result = train(cfg)
    out: dict[str, Any] = {"host_ms": result["step_ms"]["host_ms_all"]}
    if count:
        ops = result["step_ops"]
        out.update(ops=ops["ops_per_step"], ops_by_name=ops["ops"], syncs=ops["syncs_per_step"],
                   syncs_by_name=ops["syncs"], steps=ops["steps"])
    return out


# ------------------------------------------------------------------------------------------------ plain loops
class _Averaging:
    """The recipe's weight averaging, inline: EMA (Page) or lookahead (airbench), as a hand-written loop
    would do it (foreach kernels over the floating-point tensors, no host sync)."""

    def __init__(self, settings: dict[str, Any] | None, kind: str, net: torch.nn.Module, total_steps: int) -> None:
        self.settings, self.kind, self.total = settings or {}, kind, total_steps
        self.current = [t for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()]
        self.average: list[torch.Tensor] | None = None
        self.every = int(self.settings.get("every_n_steps", 5))

    @torch.no_grad()
    def step(self, global_step: int, epoch: int) -> None:
        if not self.settings or global_step % self.every:
            return
        if self.kind == "lookahead" and epoch < int(self.settings.get("start_epochs", 3)):
            return
        if self.average is None:
            self.average = [t.clone() for t in self.current]
            return
        if self.kind == "ema":
            decay = float(self.settings.get("momentum", 0.99)) ** self.every
        else:
            decay = (float(self.settings.get("decay_base", 0.95)) ** self.every
                     * (global_step / self.total) ** float(self.settings.get("decay_pow", 3.0)))
        torch._foreach_lerp_(self.average, self.current, 1.0 - decay)
        if self.kind == "lookahead":
            torch._foreach_copy_(self.current, self.average)


def plain(cfg: DictConfig, initial_state: dict[str, torch.Tensor], recipe: bool, epochs: int,
          steps_per_epoch: int, count: bool = False) -> dict[str, Any]:
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batches = datamodule.train_dataloader()
    net = instantiate(cfg.model)
    net.load_state_dict(initial_state)
    if cfg.get("channels_last"):
        net = net.to(memory_format=torch.channels_last)
    for layer in net.modules():
        if callable(getattr(layer, "fit_to_data", None)):
            layer.fit_to_data(datamodule.train_images)
    optim_cfg = OmegaConf.to_container(cfg.optim, resolve=True)
    smoothing = float(cfg.loss.label_smoothing) if recipe else 0.0
    averaging = None
    if recipe:
        built = read_optimizer(optim_cfg).build(net, int(cfg.data.batch_size), "cpu")
        optimizer = built.optimizer
        schedule = PiecewiseLinear(resolve_knots(list(optim_cfg["schedule"]["epochs"]), float(cfg.epochs)),
                                   optim_cfg["schedule"]["factors"], steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, group_schedules(built, schedule, float(cfg.epochs)))
        callbacks = cfg.get("callbacks") or {}
        for kind in ("ema", "lookahead"):
            if callbacks.get(kind) is not None:
                averaging = _Averaging(OmegaConf.to_container(callbacks[kind], resolve=True), kind, net,
                                       epochs * steps_per_epoch)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=True)
        scheduler = None
    wanted = measured_steps(epochs, steps_per_epoch)
    host_ms: list[float] = []
    ops: Counter[str] = Counter()
    syncs: Counter[str] = Counter()
    global_step = 0
    net.train()
    for epoch in range(epochs):
        for layer in net.modules():
            if callable(getattr(layer, "set_epoch", None)):
                layer.set_epoch(epoch)
        iterator = iter(batches)
        for step in range(steps_per_epoch):
            measured = (epoch, step) in wanted
            counter = OpCounter() if measured and count else None
            start = time.perf_counter()
            if counter is not None:
                counter.__enter__()
            images, labels = next(iterator)
            loss = F.cross_entropy(net(images), labels, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            global_step += 1
            if averaging is not None:
                averaging.step(global_step, epoch)
            if measured:
                host_ms.append(1000 * (time.perf_counter() - start))
            if counter is not None:
                counter.__exit__(None, None, None)
                ops.update(counter.ops)
                syncs.update(counter.syncs)
    steps = len(host_ms)
    out: dict[str, Any] = {"host_ms": host_ms, "steps": steps}
    if count:
        out.update(ops=sum(ops.values()) / steps, syncs=sum(syncs.values()) / steps, syncs_by_name=dict(syncs),
                   ops_by_name={k: v / steps for k, v in ops.most_common()})
    return out


# ------------------------------------------------------------------------------------------------ report
def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.fmean(values)


def measure(experiment: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    cfg = compose(experiment, args, extra, args.width, args.batch, args.steps_per_epoch)
    torch.manual_seed(int(cfg.seed))
    initial = {k: v.clone() for k, v in instantiate(cfg.model).state_dict().items()}
    def run(side: str, count: bool) -> dict[str, Any]:
        if side == "project":
            return project(compose(experiment, args, extra, args.width, args.batch, args.steps_per_epoch), count)
        return plain(cfg, initial, side == "recipe", args.epochs, args.steps_per_epoch, count)

    sides = ("project", "recipe", "sgd")
    counted = {side: run(side, True) for side in sides}
    timed: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(args.repeats):  # alternating, so drift of the machine hits all sides alike
        for side in sides:
            timed[side] += run(side, False)["host_ms"]
    out: dict[str, Any] = {"experiment": experiment}
    for side in sides:
        median, mean = _stats(timed[side])
        c = counted[side]
        out[side] = {"median_ms": median, "mean_ms": mean, "ops": c["ops"], "syncs": c["syncs"],
                     "syncs_by_name": c["syncs_by_name"], "steps": c["steps"], "ops_by_name": c["ops_by_name"]}
    if args.proxy_steps:
        out["proxy"] = proxy_times(experiment, args, extra)
    return out


def proxy_times(experiment: str, args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    """ms/step at the proxy width (0.125) and the recipe's own batch: where the compute dominates."""
    cfg = _common.compose_config([f"experiment={experiment}", "proxy=cpu", "data.source=image_folder",
                                  f"data.path={_common.archive_path()}", "data.test_subset=100", *extra])
    batch = int(cfg.data.batch_size)
    steps = args.proxy_steps + 1
    proxy_args = argparse.Namespace(**{**vars(args), "epochs": 3})  # 3: the fewest every recipe's knots allow
    cfg = compose(experiment, proxy_args, ["proxy=cpu", *extra], 0.125, batch, steps)
    torch.manual_seed(int(cfg.seed))
    initial = {k: v.clone() for k, v in instantiate(cfg.model).state_dict().items()}
    project_ms, recipe_ms = [], []
    for _ in range(args.repeats):  # alternating: this machine's speed drifts by tens of percent over minutes
        project_ms += project(compose(experiment, proxy_args, ["proxy=cpu", *extra], 0.125, batch, steps),
                              False)["host_ms"]
        recipe_ms += plain(cfg, initial, True, 3, steps)["host_ms"]
    return {"project_ms": statistics.fmean(project_ms), "recipe_ms": statistics.fmean(recipe_ms), "batch": batch}


def main() -> int:
    _common.keep_large_allocations_off_mmap()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=DEFAULT_EXPERIMENTS)
    parser.add_argument("--width", type=float, default=0.03)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--proxy-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the host side is single-threaded Python and launches, as on a GPU; "
                             "also steadier timings)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    device = f"cpu x{torch.get_num_threads()}"
    print(f"step_cost: {device}, width {args.width}, batch {args.batch}, {args.steps_per_epoch} steps/epoch x "
          f"{args.epochs} epochs, {args.repeats} repeats; overrides: {' '.join(extra) or 'none'}", flush=True)
    rows = []
    for experiment in args.experiments:
        row = measure(experiment, args, extra)
        rows.append(row)
        p, r, s = row["project"], row["recipe"], row["sgd"]
        line = (f"{experiment}: host ms/step median {p['median_ms']:.2f} / recipe {r['median_ms']:.2f} / sgd "
                f"{s['median_ms']:.2f} (ratio {p['median_ms'] / r['median_ms']:.2f}); mean {p['mean_ms']:.2f} / "
                f"{r['mean_ms']:.2f} / {s['mean_ms']:.2f} (ratio {p['mean_ms'] / r['mean_ms']:.2f}); ops/step "
                f"{p['ops']:.1f} / {r['ops']:.1f} / {s['ops']:.1f} (ratio {p['ops'] / r['ops']:.2f}); syncs/step "
                f"{p['syncs']:.3f} {p['syncs_by_name'] or ''} / recipe {r['syncs']:.3f}; {p['steps']} steps")
        if "proxy" in row:
            q = row["proxy"]
            line += (f"; at width 0.125, batch {q['batch']}: {q['project_ms']:.0f} / {q['recipe_ms']:.0f} ms/step "
                     f"(ratio {q['project_ms'] / q['recipe_ms']:.3f})")
        print(line, flush=True)
        extra_ops = {name: round(count - r["ops_by_name"].get(name, 0.0), 2) for name, count in p["ops_by_name"].items()
                     if count - r["ops_by_name"].get(name, 0.0) > 0.05}
        print(f"  ops the project adds per step: {extra_ops}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
