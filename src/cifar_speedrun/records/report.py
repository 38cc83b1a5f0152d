"""Multirun directories (or a per-run CSV) -> a table of mean ± 95% CI over seeds, a plot, Welch's t-test.

    python -m cifar_speedrun.records.report logs/train/multiruns/<time> [more dirs] [--compare A B] [--wandb]
    python -m cifar_speedrun.records.report <dirs> --export-runs results/runs.csv   # one row per run, to commit
    python -m cifar_speedrun.records.report results/runs.csv                        # the table again, from that CSV

Page's warning (part 8): one run's test accuracy has sd ≈ 0.15%, larger than most single tricks'
effect, so a comparison means nothing without the spread over seeds. Runs are grouped by their
configuration (every override except the seed), in the order the sweep launched them; failed runs
are counted and listed, never silently dropped; runs still running are listed apart and left out of the
means. Every run is checked as a `run_records.RunRecord` (finite numbers in range, exact types) whether
it comes from results.json or a runs CSV, and every CSV the report writes is spreadsheet-safe
(run_records.write_csv_rows).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from cifar_speedrun.config.hydra_job import config_key
from cifar_speedrun.operations import storage
from cifar_speedrun.records.run_records import (
    CsvInputError,
    RecordError,
    RunRecord,
    check_record,
    finite,
    read_records,
    write_csv_rows,
)


@dataclass
class Run:
    path: Path
    job: int
    status: str
    config_key: str
    test_acc: float | None
    train_seconds: float | None
    time_to_target: float | None
    target_acc: float | None
    seed: int | None
    error: str | None
    epochs: int | None = None
    width: float | None = None
    data: str | None = None
    device: str | None = None
    commit: str | None = None
    wandb_group: str | None = None
    val_acc: float | None = None  # with data.val_split: accuracy on the held-out training images
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch (results.json only)
    # train loss per epoch (1-based, as history counts), from csv/metrics.csv beside results.json
    epoch_train_loss: dict[int, float] = field(default_factory=dict)


# One row per run: what a results/ CSV holds, enough to rebuild the table and audit each run.
RUN_COLUMNS = ["configuration", "seed", "status", "test_acc", "train_seconds", "time_to_target", "target_acc",
               "epochs", "width", "data", "device", "commit", "job", "error", "val_acc"]
# The difference a reader most often asks about (a single trick's effect on the proxy is a few tenths).
RESOLVE_TARGET = 0.002


@dataclass
class Row:
    config: str
    runs: list[Run] = field(default_factory=list)
    failed: list[Run] = field(default_factory=list)
    running: list[Run] = field(default_factory=list)  # not finished: in no mean, not a failure
    debug: list[Run] = field(default_factory=list)  # debug=fdr: one batch, no accuracy; in no mean

    @property
    def accuracies(self) -> list[float]:
        return [r.test_acc for r in self.runs if r.test_acc is not None]

    @property
    def n(self) -> int:
        return len(self.accuracies)

    @property
    def val_accuracies(self) -> list[float]:
        return [r.val_acc for r in self.runs if r.val_acc is not None]

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val_accuracies) if self.val_accuracies else math.nan

    @property
    def val_ci95(self) -> float:
        return confidence_half_width(self.val_accuracies)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies) if self.accuracies else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if self.n > 1 else math.nan

    @property
    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of the mean (Student t, n - 1 dof)."""
        return confidence_half_width(self.accuracies)

    @property
    def fraction_reaching_target(self) -> float:
        if not self.runs:
            return math.nan
        return sum(1 for r in self.runs if r.time_to_target is not None) / len(self.runs)

    @property
    def median_train_seconds(self) -> float:
        times = [r.train_seconds for r in self.runs if r.train_seconds is not None]
        return statistics.median(times) if times else math.nan

    @property
    def median_time_to_target(self) -> float:
        """Median over runs that reached the target (NaN when none did)."""
        times = [r.time_to_target for r in self.runs if r.time_to_target is not None]
        return statistics.median(times) if times else math.nan


def confidence_half_width(values: Sequence[float], level: float = 0.95) -> float:
    if len(values) < 2:
        return math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(t, degrees of freedom, two-sided p) of Welch's unequal-variance t-test of mean(a) - mean(b)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least 2 runs in each configuration")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p = 2 * float(stats.t.sf(abs(t), dof))
    return t, dof, p


