"""Load a packed model and generate: the library API behind `flashmoe-pack run`.

    m = flashmoe_pack.load("packed-dir", device="cpu", expert_cache="2GiB")
    logits = m.logits(ids)                       # float32 [T, vocab], one prefill
    for text in m.generate("Hello", max_tokens=32): print(text, end="")
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends import get_kernel
from ..models import get_model_class
from ..pack import format as fmt
from ..pack.index import PackedIndex, load_index
from ..tokenizer import Tokenizer
from .moe import StreamedExperts
from .profiler import Profiler
from .resident import load_resident
from .sampler import SamplingParams, sample
from .store import ExpertStore, StoreStats, estimate_resident_bytes, resident_nbytes

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str | int) -> int:
    """'512MiB', '2G', '0', 1024 -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot read size {text!r}: use e.g. 512MiB, 2GiB or 0") from None
    if unit not in _UNITS or value < 0:
        raise ValueError(f"cannot read size {text!r}: use e.g. 512MiB, 2GiB or 0")
    return int(value * _UNITS[unit])


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # prompt prefill + first token
    decode_s: float = 0.0  # the remaining tokens
    store_before: StoreStats = field(default_factory=StoreStats)
    store_after: StoreStats = field(default_factory=StoreStats)

    @property
    def decode_tok_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def hit_rate(self) -> float:
        h = self.store_after.hits - self.store_before.hits
        m = self.store_after.misses - self.store_before.misses
        return h / (h + m) if h + m else 0.0

    @property
    def bytes_read(self) -> int:
        return self.store_after.bytes_read - self.store_before.bytes_read


class Model:
    """A loaded packed model: resident weights in memory, experts streamed through the store."""

    def __init__(self, index: PackedIndex, device: str, expert_cache: int | str, io: str, threads: int,
                 experts_per_token: int | None, dtype: torch.dtype | None, verify_reads: bool,
                 gpu_expert_cache: int | str = "auto", resident: str = "auto"):
        self.index, self.path = index, index.path
        self.device = torch.device(device)
        if self.device.type == "cuda":  # VRAM expert cache + Triton kernels (backends/cuda.py)
            from ..backends.cuda import cuda_experts

            # cuDNN attention builds a plan for every new KV length, i.e. every decode step (40-70 ms
            # each on the H200, scripts/gpu_check.py sdpa); flash/efficient SDPA need none.
            torch.backends.cuda.enable_cudnn_sdp(False)
            # three tiers: VRAM slots (gpu_expert_cache), host RAM (expert_cache), the SSD
            self.store, self.experts = cuda_experts(index, gpu_expert_cache, io=io, threads=threads,
                                                    verify_reads=verify_reads, device=self.device,
                                                    host_budget=expert_cache)
        else:
            cache = "auto" if str(expert_cache).strip().lower() == "auto" else parse_size(expert_cache)
            self.store = ExpertStore(index, cache, io=io, threads=threads, verify_reads=verify_reads,
                                     device=self.device, resident_bytes=estimate_resident_bytes(index, dtype))
        cls = get_model_class(index.raw["model_type"])
        overrides = {"num_experts_per_tok": experts_per_token} if experts_per_token else {}
        self.config = cls.config_class.from_dict(index.raw["config"], **overrides)
        self.kernel = get_kernel(self.device)
        if self.device.type != "cuda":
            self.experts = StreamedExperts(self.store, self.kernel)
        try:
            weights = load_resident(index, self.device, dtype, verify=verify_reads, resident=resident)
        except torch.OutOfMemoryError:
            self.store.close()
            raise MemoryError(
                f"{self.path}: the resident (non-expert) weights do not fit in {self.device}'s memory with "
                f"resident={resident!r}; try --resident q8 (about half of bf16) or q4-head, a smaller "
                "--gpu-expert-cache, or --device cpu") from None
        if isinstance(self.store, ExpertStore):  # an "auto" cache budget counts the weights as loaded
            self.store.set_resident_bytes(resident_nbytes(weights))
        # CUDA: fused projections (one product instead of two to four; the parts leave `weights`);
        # FLASHMOE_CUDA_FUSE=0 keeps them apart (A/B)
        fuse = self.device.type == "cuda" and os.environ.get("FLASHMOE_CUDA_FUSE", "1") != "0"
        self.model = cls(self.config, weights, self.experts, dtype=dtype, fuse=fuse)
        del weights
        self.graphed = None  # CUDA: decode steps replayed from a graph once every expert is in VRAM
        if self.device.type == "cuda" and hasattr(self.model.new_state(), "advance"):
            from .cuda_graph import GraphedDecode

            self.graphed = GraphedDecode(self.model)
        self.tokenizer = Tokenizer.from_dir(self.path) if (self.path / "tokenizer.json").is_file() else None
        self.last_stats: GenerationStats | None = None

    def close(self) -> None:
        self.store.close()

    def logits(self, ids) -> torch.Tensor:
        """float32 logits [T, vocab] of one prefill of token ids [T] from an empty state."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        return self.model.forward(ids, self.model.new_state())

    def decode_step(self, tok: int, state, profiler: Profiler | None = None) -> torch.Tensor:
        """Feed one token to `state`; float32 logits [vocab] of the next. A CUDA graph replay where
        it applies (engine/cuda_graph.py; not while profiling, which times sections eagerly)."""
        if profiler is None and self.graphed is not None and self.graphed.usable():
            return self.graphed(tok, state)
        return self.model.forward(torch.tensor([tok], dtype=torch.long), state, profiler, last_only=True)[-1]

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None, chat: bool = False,
                      **template_kw) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: no tokenizer.json in the packed model; pass token ids instead")
        if messages is None and chat:
            messages = [{"role": "user", "content": prompt or ""}]
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kw)
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(prompt or "")

    def generate_ids(self, ids: list[int], max_tokens: int = 64, sampling: SamplingParams | None = None,
                     stop_ids: tuple[int, ...] | None = None, profiler: Profiler | None = None,
                     state=None) -> Iterator[int]:
        """Prefill `ids`, then yield up to `max_tokens` new token ids, stopping after an EOS id."""
        if not ids:
            raise ValueError("the prompt is empty: nothing to condition on")
        sampling = sampling or SamplingParams(temperature=0.0)
        gen = sampling.generator()
        stops = set(self.eos_ids if stop_ids is None else stop_ids)
        state = state if state is not None else self.model.new_state()
        self.experts.profiler = profiler
        st = self.last_stats = GenerationStats(prompt_tokens=len(ids), store_before=self.store.stats.snapshot())
        t0 = time.perf_counter()
        logits = self.model.forward(torch.tensor(ids, dtype=torch.long), state, profiler, last_only=True)[-1]
        try:
            for i in range(max_tokens):
                tok = sample(logits, sampling.temperature, sampling.top_p, sampling.top_k, gen)
                st.generated_tokens += 1
                now = time.perf_counter()
                if i == 0:
                    st.ttft_s, t_first = now - t0, now
                else:
                    st.decode_s = now - t_first
                st.store_after = self.store.stats.snapshot()
                yield tok
                if tok in stops or i == max_tokens - 1:
                    break
                logits = self.decode_step(tok, state, profiler)
        finally:
            self.experts.profiler = None

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None, chat: bool = False,
                 max_tokens: int = 64, sampling: SamplingParams | None = None,
                 profiler: Profiler | None = None, **template_kw) -> Iterator[str]:
        """Stream generated text for a prompt (or chat `messages`); stops at the model's EOS."""
        ids = self.encode_prompt(prompt, messages, chat, **template_kw)
        dec = self.tokenizer.stream_decoder(skip_special_tokens=True)
        for tok in self.generate_ids(ids, max_tokens, sampling, profiler=profiler):
            if tok in self.eos_ids:
                break
            text = dec.step(tok)
            if text:
                yield text
        tail = dec.flush()
        if tail:
            yield tail

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_ids)
        return tuple(sorted(ids))


