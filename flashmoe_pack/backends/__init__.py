"""Expert-compute kernels behind one small interface.

A kernel is an object with
    expert_mlp(x: Tensor[T, H], w: ExpertWeights) -> Tensor[T, H]
computing down(silu(gate x) * up x) for one expert. `torch_ref` is the plain torch twin every
fast kernel (CPU C, CUDA Triton, Metal) is tested against.
"""

from __future__ import annotations

import torch

from .torch_ref import TorchKernel


def get_kernel(device: str | torch.device):
    """The best available expert kernel for `device`."""
    dev = torch.device(device)
    if dev.type == "mps":
        from .mps import MetalKernel

        return MetalKernel()
    if dev.type == "cuda":
        from .cuda import CudaKernel

        return CudaKernel()
    if dev.type == "cpu":
        from .cpu import select_kernel

        kernel, reason = select_kernel()
        if kernel is not None:
            return kernel
        fallback = TorchKernel()
        fallback.fallback_reason = reason  # why the C kernels are not used (cpu.py logs it once)
        return fallback
    return TorchKernel()


__all__ = ["get_kernel", "TorchKernel"]
