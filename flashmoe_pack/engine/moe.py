"""Routed experts streamed from the expert store (the `experts` object the models call).

Expert-major: for a batch of T tokens, each distinct expert chosen in the layer is fetched once
and applied to all of its tokens together, so a prompt reads each needed expert once per layer.
Overlapped: reads for the layer start as soon as routing is known, and each expert is computed
as soon as its read completes (cache hits first), while the remaining reads continue.
Deterministic: outputs are summed in expert-id order whatever order the reads complete in, so the
result does not depend on I/O timing (a finished expert's output waits, [n_e, H], until every
smaller id has been added).
"""

from __future__ import annotations

import contextlib

import torch

from .store import ExpertStore


class StreamedExperts:
    def __init__(self, store: ExpertStore, kernel, profiler=None, overlap: bool = True):
        self.store, self.kernel, self.profiler = store, kernel, profiler
        self.overlap = overlap  # False: wait for every read of the layer, then compute (benchmarks)

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, K], weights [T, K] -> weighted sum of the chosen experts' outputs [T, H]."""
        prof = self.profiler
        section = prof.section if prof is not None else _no_section
        uniq = torch.unique(ids).tolist()  # the one host sync per layer (sorted)
        out = torch.zeros_like(x)
        ready: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # expert -> (token rows, weighted output)
        nxt = 0  # uniq[:nxt] are summed into out
        stream = self.store.stream(layer, uniq, hold=not self.overlap)
        batch: list = []  # overlap off: the whole layer, computed once the last read is in
        while True:
            with section("expert_io", layer):  # waits only when no read has completed yet
                item = next(stream, None)
            if item is None:
                break
            batch.append(item)
            if not self.overlap and len(batch) < len(uniq):
                continue
            with section("expert_compute", layer):
                for e, w in batch:
                    tok, slot = torch.nonzero(ids == e, as_tuple=True)  # tokens routed to e
                    y = self.kernel.expert_mlp(x[tok], w)  # [n, H]
                    ready[e] = (tok, y * weights[tok, slot, None].to(y.dtype))
                batch = []
                while nxt < len(uniq) and uniq[nxt] in ready:
                    rows, contrib = ready.pop(uniq[nxt])
                    out.index_add_(0, rows, contrib)
                    nxt += 1
        return out


_NULL = contextlib.nullcontext()


def _no_section(name: str, layer: int):
    return _NULL
