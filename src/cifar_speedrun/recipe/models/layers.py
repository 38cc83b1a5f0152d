"""The layers the model families share: batch norm (ghost, frozen scale, fp32), patch whitening, blocks.

Every setting comes from a typed section (models/base.py: NormSettings, WhiteningSettings), whose
defaults are the yaml's (conf/model/<family>.yaml): nothing here restates a default.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifar_speedrun.errors import UserError


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with a settable initial/frozen scale and an optional fp32 computation.

    `freeze_scale` keeps the scale (weight) at `scale_init` and out of the optimizer: Page part 8
    ("frozen batch norm scales"). `float32` keeps the normalization in fp32 under half precision:
    Page part 3 found batch norm with fp16 parameters falls onto a slow cuDNN path. Under autocast the
    parameters and statistics are fp32 already, and torch's batch norm takes half inputs with fp32
    parameters as they are (mixed precision: statistics, normalization and affine computed in fp32,
    the output in the input's dtype), so only a net whose own parameters are half is cast: for the
    others a cast to fp32 and back would be two more passes over every activation, forward and
    backward, for the same arithmetic. airbench94 runs its batch norm the same way (fp32 modules in a
    half net).
    """

    def __init__(self, num_features: int, *, eps: float, momentum: float, scale_init: float,
                 freeze_scale: bool, float32: bool) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        nn.init.constant_(self.weight, scale_init)
        self.weight.requires_grad_(not freeze_scale)
        self.float32 = float32

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32 and x.dtype != torch.float32 and self.weight.dtype != torch.float32:
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

    def __init__(self, num_features: int, *, splits: int, eps: float, momentum: float, scale_init: float,
                 freeze_scale: bool, float32: bool) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, scale_init=scale_init,
                         freeze_scale=freeze_scale, float32=float32)
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
    """A frozen conv whose filters PCA-whiten the training set's patches (Page part 8; airbench's stem).

    `fit_to_data` takes the k x k x 3 patches of `max_images` standardized training images (Page:
    10,000 of 3x3), forms their second-moment matrix Σ (27x27 for 3x3; Page does not subtract the
    mean, the images are already standardized), and sets the filters to Σ's eigenvectors scaled by
    1/sqrt(eigenvalue + eps) (Page: eps = 1e-2). The filtered patches then have covariance
    Λ/(Λ + eps) ≈ I: decorrelated, unit variance. Computed once, on the device, before training.

    Which images: Page takes the first 10,000 of torchvision's training set, whose order is already
    shuffled across classes. A folder of images is stored class by class, so "the first 10,000"
    would be two classes (5,000 airplanes, 5,000 automobiles). The equivalent of Page's sample is a
    seeded uniform sample of the whole (possibly subset) training set: `sample_indices`. The seed
    is the run's, drawn on the CPU, so every DDP rank (each holding the full training set) fits the
    same filters.
    """

    def __init__(self, *, kernel_size: int, eps: float, padding: int, max_images: int, centered: bool, seed: int,
                 both_signs: bool, bias: bool, bias_epochs: int | None) -> None:
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


def activation(name: str, celu_alpha: float) -> nn.Module:
    """model.activation: relu, celu (Page part 8, alpha = model.celu_alpha) or gelu (airbench)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "celu":
        return nn.CELU(alpha=celu_alpha)
    return nn.GELU()


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


class ConvBlock(nn.Sequential):
    """conv -> norm -> act (-> pool), or conv -> pool -> norm -> act when `pool_before_norm`."""

    def __init__(self, c_in: int, c_out: int, pool: bool, make_norm: Callable[[int], nn.Module],
                 make_act: Callable[[], nn.Module], pool_before_norm: bool, kernel_size: int = 3) -> None:
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
    """Logits times a constant (Page: 0.125; airbench: 1/9)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
