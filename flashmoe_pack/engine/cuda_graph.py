"""Decode steps replayed from a CUDA graph when every expert is resident in VRAM.

An eager decode step launches ~100 small kernels per layer from Python; on a GPU the step is then
bound by the launches, not by the weights it reads. When every expert of the model is in VRAM
(GpuExpertCache.resident_map), a step has fixed shapes and needs no host value: the model's
static step (forward with a device position `pos`: KV written at pos with index_copy_, attention
over the whole zero-filled buffer with later slots masked, conv/recurrent states updated in
place) is captured once and replayed per token. The graph is bound to the tensors it was captured
on (their addresses are baked in), which it keeps: another state of the same shapes whose cached
tokens fit their KV room is copied into them and uses them from then on (`adopt`; their previous
owner, if still alive, gets private copies first), so a new request or a resumed snapshot costs a
copy of the state (tens of MB at device speed) instead of a capture (~0.1 s on the H200 at 397B
geometry); a KV buffer too small for the next position captures again on the state's own
(doubled) buffers, O(log n) times for n tokens.

    step = GraphedDecode(model.model)  # its .experts: a backends.cuda.CudaExperts
    logits = step(tok, state)  # float32 [vocab]; state.pos advanced by one

FLASHMOE_CUDA_GRAPH=0 turns graphs off (A/B).
"""

from __future__ import annotations

import os
import time
import weakref

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
        self.key: tuple | None = None  # what the graph baked in besides the state's tensors
        self.work: list[torch.Tensor] = []  # the state tensors the graph is bound to (kept alive here)
        self.owner = None  # weakref to the state that uses `work` now
        self._work_ptrs: list[int] = []
        self._kv_ptrs: list[int] = []  # each KV cache's key buffer among them (the per-token check)
        self.captures = 0
        self.capture_s = 0.0  # wall time of warm-ups + captures
        self.replays = 0
        self.adoptions = 0  # states moved onto `work` instead of capturing

    @property
    def experts(self):
        return self.model.experts

    @property
    def cache(self):
        return self.model.experts.cache

    def usable(self) -> bool:
        """True when the step can run as a graph: a CUDA model with every expert in VRAM."""
        return self.model.device.type == "cuda" and graphs_enabled() and self.experts.sync_free()

    def _static_key(self) -> tuple:
        """What a capture bakes in besides the state's tensors: the experts object and its slot table, K."""
        return (id(self.experts), id(self.cache.resident_map()), self.model.config.num_experts_per_tok,
                os.environ.get("FLASHMOE_CUDA_LAYER_KERNELS", "1"),  # (A/B switches: models/layers.py's and
                os.environ.get("FLASHMOE_DECODE_I8", "1"))  # the decode kernels' int8 activations)

    def _fits(self, state) -> bool:
        """The bound tensors can take `state`: same dtypes and shapes, KV buffers with room for position pos."""
        mine = state.buffers()
        if self.graph is None or len(mine) != len(self.work):
            return False
        n_kv = 2 * len(state.kv)  # buffers() lists each KV cache's k and v first
        for j, (w, t) in enumerate(zip(self.work, mine, strict=True)):
            if w.dtype != t.dtype or w.device != t.device:
                return False
            if j < n_kv:
                if w.shape[0] != t.shape[0] or w.shape[2] != t.shape[2] or w.shape[1] < state.pos + 1:
                    return False
            elif w.shape != t.shape:
                return False
        return True

    def _uses_work(self, state) -> bool:
        return [t.data_ptr() for t in state.buffers()] == self._work_ptrs

    def _runs_on_work(self, state) -> bool:
        """The per-token check, kept cheap: `state` is the bound tensors' owner, still on them, with KV room for
        its next position. Only KVCache.reserve replaces a state's tensors besides adopt (conv and recurrent
        states are updated in place), and it replaces k and v together, so the KV keys' addresses say it."""
        if self.owner is None or self.owner() is not state:
            return False
        return all(c.k.data_ptr() == p and c.capacity > state.pos for c, p in
                   zip(state.kv.values(), self._kv_ptrs, strict=True))

    def adopt(self, state) -> None:
        """Move `state` onto the bound tensors; their previous owner, if alive, keeps a private copy."""
        old = self.owner() if self.owner is not None else None
        if old is not None and old is not state and self._uses_work(old):
            old.set_buffers([t.clone() for t in self.work])
        state.move_to(self.work)
        self.owner = weakref.ref(state)
        self.adoptions += 1

    def __call__(self, tok: int, state) -> torch.Tensor:
        key = self._static_key()
        if key != self.key or not self._runs_on_work(state):
            if key == self.key and self._fits(state):
                self.adopt(state)
            else:
                for kv in state.kv.values():
                    kv.reserve(state.pos + 1)
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
        self.graph = self.logits = self.key = self.owner = None  # release the old graph's memory first
        self.work, self._work_ptrs, self._kv_ptrs = [], [], []
        # Warm up on a copy (the step changes the state it runs on): Triton compiles, cuBLAS picks
        # its kernels, the allocator sees the step's sizes; then capture on the real state. A
        # capture records kernels without running them, so the state is untouched until replay.
        hits = self.cache.vram.hits
        scratch = state.clone()
        for kv in scratch.kv.values():
            kv.reserve(state.pos + 1)
        self.pos.fill_(state.pos)
        self._warm_up(scratch)
        del scratch
        self.graph, self.logits = self._record(state)
        self.cache.vram.hits = hits  # warming up and recording are not lookups
        self.work, self.owner = state.buffers(), weakref.ref(state)
        self._work_ptrs = [t.data_ptr() for t in self.work]
        self._kv_ptrs = [c.k.data_ptr() for c in state.kv.values()]
        self.captures += 1
        self.capture_s += time.perf_counter() - t0

    def _warm_up(self, scratch) -> None:
        """One static step on a scratch copy, on a side stream (as torch.cuda.graph wants warm-ups)."""
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            self.model.forward(self.ids, scratch, last_only=True, pos=self.pos)
        torch.cuda.current_stream(self.model.device).wait_stream(side)

    def _record(self, state):
        """(graph, its output tensor): the static step on `state` captured into a CUDA graph."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model.forward(self.ids, state, last_only=True, pos=self.pos)
        return graph, logits
