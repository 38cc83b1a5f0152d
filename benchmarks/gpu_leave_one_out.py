"""Page's final recipe minus each trick in turn, at full width on a GPU: the rows of sweep=leave_one_out.

The CPU proxy (width 0.125, fp32) ranks the tricks by their leave-one-out differences
(results/leave_one_out_proxy.csv); whether the full-width GPU recipe ranks them the same way is what
makes a proxy ranking worth trusting. This runs the same ten configurations (conf/sweep/
leave_one_out.yaml: all tricks, then all but one) on the GPU, seed-major (seed 0 of every row, then
seed 1, ...), so a run cut short by its time budget still has every row at the same n. After every run
it writes the runs as a results CSV (`python -m cifar_speedrun.records.report <csv>` makes the table) and a
run that already finished (same row and seed in --csv) is not run again, so a second call completes
the first.

    python benchmarks/gpu_leave_one_out.py --seeds 0 1 2 --csv OUT/leave_one_out_gpu.csv
        [--budget-seconds S] [--step-mode graph] [--runs-dir DIR] [--extra k=v ...]
    python benchmarks/gpu_leave_one_out.py --smoke ...   # the same code path on the CPU, tiny (tests)

A row that fails in step.mode=graph is run again in eager mode, and the rest of the rows follow in
eager (the failure is printed and kept in <csv>.log.json); the configuration names the mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _common
import yaml
from omegaconf import open_dict

from cifar_speedrun.records.report import load_runs_csv, write_runs_csv
from cifar_speedrun.train import train

SMOKE = ["trainer=cpu", "model.width=0.125", "data.subset=1024", "data.batch_size=256", "data.test_subset=500",
         "epochs=3", "trainer.precision=32-true"]
# The runs' common settings: the final evaluation only (Page's accuracy is the last epoch's), no
# checkpoints, no loggers: what is measured is the accuracy, and each run's results.json keeps its history.
COMMON = ["data.source=image_folder", "logger=none", "callbacks.checkpoint=null", "trainer.enable_progress_bar=false"]


def leave_one_out_rows() -> list[str]:
    """The `trick=[...]` values of conf/sweep/leave_one_out.yaml, in its order (all tricks first)."""
    sweep = yaml.safe_load((_common.REPO / "conf" / "sweep" / "leave_one_out.yaml").read_text())
    text = sweep["hydra"]["sweeper"]["params"]["trick"]
    return [item.strip() + ("" if item.strip().endswith("]") else "]") for item in text.split("],") if item.strip()]


def left_out(row: str, rows: list[str]) -> str:
    """The trick a row leaves out of the first (all-tricks) row, or 'none'."""
    every = rows[0].strip("[]").split(",")
    mine = row.strip("[]").split(",")
    missing = [t for t in every if t not in mine]
    return missing[0] if missing else "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--csv", required=True, help="the runs, written after every run (resumed from)")
    parser.add_argument("--runs-dir", default=None, help="the runs' own folders (default: beside --csv)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="start no run once this many seconds have passed (the median run's time before)")
    parser.add_argument("--step-mode", default="graph", choices=["graph", "eager", "auto"])
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="row indices (default: all ten)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU runs of the same code path")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    args = parser.parse_args()
    start = time.perf_counter()
    csv_path = Path(args.csv)
    runs_dir = Path(args.runs_dir) if args.runs_dir else csv_path.with_suffix("")
    rows = leave_one_out_rows()
    chosen = args.rows if args.rows is not None else list(range(len(rows)))
    runs = load_runs_csv(csv_path) if csv_path.is_file() else []
    done = {(run.config_key.split(" step.mode=")[0], str(run.seed)) for run in runs if run.status == "ok"}
    runs = [run for run in runs if run.status == "ok"]
    log: dict = {"failures": [], "mode_changes": []}
    mode = args.step_mode
    common = COMMON + (SMOKE if args.smoke else []) + args.extra
    durations: list[float] = []
    for seed in args.seeds:
        for index in chosen:
            row = rows[index]
            key = f"stage=final_recipe trick={row}"
            if (key, str(seed)) in done:
                continue
            elapsed = time.perf_counter() - start
            typical = sorted(durations)[len(durations) // 2] if durations else 0.0
            if args.budget_seconds is not None and elapsed + typical > args.budget_seconds:
                print(f"leave-one-out: budget of {args.budget_seconds:.0f}s reached after {len(durations)} runs; "
                      f"rerun to complete", flush=True)
                return finish(runs, csv_path, log)
            began = time.perf_counter()
            result = run(key, seed, mode, common, runs_dir)
            if result["status"] != "ok" and mode == "graph":
                log["failures"].append({"row": key, "seed": seed, "mode": mode, "error": result.get("error")})
                log["mode_changes"].append(f"graph -> eager after {key} seed {seed}")
                print(f"  graph step FAILED ({result.get('error')}): this and the remaining runs in step.mode=eager",
                      flush=True)
                mode = "eager"
                result = run(key, seed, mode, common, runs_dir)
            durations.append(time.perf_counter() - began)
            run_record = as_report_run(result, key, seed, mode, index)
            runs.append(run_record)
            write_runs_csv(runs, csv_path)
            print(f"  {left_out(row, rows):>16} left out, seed {seed}: {result['status']} "
                  f"test acc {100 * (result.get('test_acc') or 0):.2f}%, train {result.get('train_seconds') or 0:.2f}s "
                  f"({mode}; {time.perf_counter() - start:.0f}s so far)", flush=True)
    return finish(runs, csv_path, log)


def run(key: str, seed: int, mode: str, common: list[str], runs_dir: Path) -> dict:
    overrides = key.split(" ", 1)
    folder = runs_dir / f"{overrides[1].replace('trick=', '').strip('[]').replace(',', '-')[:80]}-seed{seed}-{mode}"
    cfg = _common.compose_config([*overrides, f"step.mode={mode}", *common, f"seed={seed}"], output_dir=str(folder))
    with open_dict(cfg):
        cfg.trainer.check_val_every_n_epoch = int(cfg.trainer.max_epochs)  # the last epoch's evaluation only
    try:
        return train(cfg)
    except Exception as error:  # a failed run is recorded, the sweep goes on
        return {"status": "failed", "error": f"{type(error).__name__}: {error}", "seed": seed}


def as_report_run(result: dict, key: str, seed: int, mode: str, index: int):
    """The run as the report's Run, its configuration the row (with the step mode it ran in)."""
    from cifar_speedrun.records.report import Run

    config = result.get("config") or {}
    return Run(path=Path(key), job=index, status=str(result.get("status")), config_key=f"{key} step.mode={mode}",
               test_acc=result.get("test_acc"), train_seconds=result.get("train_seconds"),
               time_to_target=result.get("time_to_target"), target_acc=result.get("target_acc"), seed=seed,
               error=result.get("error"), epochs=result.get("epochs"), width=(config.get("model") or {}).get("width"),
               data=result.get("data_source"), device=result.get("device"), commit=result.get("git_commit"))


def finish(runs: list, csv_path: Path, log: dict) -> int:
    write_runs_csv(runs, csv_path)
    Path(f"{csv_path}.log.json").write_text(json.dumps(log, indent=2))
    print(f"leave-one-out: {len(runs)} runs in {csv_path}", flush=True)
    return 0 if runs else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
