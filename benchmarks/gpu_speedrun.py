"""The GPU speedrun: recipes side by side (default: experiment=page_final and airbench94), N seeds each, timed honestly.

One process: per experiment a warm-up run first (CUDA context, cuDNN autotune, kernel loading,
torch.compile caches), not reported; then N seeds per experiment and precision, all on the same data
with the same rules. Each run's `train_seconds` covers training plus the fit of data-dependent layers
(patch whitening), device-synchronized, evaluation excluded, after the run's own warm-up step;
`eval_seconds` is its final evaluation (with TTA). airbench's own timer covers whitening + training +
the final TTA evaluation, i.e. train + eval here; both are printed. Every run also measures host and
device milliseconds per step (callbacks.StepClock, CUDA events); each warm-up run profiles 20 steps,
so the first GPU run shows whether a recipe is host-bound. Prints per-seed accuracy and times,
then per experiment and precision the mean, std, 95% CI and the median times, and writes
<out>/gpu_speedrun.json after every run (a timeout keeps what finished).

    python benchmarks/gpu_speedrun.py --seeds 5 [--experiments page_final airbench94 airbench94_muon]
                                      [--precision 16-mixed bf16-mixed] [--compile] [--compile-mode MODE]
                                      [--out DIR] [--runs-dir DIR]
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
from omegaconf import open_dict

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


def run_once(overrides: list[str], out: Path, profile_steps: int = 0) -> dict:
    """One run; a StepClock measures host and device ms per step (and profiles the device if asked)."""
    cfg = _common.compose_config(overrides, output_dir=str(out))
    with open_dict(cfg):
        cfg.callbacks.step_clock = {"_target_": "cifar_speedrun.callbacks.StepClock", "profile_steps": profile_steps}
    return train(cfg)


def describe_steps(step_ms: dict | None) -> str:
    """'host 4.1 / device 6.3 ms/step' (medians), plus the profiled busy fraction when there is one."""
    if not step_ms or not step_ms.get("host_ms"):
        return "ms/step: too few epochs to measure"
    text = f"host {step_ms['host_ms']['median']:.2f}"
    if step_ms.get("device_ms"):
        text += f" / device {step_ms['device_ms']['median']:.2f}"
    text += " ms/step (median)"
    profile = step_ms.get("profile") or {}
    if profile.get("busy_fraction") is not None:
        text += (f"; profiled: device busy {profile['device_busy_ms_per_step']:.2f} of "
                 f"{profile['wall_ms_per_step']:.2f} ms/step = {100 * profile['busy_fraction']:.0f}%"
                 f"{' (host-bound)' if profile['busy_fraction'] < 0.9 else ''}")
    elif profile.get("error"):
        text += f"; profiler failed: {profile['error']}"
    return text


def _step_line(summary: dict) -> str:
    host, device = summary.get("median_host_ms_per_step"), summary.get("median_device_ms_per_step")
    if host is None:
        return ""
    return f"; host {host:.2f}" + (f" / device {device:.2f}" if device is not None else "") + " ms/step"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--experiments", nargs="+", default=["page_final", "airbench94"])
    parser.add_argument("--precision", nargs="+", default=["16-mixed", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true", help="add trick=compile (compile time reported apart)")
    modes = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    parser.add_argument("--compile-mode", default=None, choices=modes,
                        help="add trick=compile with this torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--compile-modes", nargs="+", default=None, choices=["none", *modes],
                        help="run every experiment in each of these (none: eager), side by side")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    parser.add_argument("--official", action="store_true", help="torchvision's official CIFAR-10 download")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_speedrun_out"),
                        help="where gpu_speedrun.json goes")
    parser.add_argument("--runs-dir", default=None,
                        help="the runs' own folders (results.json, model.pt); default: <out>/runs")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. epochs=9")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs_dir) if args.runs_dir else out / "runs"
    common = ["logger=none", "trainer.enable_progress_bar=false", "callbacks.checkpoint=null"]
    if not args.official:
        common += ["data.source=image_folder", f"data.path={_common.archive_path()}"]
    # Variants: eager, or torch.compile in each mode asked for (one warm-up run each: compile caches).
    modes = args.compile_modes or ([args.compile_mode or "default"] if args.compile or args.compile_mode else ["none"])
    variants = [("" if mode == "none" else f" compile={mode}",
                 [] if mode == "none" else ["+trick=compile", f"compile.mode={mode}"]) for mode in modes]
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
                    "runs": [], "summary": {}, "warmups": {}}

    def save() -> None:
        (out / "gpu_speedrun.json").write_text(json.dumps(report, indent=2))

    def run_experiment(experiment: str, label: str, base: list[str]) -> None:
        """A warm-up run, then N seeds per precision, of one experiment in one variant (eager / compiled)."""
        warm = run_once([*base, "seed=1000", "epochs=3", f"trainer.precision={args.precision[0]}"],
                        runs / f"{experiment}{label.replace(' ', '-')}-warmup", profile_steps=20)
        report["warmups"][experiment + label] = {"precision": args.precision[0], "step_ms": warm.get("step_ms"),
                                                 "warmup_seconds": warm.get("warmup_seconds")}
        print(f"{experiment}{label}: warm-up run done at {time.perf_counter() - start:.1f}s (not reported; its "
              f"warmup_seconds {warm.get('warmup_seconds')}); {args.precision[0]}: "
              f"{describe_steps(warm.get('step_ms'))}", flush=True)
        for precision in args.precision:
            accuracies, seconds, evals = [], [], []
            for seed in range(args.seeds):
                result = run_once([*base, f"seed={seed}", f"trainer.precision={precision}"],
                                  runs / f"{experiment}{label.replace(' ', '-')}-{precision}-seed{seed}")
                if result.get("status") != "ok":
                    print(f"  {experiment}{label} {precision} seed {seed}: FAILED {result.get('error')}", flush=True)
                    continue
                accuracies.append(result["test_acc"])
                seconds.append(result["train_seconds"])
                evals.append(result.get("eval_seconds") or 0.0)
                report["runs"].append({"experiment": experiment, "variant": label.strip() or "eager",
                                       "precision": precision, "seed": seed,
                                       "test_acc": result["test_acc"], "train_seconds": result["train_seconds"],
                                       "eval_seconds": result.get("eval_seconds"),
                                       "fit_seconds": result.get("fit_seconds"),
                                       "warmup_seconds": result.get("warmup_seconds"),
                                       "time_to_target": result.get("time_to_target"),
                                       "step_ms": result.get("step_ms")})
                save()
                print(f"  {experiment}{label} {precision} seed {seed}: test acc {100 * result['test_acc']:.2f}%, "
                      f"train {result['train_seconds']:.2f}s, eval {result.get('eval_seconds') or 0:.2f}s, "
                      f"warm-up/compile {result.get('warmup_seconds') or 0:.2f}s; "
                      f"{describe_steps(result.get('step_ms'))}", flush=True)
            if accuracies:
                summary = summarize(accuracies, seconds)
                steps = [r["step_ms"] for r in report["runs"] if r["experiment"] == experiment
                         and r["variant"] == (label.strip() or "eager") and r["precision"] == precision
                         and r.get("step_ms") and r["step_ms"].get("host_ms")]
                for side in ("host_ms", "device_ms"):
                    values = [s[side]["median"] for s in steps if s.get(side)]
                    summary[f"median_{side}_per_step"] = statistics.median(values) if values else None
                summary["median_eval_seconds"] = statistics.median(evals)
                summary["median_train_plus_eval_seconds"] = statistics.median(
                    [s + e for s, e in zip(seconds, evals, strict=True)])
                report["summary"][f"{experiment} {precision}{label}"] = summary
                save()
                print(f"{experiment} {precision}{label}: n={summary['n']}, mean {100 * summary['mean_acc']:.2f}% ± "
                      f"{100 * summary['ci95']:.2f} (95% CI), std {100 * summary['std']:.2f}, median train "
                      f"{summary['median_train_seconds']:.2f}s (+ eval {summary['median_eval_seconds']:.2f}s = "
                      f"{summary['median_train_plus_eval_seconds']:.2f}s by airbench's rules)"
                      + _step_line(summary), flush=True)

    for experiment in args.experiments:
        for label, variant in variants:
            run_experiment(experiment, label, [f"experiment={experiment}", *common, *variant])
    save()
    print(f"total wall {time.perf_counter() - start:.1f}s; wrote {out / 'gpu_speedrun.json'}")
    return 0 if report["summary"] else 1


if __name__ == "__main__":
    sys.exit(main())
