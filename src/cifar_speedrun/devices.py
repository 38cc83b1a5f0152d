"""Which device a run uses, how it is named in results and logs, and the precision that pays on it."""

from __future__ import annotations

import platform

import torch


def on_cuda(accelerator: str) -> bool:
    """The run is meant for CUDA: asked for (gpu, cuda), or auto on a machine that has it."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def auto_mixed_precision(accelerator: str, on_cpu: str = "bf16-mixed") -> str:
    """fp16 autocast (with a GradScaler) on CUDA, where tensor cores make it pay; `on_cpu` on a CPU."""
    return "16-mixed" if on_cuda(accelerator) else str(on_cpu)


def device_name(device: torch.device | str) -> str:
    """'NVIDIA H200' on CUDA; 'cpu (x86_64, 2 threads)' on a CPU: what results.json, eval and [run] print."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type