def difference_half_width(sd_a: float, n_a: int, sd_b: float, n_b: int, level: float = 0.95) -> float:
    """95% CI half-width of mean(a) - mean(b) (Welch): the smallest difference these runs can resolve."""
    if n_a < 2 or n_b < 2 or math.isnan(sd_a) or math.isnan(sd_b):
        return math.nan
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    if va + vb == 0:
        return 0.0
    dof = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    return float(stats.t.ppf(0.5 + level / 2, dof)) * math.sqrt(va + vb)


def seeds_needed(sd: float, difference: float = RESOLVE_TARGET, level: float = 0.95, most: int = 10_000) -> int | None:
    """Seeds per row for two rows of spread `sd` to resolve `difference` (CI half-width of the difference
    at most `difference`); None if sd is unknown."""
    if math.isnan(sd):
        return None
    for n in range(2, most + 1):
        if difference_half_width(sd, n, sd, n, level) <= difference:
            return n
    return most


def power_line(rows: list[Row]) -> str:
    """What the table as a whole can resolve: the typical row's n and sd, in words."""
    measured = [row for row in rows if row.n > 1 and not math.isnan(row.std)]
    if not measured:
        return ("Resolution: no row has 2 or more seeds, so no difference between rows is resolved; run seeds "
                "0,1,2 at least.")
    n = int(statistics.median(row.n for row in measured))
    sd = statistics.median(row.std for row in measured)
    half = difference_half_width(sd, n, sd, n)
    need = seeds_needed(sd)
    return (f"Resolution: with n = {n} seeds and the rows' median sd {_pct(sd)} points, two rows must differ by "
            f"more than {_pct(half)} points to be resolved (95% CI half-width of the difference); resolving "
            f"{100 * RESOLVE_TARGET:.1f} points at this sd needs n = {need} per row.")


def _config_key(result: dict[str, Any]) -> str:
    return config_key(str(result.get("overrides") or ""))  # as the run itself computed it (hydra_job.py)


def _job_number(path: Path, root: Path) -> int:
    for part in path.relative_to(root).parts:
        if part.isdigit():
            return int(part)
    return 10**9


def _unreadable(path: Path, root: Path, reason: str) -> Run:
    return Run(path, _job_number(path, root), "unreadable", str(path.parent.name), None, None, None, None, None,
               f"{path}: {reason}")


# results.json's names for the record's fields, so a refusal names the key as the file spells it
_JSON_NAMES = {"configuration": "overrides", "data": "data_source", "commit": "git_commit",
               "width": "config.model.width"}


def _run_from_record(record: RunRecord, path: Path, job: int, **extra: Any) -> Run:
    return Run(path=path, job=job, status=record.status, config_key=record.configuration, test_acc=record.test_acc,
               train_seconds=record.train_seconds, time_to_target=record.time_to_target,
               target_acc=record.target_acc, seed=record.seed, error=record.error, epochs=record.epochs,
               width=record.width, data=record.data, device=record.device, commit=record.commit,
               val_acc=record.val_acc, **extra)


