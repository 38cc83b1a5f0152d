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

--peer runs Keller Jordan's own `airbench` package (train94, unmodified; benchmarks/airbench_peer.py)
first, on the same GPU and the same images (the project's decoded cache, exported in airbench's file
layout): a warm-up, then N seeds, under report["peer"]. After the experiments every summary row gets
its median train + eval seconds over the peer's median (airbench's timer: whitening + training + the
final TTA evaluation) and its accuracy minus the peer's with a Welch 95% CI. With --smoke (or without
CUDA) the peer only exports the data and checks it with airbench's CifarLoader on the CPU.

    python benchmarks/gpu_speedrun.py --seeds 5 [--experiments page_final airbench94 airbench94_muon]
                                      [--precision 16-mixed bf16-mixed] [--compile] [--compile-mode MODE]
                                      [--out DIR] [--runs-dir DIR] [--peer [--peer-seeds N]]
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
from collections.abc import Callable
from pathlib import Path

import _common
import airbench_peer
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


def welch_difference(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float,
                     n_b: int) -> tuple[float, float]:
    """a - b and the half-width of its 95% CI, Welch's (unequal variances: the project and the peer
    need not spread alike). The Welch-Satterthwaite degrees of freedom are rounded down, so the
    t quantile from the table is the conservative one; NaN when either side has fewer than 2 runs."""
    diff = mean_a - mean_b
    if n_a < 2 or n_b < 2:
        return diff, math.nan
    var_a, var_b = std_a ** 2 / n_a, std_b ** 2 / n_b
    if var_a + var_b == 0:
        return diff, 0.0
    dof = (var_a + var_b) ** 2 / (var_a ** 2 / (n_a - 1) + var_b ** 2 / (n_b - 1))
    return diff, t975(max(1, math.floor(dof))) * math.sqrt(var_a + var_b)


def peer_summary(runs: list[dict]) -> dict[str, float]:
    """The peer's runs summarized as the project's rows are (summarize), under airbench's names."""
    stats = summarize([r["tta_val_acc"] for r in runs], [r["total_seconds"] for r in runs])
    return {"n": stats["n"], "mean_acc": stats["mean_acc"], "std": stats["std"], "ci95": stats["ci95"],
            "median_seconds": stats["median_train_seconds"], "min_seconds": stats["min_train_seconds"]}


def compare_to_peer(summary: dict[str, dict], peer: dict[str, float]) -> list[str]:
    """Add `ratio_to_peer` (median train + eval seconds over the peer's median seconds, one timing
    definition on both sides) and the accuracy difference project - peer with its Welch 95% CI to
    every summary row; return one printable line per row."""
    lines = []
    for name, row in summary.items():
        seconds = row["median_train_plus_eval_seconds"]
        row["ratio_to_peer"] = seconds / peer["median_seconds"]
        diff, ci = welch_difference(row["mean_acc"], row["std"], row["n"], peer["mean_acc"], peer["std"], peer["n"])
        row["acc_diff_vs_peer"], row["acc_diff_vs_peer_ci95"] = diff, ci
        lines.append(f"{name}: {seconds:.2f}s vs airbench {peer['median_seconds']:.2f}s = {row['ratio_to_peer']:.2f}x; "
                     f"acc {100 * diff:+.2f} ± {100 * ci:.2f} points (95% CI, Welch)")
    return lines


def run_peer(report: dict, save: Callable[[], None], overrides: list[str], folder: Path, seeds: int, warmup: str,
             smoke: bool) -> None:
    """The peer, before the project's runs: export the project's data for airbench, check it with
    airbench's own loader, then (on CUDA) a warm-up and `seeds` seeded runs, saved after each."""
    peer = report["peer"] = {"package": airbench_peer.PACKAGE, "version": airbench_peer.airbench_version()}
    try:
        data = airbench_peer.load_project_data(overrides, scratch_dir=str(folder))
        target = airbench_peer.export_uint8(data, folder)
        peer["data"] = {"folder": str(target), "source_id": data.source_id}
        peer["check"] = airbench_peer.check_with_airbench_loader(folder, data)
        del data
    except Exception as error:  # no peer on other data than the project's; the project's runs still go on
        peer["error"] = f"data: {type(error).__name__}: {error}"
        save()
        print(f"airbench (peer): data export or check FAILED, no peer runs: {peer['error']}", flush=True)
        return
    print(f"airbench {peer['version']} (peer): exported {data_line(peer)} and read them back with its CifarLoader",
          flush=True)
    if smoke or not torch.cuda.is_available():
        peer["skipped"] = "needs CUDA" if not torch.cuda.is_available() else "--smoke: export and check only"
        save()
        print(f"airbench (peer): training skipped ({peer['skipped']})", flush=True)
        return
    peer["runs"], peer["failed"] = [], []
    try:
        peer["warmup"] = airbench_peer.warm_up(folder, warmup)
    except Exception as error:  # a peer that cannot start must not cost the project's runs
        peer["error"] = f"warm-up: {type(error).__name__}: {error}"
        save()
        print(f"airbench (peer): warm-up FAILED, no peer runs: {str(error).splitlines()[0]}", flush=True)
        airbench_peer.release_memory()
        return
    save()
    warm_run = peer["warmup"].get("run")
    print(f"airbench (peer): warm-up ({warmup}) done, not reported"
          + (f"; its run {warm_run['total_seconds']:.2f}s, tta acc {100 * warm_run['tta_val_acc']:.2f}%"
             if warm_run else ""), flush=True)
    for seed in range(seeds):
        try:
            result = airbench_peer.run_one(folder, seed)
        except Exception as error:
            peer["failed"].append({"seed": seed, "error": f"{type(error).__name__}: {error}"})
            save()
            print(f"  airbench (peer) seed {seed}: FAILED {str(error).splitlines()[0]}", flush=True)
            continue
        peer["runs"].append(result)
        save()
        no_tta = "?" if result["val_acc"] is None else f"{100 * result['val_acc']:.2f}%"
        print(f"  airbench (peer) seed {seed}: tta acc {100 * result['tta_val_acc']:.2f}% (no TTA {no_tta}), "
              f"{result['total_seconds']:.2f}s by its own timer "
              f"(wall {result['wall_seconds']:.2f}s)", flush=True)
    airbench_peer.release_memory()
    if peer["runs"]:
        peer["summary"] = peer_summary(peer["runs"])
        save()
        s = peer["summary"]
        print(f"airbench (peer): n={s['n']}, mean {100 * s['mean_acc']:.2f}% ± {100 * s['ci95']:.2f} (95% CI), std "
              f"{100 * s['std']:.2f}, median {s['median_seconds']:.2f}s (whitening + training + TTA eval)", flush=True)


