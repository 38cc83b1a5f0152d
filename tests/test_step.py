"""A GPU-ready training step (issue 18): no host sync in any step of any recipe, few ops beyond the recipe's.

On a GPU every `.item()` / `bool(t)` / data-dependent shape in a step makes the host wait for the
device, and every op is a kernel launch. Both are counted here on the CPU with a TorchDispatchMode
(`benchmarks/op_count.py`), per training step, through `train()` as `python train.py` runs it, for
every experiment and every configuration of the leave-one-out sweep, over enough steps to include
what happens only every few steps (EMA and lookahead every 5, the NaN watch every 25, lr logging).
Counts are asserted; times are not (benchmarks/step_cost.py measures those).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from omegaconf import open_dict

from cifar_speedrun.recipe.train_metrics import EpochMetrics
from cifar_speedrun.train import train

# 4 epochs of 26 steps: EMA / lookahead updates (every 5 steps; lookahead from epoch 3), two NaN-watch
# reads (every 25) and lr logs (every 50) fall inside the counted steps (epochs 1-3).
STEP_WINDOW = ["trainer=cpu", "data.source=image_folder", "model.width=0.03", "data.batch_size=32",
               "data.subset=832", "data.test_subset=100", "epochs=4", "trainer.check_val_every_n_epoch=4",
               "trainer.enable_progress_bar=false", "callbacks.checkpoint=null", "callbacks.model_file=null",
               "logger=csv", "trainer.log_every_n_steps=50"]


def _leave_one_out() -> list[list[str]]:
    sweep = yaml.safe_load((REPO / "conf" / "sweep" / "leave_one_out.yaml").read_text())
    lists = sweep["hydra"]["sweeper"]["params"]["trick"]
    tricks = [item.strip() for item in lists.split("],") if item.strip()]
    return [["stage=final_recipe", f"trick={item if item.endswith(']') else item + ']'}"] for item in tricks]


CONFIGS = {
    **{f"experiment={name}": [f"experiment={name}"]
       for name in ("page_baseline", "page_final", "airbench94", "airbench94_muon", "resnet18")},
    **{f"leave-one-out {i}": overrides for i, overrides in enumerate(_leave_one_out())},
    "davidnet + lookahead + alternating flip": ["+trick=[lookahead,alternating_flip,dirac_init,channels_last]"],
    "optim=lion": ["experiment=page_baseline", "optim=lion", "+trick=ema"],
}


@pytest.mark.parametrize("overrides", list(CONFIGS.values()), ids=list(CONFIGS))
def test_no_training_step_reads_the_device(overrides: list[str], compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(*STEP_WINDOW, *overrides)
    with open_dict(cfg):
        cfg.callbacks.step_ops = {"_target_": "op_count.StepOps", "skip_epochs": 1}
        del cfg["hydra"]  # a job's config, as train.py hands it over
    result = train(cfg)
    ops = result["step_ops"]
    assert ops["steps"] == 3 * 25, ops["steps"]  # epochs 1-3, each epoch's last step left out
    assert ops["syncs_per_step"] == 0, f"host syncs in a training step: {ops['syncs']}"
    assert 50 < ops["ops_per_step"] < 1000


def test_the_nan_watch_finds_the_window_without_reading_every_step() -> None:
    watch = EpochMetrics(check_every=25)
    watch.start_epoch(torch.device("cpu"), global_step=0)
    logits, labels = torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    found = None
    for step in range(1, 76):
        loss = torch.tensor(float("nan") if step == 30 else 1.0)
        watch.update(loss, logits, labels)
        found = found or watch.check(step)
    assert found == (26, 50), "the read at step 50 sees the NaN of step 30; step 25's read was finite"
    metrics, bad = watch.finish_epoch()
    assert bad == (26, 75) and math.isnan(metrics["train_loss"])  # the last finite read was at step 25


def test_epoch_metrics_are_the_mean_loss_and_the_accuracy() -> None:
    watch = EpochMetrics()
    watch.start_epoch(torch.device("cpu"), global_step=0)
    labels = torch.tensor([0, 1, 2, 3])
    watch.update(torch.tensor(2.0), torch.eye(10)[[0, 1, 5, 5]], labels)  # 2 of 4 right
    watch.update(torch.tensor(1.0), torch.eye(10)[[0, 1, 2, 3]], labels)  # 4 of 4 right
    metrics, bad = watch.finish_epoch()
    assert bad is None and metrics == {"train_loss": 1.5, "train_acc": 0.75}


def test_muon_takes_grad_scaler_tensors_and_skips_an_inf_step_on_the_device() -> None:
    """With fp16 loss scaling, GradScaler hands MuonSGD `grad_scale` and `found_inf` instead of reading
    found_inf back every step: a scaled step equals the unscaled one, and an inf step changes nothing."""
    from cifar_speedrun.recipe.optim import MuonSGD

    def fresh() -> tuple[list[torch.nn.Parameter], MuonSGD]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3, 3, 3)), torch.nn.Parameter(torch.randn(4))]
        groups = [{"params": [params[0]], "lr": 0.1, "momentum": 0.6, "muon": True},
                  {"params": [params[1]], "lr": 0.05, "weight_decay": 0.01}]
        return params, MuonSGD(groups, momentum=0.85)

    plain, reference = fresh()
    scaled, optimizer = fresh()
    for step in range(3):
        for p, q in zip(plain, scaled, strict=True):
            grad = torch.full_like(p, 0.1 * (step + 1))
            p.grad, q.grad = grad.clone(), grad * 1024.0
        reference.step()
        optimizer.grad_scale, optimizer.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        optimizer.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(plain, scaled, strict=True))
    before = [q.detach().clone() for q in scaled]
    buffers = [optimizer.state[q]["momentum_buffer"].clone() for q in scaled]
    for q in scaled:
        q.grad = torch.full_like(q, float("inf"))
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    optimizer.step()
    assert all(torch.equal(q, b) for q, b in zip(scaled, before, strict=True)), "an inf step moves nothing"
    assert all(torch.equal(optimizer.state[q]["momentum_buffer"], b) for q, b in zip(scaled, buffers, strict=True))


# ---------------------------------------------------------------- torch.compile: one graph per net, the same numbers
FAMILIES = ["page_baseline", "page_final", "airbench94", "airbench94_muon", "resnet18",
            "resnet18 +trick=[ghost_bn,celu,whitening]"]


@pytest.mark.parametrize("experiment", FAMILIES)
def test_every_net_compiles_to_one_graph_in_training_and_eval_with_and_without_autocast(experiment: str,
                                                                                       compose_cfg) -> None:
    from hydra.utils import instantiate

    name, *tricks = experiment.split(" ")
    cfg = compose_cfg(f"experiment={name}", "trainer=cpu", "model.width=0.125",
                      tricks[0].replace("]", ",channels_last]") if tricks else "+trick=[channels_last]")
    net = instantiate(cfg.model).to(memory_format=torch.channels_last)
    images = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        net.train(training)
        for autocast in (False, True):
            torch._dynamo.reset()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                explained = torch._dynamo.explain(net)(images)
            where = f"{'train' if training else 'eval'}, autocast {autocast}"
            assert explained.graph_break_count == 0, (where, explained.break_reasons)
            assert explained.graph_count == 1, where
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_compiled_net_computes_what_the_eager_net_computes(compose_cfg) -> None:
    """One training step (loss, gradients, BN statistics) and one evaluation, compiled vs eager, on the
    final recipe's net (ghost BN, CELU, whitening, pool before norm): the same within float tolerance."""
    import copy

    from hydra.utils import instantiate

    cfg = compose_cfg("experiment=page_final", "trainer=cpu", "model.width=0.03")
    torch.manual_seed(0)
    eager = instantiate(cfg.model)
    images = torch.randn(64, 3, 32, 32)
    for layer in eager.modules():
        if hasattr(layer, "fit_to_data"):
            layer.fit_to_data(images)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    labels = torch.randint(0, 10, (64,))
    losses = []
    for net in (eager, compiled):
        net.train()
        loss = torch.nn.functional.cross_entropy(net(images), labels, label_smoothing=0.2)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), name
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled.named_buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
    eager.eval(), compiled.eval()
    with torch.no_grad():
        assert torch.allclose(eager(images), compiled(images), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