def load(path: str | Path | None = None, device: str = "cpu", expert_cache: int | str = "auto",
         io: str = "auto", threads: int = 8, experts_per_token: int | None = None,
         dtype: torch.dtype | str | None = None, verify_reads: bool = True,
         gpu_expert_cache: int | str = "auto", resident: str = "auto") -> Model:
    """Load a packed model directory (None: the built-in tiny default model).

    expert_cache: byte budget of the runtime's own expert cache ("2GiB", 0 to rely on the OS, "auto":
    available memory - resident weights - max(2 GiB, 15% of memory), at most 1 GiB with io "os"; see store.py).
    io: "os" (page cache), "direct" (O_DIRECT / F_NOCACHE) or "auto" (Linux: "direct" where the filesystem
    accepts it, else "os"; elsewhere "os"). experts_per_token: smaller K than the
    model's own is faster and costs quality. dtype: compute dtype of resident weights (default: as stored).
    verify_reads: check every record read from disk against its xxhash64.
    gpu_expert_cache: device "cuda": byte budget of the VRAM expert cache ("auto": free device memory
    after the resident weights less a reserve). On cuda, expert_cache is the host-RAM tier below it
    ("auto": available memory, within a memory cgroup's limit, less a reserve; see engine/gpu_cache.py).
    resident: how non-expert matrices are kept: "auto", "bf16", "stored", "q8", "q4-head" (engine/resident.py).
    """
    if path is None:
        from ..default_model import default_model_dir

        path = default_model_dir()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' requested but this torch has no available MPS device (Apple Silicon)")
    if isinstance(dtype, str):
        dtype = fmt.DTYPES[dtype]
    return Model(load_index(path), device, expert_cache, io, threads, experts_per_token, dtype, verify_reads,
                 gpu_expert_cache, resident)
