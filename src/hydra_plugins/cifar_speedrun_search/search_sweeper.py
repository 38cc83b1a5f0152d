"""A hyperparameter search as a Hydra sweeper: `python train.py -m hparams_search=<name> ...`.

lightning-hydra-template's convention (an `hparams_search` config that swaps in an Optuna sweeper),
on a thin driver over a current Optuna's ask/tell API: Hydra's own Optuna sweeper (1.3) still pins
optuna < 3, which the rest of the stack no longer installs with. Each trial is one job of the
multirun (folder `<sweep dir>/<trial number>`, its own results.json, so the report reads a search
like any multirun); its objective is the record that job returned (`val_acc`: the held-out split,
never the test set), never a file an earlier run left in its folder.

The study lives in `<sweep dir>/search.db` (SQLite); the same command with the same `hydra.sweep.dir`
resumes it. Resuming must give the search an uninterrupted one would have run, so:
- each trial's sampler is seeded from (sampler_seed, trial number): a resumed search draws new
  parameters, never the earlier trials' again (a sampler re-seeded as a whole would repeat them);
- `n_trials` counts COMPLETE trials; a trial the search lost (the process killed or interrupted mid-
  trial: left RUNNING, or FAIL without an error of its own) is run again with its parameters;
- a trial that failed on its own (status failed, no objective) is FAIL with its error and the search
  goes on; after `n_trials` such failures in a row it stops, so a setting that fails every trial
  cannot loop;
- the study remembers the configuration it was started with (study.py), and refuses another.
At the end the best trial's overrides are printed as a ready `python train.py ...` command and
written, with every trial, to search.json.
"""

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict  # noqa: UP035 - OmegaConf's structured configs read typing.Dict

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig

from cifar_speedrun.errors import UserError
from hydra_plugins.cifar_speedrun_search import study as study_lib

log = logging.getLogger(__name__)


@dataclass
class SearchSweeperConf:
    """Every field is set by conf/hparams_search/<name>.yaml (one default per key: there)."""

    _target_: str = "hydra_plugins.cifar_speedrun_search.search_sweeper.SearchSweeper"
    n_trials: int = MISSING
    sampler_seed: int = MISSING
    direction: str = MISSING
    objective: str = MISSING
    study_name: str = MISSING
    # key -> "float(low, high)", "float(low, high, log)", "int(low, high)" or "choice(a, b, ...)"; nested by
    # the key's dots (optim: {lr: ...}) so `hydra.sweeper.params.optim.lr=...` overrides one of them.
    params: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(group="hydra/sweeper", name="cifar_search", node=SearchSweeperConf,
                             provider="cifar_speedrun")


def trial_seed(sampler_seed: int, number: int) -> int:
    """The sampler's seed for trial `number`: a function of the study's seed and the trial alone, so the
    same trial draws the same parameters whether the search ran straight through or was resumed."""
    import numpy as np

    return int(np.random.SeedSequence([sampler_seed, number]).generate_state(1)[0])


def _override(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:.6g}"
    return f"{key}={value}"


@dataclass
class _Tally:
    complete: int
    failed: dict[int, str]          # trial number -> its own error
    streak: int                     # trials failed since the last completed one
    lost: list[Any]                 # FrozenTrials the search lost (killed, interrupted), not yet run again
    waiting: int


