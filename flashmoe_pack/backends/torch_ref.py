"""The plain torch expert kernel: dequantize, then matmul. Reference for every fast kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pack.reader import ExpertWeights


class TorchKernel:
    name = "torch"

    def expert_mlp(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype (dequantized weights in x's dtype)."""
        gate, up, down = w.dense(x.dtype)  # [I, H], [I, H], [H, I]
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
