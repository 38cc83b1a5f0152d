"""Optimizers as each recipe writes them: Page's SGD, airbench's decoupled SGD, airbench's Muon + SGD, Lion.

`optim=<name>` picks a config whose `builder` names one settings class here. The class is the whole
registration: declaring `class XSettings(OptimizerSettings)` with `builder: Literal["x"]` puts it in
`OPTIMIZERS`, the config check validates `optim.*` into it once, and the run builds from that object,

    settings.build(net, batch_size, device_type) -> Built(optimizer, effective, group_knots)

reading the checked attributes (`self.lr`), so a recipe's optimizer is a config choice, not a branch in
the LightningModule, and a number goes from its yaml to its parameter group through one object. Every builder
works on the mean loss over the batch (module.py): where a recipe sums the loss (Page, airbench),
its learning rates are per example and are multiplied by the batch size here, and its weight decay
is converted so that the shrink per step, lr x weight_decay, is the recipe's. `effective` records
the numbers in use (results.json `effective_optim`), in both forms.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.models import ModelFamily
from cifar_speedrun.recipe.models.base import ROLES
from cifar_speedrun.typed_sections import Section, check


class Schedule(Section):
    """Learning-rate factors at knots in epochs, linear between (schedule.py); knots may be written in `epochs`."""

    epochs: list[Any] = Field(min_length=2, description="numbers or expressions in epochs, e.g. [0,epochs/5,epochs]")
    factors: list[Annotated[float, Field(ge=0)]] = Field(min_length=2)


@dataclass
class Built:
    optimizer: torch.optim.Optimizer
    effective: dict[str, Any]
    # Per-group schedules that differ from the run's (group name -> (knots in epochs, factors)).
    group_knots: dict[str, tuple[list[Any], list[float]]] = field(default_factory=dict)


# optim.builder -> its settings class; filled by declaring the classes (OptimizerSettings).
OPTIMIZERS: dict[str, type[OptimizerSettings]] = {}


class OptimizerSettings(Section):
    """What every optimizer's settings have: the run's lr `schedule` and `build`.

    A subclass whose `builder` field is a one-name Literal registers itself under that name: a new
    optimizer is that class (its keys, their ranges and `build`) plus conf/optim/<name>.yaml.
    `build(..., tensor_lr=True)` is asked for when step.py's graph-ready step sets the lrs as device tensors.
    """

    schedule: Schedule

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        builder = cls.model_fields.get("builder")
        names = typing.get_args(builder.annotation) if builder is not None else ()
        if len(names) == 1:
            OPTIMIZERS[names[0]] = cls

    def build(self, net: nn.Module, batch_size: int, device_type: str, tensor_lr: bool = False) -> Built:
        raise NotImplementedError(f"{type(self).__name__} must say how it builds its optimizer")


def read_optimizer(value: Any) -> OptimizerSettings:
    """`optim` as its typed settings: a settings object as it is, a dict (a test's, a script's) checked once."""
    if isinstance(value, OptimizerSettings):
        return value
    chosen = value.get("builder") if isinstance(value, dict) else None
    settings = OPTIMIZERS.get(chosen) if isinstance(chosen, str) else None
    if settings is None:
        raise UserError(f"optim.builder={chosen!r} is not one of this project's; use optim=<name> "
                        f"({', '.join(sorted(OPTIMIZERS))})")
    return check(settings, value, "optim")


class _NesterovMomentum(OptimizerSettings):
    """Nesterov's look-ahead is a momentum step: refused without momentum (torch would refuse it at build)."""

    @model_validator(mode="after")
    def _momentum_for_nesterov(self) -> _NesterovMomentum:
        if getattr(self, "nesterov", False) and getattr(self, "momentum", 1.0) == 0:
            raise UserError("optim.nesterov=true needs optim.momentum > 0: set a momentum or optim.nesterov=false")
        return self


class PageSGDSettings(_NesterovMomentum):
    builder: Literal["page_sgd"]
    lr: float = Field(ge=0, description="Page's peak: 0.4 (baseline), 1.0 (final)")
    weight_decay: float = Field(ge=0, description="Page: 5e-4")
    momentum: float = Field(ge=0, lt=1, description="Page uses 0.9")
    nesterov: bool
    fused: bool
    bias_lr_factor: float = Field(ge=0)
    bias_wd_factor: float = Field(ge=0)
    hold_invariant: bool
    reference_batch_size: int = Field(ge=1)
    reference_momentum: float = Field(ge=0, lt=1)

    def build(self, net: nn.Module, batch_size: int, device_type: str, tensor_lr: bool = False) -> Built:
        return page_sgd(self, net, batch_size, device_type, tensor_lr)