def epoch_train_losses(results_path: Path, history: list[dict[str, Any]]) -> dict[int, float]:
    """The run's mean train loss per epoch (1-based, as results.json's history counts epochs).

    results.json's history has an entry only for the epochs that were evaluated, and `train_loss` only in
    those (a CPU proxy evaluates once, at its end: one point). The CSV logger (logger=csv, the default)
    writes `train/loss` after every epoch into csv/metrics.csv beside results.json, with Lightning's
    0-based `epoch`; that file is read when present, the history fills in when it is not (another logger).
    """
    losses = {int(entry["epoch"]): float(entry["train_loss"]) for entry in history
              if finite(entry.get("train_loss")) and finite(entry.get("epoch"))}
    try:
        with open(results_path.parent / "csv" / "metrics.csv", newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                try:
                    epoch, loss = int(float(row.get("epoch") or "")), float(row.get("train/loss") or "")
                except (ValueError, OverflowError):
                    continue  # a row of other metrics (lr, time), logged by step
                if math.isfinite(loss) and epoch >= 0:
                    losses[epoch + 1] = loss  # the last row of an epoch wins (a resumed run logs it again)
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    return dict(sorted(losses.items()))


def _run_from_result(result: dict[str, Any], path: Path, job: int) -> Run:
    """A results.json as a Run, its fields checked as a RunRecord (ValueError naming the key otherwise)."""
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    values = {"configuration": _config_key(result), "seed": result.get("seed"), "status": result.get("status"),
              "test_acc": result.get("test_acc"), "train_seconds": result.get("train_seconds"),
              "time_to_target": result.get("time_to_target"), "target_acc": result.get("target_acc"),
              "epochs": result.get("epochs"), "width": model.get("width"), "data": result.get("data_source"),
              "device": result.get("device"), "commit": result.get("git_commit"), "job": job,
              "error": result.get("error"), "val_acc": result.get("val_acc")}
    try:
        record = check_record(values)
    except RecordError as error:
        raise ValueError(f"{_JSON_NAMES.get(error.field, error.field)}={error.value!r} {error.problem}") from None
    history = [entry for entry in result.get("history") or [] if isinstance(entry, dict)]
    group = result.get("wandb_group")
    return _run_from_record(record, path, job, wandb_group=group if isinstance(group, str) else None,
                            history=history, epoch_train_loss=epoch_train_losses(path, history))


def _save_figure(fig: Any, path: Path, **options: Any) -> None:
    """A plot written to a new file renamed over `path`: a link planted at `path` is replaced, never written through
    (a shared results folder may be reported by anyone who can read it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight", **options)
    storage.write_bytes_atomic(buffer.getvalue(), str(path))


# Folders that hold records set aside, not runs of the multirun: an earlier run moved out of a reused folder
# (records.results.SET_ASIDE_PREFIX, `earlier-<time>/`) and a search's trial folder moved aside before its
# number is used again (`<n>.before-<k>`).
_SET_ASIDE = re.compile(r"^earlier-|\.before-\d+$")


def load_runs(multirun_dir: str | Path, jobs: Sequence[Path] | None = None) -> list[Run]:
    """Every run recorded under `multirun_dir` (or only those in the job folders `jobs`); set-aside records skipped."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: pass the multirun dir (logs/train/multiruns/<time>)")
    runs = []
    wanted = None if jobs is None else {Path(job).resolve() for job in jobs}
    for path in sorted(root.rglob("results.json")):
        if any(_SET_ASIDE.search(part) for part in path.relative_to(root).parts[:-1]):
            continue
        if wanted is not None and path.parent.resolve() not in wanted:
            continue
        try:
            result = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            runs.append(_unreadable(path, root, "not UTF-8 text (not a results.json written by train.py)"))
            continue
        except (OSError, json.JSONDecodeError) as error:
            runs.append(_unreadable(path, root, f"{type(error).__name__}: {error}"))
            continue
        if not isinstance(result, dict):
            runs.append(_unreadable(path, root, f"holds a JSON {type(result).__name__}, not an object"))
            continue
        try:
            runs.append(_run_from_result(result, path, _job_number(path, root)))
        except (ValueError, TypeError, AttributeError) as error:
            runs.append(_unreadable(path, root, str(error)))
    return sorted(runs, key=lambda r: (r.job, str(r.path)))


class ReportError(Exception):
    """A problem with the report's inputs or output folder, said in one line."""


def load_runs_csv(path: str | Path) -> list[Run]:
    """Runs as written by `write_runs_csv`, in file order (the order the table shows them).

    Every row is checked as strictly as a results.json (run_records.read_records); the first problem
    refuses the file in one line naming its row, column and the fix.
    """
    try:
        records = read_records(path)
    except CsvInputError as error:
        raise ReportError(str(error)) from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise ReportError(f"{path} is not a runs CSV written by --export-runs ({type(error).__name__}: {error})") \
            from None
    except OSError as error:
        raise ReportError(f"cannot read {path} ({error.strerror or error}): check the path and its permissions") \
            from None
    return [_run_from_record(record, Path(path), record.job if record.job is not None else index)
            for index, (record, _line) in enumerate(records)]


