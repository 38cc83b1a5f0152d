"""A hyperparameter search as a Hydra sweeper: `python train.py -m hparams_search=<name> ...`.

lightning-hydra-template's convention (an `hparams_search` config that swaps in an Optuna sweeper),
on a thin driver over a current Optuna's ask/tell API: Hydra's own Optuna sweeper (1.3) still pins
optuna < 3, which the rest of the stack no longer installs with. Each trial is one job of the
multirun (folder `<sweep dir>/<trial number>`, its own results.json, so the report reads a search
like any multirun); its objective is read from that results.json (`val_acc`: the held-out split,
never the test set). The study lives in `<sweep dir>/search.db` (SQLite): the same command with the
same `hydra.sweep.dir` resumes it, counting the trials already finished. A failed trial is recorded
(Optuna state FAIL, its error in search.json) and the search goes on. At the end the best trial's
overrides are printed as a ready `python train.py ...` command and written to search.json.
"""

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict  # noqa: UP035 - OmegaConf's structured configs read typing.Dict

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf

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
    # key -> "float(low, high)", "float(low, high, log)", "int(low, high)" or "choice(a, b, ...)"
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006


ConfigStore.instance().store(group="hydra/sweeper", name="cifar_search", node=SearchSweeperConf,
                             provider="cifar_speedrun")

_SPEC = re.compile(r"^\s*(float|int|choice)\((.*)\)\s*$")


def distribution(key: str, spec: str) -> Any:
    """'float(0.1, 2.0, log)' -> optuna.distributions.FloatDistribution(0.1, 2.0, log=True), and so on."""
    import optuna

    match = _SPEC.match(str(spec))
    if not match:
        raise ValueError(f"hparams_search: params.{key}={spec!r} is not float(low, high[, log]), int(low, high[, log]) "
                         "or choice(a, b, ...)")
    kind, inner = match.group(1), [part.strip() for part in match.group(2).split(",") if part.strip()]
    if kind == "choice":
        return optuna.distributions.CategoricalDistribution([_literal(part) for part in inner])
    log_scale = len(inner) == 3 and inner[2] == "log"
    if len(inner) not in (2, 3) or (len(inner) == 3 and not log_scale):
        raise ValueError(f"hparams_search: params.{key}={spec!r}: give low, high and optionally log")
    low, high = float(inner[0]), float(inner[1])
    if kind == "int":
        return optuna.distributions.IntDistribution(int(low), int(high), log=log_scale)
    return optuna.distributions.FloatDistribution(low, high, log=log_scale)


def _literal(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text.strip("'\"")


def _override(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:.6g}"
    return f"{key}={value}"


class SearchSweeper(Sweeper):
    def __init__(self, n_trials: int, sampler_seed: int, direction: str, objective: str, study_name: str,
                 params: dict[str, str]) -> None:
        super().__init__()
        self.n_trials, self.sampler_seed, self.direction = int(n_trials), int(sampler_seed), str(direction)
        self.objective, self.study_name = str(objective), str(study_name)
        self.params = {str(key): str(value) for key, value in (params or {}).items()}
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)
        if self.objective.startswith("val") and not int(OmegaConf.select(config, "data.val_split") or 0):
            raise ValueError("hparams_search: the objective is the validation accuracy, but data.val_split=0 holds "
                             "nothing out: set data.val_split=N (a search never looks at the test set)")

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        assert self.config is not None and self.launcher is not None
        distributions = {key: distribution(key, spec) for key, spec in self.params.items()}
        swept = [a for a in arguments if a.split("=", 1)[0].lstrip("+~") in distributions]
        if swept:
            raise ValueError(f"hparams_search: {swept[0]} is searched; drop it from the command line")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=self.study_name, storage=f"sqlite:///{sweep_dir / 'search.db'}",
                                    load_if_exists=True, direction=self.direction,
                                    sampler=optuna.samplers.TPESampler(seed=self.sampler_seed))
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # a search interrupted mid-trial
        finished = len(study.get_trials(deepcopy=False))
        errors: dict[int, str] = self._recorded_errors(sweep_dir)
        while finished < self.n_trials:
            trial = study.ask(distributions)
            overrides = [*arguments, *(_override(key, value) for key, value in trial.params.items())]
            self.launcher.launch([overrides], initial_job_idx=trial.number)
            value, error = self._objective(sweep_dir / str(trial.number) / "results.json")
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                errors[trial.number] = error
                log.warning(f"trial {trial.number} failed ({error}); the search goes on")
            else:
                study.tell(trial, value)
            finished += 1
        return self._summary(study, arguments, sweep_dir, errors)

    def _objective(self, results: Path) -> tuple[float | None, str]:
        try:
            record = json.loads(results.read_text())
        except (OSError, ValueError) as error:
            return None, f"no readable results.json ({type(error).__name__})"
        if record.get("status") != "ok":
            return None, f"status {record.get('status')}: {record.get('error')}"
        value = record.get(self.objective)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None, f"results.json has no {self.objective}"
        return float(value), ""

    @staticmethod
    def _recorded_errors(sweep_dir: Path) -> dict[int, str]:
        try:
            return {int(k): v for k, v in json.loads((sweep_dir / "search.json").read_text())["failed"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _summary(self, study: Any, arguments: list[str], sweep_dir: Path, errors: dict[int, str]) -> dict[str, Any]:
        import optuna

        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        summary: dict[str, Any] = {
            "study": self.study_name, "objective": self.objective, "direction": self.direction,
            "trials": len(study.get_trials(deepcopy=False)), "complete": len(complete),
            "failed": {str(number): error for number, error in sorted(errors.items())},
            "history": [{"trial": t.number, "state": t.state.name, "value": t.value,
                         "params": t.params} for t in study.get_trials(deepcopy=False)],
        }
        if complete:
            best = study.best_trial
            # The chosen setting, to train on the whole training set and score on the test set: without the
            # search (hparams_search, its sweeper settings) and without the held-out split.
            dropped = ("hydra.", "hydra/", "hparams_search", "data.val_split")
            kept = [a for a in arguments if not a.lstrip("+~").startswith(dropped)]
            command = "python train.py " + " ".join([*kept, *(_override(k, v) for k, v in best.params.items())])
            summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                           best_command=command)
            print(f"[search] best of {len(complete)} trials: trial {best.number}, {self.objective} "
                  f"{100 * best.value:.2f}%; {len(errors)} failed. Train it on all training images and score it on "
                  f"the test set (add seed=0,1,2 and -m for n = 3) with:\n"
                  f"  {command}", flush=True)
        else:
            print(f"[search] no trial finished ({len(errors)} failed): see {sweep_dir}/search.json", flush=True)
        (sweep_dir / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