class AirbenchSGDSettings(_NesterovMomentum):
    builder: Literal["airbench_sgd"]
    lr_per_1024: float = Field(ge=0, description="airbench94: 11.5")
    weight_decay_per_1024: float = Field(ge=0, description="airbench94: 0.0153")
    bias_scaler: float = Field(ge=0, description="airbench94: 64")
    momentum: float = Field(ge=0, lt=1, description="airbench94: 0.85")
    nesterov: bool
    fused: bool

    def build(self, net: nn.Module, batch_size: int, device_type: str, tensor_lr: bool = False) -> Built:
        return airbench_sgd(self, net, batch_size, device_type, tensor_lr)


class MuonSettings(_NesterovMomentum):
    builder: Literal["muon_sgd"]
    lr: float = Field(ge=0, description="airbench94_muon: 0.24")
    muon_momentum: float = Field(ge=0, lt=1)
    ns_steps: int = Field(ge=1, le=20)
    renormalize: bool
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool
    bias_lr: float = Field(ge=0)
    head_lr: float = Field(ge=0)
    width_reference_features: Annotated[float, Field(ge=1)] | None
    weight_decay_per_example: float = Field(ge=0)
    whiten_bias_schedule: Schedule | None

    def build(self, net: nn.Module, batch_size: int, device_type: str, tensor_lr: bool = False) -> Built:
        return muon_sgd(self, net, batch_size, device_type, tensor_lr)