def data_line(peer: dict) -> str:
    check = peer["check"]
    return f"{check['train']} + {check['test']} images of {peer['data']['source_id']} to {peer['data']['folder']}"


def run_once(overrides: list[str], out: Path, profile_steps: int = 0) -> dict:
    """One run; a StepClock measures host and device ms per step (and profiles the device if asked).
    A run that fails is returned as such (status, error), so one failure costs one row, not the call."""
    cfg = _common.compose_config(overrides, output_dir=str(out))
    with open_dict(cfg):
        cfg.callbacks.step_clock = {"_target_": "step_clock.StepClock", "profile_steps": profile_steps}
    try:
        return train(cfg)
    except Exception as error:
        import traceback

        return {"status": "failed", "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-3000:]}


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
    parser.add_argument("--step-modes", nargs="+", default=["graph", "eager"], choices=["graph", "eager", "auto"],
                        help="run every experiment with each step.mode (step.py), the first one with --seeds")
    parser.add_argument("--baseline-seeds", type=int, default=None,
                        help="seeds of the variants after the first (default --seeds; 0: only their profiled "
                             "warm-up run, which measures host and device ms per step)")
    parser.add_argument("--probe", nargs="+", action="append", default=[], metavar=("EXPERIMENT", "OVERRIDES"),
                        help="before an experiment's seeds, a profiled 3-epoch run with each alternative "
                             "(overrides joined by '+', e.g. channels_last=true channels_last=false); the one with "
                             "the fewest device ms per step is used for its seeds")
    parser.add_argument("--peer", action="store_true",
                        help="first run Keller Jordan's airbench package (train94) on the same GPU and images")
    parser.add_argument("--peer-seeds", type=int, default=None, help="the peer's seeds (default: --seeds)")
    parser.add_argument("--peer-warmup", default="full", choices=["full", "step"],
                        help="the peer's warm-up: airbench.warmup94 (step) and one whole unreported run (full)")
    args = parser.parse_args()
    if args.peer:
        try:
            airbench_peer.require_airbench()
        except airbench_peer.PeerUnavailable as error:
            print(f"gpu_speedrun: {error}", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs_dir) if args.runs_dir else out / "runs"
    common = ["logger=none", "trainer.enable_progress_bar=false", "callbacks.checkpoint=null"]
    if not args.official:
        common += ["data.source=image_folder", f"data.path={_common.archive_path()}"]
    # Variants: each step mode, and torch.compile in each mode asked for (one warm-up run each: compile caches).
    modes = args.compile_modes or ([args.compile_mode or "default"] if args.compile or args.compile_mode else ["none"])
    variants = [(f" step={step}" + ("" if mode == "none" else f" compile={mode}"),
                 [f"step.mode={step}"] + ([] if mode == "none" else ["+trick=compile", f"compile.mode={mode}"]))
                for step in args.step_modes for mode in modes]
    probes = {probe[0]: [alternative.split("+") for alternative in probe[1:]] for probe in args.probe}
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
                    "runs": [], "summary": {}, "warmups": {}, "probes": {}}

    def save() -> None:
        (out / "gpu_speedrun.json").write_text(json.dumps(report, indent=2))

    def warm_up(experiment: str, label: str, base: list[str], name: str = "warmup") -> dict:
        """A profiled 3-epoch run, not reported: cuDNN autotune, compile caches, and the step's profile."""
        warm = run_once([*base, "seed=1000", "epochs=3", f"trainer.precision={args.precision[0]}"],
                        runs / f"{experiment}{label.replace(' ', '-')}-{name}", profile_steps=20)
        entry = {"precision": args.precision[0], "overrides": base, "status": warm.get("status"),
                 "error": warm.get("error"), "step_ms": warm.get("step_ms"), "step": warm.get("step"),
                 "warmup_seconds": warm.get("warmup_seconds")}
        print(f"{experiment}{label} {name}: done at {time.perf_counter() - start:.1f}s (not reported; its "
              f"warmup_seconds {warm.get('warmup_seconds')}); {args.precision[0]}: "
              + (describe_steps(warm.get("step_ms")) if warm.get("status") == "ok" else f"FAILED {warm.get('error')}"),
              flush=True)
        return entry

    def choose(experiment: str, label: str, base: list[str]) -> list[str]:
        """The probe alternative with the fewest device ms per step (median), as overrides to add."""
        tried = []
        for alternative in probes.get(experiment, []):
            entry = warm_up(experiment, label, [*base, *alternative], "probe-" + "-".join(alternative))
            step_ms = entry.get("step_ms") or {}
            # device ms per step on CUDA; on a CPU (the smoke test) the host's, which is then the device's
            device_ms = (step_ms.get("device_ms") or step_ms.get("host_ms") or {}).get("median")
            tried.append({**entry, "overrides": alternative, "device_ms_per_step": device_ms})
        usable = [t for t in tried if t["device_ms_per_step"] is not None and t["status"] == "ok"]
        if not usable:
            return []
        best = min(usable, key=lambda t: t["device_ms_per_step"])
        report["probes"][experiment + label] = {"tried": tried, "chosen": best["overrides"]}
        report["warmups"][experiment + label] = best
        save()
        print(f"{experiment}{label}: probe chose {' '.join(best['overrides'])} ("
              + ", ".join(f"{' '.join(t['overrides'])}: {t['device_ms_per_step']:.2f}" for t in usable)
              + " device ms/step)", flush=True)
        return list(best["overrides"])

    def run_experiment(experiment: str, label: str, base: list[str], seeds: int, chosen: list[str] | None) -> list[str]:
        """A warm-up run (or the probes), then `seeds` seeds per precision, of one experiment in one variant.
        Returns the probe's choice, which later variants of the experiment reuse."""
        if chosen is None and probes.get(experiment):
            chosen = choose(experiment, label, base)
            base = [*base, *chosen]
        else:
            base = [*base, *(chosen or [])]
            report["warmups"][experiment + label] = warm_up(experiment, label, base)
            save()
        for precision in args.precision:
            accuracies, seconds, evals = [], [], []
            for seed in range(seeds):
                result = run_once([*base, f"seed={seed}", f"trainer.precision={precision}"],
                                  runs / f"{experiment}{label.replace(' ', '-')}-{precision}-seed{seed}")
                if result.get("status") != "ok":
                    print(f"  {experiment}{label} {precision} seed {seed}: FAILED {result.get('error')}", flush=True)
                    continue
                accuracies.append(result["test_acc"])
                seconds.append(result["train_seconds"])
                evals.append(result.get("eval_seconds") or 0.0)
                report["runs"].append({"experiment": experiment, "variant": label.strip() or "eager",
                                       "precision": precision, "seed": seed, "overrides": base,
                                       "step": result.get("step"),
                                       "test_acc": result["test_acc"], "train_seconds": result["train_seconds"],
                                       "eval_seconds": result.get("eval_seconds"),
                                       "whitening_fit_seconds": result.get("whitening_fit_seconds"),
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
                summary["overrides"] = base
                report["summary"][f"{experiment} {precision}{label}"] = summary
                save()
                print(f"{experiment} {precision}{label}: n={summary['n']}, mean {100 * summary['mean_acc']:.2f}% ± "
                      f"{100 * summary['ci95']:.2f} (95% CI), std {100 * summary['std']:.2f}, median train "
                      f"{summary['median_train_seconds']:.2f}s (+ eval {summary['median_eval_seconds']:.2f}s = "
                      f"{summary['median_train_plus_eval_seconds']:.2f}s by airbench's rules)"
                      + _step_line(summary), flush=True)
        return chosen or []

    if args.peer:
        run_peer(report, save, common, runs / "airbench-peer", args.peer_seeds if args.peer_seeds is not None
                 else args.seeds, args.peer_warmup, args.smoke)
    for experiment in args.experiments:
        chosen = None
        for index, (label, variant) in enumerate(variants):
            seeds = args.seeds if index == 0 or args.baseline_seeds is None else args.baseline_seeds
            chosen = run_experiment(experiment, label, [f"experiment={experiment}", *common, *variant], seeds, chosen)
    if report.get("peer", {}).get("summary") and report["summary"]:
        print("against the peer (median train + eval seconds vs airbench's own timer; accuracy project - airbench):")
        for line in compare_to_peer(report["summary"], report["peer"]["summary"]):
            print("  " + line, flush=True)
    save()
    print(f"total wall {time.perf_counter() - start:.1f}s; wrote {out / 'gpu_speedrun.json'}")
    return 0 if report["summary"] else 1


if __name__ == "__main__":
    sys.exit(main())
