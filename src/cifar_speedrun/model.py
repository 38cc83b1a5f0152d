"""DavidNet (Page's ResNet-9, "How to train your ResNet" part 4), built from config.

    prep    conv 3->64
    layer1  conv 64->128, max-pool 2, residual(conv 128->128, conv 128->128)
    layer2  conv 128->256, max-pool 2
    layer3  conv 256->512, max-pool 2, residual(conv 512->512, conv 512->512)
    head    global max-pool, linear 512->10 (no bias), logits * 0.125

Every conv is 3x3, stride 1, pad 1, no bias, followed by a norm and an activation. The knobs that
Page's tricks turn are arguments: `activation` (relu / celu), `norm` (batch / ghost, scale frozen or
learned, computed in fp32), `pool_before_norm` (part 8: conv -> pool -> norm -> act, so the norm
and activation run on a quarter of the pixels), and `whitening` (a frozen PCA-whitening conv on
3x3 patches in front of the prep layer).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_speedrun.errors import UserError

# Page part 4, final DavidNet: channel widths of prep, layer1, layer2, layer3.
BASE_CHANNELS = (64, 128, 256, 512)
# Page part 4: "the final ... multiplied by 0.125" (cifar10-fast: Mul(weight=0.125) before the loss).
LOGIT_SCALE = 0.125


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with a settable initial/frozen scale and an optional fp32 computation.

    `freeze_scale` keeps the scale (weight) at `scale_init` and out of the optimizer: Page part 8
    ("frozen batch norm scales"). `float32` runs the normalization in fp32 even inside autocast:
    Page part 3 found fp16 batch norm falls onto a slow cuDNN path.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, scale_init: float = 1.0,
                 freeze_scale: bool = False, float32: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        nn.init.constant_(self.weight, scale_init)
        self.weight.requires_grad_(not freeze_scale)
        self.float32 = float32

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32 and x.dtype != torch.float32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.normalize(x.float()).to(x.dtype)
        return self.normalize(x)


class GhostBatchNorm(BatchNorm):
    """Batch norm whose training statistics come from `splits` sub-batches (Hoffer et al. 2017).

    Page part 8 uses 16 splits of a 512 batch (32 images each): noisier statistics regularize.
    Vectorized with one `F.batch_norm` call: the (N, C, H, W) batch viewed as (N/s, s*C, H, W) puts
    image i of every group of s consecutive images into its own block of C channels, so split k is
    the images k, k+s, k+2s, ... (the batch order is a random permutation, so this is as good as
    contiguous chunks, and the view costs no copy; cifar10-fast uses the same view).

    Training keeps running statistics per split (`split_running_mean/var`, C*s each) and does
    nothing else: no eval-statistics work on a training step. Evaluation normalizes with their
    average over the splits, the mean of the split means and the mean of the split variances, as
    cifar10-fast's GhostBatchNorm collates them when it goes to eval. That is not the whole batch's
    variance (the variance of the split means is left out): it is the expected variance of one ghost
    batch, the scale each image was normalized with in training. The average is linear in the split
    statistics, so averaging weights and buffers (EMA) before or after combining gives the same.

    The average is taken in the eval forward itself (two reductions over s*C numbers per layer
    and eval batch, written to `running_mean/var` so they show what evaluation used), not cached
    across forwards: the EMA callback copies averaged buffers into the model without the module
    knowing, and a cached combination would then evaluate stale statistics.
    """

    def __init__(self, num_features: int, splits: int = 16, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.splits = int(splits)
        self.register_buffer("split_running_mean", torch.zeros(num_features * self.splits))
        self.register_buffer("split_running_var", torch.ones(num_features * self.splits))

    @torch.no_grad()
    def combine_split_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval statistics: the mean over splits of the per-split running means and variances."""
        c = self.num_features
        self.running_mean.copy_(self.split_running_mean.view(self.splits, c).mean(0))
        self.running_var.copy_(self.split_running_var.view(self.splits, c).mean(0))
        return self.running_mean, self.running_var

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.training:
            if n % self.splits:
                raise UserError(
                    f"ghost batch norm with {self.splits} splits got a batch of {n}: use a batch size "
                    f"divisible by {self.splits} (model.norm.ghost_splits)"
                )
            grouped = x.reshape(n // self.splits, c * self.splits, h, w)
            out = F.batch_norm(
                grouped, self.split_running_mean, self.split_running_var,
                self.weight.repeat(self.splits), self.bias.repeat(self.splits),
                True, self.momentum, self.eps,
            )
            return out.view(n, c, h, w)
        mean, var = self.combine_split_statistics()
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


class PatchWhitening(nn.Module):
    """A frozen 3x3 conv whose filters PCA-whiten the training set's 3x3 patches (Page part 8).

    `fit_to_data` takes the 3x3x3 patches of `max_images` standardized training images (Page: 10,000),
    forms their second-moment matrix Σ (27x27; Page does not subtract the mean, the images are
    already standardized), and sets the 27 filters to Σ's eigenvectors scaled by
    1/sqrt(eigenvalue + eps) (Page: eps = 1e-2). The filtered patches then have covariance
    Λ/(Λ + eps) ≈ I: decorrelated, unit variance. Computed once, on the device, before training.

    Which images: Page takes the first 10,000 of torchvision's training set, whose order is already
    shuffled across classes. A folder of images is stored class by class, so "the first 10,000"
    would be two classes (5,000 airplanes, 5,000 automobiles). The equivalent of Page's sample is a
    seeded uniform sample of the whole (possibly subset) training set: `sample_indices`. The seed
    is the run's, drawn on the CPU, so every DDP rank (each holding the full training set) fits the
    same filters.
    """

    def __init__(self, kernel_size: int = 3, eps: float = 1e-2, padding: int = 1, max_images: int = 10_000,
                 centered: bool = False, seed: int = 0, both_signs: bool = False, bias: bool = False,
                 bias_epochs: int | None = None) -> None:
        super().__init__()
        self.kernel_size, self.eps, self.padding = kernel_size, eps, padding
        self.max_images, self.centered, self.seed = max_images, centered, int(seed)
        self.both_signs, self.bias_epochs = both_signs, bias_epochs
        channels = 3 * kernel_size * kernel_size
        self.out_channels = 2 * channels if both_signs else channels
        self.register_buffer("weight", torch.eye(channels).repeat(2 if both_signs else 1, 1)
                             .view(self.out_channels, 3, kernel_size, kernel_size))
        # airbench: a learned bias after the frozen filters, trained for the first `bias_epochs` epochs only.
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    @staticmethod
    def patches(images: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """All kernel_size x kernel_size patches, flattened in conv-weight order: (num_patches, 3*k*k)."""
        cols = F.unfold(images.float(), kernel_size)  # (N, 3*k*k, L), channel-major like conv weights
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    @staticmethod
    def sample_indices(num_images: int, max_images: int, seed: int) -> torch.Tensor:
        """`max_images` indices drawn uniformly without replacement (all of them if fewer), seeded, sorted."""
        if num_images <= max_images:
            return torch.arange(num_images)
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(num_images, generator=generator)[:max_images].sort().values

    @torch.no_grad()
    def fit_to_data(self, images: torch.Tensor) -> None:
        index = self.sample_indices(len(images), self.max_images, self.seed).to(images.device)
        patches = self.patches(images.index_select(0, index), self.kernel_size).double()
        if self.centered:
            patches = patches - patches.mean(dim=0, keepdim=True)
        moment = patches.T @ patches / (len(patches) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(moment)
        filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)[:, None]
        if self.both_signs:  # airbench: each filter and its negation, so a ReLU-like activation keeps both halves
            filters = torch.cat((filters, -filters))
        self.weight.copy_(filters.view_as(self.weight).to(self.weight.dtype))

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch: the bias trains for its first `bias_epochs` only."""
        if self.bias is not None and self.bias_epochs is not None:
            self.bias.requires_grad_(epoch < self.bias_epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, padding=self.padding)


def _activation(name: str, celu_alpha: float) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "celu":
        return nn.CELU(alpha=celu_alpha)
    if name == "gelu":
        return nn.GELU()
    raise UserError(f"model.activation={name!r} is not known; use relu, celu or gelu")


def norm_factory(norm: dict[str, Any] | None) -> Any:
    """`make_norm(channels)` for the configured norm: batch norm or ghost batch norm, with its settings."""
    norm = dict(norm or {})
    kind = norm.pop("kind", "batch")
    splits = norm.pop("ghost_splits", 16)
    norm_kwargs = {
        "eps": float(norm.pop("eps", 1e-5)),
        "momentum": float(norm.pop("momentum", 0.1)),
        "scale_init": float(norm.pop("scale_init", 1.0)),
        "freeze_scale": bool(norm.pop("freeze_scale", False)),
        "float32": bool(norm.pop("float32", False)),
    }
    if norm:
        raise UserError(f"model.norm has unknown keys {sorted(norm)}; known: kind, ghost_splits, eps, "
                        "momentum, scale_init, freeze_scale, float32")
    if kind == "batch":
        return lambda c: BatchNorm(c, **norm_kwargs)
    if kind == "ghost":
        return lambda c: GhostBatchNorm(c, splits=splits, **norm_kwargs)
    raise UserError(f"model.norm.kind={kind!r} is not known; use batch or ghost")


def dirac_init_(net: nn.Module) -> nn.Module:
    """Every conv starts as the identity on its first input channels (airbench: "an implicit residual").

    Filter i of a conv with at least as many outputs as inputs passes input channel i through
    unchanged at its centre tap (torch.nn.init.dirac_ on the first in_channels filters); the other
    filters keep their random init.
    """
    for conv in net.modules():
        if isinstance(conv, nn.Conv2d):
            with torch.no_grad():
                nn.init.dirac_(conv.weight[: conv.in_channels])
    return net


def _whitening_layer(settings: dict[str, Any], defaults: dict[str, Any]) -> PatchWhitening:
    merged = {**defaults, **{k: v for k, v in settings.items() if k != "enabled"}}
    return PatchWhitening(int(merged["kernel_size"]), float(merged["eps"]), int(merged["padding"]),
                          int(merged["max_images"]), bool(merged.get("centered", False)), int(merged.get("seed", 0)),
                          bool(merged.get("both_signs", False)), bool(merged.get("bias", False)),
                          merged.get("bias_epochs"))


class ConvBlock(nn.Sequential):
    """conv -> norm -> act (-> pool), or conv -> pool -> norm -> act when `pool_before_norm`."""

    def __init__(self, c_in: int, c_out: int, pool: bool, make_norm: Any, make_act: Any,
                 pool_before_norm: bool, kernel_size: int = 3) -> None:
        conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
        layers: list[tuple[str, nn.Module]] = [("conv", conv)]
        if pool and pool_before_norm:
            layers.append(("pool", nn.MaxPool2d(2)))
        layers += [("norm", make_norm(c_out)), ("act", make_act())]
        if pool and not pool_before_norm:
            layers.append(("pool", nn.MaxPool2d(2)))
        super().__init__(OrderedDict(layers))


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def scaled_channels(width: float) -> tuple[int, ...]:
    if not width or width <= 0:
        raise UserError(f"model.width={width} must be > 0 (1.0 is DavidNet; 0.25 for CPU runs)")
    return tuple(max(1, round(c * width)) for c in BASE_CHANNELS)


class DavidNet(nn.Sequential):
    """Page's ResNet-9. Arguments mirror conf/model/davidnet.yaml."""

    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 10,
        activation: str = "relu",
        celu_alpha: float = 0.075,
        norm: dict[str, Any] | None = None,
        pool_before_norm: bool = False,
        whitening: dict[str, Any] | None = None,
        logit_scale: float = LOGIT_SCALE,
        dirac_init: bool = False,
    ) -> None:
        make_norm = norm_factory(norm)
        _activation(activation, celu_alpha)  # validate early

        def make_act() -> nn.Module:
            return _activation(activation, celu_alpha)

        c_prep, c1, c2, c3 = scaled_channels(width)

        def block(c_in: int, c_out: int, pool: bool = False, kernel_size: int = 3) -> ConvBlock:
            return ConvBlock(c_in, c_out, pool, make_norm, make_act, pool_before_norm, kernel_size)

        whitening = dict(whitening or {})
        if whitening.get("enabled", False):
            white = _whitening_layer(whitening, {"kernel_size": 3, "eps": 1e-2, "padding": 1, "max_images": 10_000})
            # Page part 8: the whitened 27 channels feed a learned 1x1 conv to the prep width.
            prep: nn.Module = nn.Sequential(OrderedDict(whiten=white, block=block(white.out_channels, c_prep,
                                                                            kernel_size=1)))
        else:
            prep = block(3, c_prep)
        super().__init__(OrderedDict(
            prep=prep,
            layer1=nn.Sequential(OrderedDict(block=block(c_prep, c1, pool=True),
                                      residual=Residual(nn.Sequential(block(c1, c1), block(c1, c1))))),
            layer2=block(c1, c2, pool=True),
            layer3=nn.Sequential(OrderedDict(block=block(c2, c3, pool=True),
                                      residual=Residual(nn.Sequential(block(c3, c3), block(c3, c3))))),
            pool=nn.AdaptiveMaxPool2d(1),
            flatten=nn.Flatten(),
            linear=nn.Linear(c3, num_classes, bias=False),
            scale=Scale(logit_scale),
        ))
        if dirac_init:
            dirac_init_(self)


# airbench94 (cifar10-airbench airbench94.py, hyp['net']): block widths at base width 64.
AIRBENCH_WIDTHS = (64, 256, 256)
# airbench94's BatchNorm: eps 1e-12, momentum 0.6 in its convention (PyTorch's 1 - 0.6), scale frozen.
AIRBENCH_NORM = {"eps": 1e-12, "momentum": 0.4, "freeze_scale": True}
# airbench94: logits multiplied by 1/9 (hyp['net']['scaling_factor']).
AIRBENCH_LOGIT_SCALE = 1 / 9


class AirbenchNet(nn.Sequential):
    """Keller Jordan's airbench94 network (cifar10-airbench; arXiv 2404.00498), built from config.

        whiten  2x2 patch-whitening conv, 24 channels (both signs of the 12 filters), a bias, GELU
        block1  conv 24->64, max-pool 2, BN, GELU, conv 64->64, BN, GELU
        block2  conv 64->256, max-pool 2, BN, GELU, conv 256->256, BN, GELU
        block3  conv 256->256, max-pool 2, BN, GELU, conv 256->256, BN, GELU
        head    max-pool over the remaining 3x3, linear 256->10 without bias, logits x 1/9

    No residual connections: the convs start as identities on their first input channels instead
    (`dirac_init`). BN scales are frozen at 1 and its statistics use momentum 0.6 in airbench's
    convention (PyTorch's 0.4), eps 1e-12: all in conf/model/airbench94.yaml. `width` scales the
    block widths; `norm` and `activation` take the same settings as DavidNet's, so Page's tricks
    (ghost_bn, celu, ...) apply to this net too.
    """

    def __init__(
        self,
        width: float = 1.0,
        widths: tuple[int, ...] | list[int] = AIRBENCH_WIDTHS,
        num_classes: int = 10,
        activation: str = "gelu",
        celu_alpha: float = 0.075,
        norm: dict[str, Any] | None = None,
        whitening: dict[str, Any] | None = None,
        logit_scale: float | None = AIRBENCH_LOGIT_SCALE,
        dirac_init: bool = True,
        unit_head_init: bool = False,
    ) -> None:
        if not width or width <= 0:
            raise UserError(f"model.width={width} must be > 0 (1.0 is airbench94; 0.125 for CPU runs)")
        make_norm = norm_factory({**AIRBENCH_NORM, **(norm or {})})
        _activation(activation, celu_alpha)

        def make_act() -> nn.Module:
            return _activation(activation, celu_alpha)

        whitening = dict(whitening or {})
        if whitening.get("enabled", True):
            stem: nn.Module = _whitening_layer(whitening, {"kernel_size": 2, "eps": 5e-4, "padding": 0,
                                                          "max_images": 5000, "both_signs": True, "bias": True,
                                                          "bias_epochs": 3})
            stem_channels = stem.out_channels
        else:  # a learned conv of the same shape in its place
            kernel = int(whitening.get("kernel_size", 2))
            stem_channels = 2 * 3 * kernel * kernel
            stem = nn.Conv2d(3, stem_channels, kernel, padding=int(whitening.get("padding", 0)), bias=True)
        channels = [max(1, round(c * width)) for c in widths]

        def group(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(OrderedDict(
                conv1=nn.Conv2d(c_in, c_out, 3, padding="same", bias=False), pool=nn.MaxPool2d(2),
                norm1=make_norm(c_out), act1=make_act(),
                conv2=nn.Conv2d(c_out, c_out, 3, padding="same", bias=False), norm2=make_norm(c_out),
                act2=make_act(),
            ))

        blocks = OrderedDict(whiten=stem, whiten_act=make_act())
        previous = stem_channels
        for index, c in enumerate(channels, start=1):
            blocks[f"block{index}"] = group(previous, c)
            previous = c
        head = nn.Linear(previous, num_classes, bias=False)
        if unit_head_init:  # airbench94_muon: unit-std head weights, logits divided by the feature count
            with torch.no_grad():
                head.weight.mul_(1 / head.weight.std())
        # null: logits divided by the feature count (airbench94_muon's `head(x) / x.size(-1)`).
        scale = 1.0 / previous if logit_scale is None else float(logit_scale)
        blocks.update(pool=nn.AdaptiveMaxPool2d(1), flatten=nn.Flatten(), linear=head, scale=Scale(scale))
        super().__init__(blocks)
        if dirac_init:
            dirac_init_(self)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# The model families a file may build (model.pt, a checkpoint's stored config): the `_target_` a run
# records -> the class. Files are built only through this table, never through an import path, so a
# file that names anything else (`cifar_speedrun.model.torch.save`, `os.system`) builds nothing.
MODEL_FAMILIES: dict[str, type[nn.Module]] = {
    "cifar_speedrun.model.DavidNet": DavidNet,
    "cifar_speedrun.model.AirbenchNet": AirbenchNet,
}
