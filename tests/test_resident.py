"""Resident weights: layers.linear / embedding on every weight kind, resident modes at load
(engine/resident.py), and hashing without a copy."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
import torch.nn.functional as F
import xxhash

import flashmoe_pack
from flashmoe_pack.engine import resident as res
from flashmoe_pack.models import layers
from flashmoe_pack.pack import format as fmt
from flashmoe_pack.pack import quantize as pack_quantize
from flashmoe_pack.quant import QTensor, dequantize, quantize

cpu = pytest.importorskip("flashmoe_pack.backends.cpu")
needs_c = pytest.mark.skipif(not cpu.available(), reason="C kernels not built")

# (out, in) odd sizes; tokens below and above the C kernels' batched threshold and DEQUANT_FROM_T
SHAPES = [(37, 192), (129, 320)]
TOKENS = (1, 5, layers.DEQUANT_FROM_T + 3)
KINDS = [("f32", None), ("bf16", None), ("q8", torch.bfloat16), ("q4", torch.float16), ("q2", torch.bfloat16)]


def weight(kind: str, sdtype, out: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.1
    if kind == "f32":
        return w
    if kind == "bf16":
        return w.to(torch.bfloat16)
    return quantize(w, int(kind[1]), 32 if kind == "q2" else 64, sdtype)


def reference(x: torch.Tensor, w) -> torch.Tensor:
    """x @ W^T in float64 from the exact dequantized values."""
    wd = dequantize(w, torch.float64) if isinstance(w, QTensor) else w.double()
    return x.double() @ wd.T


@needs_c
@pytest.mark.parametrize("kind,sdtype", KINDS)
@pytest.mark.parametrize("out,n", SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_linear_matches_reference(kind, sdtype, out, n, t):
    """float32 activations: every path (torch, C decode, C batched, dequantize + torch) agrees with
    the float64 product to float32 summation error; bias and leading dims pass through."""
    w = weight(kind, sdtype, out, n, seed=t)
    g = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32  # x in the float weight's dtype
    x = torch.randn(2, t, n, generator=g).to(dtype)
    bias = torch.randn(out, generator=g).to(dtype)
    y = layers.linear(x, w, bias)
    assert y.shape == (2, t, out) and y.dtype == dtype
    want = reference(x.reshape(-1, n), w) + bias.double()
    err = (y.reshape(-1, out).double() - want).abs().max() / want.abs().max()
    assert err < (1e-2 if kind == "bf16" else 2e-6), (kind, t, err.item())


@needs_c
@pytest.mark.parametrize("kind,sdtype", KINDS)
def test_linear_bf16_activations(kind, sdtype):
    """bf16 activations (the model's compute dtype): output in bf16 or the asked dtype, within bf16 rounding
    of the exact product (quantized weights are not rounded to bf16 on the C path)."""
    w = weight(kind, sdtype, 37, 192)
    x = torch.randn(3, 192).to(torch.bfloat16)
    want = reference(x, w)
    y = layers.linear(x, w)
    assert y.dtype == torch.bfloat16
    assert (y.double() - want).abs().max() / want.abs().max() < (2e-2 if kind == "bf16" else 8e-3)
    y32 = layers.linear(x, w, out_dtype=torch.float32)
    assert y32.dtype == torch.float32
    if isinstance(w, QTensor):  # no rounding to bf16 on the way: float32 accuracy
        assert ((y32.double() - want).abs().max() / want.abs().max()) < 2e-6


@pytest.mark.parametrize("t", (1, layers.DEQUANT_FROM_T + 1))
def test_linear_twin_without_c_kernels(monkeypatch, t):
    """FLASHMOE_CPU_KERNEL=torch: the dequantize twin, F.linear on the weight dequantized to x's dtype."""
    monkeypatch.setenv("FLASHMOE_CPU_KERNEL", "torch")
    w = weight("q4", torch.bfloat16, 37, 192)
    x = torch.randn(t, 192)
    assert torch.equal(layers.linear(x, w), F.linear(x, dequantize(w, torch.float32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows(dtype):
    w = weight("q8", torch.bfloat16, 50, 128)
    ids = torch.tensor([3, 0, 49, 3])
    assert torch.equal(layers.embedding(ids, w, dtype), dequantize(w, dtype)[ids])
    f = weight("bf16", None, 50, 128)
    assert torch.equal(layers.embedding(ids, f, dtype), f[ids].to(dtype))


# ----------------------------------------------------------------------------------------- hashing


@pytest.mark.parametrize("t", [torch.randn(33, 17).to(torch.bfloat16), torch.randn(5, 7), torch.arange(10),
                               torch.randn(8, 6).T, torch.empty(0, 4), torch.tensor([3.0])])
def test_tensor_xxh64_matches_tensor_bytes(t):
    assert res.tensor_xxh64(t) == xxhash.xxh64(fmt.tensor_bytes(t)).hexdigest()


def test_tensor_xxh64_does_not_copy():
    """Hashing a 64 MiB tensor allocates almost nothing in Python; tensor_bytes allocates its size."""
    t = torch.ones(32 << 20, dtype=torch.bfloat16)
    tracemalloc.start()
    try:
        res.tensor_xxh64(t)
        hashed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        fmt.tensor_bytes(t)
        copied = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert hashed < 1 << 20 and copied >= 64 << 20


# ------------------------------------------------------------------------------------ modes at load


@pytest.fixture(scope="module")
def packed_q8r(tiny_src, tmp_path_factory):
    """Experts at 16 bits, resident matrices stored 8-bit."""
    return pack_quantize(tiny_src, tmp_path_factory.mktemp("q8r") / "m", bits=16, resident_dtype="q8",
                         progress=False)


@pytest.fixture(scope="module")
def packed_bf16r(tiny_src, tmp_path_factory):
    """Experts at 4 bits, resident matrices bf16 (the default)."""
    return pack_quantize(tiny_src, tmp_path_factory.mktemp("bf16r") / "m", bits=4, group_size=32,
                         progress=False)


PROMPTS = [[3, 4, 5, 6, 7, 8], [200, 17, 17, 90, 1, 2, 250, 33, 64, 128, 5]]


@needs_c
def test_q8_residents_match_dequantized_path(packed_q8r, monkeypatch):
    """Stored 8-bit residents through the C kernels vs dequantized once at load (the old path), both in
    float32: the same values, so the logits differ only by float order."""
    monkeypatch.setattr(fmt, "tensor_bytes", None)  # load must hash without tensor_bytes' copy
    kept = flashmoe_pack.load(packed_q8r, dtype="float32", resident="stored", expert_cache=0)
    deq = flashmoe_pack.load(packed_q8r, dtype="float32", resident="bf16", expert_cache=0)
    assert isinstance(kept.model.lm_head, QTensor) and isinstance(kept.model.embed, QTensor)
    assert isinstance(kept.model.layers[0]["linear_attn.in_proj_qkv.weight"], QTensor)
    assert not isinstance(deq.model.lm_head, QTensor)
    for ids in PROMPTS:
        a, b = kept.logits(ids), deq.logits(ids)
        assert ((a - b).abs().max() / b.abs().max()) < 1e-5
    for m in (kept, deq):
        m.close()


@needs_c
def test_load_time_quantization(packed_bf16r):
    ms = {mode: flashmoe_pack.load(packed_bf16r, resident=mode, expert_cache=0)
          for mode in ("bf16", "q8", "q4-head", "auto")}
    head = ms["q8"].model.lm_head
    assert isinstance(head, QTensor) and head.bits == 8 and ms["q4-head"].model.lm_head.bits == 4
    assert ms["q4-head"].model.layers[0]["mlp.gate.weight"].bits == 8
    assert isinstance(ms["auto"].model.lm_head, QTensor)  # auto on the CPU with bf16 compute: q8
    assert not isinstance(ms["q8"].model.embed, QTensor)  # untied embedding: stays a float lookup
    assert not isinstance(ms["bf16"].model.lm_head, QTensor)
    bf16_head = ms["bf16"].model.lm_head
    want = quantize(bf16_head, 8, 64, torch.bfloat16, method="minmax")
    assert torch.equal(head.weight, want.weight) and torch.equal(head.scales, want.scales)
    ref = torch.cat([ms["bf16"].logits(ids) for ids in PROMPTS]).log_softmax(-1)
    for mode, kl_max, top1_min in (("q8", 0.02, 0.9), ("q4-head", 0.3, 0.6)):
        lp = torch.cat([ms[mode].logits(ids) for ids in PROMPTS]).log_softmax(-1)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert kl < kl_max and top1 >= top1_min, (mode, kl, top1)
    for m in ms.values():
        m.close()


def test_float32_compute_stays_float(packed_bf16r, packed16):
    m = flashmoe_pack.load(packed_bf16r, dtype="float32", expert_cache=0)  # auto with float32 compute
    assert not isinstance(m.model.lm_head, QTensor) and m.model.lm_head.dtype == torch.float32
    m.close()
    m = flashmoe_pack.load(packed16, expert_cache=0)  # residents stored float32
    assert not isinstance(m.model.lm_head, QTensor)
    m.close()


def test_mode_errors():
    with pytest.raises(ValueError, match="resident='q9'"):
        res.resolve_mode("q9", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="device mps has no quantized kernels"):
        res.resolve_mode("q8", torch.device("mps"), torch.bfloat16)
    assert res.resolve_mode("auto", torch.device("mps"), torch.bfloat16) == "bf16"
    # CUDA: quantized matrices run in Triton; "auto" keeps float weights while they fit in VRAM
    assert res.resolve_mode("auto", torch.device("cuda"), torch.bfloat16) == "bf16"
    assert res.resolve_mode("auto", torch.device("cuda"), torch.bfloat16, fits=False) == "q8"
    assert res.resolve_mode("auto", torch.device("cuda"), torch.float32, fits=False) == "bf16"
    assert res.resolve_mode("q4-head", torch.device("cuda"), torch.bfloat16) == "q4-head"


def test_quantized_on_cuda_needs_triton(monkeypatch):
    from flashmoe_pack.backends import triton_kernels

    monkeypatch.setattr(triton_kernels, "HAVE_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        res.resolve_mode("q8", torch.device("cuda"), torch.bfloat16)
    assert res.resolve_mode("auto", torch.device("cuda"), torch.bfloat16, fits=False) == "bf16"


def test_float_bytes_counts_what_bf16_puts_on_the_device(packed_bf16r, packed_q8r):
    """What "auto" on CUDA compares with free VRAM: float matrices and stored 8-bit ones as bf16."""
    from flashmoe_pack.pack import load_index

    for path in (packed_bf16r, packed_q8r):
        ix = load_index(path)
        held = res.load_resident(ix, "cpu", None, resident="bf16").values()
        assert res.float_bytes(ix, torch.bfloat16) == sum(t.numel() * t.element_size() for t in held)


def test_quantized_modes_need_the_c_kernels(monkeypatch):
    monkeypatch.setenv("FLASHMOE_CPU_KERNEL", "torch")
    assert res.resolve_mode("auto", torch.device("cpu"), torch.bfloat16) == "bf16"
    with pytest.raises(ValueError, match="C kernels are unavailable"):
        res.resolve_mode("stored", torch.device("cpu"), torch.bfloat16)
