"""The GPU speedrun: recipes side by side (default: experiment=page_final and airbench94), N seeds each, timed honestly.

One process: per experiment a warm-up run first (CUDA context, cuDNN autotune, kernel loading,
torch.compile caches), not reported; then N seeds per experiment and precision, all on the same data
with the same rules. Each run's `train_seconds` covers training plus the fit of data-dependent layers
(patch whitening), device-synchronized, evaluation excluded, after the run's own warm-up step;
`eval_seconds` is its final evaluation (with TTA). airbench's own timer covers whitening + training +
the final TTA evaluation, i.e. train + eval here; both are printed. Prints per-seed accuracy and times,
then per experiment and precision the mean, std, 95% CI and the median times, and writes
<out>/gpu_speedrun.json after every run (a timeout keeps what finished).

    python benchmarks/gpu_speedrun.py --seeds 5 [--experiments page_final airbench94 airbench94_muon]
                                      [--precision 16-mixed bf16-mixed] [--compile] [--out DIR]
    python benchmarks/gpu_speedrun.py --smoke     # the same code path on the CPU, tiny (used by the tests)

Data: $CIFAR10_ARCHIVE (an image_folder copy), or --official for torchvision's download.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import _common
import torch

from cifar_speedrun.train import train

# Two-sided 95% Student-t quantiles by degrees of freedom (scipy.stats.t.ppf(0.975, dof)), so the
# benchmark needs no scipy on a bare GPU machine.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

# 3 epochs: the fewest for which every recipe's knots ([0, epochs/5, epochs - 2], ...) are in order.
SMOKE = ["trainer=cpu", "model.width=0.125", "data.subset=1024", "data.batch_size=256", "data.test_subset=500",
         "epochs=3"]


def t975(dof: int) -> float:
    return T975.get(dof) or T975[max(k for k in T975 if k <= dof)]


def summarize(accuracies: list[float], seconds: list[float]) -> dict[str, float]:
    n = len(accuracies)
    mean = statistics.fmean(accuracies)
    std = statistics.stdev(accuracies) if n > 1 else math.nan
    return {"n": n, "mean_acc": mean, "std": std, "ci95": t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan,
            "median_train_seconds": statistics.median(seconds), "min_train_seconds": min(seconds)}


def run_once(overrides: list[str], out: Path) -> dict:
    cfg = _common.compose_config(overrides, output_dir=str(out))
    return train(cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--experiments", nargs="+", default=["page_final", "airbench94"])
    parser.add_argument("--precision", nargs="+", default=["16-mixed", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true", help="add trick=compile (compile time reported apart)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    parser.add_argument("--official", action="store_true", help="torchvision's official CIFAR-10 download")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_speedrun_out"))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. epochs=9")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["logger=none", "trainer.enable_progress_bar=false", "callbacks.checkpoint=null"]
    if not args.official:
        common += ["data.source=image_folder", f"data.path={_common.archive_path()}"]
    if args.compile:
        common.append("+trick=compile")
    if args.smoke:
        common += SMOKE
        args.precision = ["32-true"]  # bf16 autocast is very slow on CPUs without bf16 units
    common += args.extra
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"gpu_speedrun: {device}, torch {torch.__version__}, experiments {' '.join(args.experiments)}, "
          f"overrides {' '.join(common)}", flush=True)
    start = time.perf_counter()
    report: dict = {"device": device, "torch": torch.__version__, "overrides": common,
                    "experiments": args.experiments,
                    "data": "official CIFAR-10" if args.official else f"image_folder {_common.archive_path()}",
                    "runs": [], "summary": {}}

    def save() -> None:
        (out / "gpu_speedrun.json").write_text(json.dumps(report, indent=2))

    for experiment in args.experiments:
        base = [f"experiment={experiment}", *common]
        warm = run_once([*base, "seed=1000", "epochs=3", f"trainer.precision={args.precision[0]}"],
                        out / f"{experiment}-warmup")
        print(f"{experiment}: warm-up run done at {time.perf_counter() - start:.1f}s (not reported; its "
              f"warmup_seconds {warm.get('warmup_seconds')})", flush=True)
        for precision in args.precision:
            accuracies, seconds, evals = [], [], []
            for seed in range(args.seeds):
                result = run_once([*base, f"seed={seed}", f"trainer.precision={precision}"],
                                  out / f"{experiment}-{precision}-seed{seed}")
                if result.get("status") != "ok":
                    print(f"  {experiment} {precision} seed {seed}: FAILED {result.get('error')}", flush=True)
                    continue
                accuracies.append(result["test_acc"])
                seconds.append(result["train_seconds"])
                evals.append(result.get("eval_seconds") or 0.0)
                report["runs"].append({"experiment": experiment, "precision": precision, "seed": seed,
                                       "test_acc": result["test_acc"], "train_seconds": result["train_seconds"],
                                       "eval_seconds": result.get("eval_seconds"),
                                       "fit_seconds": result.get("fit_seconds"),
                                       "warmup_seconds": result.get("warmup_seconds"),
                                       "time_to_target": result.get("time_to_target")})
                save()
                print(f"  {experiment} {precision} seed {seed}: test acc {100 * result['test_acc']:.2f}%, "
                      f"train {result['train_seconds']:.2f}s, eval {result.get('eval_seconds') or 0:.2f}s, "
                      f"warm-up/compile {result.get('warmup_seconds') or 0:.2f}s", flush=True)
            if accuracies:
                summary = summarize(accuracies, seconds)
                summary["median_eval_seconds"] = statistics.median(evals)
                summary["median_train_plus_eval_seconds"] = statistics.median(
                    [s + e for s, e in zip(seconds, evals, strict=True)])
                report["summary"][f"{experiment} {precision}"] = summary
                save()
                print(f"{experiment} {precision}: n={summary['n']}, mean {100 * summary['mean_acc']:.2f}% ± "
                      f"{100 * summary['ci95']:.2f} (95% CI), std {100 * summary['std']:.2f}, median train "
                      f"{summary['median_train_seconds']:.2f}s (+ eval {summary['median_eval_seconds']:.2f}s = "
                      f"{summary['median_train_plus_eval_seconds']:.2f}s by airbench's rules)", flush=True)
    save()
    print(f"total wall {time.perf_counter() - start:.1f}s; wrote {out / 'gpu_speedrun.json'}")
    return 0 if report["summary"] else 1


if __name__ == "__main__":
    sys.exit(main())
