"""Ghost BN's training step before and after moving the eval-statistics work out of it.

Before: after every training forward, each GhostBatchNorm recombined its 16 per-split running
statistics into `running_mean` / `running_var` (`EagerGhostBatchNorm` below keeps that behaviour).
After: `model.GhostBatchNorm` combines them once, at the first eval forward. Both sides train the
same DavidNet (ghost_bn on, same width, weights and batches) with SGD; repetitions alternate
a, b, b, a, ... Prints the median step time of each, the ratio after/before, and the number of tensor
operations per step (torch.profiler): on a GPU each is a kernel launch, and launch overhead is
what a 10-second run is made of.

    python benchmarks/ghost_bn_step.py [--width 0.25] [--batch 512] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from cifar_speedrun.recipe.models.layers import GhostBatchNorm


class EagerGhostBatchNorm(GhostBatchNorm):
    """The previous GhostBatchNorm: eval statistics recombined after every training forward."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        out = super().normalize(x)
        if self.training:
            self.combine_split_statistics()
        return out


def with_eager_ghost_bn(net: nn.Module) -> nn.Module:
    """Swap every GhostBatchNorm for an EagerGhostBatchNorm holding the same parameters and buffers."""
    for name, child in list(net.named_children()):
        if isinstance(child, GhostBatchNorm):
            eager = EagerGhostBatchNorm(child.num_features, splits=child.splits, eps=child.eps,
                                        momentum=child.momentum, scale_init=1.0,
                                        freeze_scale=not child.weight.requires_grad, float32=child.float32)
            eager.load_state_dict(child.state_dict())
            eager.weight.requires_grad_(child.weight.requires_grad)
            setattr(net, name, eager)
        else:
            with_eager_ghost_bn(child)
    return net


def train_steps(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                nesterov=True, foreach=True)
    net.train()
    times = []
    for images, labels in batches:
        start = time.perf_counter()
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step pays one-off allocation costs


def ops_per_step(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    from torch.profiler import ProfilerActivity, profile

    net.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.cross_entropy(net(images), labels).backward()
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::")
               and not event.key.startswith(("aten::empty", "aten::view", "aten::as_strided")))


def main() -> None:
    _common.keep_large_allocations_off_mmap()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = _common.compose_config(["+trick=ghost_bn", f"model.width={args.width}"])
    torch.manual_seed(0)
    after_net = instantiate(cfg.model)
    before_net = with_eager_ghost_bn(instantiate(cfg.model))
    before_net.load_state_dict(after_net.state_dict())
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=generator),
                torch.randint(0, 10, (args.batch,), generator=generator)) for _ in range(args.steps + 1)]
    before_ops = ops_per_step(before_net, *batches[0])
    after_ops = ops_per_step(after_net, *batches[0])
    before, after = [], []
    for repeat in range(args.repeats):
        # Alternate which side goes first, so drift of the machine and allocator warm-up hit both alike.
        if repeat % 2 == 0:
            before += train_steps(before_net, batches)
            after += train_steps(after_net, batches)
        else:
            after += train_steps(after_net, batches)
            before += train_steps(before_net, batches)
        print(f"repeat {repeat + 1}: before {statistics.median(before) * 1e3:.1f} ms/step, "
              f"after {statistics.median(after) * 1e3:.1f} ms/step", flush=True)
    b, a = statistics.median(before), statistics.median(after)
    print(f"ghost_bn_step: width {args.width}, batch {args.batch}, cpu x{torch.get_num_threads()}: "
          f"before {b * 1e3:.1f} ms/step ({before_ops} ops fwd+bwd), after {a * 1e3:.1f} ms/step "
          f"({after_ops} ops), {before_ops - after_ops} fewer ops a step, ratio after/before = {a / b:.3f}")


if __name__ == "__main__":
    main()
