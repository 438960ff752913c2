"""The `--device cuda` expert path: Triton kernels over experts held in the VRAM cache.

`CudaExperts` is the `experts` object the model calls on a CUDA device. Per layer the router's
ids reach the host once (one sync); the distinct experts are made resident in the VRAM cache
(engine/gpu_cache.py: misses from the host-RAM tier or the SSD, copied through pinned buffers on a
side stream), and one
launch pair computes every routed expert of every token (triton_kernels: GEMV kernels for
decode, grouped GEMM for prefill). When a layer needs more distinct experts than the cache has
slots, it runs in chunks of at most that many, each chunk's other assignments weighted 0.
When every expert of the model is in VRAM (a preloaded, fully resident model), a decode step maps
the router's ids to slots on the device through the cache's slot map and launches the decode
kernels over a table of every slot: no host sync at all in the expert path.
Unquantized (bits 16) packs, and quantized shapes the kernels do not handle, run `TorchKernel`
per expert on the slot views, like engine.moe.StreamedExperts.

`CudaKernel` is the single-expert kernel (backends.get_kernel) over any ExpertWeights.
Everything here also runs on CPU tensors with TRITON_INTERPRET=1, which is how CI tests it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..pack.reader import ExpertWeights
from ..quant import QTensor
from . import triton_kernels as tk
from .torch_ref import TorchKernel


def kernels_apply(w: ExpertWeights) -> bool:
    return tk.HAVE_TRITON and all(isinstance(p, QTensor) and tk.supported(p) for p in (w.gate, w.up, w.down))


class CudaKernel:
    """expert_mlp(x [T, H], w) -> [T, H] through the Triton kernels; TorchKernel otherwise."""

    name = "cuda"

    def __init__(self):
        self.fallback = TorchKernel()

    def expert_mlp(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        if not kernels_apply(w) or w.gate.weight.device != x.device:
            return self.fallback.expert_mlp(x, w)
        table = tk.table_from_experts([w], w.gate.shape[1], w.gate.shape[0])
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        return tk.moe_forward(x.contiguous(), table, [[0]] * x.shape[0], ones)


class CudaExperts:
    """Routed experts through a GpuExpertCache and the Triton kernels (see module docstring)."""

    def __init__(self, cache, profiler=None):
        self.cache, self.profiler = cache, profiler
        ix = cache.index
        self.quantized = ix.bits in tk.BITS and tk.HAVE_TRITON
        if self.quantized:
            sdt = ix.layout.component("gate.scales").dtype
            probe = QTensor(
                torch.empty(1, 1, dtype=torch.int32),
                torch.empty(1, 1, dtype=_DT[sdt]),
                torch.empty(1, 1, dtype=_DT[sdt]),
                ix.bits,
                ix.group_size,
            )
            self.quantized = tk.supported(probe)
        self.fallback = TorchKernel()
        # decode steps with every expert resident skip the host sync (FLASHMOE_CUDA_DEVICE_MAP=0: off, for A/B)
        self.device_map = os.environ.get("FLASHMOE_CUDA_DEVICE_MAP", "1") != "0"

    def sync_free(self) -> bool:
        """True when a decode step needs no host value here: every expert in VRAM, quantized kernels."""
        return self.device_map and self.quantized and self.cache.resident_map() is not None

    def _section(self, name: str, layer: int):
        return self.profiler.section(name, layer) if self.profiler is not None else contextlib.nullcontext()

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, K], weights [T, K] -> weighted sum of the chosen experts' outputs [T, H]."""
        if self.device_map and self.quantized and x.shape[0] <= tk.DECODE_MAX_T:
            res = self.cache.resident_map()
            if res is not None:  # every expert in VRAM: router ids -> slots on the device, no host sync
                smap, table = res
                with self._section("expert_compute", layer):
                    self.cache.vram.hits += ids.numel()  # counted per assignment on this path
                    # the kernels map ids to slots through the layer's row of the slot map, and read the
                    # router weights in their dtype as float32 (no lookup or cast launch)
                    return tk.moe_decode(x.contiguous(), table, ids.reshape(-1), weights.reshape(-1), ids.shape[1],
                                         smap=smap[self.cache.row(layer)])
        rows = ids.tolist()  # the one host sync per layer  [T][K]
        uniq = sorted({e for r in rows for e in r})
        cap = self.cache.capacity
        chunks = [uniq[i : i + cap] for i in range(0, len(uniq), cap)]
        out = None
        for chunk in chunks:
            with self._section("expert_io", layer):
                slots = self.cache.slots(layer, chunk)
            with self._section("expert_compute", layer):
                y = self._compute(layer, x, rows, weights, chunk, slots, len(chunks) > 1)
            out = y if out is None else out + y
        return out

    def _compute(self, layer, x, rows, weights, chunk, slots, partial) -> torch.Tensor:
        if not self.quantized:
            return self._torch(x, rows, weights, chunk, slots)
        local = {e: i for i, e in enumerate(chunk)}
        if partial:  # assignments of other chunks: any row, weight 0
            keep = torch.tensor([[e in local for e in r] for r in rows], device=x.device)
            weights = weights * keep.to(weights.dtype)
        lids = [[local.get(e, 0) for e in r] for r in rows]
        table = self.cache.table(slots)
        return tk.moe_forward(x.contiguous(), table, lids, weights.float())

    def _torch(self, x, rows, weights, chunk, slots) -> torch.Tensor:
        experts = {e: self.cache.view(s) for e, s in zip(chunk, slots, strict=True)}
        ids = torch.tensor(rows, device=x.device)
        out = torch.zeros_like(x)
        for e in chunk:
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            y = self.fallback.expert_mlp(x[tok], experts[e])  # [n, H]
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out


_DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cuda_experts(index, budget="auto", io="os", threads=8, verify_reads=True, device="cuda", policy="lfu",
                 host_budget="auto"):
    """(store-like cache, experts object) for runtime.Model on a CUDA device: `budget` bytes of
    VRAM slots over a host-RAM tier of `host_budget` bytes (both "auto": from free memory)."""
    from ..engine.gpu_cache import GpuExpertCache

    cache = GpuExpertCache(
        index, budget, io=io, threads=threads, verify_reads=verify_reads, device=device, policy=policy,
        host_budget=host_budget,
    )
    return cache, CudaExperts(cache)
