"""Routed experts streamed from the expert store (the `experts` object the models call).

Expert-major: for a batch of T tokens, each distinct expert chosen in the layer is fetched once
and applied to all of its tokens together, so a prompt reads each needed expert once per layer.
"""

from __future__ import annotations

import torch

from .store import ExpertStore


class StreamedExperts:
    def __init__(self, store: ExpertStore, kernel, profiler=None):
        self.store, self.kernel, self.profiler = store, kernel, profiler

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, K], weights [T, K] -> weighted sum of the chosen experts' outputs [T, H]."""
        prof = self.profiler
        uniq = torch.unique(ids).tolist()  # the one host sync per layer
        if prof is not None:
            with prof.section("expert_io", layer):
                experts = self.store.get(layer, uniq)
        else:
            experts = self.store.get(layer, uniq)
        out = torch.zeros_like(x)
        ctx = prof.section("expert_compute", layer) if prof is not None else _null()
        with ctx:
            for e in uniq:
                tok, slot = torch.nonzero(ids == e, as_tuple=True)  # tokens routed to e
                y = self.kernel.expert_mlp(x[tok], experts[e])  # [n, H]
                out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