class SearchSweeper(Sweeper):
    def __init__(self, n_trials: Any, sampler_seed: Any, direction: Any, objective: Any, study_name: Any,
                 params: Any) -> None:
        super().__init__()
        self.settings = {"n_trials": n_trials, "sampler_seed": sampler_seed, "direction": direction,
                         "objective": objective, "study_name": study_name, "params": params}
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        """Run the search; a mistake found here (train.py's checks found it first, unless the folder changed
        in between) is one `error:` line and exit 2, like every other."""
        try:
            return self._search(arguments)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def _search(self, arguments: list[str]) -> Any:
        import optuna

        assert self.config is not None and self.launcher is not None
        spec = study_lib.parse_search(self.settings)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        db = sweep_dir / study_lib.DB_NAME
        configuration = study_lib.measured_configuration(self.config, spec)
        stored = study_lib.check_study(db, spec, configuration)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(study_name=spec.study_name, storage=f"sqlite:///{db}", load_if_exists=True,
                                        direction=spec.direction)
        except (RuntimeError, ValueError, optuna.exceptions.OptunaError) as error:  # e.g. a newer Optuna's schema
            raise UserError(f"{db} cannot be opened as the study {spec.study_name!r}: {str(error).splitlines()[0]}; "
                            "move it away or choose another hydra.sweep.dir") from None
        if stored is None or stored.configuration is None:
            if stored is not None:
                log.warning(f"{db} records no configuration (an older version made it): recording this command's")
            study.set_user_attr("configuration", configuration)
        legacy = self._legacy_errors(sweep_dir)
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # the process running it is gone
        while True:
            tally = self._tally(study, legacy)
            if tally.complete >= spec.n_trials:
                break
            if tally.streak >= spec.n_trials:
                log.warning(f"{tally.streak} trials failed in a row: the search stops (see {sweep_dir}/search.json)")
                break
            if tally.lost and not tally.waiting:
                lost = tally.lost[0]
                study.enqueue_trial(lost.params, user_attrs={"rerun_of": lost.number})
                log.warning(f"trial {lost.number} was not finished (stopped mid-trial): running it again")
                # What the lost trial left (even a results.json written just before the kill) is not a
                # trial of the study: aside, so the report does not count its parameters twice.
                self._move_aside(sweep_dir / str(lost.number))
            elif not tally.waiting:  # a fresh trial: its own seed
                study.sampler = optuna.samplers.TPESampler(
                    seed=trial_seed(spec.sampler_seed, len(study.get_trials(deepcopy=False))))
            self._run_trial(study, spec, arguments, sweep_dir)
        return self._summary(study, spec, arguments, sweep_dir, legacy)

    def _run_trial(self, study: Any, spec: study_lib.SearchSpec, arguments: list[str], sweep_dir: Path) -> None:
        import optuna

        trial = study.ask(spec.space)
        folder = sweep_dir / str(trial.number)
        self._move_aside(folder)
        overrides = [*arguments, *(_override(key, value) for key, value in trial.params.items())]
        try:
            returns = self.launcher.launch([overrides], initial_job_idx=trial.number)
        except BaseException:  # interrupted (SIGINT, SIGTERM): lost, run again on resume
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        value, error = self._objective(returns[0] if returns else None, folder, spec.objective)
        if value is None:
            trial.set_user_attr("error", error)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning(f"trial {trial.number} failed ({error}); the search goes on")
        else:
            study.tell(trial, value)

    @staticmethod
    def _move_aside(folder: Path) -> None:
        """A trial number is new, so its folder should be too; one left by an earlier run (a search whose
        search.db was removed, another multirun) is renamed, not overwritten or read as this trial's."""
        if not folder.exists():
            return
        for suffix in range(1, 1000):
            target = folder.with_name(f"{folder.name}.before-{suffix}")
            if not target.exists():
                shutil.move(str(folder), str(target))
                log.warning(f"{folder} held an earlier run: moved to {target} (nothing is overwritten)")
                return
        raise UserError(f"{folder} and 999 renamed copies beside it exist: choose another hydra.sweep.dir")

    @staticmethod
    def _objective(job: Any, folder: Path, objective: str) -> tuple[float | None, str]:
        """The trial's value from what its job returned now (train.py returns the results record); the error
        of a failed one from the results.json it wrote (its folder was empty before the trial)."""
        from hydra.core.utils import JobStatus

        record = job.return_value if job is not None and job.status == JobStatus.COMPLETED else None
        if isinstance(record, dict) and record.get("status") == "ok":
            value = record.get(objective)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value), ""
            return None, f"the run recorded no {objective}"
        try:
            written = json.loads((folder / "results.json").read_text())
            return None, f"status {written.get('status')}: {written.get('error')}"
        except (OSError, ValueError, AttributeError):
            return None, "the trial ended without a results record"

    @staticmethod
    def _tally(study: Any, legacy: dict[int, str]) -> _Tally:
        import optuna

        state = optuna.trial.TrialState
        trials = study.get_trials(deepcopy=False)
        rerun = {t.user_attrs.get("rerun_of") for t in trials}
        failed: dict[int, str] = {}
        lost = []
        streak = 0
        for t in sorted(trials, key=lambda t: t.number):
            if t.state == state.COMPLETE:
                streak = 0
            if t.state != state.FAIL:
                continue
            error = t.user_attrs.get("error") or legacy.get(t.number)
            if error:
                failed[t.number] = str(error)
                streak += 1
            elif t.number not in rerun and set(t.params) == set(t.distributions) and t.params:
                lost.append(t)
        return _Tally(sum(t.state == state.COMPLETE for t in trials), failed, streak, lost,
                      sum(t.state == state.WAITING for t in trials))

    @staticmethod
    def _legacy_errors(sweep_dir: Path) -> dict[int, str]:
        """Failures an older version recorded only in search.json (not in the study)."""
        try:
            return {int(k): str(v) for k, v in json.loads((sweep_dir / "search.json").read_text())["failed"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _summary(self, study: Any, spec: study_lib.SearchSpec, arguments: list[str], sweep_dir: Path,
                 legacy: dict[int, str]) -> dict[str, Any]:
        import optuna

        tally = self._tally(study, legacy)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        lost = [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL and t.number not in tally.failed]
        summary: dict[str, Any] = {
            "study": spec.study_name, "objective": spec.objective, "direction": spec.direction,
            "n_trials": spec.n_trials, "trials": len(trials), "complete": len(complete),
            "failed": {str(number): error for number, error in sorted(tally.failed.items())},
            "interrupted": lost,
            "history": [{"trial": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                         **({"rerun_of": t.user_attrs["rerun_of"]} if "rerun_of" in t.user_attrs else {})}
                        for t in trials],
        }
        failed = f"{len(tally.failed)} failed" + (f", {len(lost)} interrupted and run again" if lost else "")
        if complete:
            best = study.best_trial
            # The chosen setting, to train on the whole training set and score on the test set: without the
            # search (hparams_search, its sweeper settings) and without the held-out split.
            dropped = ("hydra.", "hydra/", "hparams_search", "data.val_split")
            kept = [a for a in arguments if not a.lstrip("+~").startswith(dropped)]
            command = "python train.py " + " ".join([*kept, *(_override(k, v) for k, v in best.params.items())])
            summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                           best_command=command)
            print(f"[search] best of {len(complete)} trials: trial {best.number}, {spec.objective} "
                  f"{100 * best.value:.2f}%; {failed}. Train it on all training images and score it on "
                  f"the test set (add seed=0,1,2 and -m for n = 3) with:\n"
                  f"  {command}", flush=True)
        else:
            print(f"[search] no trial finished ({failed}): see {sweep_dir}/search.json", flush=True)
        (sweep_dir / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
