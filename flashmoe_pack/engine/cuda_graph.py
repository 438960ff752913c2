"""Decode steps replayed from a CUDA graph when every expert is resident in VRAM.

An eager decode step launches ~100 small kernels per layer from Python; on a GPU the step is then
bound by the launches, not by the weights it reads. When every expert of the model is in VRAM
(GpuExpertCache.resident_map), a step has fixed shapes and needs no host value: the model's
static step (forward with a device position `pos`: KV written at pos with index_copy_, attention
over the whole zero-filled buffer with later slots masked, conv/recurrent states updated in
place) is captured once and replayed per token. The graph is bound to one state's buffers (their
addresses are baked in), so a new state, or a KV buffer that grew, captures again; KV buffers
double, so a sequence of n tokens captures O(log n) times.

    step = GraphedDecode(model.model)  # its .experts: a backends.cuda.CudaExperts
    logits = step(tok, state)  # float32 [vocab]; state.pos advanced by one

FLASHMOE_CUDA_GRAPH=0 turns graphs off (A/B).
"""

from __future__ import annotations

import os
import time

import torch


def graphs_enabled() -> bool:
    return os.environ.get("FLASHMOE_CUDA_GRAPH", "1") != "0"


class GraphedDecode:
    """Captures and replays the model's static decode step (see module docstring)."""

    def __init__(self, model):
        self.model = model
        dev = model.device
        self.ids = torch.zeros(1, dtype=torch.long, device=dev)  # the graph's inputs
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output [1, vocab]
        self.key: tuple | None = None
        self.captures = 0
        self.capture_s = 0.0  # wall time of warm-ups + captures
        self.replays = 0

    @property
    def experts(self):
        return self.model.experts

    @property
    def cache(self):
        return self.model.experts.cache

    def usable(self) -> bool:
        """True when the step can run as a graph: a CUDA model with every expert in VRAM."""
        return self.model.device.type == "cuda" and graphs_enabled() and self.experts.sync_free()

    def __call__(self, tok: int, state) -> torch.Tensor:
        for kv in state.kv.values():
            kv.reserve(state.pos + 1)
        # what the graph baked in: the state's buffers, the experts object and its slot table, K
        key = (id(state), tuple(t.data_ptr() for t in state.buffers()), id(self.experts),
               id(self.cache.resident_map()), self.model.config.num_experts_per_tok,
               os.environ.get("FLASHMOE_CUDA_LAYER_KERNELS", "1"))  # (an A/B switch of models/layers.py)
        if key != self.key:
            self._capture(state)
            self.key = key
        self.ids.fill_(tok)
        self.pos.fill_(state.pos)
        self.graph.replay()
        self.replays += 1
        state.advance(1)
        self._count_hits()
        return self.logits[-1].clone()  # the buffer is overwritten by the next replay

    def _count_hits(self) -> None:
        """A replay looks up K experts per layer in VRAM, all hits (the eager path counts the same)."""
        c = self.model.config
        self.cache.vram.hits += c.num_experts_per_tok * c.num_hidden_layers

    def _capture(self, state) -> None:
        t0 = time.perf_counter()
        self.graph = self.logits = self.key = None  # release the old graph's memory first
        # Warm up on a copy (the step changes the state it runs on): Triton compiles, cuBLAS picks
        # its kernels, the allocator sees the step's sizes; then capture on the real state. A
        # capture records kernels without running them, so the state is untouched until replay.
        hits = self.cache.vram.hits
        scratch = state.clone()
        for kv in scratch.kv.values():
            kv.reserve(state.pos + 1)
        self.pos.fill_(state.pos)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            self.model.forward(self.ids, scratch, last_only=True, pos=self.pos)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        del scratch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.model.forward(self.ids, state, last_only=True, pos=self.pos)
        self.cache.vram.hits = hits  # warming up and recording are not lookups
        self.graph = graph
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