def load_sources(sources: Sequence[str | Path]) -> list[Run]:
    """Runs from multirun dirs and/or per-run CSVs, in the order given (each dir in its sweep's order)."""
    runs: list[Run] = []
    for source in sources:
        path = Path(source)
        if path.suffix == ".csv" and path.is_file():
            runs += load_runs_csv(path)
        else:
            runs += load_runs(path)
    return runs


def write_runs_csv(runs: list[Run], path: str | Path) -> None:
    """One row per run (configuration, seed, accuracy, seconds, width, data, commit, ...): small enough to
    commit, complete enough for `report <csv>` to rebuild the table."""
    write_csv_rows(path, RUN_COLUMNS, ([run.config_key, run.seed, run.status, run.test_acc, run.train_seconds,
                                        run.time_to_target, run.target_acc, run.epochs, run.width, run.data,
                                        run.device, run.commit, run.job, run.error or "", run.val_acc]
                                       for run in runs))


def group_runs(runs: list[Run]) -> list[Row]:
    """One row per configuration, ordered by the first job that ran it (the sweep's order).

    A run still running has no final accuracy yet: it is kept apart (listed, in no mean), not failed."""
    rows: dict[str, Row] = {}
    for run in runs:
        row = rows.setdefault(run.config_key, Row(run.config_key))
        if run.status == "running":
            row.running.append(run)
        elif run.status == "debug":
            row.debug.append(run)
        elif run.status == "ok" and run.test_acc is not None:
            row.runs.append(run)
        else:
            row.failed.append(run)
    return list(rows.values())


def _short_labels(rows: list[Row]) -> list[str]:
    """Drop the overrides every row shares, so labels show what differs."""
    split = [row.config.split() for row in rows]
    common = set(split[0]).intersection(*split[1:]) if len(split) > 1 else set()
    return [" ".join(o for o in parts if o not in common) or "(shared settings)" for parts in split]


def _pct(value: float, digits: int = 2) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.{digits}f}"


