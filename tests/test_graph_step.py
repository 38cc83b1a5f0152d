"""The graph-ready step (step.py) computes what the op-by-op step computes, for every recipe.

`step.mode=graph` runs the step that a CUDA device captures as one graph: the learning rates as
device tensors read from a table by a device counter, zero-initialized momentum buffers, the
metric sums added in place, fused SGD with a tensor lr, the averaging called from the step. On a CPU
it runs uncaptured, so the whole mechanism except the capture itself is checked here against
`step.mode=eager` (Lightning's optimizer wrapper, torch's LambdaLR): the same weights, bit for bit,
after every step of a four-epoch run, for every experiment and every configuration of the
leave-one-out sweep. The capture is checked on CUDA (tests/test_cuda.py).

Bit for bit because both modes use torch's fused SGD kernel (optim._sgd): its foreach kernel rounds a
tensor's last elements past a multiple of the vector width differently, which a net this small
amplifies within a few steps.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from test_step import CONFIGS

from cifar_speedrun.train import train

# 4 epochs of 13 steps: EMA / lookahead updates (every 5 steps; lookahead from epoch 3), the whitening
# bias that stops training after epoch 3 (airbench), lr logging and the NaN watch's reads.
WINDOW = ["trainer=cpu", "data.source=image_folder", "model.width=0.03", "data.batch_size=32",
          "data.subset=416", "data.test_subset=100", "epochs=4", "trainer.check_val_every_n_epoch=4",
          "trainer.enable_progress_bar=false", "callbacks.checkpoint=null", "logger=none", "nan_check_every=5",
          "+callbacks.lr_logger.every_n_steps=7"]


class Trajectory(L.Callback):
    """The net's weights and buffers after every step and the global step, kept in `runs[name]`."""

    runs: dict[str, Trajectory] = {}

    def __init__(self, name: str) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []
        Trajectory.runs[name] = self

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})
        self.steps.append(trainer.global_step)


def _run(compose_cfg, overrides: list[str], mode: str, tmp_path) -> tuple[dict, Trajectory]:
    cfg = compose_cfg(*WINDOW, *overrides, f"step.mode={mode}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / mode)
        del cfg["hydra"]
        cfg.callbacks.trajectory = {"_target_": "test_graph_step.Trajectory", "name": mode}
    result = train(cfg)
    assert result["status"] == "ok", result.get("error")
    return result, Trajectory.runs.pop(mode)


@pytest.mark.parametrize("overrides", list(CONFIGS.values()), ids=list(CONFIGS))
def test_the_graph_ready_step_gives_the_eager_steps_weights_after_every_step(overrides, compose_cfg,
                                                                             tmp_path) -> None:
    eager, eager_path = _run(compose_cfg, overrides, "eager", tmp_path)
    graph, graph_path = _run(compose_cfg, overrides, "graph", tmp_path)
    assert graph["step"] == {"mode": "graph", "captured": False, "captures": 0}, "uncaptured on a CPU"
    assert eager["step"] == {"mode": "eager"}
    assert graph_path.steps == eager_path.steps == list(range(1, 53)), "Lightning counts every replayed step"
    for step, (a, b) in enumerate(zip(eager_path.states, graph_path.states, strict=True), start=1):
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert not different, f"step {step}: {different[:4]} differ"
    assert graph["test_acc"] == eager["test_acc"]
    for key in ("train_loss", "train_acc"):  # the epoch sums, added in place by the graph-ready step
        assert [h.get(key) for h in graph["history"]] == [h.get(key) for h in eager["history"]]


def test_the_graph_step_logs_the_learning_rates_the_eager_step_logs(compose_cfg, tmp_path) -> None:
    logged = {}
    for mode in ("eager", "graph"):
        cfg = compose_cfg(*WINDOW, "experiment=airbench94_muon", "data.batch_size=32", "logger=csv",
                          f"step.mode={mode}")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / mode)
            del cfg["hydra"]
        train(cfg)
        import csv

        rows = list(csv.DictReader(open(next((tmp_path / mode).rglob("metrics.csv")))))
        logged[mode] = [{k: v for k, v in row.items() if k.startswith("lr/") and v} for row in rows]
        logged[mode] = [row for row in logged[mode] if row]
    assert logged["graph"] and logged["graph"] == logged["eager"]
    assert {"lr/filters", "lr/head", "lr/whiten_bias"} <= set(logged["graph"][0])


def test_graph_mode_is_refused_where_it_cannot_run(compose_cfg) -> None:
    from cifar_speedrun.config.command_line import validate
    from cifar_speedrun.errors import UserError

    cfg = compose_cfg("step.mode=graph", "+trick=compile", "compile.mode=reduce-overhead", "trainer=cpu")
    with pytest.raises(UserError, match="compile.mode=max-autotune-no-cudagraphs"):
        validate(cfg)


@pytest.mark.parametrize("experiment", ["page_final", "airbench94", "airbench94_muon"])
def test_the_graph_ready_step_reads_nothing_from_the_device(experiment: str, compose_cfg) -> None:
    """What a replay may not do, counted on the CPU: the step's ops, and not one host sync among them."""
    from test_step import STEP_WINDOW

    cfg = compose_cfg(*STEP_WINDOW, f"experiment={experiment}", "step.mode=graph")
    with open_dict(cfg):
        cfg.callbacks.step_ops = {"_target_": "op_count.StepOps", "skip_epochs": 1}
        del cfg["hydra"]
    result = train(cfg)
    ops = result["step_ops"]
    assert ops["steps"] == 3 * 25 and ops["syncs_per_step"] == 0, ops["syncs"]
    assert 50 < ops["ops_per_step"] < 1000


class KeepEpochCheckpoint(L.Callback):
    """Copy the run's last.ckpt as it is after epoch `epoch` (0-based) to epoch<epoch>.ckpt beside it."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch + 1:
            import shutil

            folder = Path(trainer.checkpoint_callback.dirpath)
            if (folder / "last.ckpt").is_file():  # a run resumed at this epoch has written none yet
                shutil.copyfile(folder / "last.ckpt", folder / f"epoch{self.epoch}.ckpt")


@pytest.mark.parametrize("first,then", [("graph", "eager"), ("eager", "graph")])
def test_a_run_resumed_in_the_other_step_mode_is_the_uninterrupted_run(first: str, then: str, compose_cfg,
                                                                       tmp_path) -> None:
    """The two modes keep their schedules differently (LambdaLR's state in the checkpoint, or a device
    counter set from the global step): a run resumed across them still continues at its own step."""
    window = [o for o in WINDOW if o != "callbacks.checkpoint=null"] + ["experiment=airbench94", "data.batch_size=32"]
    results = {}
    kept = "first/checkpoints/epoch1.ckpt"
    for name, mode, resume in (("whole", then, None), ("first", first, None), ("resumed", then, kept)):
        cfg = compose_cfg(*window, f"step.mode={mode}")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
            cfg.paths.checkpoint_dir = str(tmp_path / name / "checkpoints")
            del cfg["hydra"]
            # in every run (a resume is refused when the callbacks differ); only the first's copy is used
            cfg.callbacks.keep = {"_target_": "test_graph_step.KeepEpochCheckpoint", "epoch": 1}
            if resume:
                cfg.ckpt_path = str(tmp_path / resume)
        results[name] = train(cfg)
        assert results[name]["status"] == "ok", results[name].get("error")
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=False)["state_dict"]
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert results["resumed"]["test_acc"] == results["whole"]["test_acc"]
