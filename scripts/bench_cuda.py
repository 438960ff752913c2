"""Decode benchmark of the CUDA path on a synthetic Qwen3.5-397B-geometry model with few layers.

    python scripts/bench_cuda.py --dir /tmp/syn --layers 4 --tokens 16 --out bench.json

Writes the model with the packer (random 4-bit experts, group 64, bf16 scales of random sign;
random bf16 resident weights; never committed), measures the floors in the same run (pinned
H2D copy bandwidth, device copy bandwidth, disk read bandwidth with O_DIRECT and through the
page cache, both with the runtime's access pattern: whole 6.75 MiB records, 8 threads), then
decode tok/s (median per-token time) with every expert resident in VRAM and streaming through
the VRAM cache, at K=10 and K=4. Random routing is near uniform: harsher on caches than real.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flashmoe_pack.default_model import _shapes  # noqa: E402
from flashmoe_pack.pack import format as fmt  # noqa: E402
from flashmoe_pack.pack.writer import PackWriter  # noqa: E402
from flashmoe_pack.quant import QTensor  # noqa: E402
from flashmoe_pack.sources.checkpoint import ExpertPiece, Resident  # noqa: E402


def geometry(layers: int) -> dict:
    """Qwen3.5-397B-A17B's text geometry with `layers` layers (every 4th full attention)."""
    return {
        "model_type": "qwen3_5_moe_text",
        "vocab_size": 248320,
        "hidden_size": 4096,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 64,
        "linear_conv_kernel_dim": 4,
        "moe_intermediate_size": 1024,
        "shared_expert_intermediate_size": 1024,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "full_attention_interval": 4,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        "eos_token_id": 248046,
    }