def _secs(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"


COLUMNS = ["#", "configuration", "n", "mean acc %", "std %", "95% CI ± %", "≥ target", "median train s",
           "median time-to-target s", "failed"]
# With data.val_split: the held-out accuracy beside the test accuracy (what a search may be judged on).
VAL_COLUMNS = ["val acc %", "val 95% CI ± %"]


def has_validation(rows: list[Row]) -> bool:
    return any(row.val_accuracies for row in rows)


def columns(rows: list[Row]) -> list[str]:
    return COLUMNS[:6] + VAL_COLUMNS + COLUMNS[6:] if has_validation(rows) else COLUMNS


def table_rows(rows: list[Row]) -> list[list[str]]:
    labels = _short_labels(rows)
    validation = has_validation(rows)
    out = []
    for number, (label, row) in enumerate(zip(labels, rows, strict=True), start=1):
        cells = [str(number), label, str(row.n), _pct(row.mean), _pct(row.std), _pct(row.ci95)]
        if validation:
            cells += [_pct(row.val_mean), _pct(row.val_ci95)]
        out.append(cells + ["–" if math.isnan(row.fraction_reaching_target) else f"{row.fraction_reaching_target:.0%}",
                            _secs(row.median_train_seconds), _secs(row.median_time_to_target), str(len(row.failed))])
    return out


def numeric_rows(rows: list[Row]) -> list[list[Any]]:
    """The table with numbers as numbers (NaN where there is none), for W&B's sortable tables."""
    labels = _short_labels(rows)
    validation = has_validation(rows)
    return [[number, label, row.n, 100 * row.mean, 100 * row.std, 100 * row.ci95,
             *([100 * row.val_mean, 100 * row.val_ci95] if validation else []),
             row.fraction_reaching_target, row.median_train_seconds, row.median_time_to_target, len(row.failed)]
            for number, (label, row) in enumerate(zip(labels, rows, strict=True), start=1)]


def _describe(runs: list[Run]) -> str:
    """What every accuracy in the table depends on: the data, the width, the device, the code."""
    def values(attribute: str) -> str:
        seen = sorted({str(getattr(run, attribute)) for run in runs if getattr(run, attribute) is not None})
        return ", ".join(seen) or "–"

    return (f"Data: {values('data')}. Width: {values('width')}. Device: {values('device')}. "
            f"Commit: {values('commit')}.")


def time_caveat(runs: Sequence[Run]) -> str:
    """Why these runs' training times may not compare ('' when they all come from one GPU model).

    A time measured on a CPU depends on what else shares its cores (tests, a second run: the proxy's
    times here vary by 2x with load), and times from different devices (a GPU and a CPU, or 1 and 2
    threads) measure the devices as much as the recipes. Accuracy does not depend on either.
    """
    devices = {run.device for run in runs}
    if not devices:
        return ""
    named = sorted(device for device in devices if device)
    if len(devices) > 1:
        unknown = ", and runs with no device recorded" if None in devices else ""
        cpu = any(device.lower().startswith("cpu") for device in named)
        return (f"times come from mixed devices ({'; '.join(named)}{unknown}): compare times only between "
                "runs on the same device" + (", and CPU times only under the same load (shared cores)" if cpu
                                             else ""))
    if not named:
        return ("no device is recorded for these runs, so their times may come from a CPU shared with other "
                "work: compare times only within one machine and load")
    if named[0].lower().startswith("cpu"):
        return (f"times come from a CPU ({named[0]}) whose cores may be shared with other work, so they vary "
                "with load: compare times only between runs on one machine under the same load")
    return ""


def _finished_runs(rows: list[Row]) -> list[Run]:
    return [run for row in rows for run in row.runs]


def markdown(rows: list[Row], runs: list[Run], source: str) -> str:
    body = table_rows(rows)
    lines = ["| " + " | ".join(columns(rows)) + " |", "|" + "---|" * len(columns(rows))]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
    common = set(rows[0].config.split()).intersection(*[r.config.split() for r in rows[1:]]) if rows else set()
    running = [run for row in rows for run in row.running]
    still = f", {len(running)} still running (in no mean)" if running else ""
    caveat = time_caveat(_finished_runs(rows))
    text = [f"# Report: {source}", "", f"{len(runs)} runs, {sum(len(r.runs) for r in rows)} ok, "
            f"{sum(len(r.failed) for r in rows)} failed{still}. Shared settings: {' '.join(sorted(common)) or '–'}.",
            _describe(runs), *([f"Times: {caveat}."] if caveat else []),
            "95% CI: Student-t half-width of the mean over seeds; target: results' target_acc.", "", *lines, "",
            power_line(rows)]
    failed = [run for row in rows for run in row.failed]
    if failed:
        text += ["", "## Failed runs", ""]
        text += [f"- job {run.job} ({run.config_key}, seed {run.seed}): {run.status}"
                 + (f": {run.error}" if run.error else "") for run in failed]
    debug = [run for row in rows for run in row.debug]
    if debug:
        text += ["", "## Debug runs (debug=fdr: one batch, no accuracy; in no mean)", ""]
        text += [f"- job {run.job} ({run.config_key}, seed {run.seed})" for run in debug]
    if running:
        text += ["", "## Still running", ""]
        text += [f"- job {run.job} ({run.config_key}, seed {run.seed}): running, "
                 f"{run.epochs if run.epochs is not None else 'no'} epochs done when last written; not in the "
                 "means: report again when it has ended" for run in running]
    return "\n".join(text) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """The table with numbers as numbers (report.csv), through the one spreadsheet-safe writer."""
    write_csv_rows(path, ["configuration", "n", "mean_acc", "std", "ci95", "fraction_reaching_target",
                          "median_train_seconds", "median_time_to_target", "failed"],
                   ([row.config, row.n, row.mean, row.std, row.ci95, row.fraction_reaching_target,
                     row.median_train_seconds, row.median_time_to_target, len(row.failed)] for row in rows))


def plot(rows: list[Row], path: Path) -> tuple[float, float]:
    """Page's picture: accuracy (mean ± 95% CI) against median training time.

    Points carry the table's row numbers; the legend says which configuration and n each is, so
    labels never overlap the data even with Page's 8 rows. When the rows are stages (a table like
    Page's), they are joined in order. The accuracy axis stays within [0, 100]; returns its limits.
    When the times come from a CPU or from mixed devices (`time_caveat`), the title says so under the
    heading (and the PNG's Description text holds the same words), since a reader compares x positions.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _short_labels(rows)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    shown = [(number, label, row) for number, (label, row) in enumerate(zip(labels, rows, strict=True), start=1)
             if row.n > 0 and not math.isnan(row.median_train_seconds)]
    if shown and all("stage=" in label for _, label, _ in shown):
        ax.plot([row.median_train_seconds for _, _, row in shown], [100 * row.mean for _, _, row in shown],
                color="0.7", linewidth=1, zorder=1)
    lows, highs = [], []
    for index, (number, label, row) in enumerate(shown):
        mean = 100 * row.mean
        error = 0.0 if math.isnan(row.ci95) else 100 * row.ci95
        low, high = max(0.0, mean - error), min(100.0, mean + error)
        lows.append(low)
        highs.append(high)
        text = label if len(label) <= 48 else label[:47] + "…"
        ax.errorbar(row.median_train_seconds, mean, yerr=[[mean - low], [high - mean]], fmt="o", capsize=4,
                    zorder=2, label=f"{number}: {text} (n={row.n})")
        ax.annotate(str(number), (row.median_train_seconds, mean), textcoords="offset points",
                    xytext=(7, 5 if index % 2 == 0 else -11), fontsize=9, fontweight="bold")
    if shown:
        span = max(highs) - min(lows)
        ax.set_ylim(max(0.0, min(lows) - 0.15 * span - 0.5), min(100.0, max(highs) + 0.15 * span + 0.5))
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    caveat = time_caveat([run for _, _, row in shown for run in row.runs])
    ax.set_xlabel("median training time (s, evaluation excluded)" + ("; see the note above" if caveat else ""))
    ax.set_ylabel("test accuracy (%), mean ± 95% CI over seeds")
    title = "time vs accuracy"
    ax.set_title(title + ("\n" + textwrap.fill(f"Note: {caveat}.", 110) if caveat else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path, metadata={"Title": title, "Description": caveat})
    limits = ax.get_ylim()
    plt.close(fig)
    return limits


def _per_run(run: Run, key: str) -> dict[int, float]:
    """One run's `key` per epoch: train_loss from every epoch the CSV logger recorded, the rest from history."""
    if key == "train_loss":
        return run.epoch_train_loss
    return {int(entry["epoch"]): float(entry[key]) for entry in run.history
            if finite(entry.get(key)) and finite(entry.get("epoch"))}


def curves(row: Row, key: str) -> tuple[list[int], list[float], list[float]]:
    """Per epoch: (epochs, mean, 95% CI half-width) of `key` (test_acc, val_acc, test_loss, train_loss) over
    the row's finished runs.

    Only epochs every run has (a proxy evaluates at its end only: one accuracy point, but a train loss
    per epoch from csv/metrics.csv). With one run the band is 0 (there is no spread to show)."""
    per_epoch: dict[int, list[float]] = {}
    for run in row.runs:
        for epoch, value in _per_run(run, key).items():
            per_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(e for e, values in per_epoch.items() if len(values) == len(row.runs))
    means = [statistics.fmean(per_epoch[e]) for e in epochs]
    bands = [0.0 if len(per_epoch[e]) < 2 else confidence_half_width(per_epoch[e]) for e in epochs]
    return epochs, means, bands


# (key, panel, line style, name, scale): accuracies in % on the left, losses on the right
CURVES = (("test_acc", 0, "-", "test acc", 100.0), ("val_acc", 0, "--", "val acc", 100.0),
          ("train_loss", 1, "-", "train loss", 1.0), ("test_loss", 1, "--", "test loss", 1.0))


def plot_curves(rows: list[Row], path: Path) -> list[tuple[int, str, int, bool]]:
    """Learning curves, mean ± 95% CI band over seeds per configuration: test (solid) and validation
    (dashed) accuracy on the left, train loss (solid) and test loss (dashed) on the right; the table's row
    numbers in the legend, ten distinct colours (tab10), then repeats. A curve of one epoch (a run that
    evaluates only at its end) is a point with the CI as an error bar, so its spread still shows.

    Returns what was drawn, (row number, key, epochs, has a band), so a caller can say what is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = _short_labels(rows)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharex=True)  # one epoch axis for both panels
    colours = plt.get_cmap("tab10").colors
    drawn: list[tuple[int, str, int, bool]] = []
    for number, (label, row) in enumerate(zip(labels, rows, strict=True), start=1):
        colour = colours[(number - 1) % len(colours)]
        text = label if len(label) <= 40 else label[:39] + "…"
        for key, panel, style, name, scale in CURVES:
            epochs, means, bands = curves(row, key)
            if not epochs:
                continue
            ax = axes[panel]
            values = [scale * m for m in means]
            errors = [scale * (0.0 if math.isnan(b) else b) for b in bands]
            legend = f"{number}: {text} ({name}, n={row.n})"
            if len(epochs) == 1:
                ax.errorbar(epochs, values, yerr=errors, fmt="o", color=colour, capsize=4, markersize=4,
                            label=legend)
            else:
                ax.plot(epochs, values, style, color=colour, linewidth=1.4, label=legend)
                ax.fill_between(epochs, [v - e for v, e in zip(values, errors, strict=True)],
                                [v + e for v, e in zip(values, errors, strict=True)], color=colour, alpha=0.15,
                                linewidth=0)
            drawn.append((number, key, len(epochs), row.n > 1))
    for ax, ylabel, title in ((axes[0], "accuracy (%)", "test (solid), validation (dashed) accuracy"),
                              (axes[1], "loss", "train loss (solid), test loss (dashed)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{ylabel}, mean ± 95% CI over seeds")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False, ncol=1)
    fig.suptitle("learning curves (bands: 95% CI over seeds; n = 1 has none)")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return drawn


def find_row(rows: list[Row], name: str) -> Row:
    """A row by 1-based index, exact configuration, or a unique substring of its label."""
    labels = _short_labels(rows)
    if name.isdigit() and 1 <= int(name) <= len(rows):
        return rows[int(name) - 1]
    matches = [row for row, label in zip(rows, labels, strict=True) if name in (row.config, label)]
    matches = matches or [row for row, label in zip(rows, labels, strict=True) if name in row.config]
    if len(matches) != 1:
        raise ValueError(f"{name!r} matches {len(matches)} configurations; use a row number 1..{len(rows)}")
    return matches[0]


def compare(rows: list[Row], first: str, second: str, level: float = 0.05) -> str:
    """Welch's t-test of two rows, in numbers and in words."""
    a, b = find_row(rows, first), find_row(rows, second)
    labels = dict(zip((id(row) for row in rows), _short_labels(rows), strict=True))
    number = {id(row): index for index, row in enumerate(rows, start=1)}
    t, dof, p = welch_t_test(a.accuracies, b.accuracies)
    half = difference_half_width(a.std, a.n, b.std, b.n)
    difference = a.mean - b.mean
    sd = math.sqrt((a.std**2 + b.std**2) / 2)
    need = seeds_needed(sd, max(abs(difference), RESOLVE_TARGET) if p >= level else RESOLVE_TARGET)
    if p >= level and need is not None:
        # The plan assumes equal sds (2n - 2 degrees of freedom); with unequal ones Welch's test has fewer, so
        # the runs in hand can fall short of a plan that says they suffice: more seeds are needed either way.
        need = max(need, max(a.n, b.n) + 1)
    if p < level:
        verdict = (f"significant at the {level:.0%} level: the difference is resolved (it exceeds ±{_pct(half)}); "
                   "no more seeds are needed for it")
    else:
        verdict = (f"not significant at the {level:.0%} level: these runs resolve only differences beyond "
                   f"±{_pct(half)} points, so more seeds are needed: about n = {need} per row would resolve "
                   f"{_pct(max(abs(difference), RESOLVE_TARGET))} points at this sd")
    return (f"Row {number[id(a)]} ({labels[id(a)]}: {_pct(a.mean)}%, n={a.n}) vs row {number[id(b)]} "
            f"({labels[id(b)]}: {_pct(b.mean)}%, n={b.n}): difference {_pct(difference)} ± {_pct(half)} points "
            f"(95% CI), Welch t = {t:.3f}, dof = {dof:.1f}, p = {p:.4g}: {verdict}. At the pooled sd "
            f"{_pct(sd)}, resolving {100 * RESOLVE_TARGET:.1f} points needs n = {seeds_needed(sd)} per row.")


def wandb_group_of(runs: list[Run], fallback: str) -> str:
    """The W&B group the training jobs logged to (recorded in their results.json), so the report joins it."""
    groups = [run.wandb_group for run in runs if run.wandb_group]
    return groups[0] if groups else fallback


def upload_to_wandb(rows: list[Row], runs: list[Run], source: str, project: str, folder: Path,
                    image: Path | None) -> None:
    import wandb

    group = wandb_group_of(runs, f"report-{Path(source).name}")
    run = wandb.init(project=project, job_type="report", name=f"report · {group}", group=group, dir=str(folder))
    table = wandb.Table(columns=columns(rows), data=numeric_rows(rows))
    payload: dict[str, Any] = {"report": table}
    if image is not None and image.is_file():
        payload["report_plot"] = wandb.Image(str(image))
    run.log(payload)
    run.finish()


def output_prefix(sources: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Where report.md/.csv/.png go: --out, else the (first) multirun dir, else beside the runs CSV."""
    if out is not None:
        return Path(out) / "report"
    first = Path(sources[0])
    if first.suffix == ".csv" and first.is_file():
        return first.with_name(f"{first.stem}-report")
    return first / "report"


def report(sources: str | Path | Sequence[str | Path], compare_pair: Sequence[str] | None = None,
           to_wandb: bool = False, project: str = "cifar-speedrun", out: str | Path | None = None,
           export_runs: str | Path | None = None) -> str:
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    runs = load_sources(sources)
    if not runs:
        raise FileNotFoundError(f"no runs in {', '.join(map(str, sources))}: no results.json under a multirun dir "
                                "of this project, no row in a runs CSV; check the path")
    rows = group_runs(runs)
    label = " + ".join(str(source) for source in sources)
    # (multirun_table gives this text for one multirun dir without writing anything)
    text = markdown(rows, runs, label)
    if compare_pair:
        text += "\n" + compare(rows, *compare_pair) + "\n"
    prefix = output_prefix(sources, out)
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        storage.write_bytes_atomic(text.encode(), str(prefix.with_suffix(".md")))
        write_csv(rows, prefix.with_suffix(".csv"))
        if any(row.n for row in rows):
            plot(rows, prefix.with_suffix(".png"))
        if any(run.history or run.epoch_train_loss for row in rows for run in row.runs):
            plot_curves(rows, prefix.with_name(prefix.name + "-curves.png"))
    except OSError as error:
        raise ReportError(f"cannot write the report into {prefix.parent} ({error.strerror or error}): give a "
                          "writable folder with --out DIR") from None
    if export_runs:
        try:
            write_runs_csv(runs, export_runs)
        except OSError as error:
            raise ReportError(f"cannot write {export_runs} ({error.strerror or error}): choose a writable "
                              "path") from None
    if to_wandb:
        image = prefix.with_suffix(".png")
        upload_to_wandb(rows, runs, label, project, prefix.parent, image if image.is_file() else None)
    return text


def multirun_table(sweep_dir: str | Path, jobs: Sequence[Path] | None = None) -> str:
    """The report's text for one multirun folder (what report.md holds: the table, the resolution line,
    failed and still-running runs), written nowhere: for the end of a multirun to print beside its summary.

    Raises ReportError (one line, the fix in it) when the folder is missing or holds no results.json.
    """
    try:
        runs = load_runs(sweep_dir, jobs)
    except FileNotFoundError as error:
        raise ReportError(str(error)) from None
    if not runs:
        raise ReportError(f"no results.json under {sweep_dir}: is it a multirun dir of this project?")
    return markdown(group_runs(runs), runs, str(sweep_dir))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", metavar="DIR_OR_CSV",
                        help="multirun dirs (merged, in this order) or a per-run CSV written by --export-runs")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="Welch t-test between two rows (row number, or a unique part of the overrides)")
    parser.add_argument("--export-runs", metavar="CSV", help="also write one row per run to this CSV")
    parser.add_argument("--out", metavar="DIR", help="write report.md/.csv/.png here (default: the first dir, "
                        "or beside the runs CSV)")
    parser.add_argument("--wandb", action="store_true", help="upload the table to W&B as a wandb.Table")
    parser.add_argument("--project", default="cifar-speedrun")
    args = parser.parse_args(argv)
    try:
        print(report(args.sources, args.compare, args.wandb, args.project, args.out, args.export_runs), end="")
    except (FileNotFoundError, ValueError, KeyError, ReportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