def roles(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The net's parameters by the roles its family declares (models/base.py, ModelFamily.roles). A net
    that is no family (a test's nn.Linear) declares none: all its parameters are `other`."""
    if isinstance(net, ModelFamily):
        return net.parameter_roles()
    return {**{role: [] for role in ROLES}, "other": list(net.parameters())}


def _sgd(groups: list[dict[str, Any]], momentum: float, nesterov: bool, device_type: str,
         fused: bool = True, tensor_lr: bool = False) -> torch.optim.SGD:
    # One fused kernel for the whole update (torch has them for CUDA and CPU); foreach (multi-tensor) with
    # optim.fused=false. Fused also whenever the lr is a device tensor (`tensor_lr`, step.py's graph-ready
    # step): only the fused kernels take it as a tensor, foreach SGD reads it back to the host. The two
    # kernels round a tensor's last few elements (past a multiple of the vector width) differently, so
    # eager and graph-ready steps use the same one and give the same weights bit for bit.
    use_fused = bool(fused) or tensor_lr
    return torch.optim.SGD([g for g in groups if g["params"]], momentum=momentum, nesterov=nesterov,
                           fused=use_fused or None, foreach=None if use_fused else True)


def _split(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(norm biases, every other trainable parameter): Page's and airbench's two groups. Their nets have no
    other biases except airbench's whitening bias, which both recipes train with the weights; frozen
    parameters that may start training later (that bias) are in too, SGD skips those without a gradient."""
    by_role = roles(net)
    biases = by_role["norm_biases"]
    ids = {id(p) for p in biases}
    return biases, [p for p in net.parameters() if id(p) not in ids and p.requires_grad]


# ------------------------------------------------------------------------------------------------
# Page: SGD on the mean loss, lr and weight decay as in his summed-loss code times / over the batch
# ------------------------------------------------------------------------------------------------


def effective_hyperparameters(optim: PageSGDSettings, batch_size: int) -> dict[str, float]:
    """The learning rate and weight decay to use, in Page's invariant form (part 5).

    With the mean loss, our lr η equals Page's per-example rate λ = η/N times N. Page's argument:
    what stays optimal is λ (= η/N) when N changes, λ/(1-ρ) when the momentum ρ changes, and λα
    (= ηα: the weight-decay shrink per step) throughout. With `hold_invariant`, the configured lr and
    weight decay are taken as tuned at (reference_batch_size, reference_momentum) and rescaled so
    those three quantities are unchanged at the batch size and momentum in use.
    """
    lr, wd, momentum = optim.lr, optim.weight_decay, optim.momentum
    if optim.hold_invariant:
        ref_n, ref_rho = float(optim.reference_batch_size), optim.reference_momentum
        scaled_lr = lr * (batch_size / ref_n) * ((1.0 - momentum) / (1.0 - ref_rho))
        wd = wd * lr / scaled_lr  # keep ηα fixed
        lr = scaled_lr
    return {
        "lr": lr,
        "weight_decay": wd,
        "momentum": momentum,
        "batch_size": batch_size,
        "lr_per_example": lr / batch_size,  # Page's λ/N: the lr of his summed-loss code
        "lr_per_example_over_1_minus_momentum": lr / batch_size / (1.0 - momentum),
        "lr_times_weight_decay": lr * wd,
    }


def page_sgd(optim: PageSGDSettings, net: nn.Module, batch_size: int, device_type: str,
             tensor_lr: bool = False) -> Built:
    """Nesterov SGD; BN biases with their own lr and weight-decay factors (Page's frozen_bn_scale: x64, /64)."""
    effective = effective_hyperparameters(optim, batch_size)
    lr, wd = effective["lr"], effective["weight_decay"]
    biases, weights = _split(net)
    lr_factor, wd_factor = optim.bias_lr_factor, optim.bias_wd_factor
    groups = [{"params": weights, "lr": lr, "weight_decay": wd, "name": "weights"},
              {"params": [b for b in biases if b.requires_grad], "lr": lr * lr_factor,
               "weight_decay": wd * wd_factor, "name": "biases"}]
    optimizer = _sgd(groups, effective["momentum"], optim.nesterov, device_type, optim.fused, tensor_lr)
    return Built(optimizer, effective)


# ------------------------------------------------------------------------------------------------
# airbench: lr and weight decay "per 1024 examples", weight decay decoupled from the lr
# ------------------------------------------------------------------------------------------------


def airbench_scale(momentum: float) -> float:
    """airbench94's `kilostep_scale = 1024 * (1 + 1 / (1 - momentum))`: its lr is per 1024 examples and
    per unit of the momentum's gain 1/(1-ρ), so it stays put when the batch size or momentum change."""
    return 1024.0 * (1.0 + 1.0 / (1.0 - momentum))


def airbench_sgd(optim: AirbenchSGDSettings, net: nn.Module, batch_size: int, device_type: str,
                 tensor_lr: bool = False) -> Built:
    """airbench94's optimizer: Nesterov SGD with

        lr (per example, summed loss) = lr_per_1024 / kilostep_scale
        weight-decay shrink per step  = weight_decay_per_1024 * batch / kilostep_scale   (lr-independent)
        BN biases                     : lr x bias_scaler, the same shrink

    On our mean loss the group lr is that per-example lr times the batch, and weight_decay is the
    shrink over the group lr, so lr x weight_decay is airbench's shrink (decoupled: it follows the
    schedule's factor, not the lr's size).
    """
    momentum = optim.momentum
    scale = airbench_scale(momentum)
    lr_example = optim.lr_per_1024 / scale
    shrink = optim.weight_decay_per_1024 * batch_size / scale
    bias_example = lr_example * optim.bias_scaler
    biases, weights = _split(net)
    groups = [
        {"params": [b for b in biases if b.requires_grad], "lr": bias_example * batch_size,
         "weight_decay": shrink / (bias_example * batch_size), "name": "biases"},
        {"params": weights, "lr": lr_example * batch_size, "weight_decay": shrink / (lr_example * batch_size),
         "name": "weights"},
    ]
    optimizer = _sgd(groups, momentum, optim.nesterov, device_type, optim.fused, tensor_lr)
    effective = {"lr": lr_example * batch_size, "weight_decay": shrink / (lr_example * batch_size),
                 "momentum": momentum, "batch_size": batch_size, "kilostep_scale": scale,
                 "lr_per_example": lr_example, "bias_lr_per_example": bias_example,
                 "weight_decay_shrink_per_step": shrink, "lr_times_weight_decay": shrink}
    return Built(optimizer, effective)


# ------------------------------------------------------------------------------------------------
# airbench94_muon: Muon for the conv filters, Nesterov SGD for biases and the head
# ------------------------------------------------------------------------------------------------

# Newton-Schulz quintic coefficients for the orthogonalization (Keller Jordan's Muon; the same in
# airbench94_muon.py and torch.optim.Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(gradient: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to a 2-D gradient (U V^T of its SVD), approximately, by Newton-Schulz.

    In bf16 on CUDA, as airbench; in fp32 on a CPU, where bf16 matrix products are slow.
    """
    x = gradient.bfloat16() if gradient.is_cuda else gradient.float()
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.T
    return x.to(gradient.dtype)


class MuonSGD(torch.optim.Optimizer):
    """One optimizer for Lightning, two rules: groups with `muon=True` take Muon steps, the others SGD.

    Muon (as airbench94_muon.py): momentum buffer m <- ρm + g, Nesterov g + ρm; each 4-D conv filter is
    viewed as a (out, in*k*k) matrix and its update is that matrix orthogonalized; the filter is
    rescaled to norm sqrt(out) before the step (`renormalize`), so its scale, which BN makes
    irrelevant, stays put. SGD groups: PyTorch's Nesterov SGD with coupled weight decay.

    fp16 loss scaling without a host sync: like PyTorch's fused optimizers, it declares
    `_step_supports_amp_scaling`, so GradScaler hands it `grad_scale` and `found_inf` (device
    tensors) instead of reading `found_inf` back to decide whether to step. The gradients are
    divided by the scale, and a step with an inf/NaN gradient leaves parameters and momentum as
    they were, both decided on the device (`torch.where`).
    """

    _step_supports_amp_scaling = True

    def __init__(self, groups: list[dict[str, Any]], momentum: float = 0.85, nesterov: bool = True,
                 ns_steps: int = 3, renormalize: bool = True) -> None:
        defaults = {"lr": 0.0, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "muon": False,
                    "ns_steps": ns_steps, "renormalize": renormalize}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler for this step (fp16)
        found_inf = getattr(self, "found_inf", None)
        finite = None if found_inf is None else found_inf == 0
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad if grad_scale is None else param.grad / grad_scale
                if not group["muon"] and group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                if finite is None:
                    buffer.mul_(momentum).add_(grad)
                else:
                    buffer.copy_(torch.where(finite, buffer * momentum + grad, buffer))
                update = grad.add(buffer, alpha=momentum) if nesterov else buffer
                if group["muon"]:
                    if group["renormalize"]:
                        factor = math.sqrt(param.size(0)) / (param.norm() + 1e-12)
                        param.mul_(factor if finite is None else torch.where(finite, factor, 1.0))
                    update = orthogonalize(update.reshape(update.size(0), -1), group["ns_steps"]).view_as(param)
                if finite is None:
                    if isinstance(lr, torch.Tensor):  # step.py's device-side lr: no host read
                        param.addcmul_(update, lr, value=-1)  # rounds as add_(alpha=-lr) does (fused)
                    else:
                        param.add_(update, alpha=-lr)
                else:
                    param.copy_(torch.where(finite, param - lr * update, param))
        return loss


def head_width_factor(net: nn.Module, reference_features: float | None) -> float:
    """How much to scale the learning rates of the SGD groups whose gradients carry the head's 1/d.

    airbench94_muon's head divides its logits by the feature count d (`head(x) / x.size(-1)`) and starts
    from unit-std weights, so every gradient that flows back through the head is proportional to 1/d:
    the head's own and the BN biases' (measured at initialization, batch 2000, by
    benchmarks/muon_width_probe.py --init-grads: RMS BN-bias gradient 5.7e-4 to 1.1e-3 at d = 32 vs
    6.8e-5 to 7.7e-5 at d = 256; the whitening bias's, 2e-4 to 3.6e-4, does not depend on d). With
    airbench's rates, tuned at d = 256, those groups step eight times as far at width 0.125 (d = 32):
    on the proxy the first steps pushed the last BN biases to -10..-20, every GELU went silent and the
    loss sat at ln 10 for four epochs. The factor d / reference keeps airbench's step size; it is
    exactly 1 at airbench's width. None: no scaling. Muon's filter steps are orthogonalized, hence
    scale-free, and need no factor.
    """
    head = [p for p in roles(net)["head"] if p.dim() == 2]  # the head's weight: (classes, features)
    if not reference_features or not head:
        return 1.0
    return head[0].size(1) / float(reference_features)


def muon_sgd(optim: MuonSettings, net: nn.Module, batch_size: int, device_type: str,
             tensor_lr: bool = False) -> Built:
    """airbench94_muon's optimizer: Muon(conv filters, lr 0.24, momentum 0.6, Nesterov) and SGD(momentum 0.85,
    Nesterov) for the whitening bias, the BN biases (lr 0.053 per example) and the head (0.67), with the
    decoupled shrink 2e-6 x batch per step; the whitening bias's lr decays to 0 over its own epochs.
    Below airbench's width the BN-bias and head lrs are scaled by `head_width_factor`."""
    by_role = roles(net)
    filters = [p for p in by_role["filters"] if p.requires_grad]
    biases = [p for p in by_role["norm_biases"] if p.requires_grad]
    whiten_bias = by_role["whiten_bias"]
    # The SGD "head" group: the head and whatever else trains that is neither a filter nor a norm bias.
    head = [p for role in ("head", "norm_scales", "other") for p in by_role[role] if p.requires_grad]
    shrink = optim.weight_decay_per_example * batch_size
    width_factor = head_width_factor(net, optim.width_reference_features)
    head_lr = optim.head_lr * width_factor
    bias_lr = optim.bias_lr * width_factor

    def sgd_group(params: list[nn.Parameter], lr_example: float, name: str) -> dict[str, Any]:
        lr = lr_example * batch_size
        return {"params": params, "lr": lr, "weight_decay": shrink / lr, "name": name}

    groups = [
        {"params": filters, "lr": optim.lr, "momentum": optim.muon_momentum, "muon": True, "name": "filters"},
        sgd_group(whiten_bias, optim.bias_lr, "whiten_bias"),
        sgd_group(biases, bias_lr, "biases"),
        sgd_group(head, head_lr, "head"),
    ]
    optimizer = MuonSGD([g for g in groups if g["params"]], momentum=optim.momentum, nesterov=optim.nesterov,
                        ns_steps=optim.ns_steps, renormalize=optim.renormalize)
    effective = {"lr": optim.lr, "muon_momentum": optim.muon_momentum, "momentum": optim.momentum,
                 "batch_size": batch_size, "whiten_bias_lr_per_example": optim.bias_lr, "bias_lr_per_example": bias_lr,
                 "head_lr_per_example": head_lr, "width_factor": width_factor,
                 "weight_decay_shrink_per_step": shrink, "ns_steps": optim.ns_steps}
    group_knots = {}
    whiten_schedule = optim.whiten_bias_schedule
    if whiten_schedule is not None:
        group_knots["whiten_bias"] = (list(whiten_schedule.epochs), list(whiten_schedule.factors))
    return Built(optimizer, effective, group_knots)


# ------------------------------------------------------------------------------------------------
# Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolated
# momentum, decoupled weight decay
# ------------------------------------------------------------------------------------------------


class LionSettings(OptimizerSettings):
    builder: Literal["lion"]
    lr: float = Field(ge=0, description="Lion's paper: 3-10x below AdamW's; here 1e-3 at batch 512")
    beta1: float = Field(ge=0, lt=1, description="Lion's paper: 0.9")
    beta2: float = Field(ge=0, lt=1, description="Lion's paper: 0.99")
    weight_decay: float = Field(ge=0, description="decoupled: the shrink per step is lr x weight_decay")

    def build(self, net: nn.Module, batch_size: int, device_type: str, tensor_lr: bool = False) -> Built:
        """Lion on every trained parameter, one group (its sign update needs no per-role lr scaling)."""
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = Lion([{"params": params, "lr": self.lr, "name": "weights"}], betas=(self.beta1, self.beta2),
                         weight_decay=self.weight_decay)
        effective = {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "weight_decay": self.weight_decay,
                     "batch_size": batch_size, "lr_times_weight_decay": self.lr * self.weight_decay}
        return Built(optimizer, effective)


class Lion(torch.optim.Optimizer):
    """update = sign(beta1 m + (1 - beta1) g); w <- w - lr (update + weight_decay w); m <- beta2 m + (1 - beta2) g.

    Every update element has size lr whatever the gradient's scale, so the lr is not in Page's
    per-example units and the mean-loss conversion does not apply (sign(g) = sign(N g)). Written with
    tensor ops only: the lr may be a 0-d device tensor (step.py), and nothing is read back to the host.
    """

    def __init__(self, groups: list[dict[str, Any]], betas: tuple[float, float], weight_decay: float) -> None:
        super().__init__(groups, {"lr": 0.0, "betas": betas, "weight_decay": weight_decay})
        for group in self.param_groups:  # created now: a captured step (step.py) must not create state
            for param in group["params"]:
                self.state[param]["momentum_buffer"] = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                momentum = self.state[param]["momentum_buffer"]
                update = momentum.lerp(param.grad, 1 - beta1).sign_()
                if decay:
                    update.add_(param, alpha=decay)
                if isinstance(lr, torch.Tensor):
                    param.addcmul_(update, lr, value=-1)
                else:
                    param.add_(update, alpha=-lr)
                momentum.lerp_(param.grad, 1 - beta2)
        return loss