class _SyntheticCkpt:
    """What PackWriter reads from a checkpoint, for one shard of random tensors."""

    def __init__(self, path: Path, cfg: dict, bits: int, group: int, device: str, seed: int):
        self.path, self.text_config, self.model_type = path, cfg, cfg["model_type"]
        self.float_dtype, self.mlx_quant, self.is_fp8 = torch.bfloat16, None, False
        self.bits, self.group, self.device = bits, group, device
        self.gen = torch.Generator(device).manual_seed(seed)

    def _randn(self, shape, std):
        return (torch.randn(shape, generator=self.gen, device=self.device) * std).to(torch.bfloat16).cpu()

    def _qtensor(self, out: int, inp: int) -> QTensor:
        words = torch.randint(
            -(2**31),
            2**31 - 1,
            (out, inp * self.bits // 32),
            generator=self.gen,
            device=self.device,
            dtype=torch.int64,
        ).to(torch.int32)
        qmax = (1 << self.bits) - 1
        sign = torch.randint(0, 2, (out, inp // self.group), generator=self.gen, device=self.device) * 2 - 1
        scale = sign * (0.02 / (qmax / 12**0.5))  # weights of std ~0.02; random sign: no shared bias
        bias = -scale * qmax / 2  # zero-mean groups
        return QTensor(
            words.cpu(), scale.to(torch.bfloat16).cpu(), bias.to(torch.bfloat16).cpu(), self.bits, self.group
        )

    def iter_shard(self, shard):
        c = self.text_config
        for name, (shape, kind) in _shapes(c).items():
            if ".mlp.experts." in name:
                continue
            name = name.replace("model.language_model.", "model.")
            if kind == "A_log":
                t = torch.empty(shape).uniform_(1.0, 16.0).log_()
            elif kind == "ones":
                t = torch.ones(shape)
            else:
                std = {"proj": 0.02, "router": 0.2, "conv": 0.25, "norm": 0.1, "gated_norm": 0.1}[kind]
                t = self._randn(shape, std)
                t = t + 1 if kind == "gated_norm" else t
            yield Resident(name, t)
        hid, inter = c["hidden_size"], c["moe_intermediate_size"]
        for layer in range(c["num_hidden_layers"]):
            for e in range(c["num_experts"]):
                for proj, (o, i) in (("gate", (inter, hid)), ("up", (inter, hid)), ("down", (hid, inter))):
                    yield ExpertPiece(layer, e, proj, self._qtensor(o, i))


def make_synthetic(
    out: Path, layers: int, bits: int = 4, group: int = 64, seed: int = 0, cfg: dict | None = None
) -> Path:
    """Write the synthetic packed model into `out` (reused if complete); cfg overrides the geometry."""
    if (out / fmt.INDEX_NAME).is_file():
        return out
    cfg = {**geometry(layers), **(cfg or {})}
    src = out.parent / (out.name + "-src")
    src.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = _SyntheticCkpt(src, cfg, bits, group, dev, seed)
    params = {
        "bits": bits,
        "group_size": group,
        "scale_dtype": "bfloat16",
        "float_dtype": "bfloat16",
        "resident_dtype": "bfloat16",
        "method": "minmax",
    }
    w = PackWriter(ckpt, out, params, {"path": "synthetic", "seed": seed})
    w.process_shard("synthetic")
    return w.finalize()


def synthesize(out: Path, layers: int) -> tuple[Path, str]:
    """The team's generator (scripts/make_synthetic.py: 4-bit, group 32, fp16 scales, the model the
    llama.cpp comparison uses) when present, else make_synthetic above (group 64, bf16 scales)."""
    try:
        import make_synthetic as ms
    except ImportError:
        return make_synthetic(out, layers), "bench_cuda.make_synthetic"
    if not (out / fmt.INDEX_NAME).is_file():
        shutil.rmtree(out, ignore_errors=True)
        ms.write(out, ms.text_config("qwen35-397b", layers), seed=0, progress=False)
    return out, "scripts/make_synthetic.py"


# ------------------------------------------------------------------------------------------ floors


def h2d_gbs(device="cuda", nbytes=1 << 30, reps=5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times[1:]) / 1e9


def d2d_gbs(device="cuda", nbytes=4 << 30, reps=5) -> float:
    """Device copy bandwidth, bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9


def read_gbs(index, direct: bool, n: int = 256, threads: int = 8, seed: int = 1) -> dict:
    """Read n random whole records like the runtime does: `threads` workers, each keeping one
    positional read in flight into its own page-aligned buffer."""
    rb = fmt.align_up(index.layout.record_bytes, 4096)
    fds, used_direct = {}, direct
    for e in index.layers:
        path = str(index.path / e["file"])
        try:
            fds[e["layer"]] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            fds[e["layer"]], used_direct = os.open(path, os.O_RDONLY), False
    rng = random.Random(seed)
    jobs = [(rng.choice(list(fds)), rng.randrange(index.num_experts)) for _ in range(n)]

    def worker(w: int) -> int:
        buf, got = mmap.mmap(-1, rb), 0
        for layer, e in jobs[w::threads]:
            got += os.preadv(fds[layer], [buf], fmt.expert_offset(e, index.layout.stride))
        return got

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        total = sum(pool.map(worker, range(threads)))
        dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return {"GB_s": total / dt / 1e9, "direct": used_direct, "threads": threads, "bytes": total}


# ------------------------------------------------------------------------------------------ decode


def decode_run(m, k: int, budget, io: str, tokens: int, warmup: int, preload: bool, policy: str = "lru",
               threads: int = 8) -> dict:
    """Swap in a fresh VRAM cache, set K, prefill 8 tokens, then time `tokens` greedy decode steps."""
    from flashmoe_pack.backends.cuda import cuda_experts
    from flashmoe_pack.engine.gpu_cache import POLICIES
    from flashmoe_pack.engine.profiler import Profiler

    m.store.close()
    m.store = None
    if m.device.type == "cuda":
        torch.cuda.empty_cache()
    m.store, m.experts = cuda_experts(m.index, budget, io=io, threads=threads, device=m.device)
    m.store.policy = POLICIES[policy]()
    m.model.experts = m.experts
    m.model.config.num_experts_per_tok = k
    t_pre = time.perf_counter()
    if preload:
        m.store.preload()
    t_pre = time.perf_counter() - t_pre
    state = m.model.new_state()
    tok = int(m.model.forward((torch.arange(8) * 997 + 11) % m.config.vocab_size, state)[-1].argmax())
    for _ in range(warmup):
        tok = int(m.model.forward(torch.tensor([tok]), state)[-1].argmax())
    s0, b0 = m.store.stats.snapshot(), m.store.tier.fetch_seconds
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        tok = int(m.model.forward(torch.tensor([tok]), state)[-1].argmax())  # argmax -> host: synced
        times.append(time.perf_counter() - t0)
    s1 = m.store.stats
    prof = Profiler(sync=torch.cuda.synchronize if m.device.type == "cuda" else None)  # where the time goes
    m.experts.profiler = prof
    for _ in range(3):
        tok = int(m.model.forward(torch.tensor([tok]), state, prof)[-1].argmax())
    m.experts.profiler = None
    med = statistics.median(times)
    hits, misses = s1.hits - s0.hits, s1.misses - s0.misses
    return {
        "K": k,
        "io": io,
        "policy": policy,
        "threads": threads,
        "slots": m.store.n_slots,
        "direct": m.store.direct,
        "preload_s": t_pre,
        "median_ms": med * 1e3,
        "tok_s": 1 / med,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "disk_MB_per_tok": (s1.bytes_read - s0.bytes_read) / tokens / 1e6,
        "fetch_ms_per_tok": (m.store.tier.fetch_seconds - b0) / tokens * 1e3,
        "profile_ms_per_tok": {k2: v / 3 * 1e3 for k2, v in prof.by_section().items()},
    }


def run(dir: Path, layers: int, tokens: int, warmup: int, deadline: float | None = None) -> dict:
    import flashmoe_pack

    res: dict = {"layers": layers}
    t0 = time.perf_counter()
    path, res["generator"] = synthesize(dir, layers)
    res["generate_s"] = time.perf_counter() - t0
    ix = flashmoe_pack.pack.load_index(path)
    res["record_bytes"] = ix.layout.record_bytes
    res["h2d_GB_s"] = h2d_gbs()
    res["d2d_GB_s"] = d2d_gbs()
    res["disk"] = [read_gbs(ix, direct=d, threads=q, seed=q + d) for d in (True, False) for q in (8, 16, 32)]
    m = flashmoe_pack.load(path, device="cuda", gpu_expert_cache="1GiB")
    res["resident_bytes"] = sum(
        t.numel() * t.element_size() for n, t in _resident(m).items() if "embed_tokens" not in n
    )
    slot = fmt.align_up(ix.layout.record_bytes, 256)
    every = layers * ix.num_experts * slot
    runs = []
    part = layers * 64 * slot  # 12.5% of every layer's experts
    plan = [(10, every, "os", True, 8), (4, every, "os", True, 8), (10, part, "direct", False, 8),
            (10, part, "direct", False, 16), (4, part, "direct", False, 16), (10, part, "os", False, 16),
            (10, 10 * slot, "direct", False, 16)]
    for k, budget, io, pre, threads in plan:
        if deadline and time.perf_counter() > deadline:
            runs.append({"K": k, "budget": budget, "io": io, "skipped": "time"})
            continue
        r = decode_run(m, k, budget, io, tokens, warmup, pre, threads=threads)
        r["budget_GiB"] = budget / 2**30
        runs.append(r)
        print(json.dumps(r), flush=True)
    m.close()
    res["runs"] = runs
    return res


def _resident(m) -> dict:
    out = {"lm_head": m.model.lm_head, "embed_tokens": m.model.embed}
    for i, w in enumerate(m.model.layers):
        out.update({f"{i}.{n}": t for n, t in w.items()})
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fmp-synthetic"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    r = run(a.dir / f"syn{a.layers}", a.layers, a.tokens, a.warmup)
    text = json.dumps(r, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)
