"""The chunked, in-place quantizer (flashmoe_pack.quant.quantize) against the plain reference it
replaced: same bytes (words, scales, biases) on random odd shapes, every bit width and method."""

from __future__ import annotations

import pytest
import torch

from flashmoe_pack import quant


def _reference(w, bits, group_size, scale_dtype, method):
    """The unchunked quantizer as first written (session 1): the definition the fast one must match."""
    qmax = (1 << bits) - 1
    out, n = w.shape
    g = w.detach().to(torch.float32).reshape(out, n // group_size, group_size)

    def round_q(scale, bias):
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        return torch.clamp(torch.round((g - bias) / safe), 0, qmax)

    def fit(q):
        qm, wm = q.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
        var = ((q - qm) ** 2).mean(-1, keepdim=True)
        cov = ((q - qm) * (g - wm)).mean(-1, keepdim=True)
        scale = torch.where(var > 0, cov / torch.where(var > 0, var, torch.ones_like(var)), torch.zeros_like(var))
        return scale, wm - scale * qm

    def minmax(shrink=1.0):
        lo, hi = g.amin(-1, keepdim=True) * shrink, g.amax(-1, keepdim=True) * shrink
        return (hi - lo) / qmax, lo

    def storage(scale, bias):
        return scale.to(scale_dtype).float(), bias.to(scale_dtype).float()

    def error(scale, bias):
        return ((round_q(scale, bias) * scale + bias - g) ** 2).sum(-1, keepdim=True)

    best_s, best_b = storage(*minmax())
    best_err = error(best_s, best_b)
    if method == "mse":
        for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6) if bits <= 4 else (1.0,):
            scale, bias = minmax(shrink)
            for _ in range(3):
                scale, bias = fit(round_q(scale, bias))
            scale, bias = storage(scale, bias)
            err = error(scale, bias)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_b = torch.where(better, scale, best_s), torch.where(better, bias, best_b)
    q = round_q(best_s, best_b).to(torch.int64).reshape(out, n)
    per_word = 32 // bits
    words = (q.reshape(out, -1, per_word) << (torch.arange(per_word) * bits)).sum(-1)
    words = (words - ((words >> 31) << 32)).to(torch.int32)
    return words, best_s.squeeze(-1).to(scale_dtype), best_b.squeeze(-1).to(scale_dtype)


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.itemsize])


CASES = [  # rows, cols, group, bits, source dtype, scale dtype, method
    (37, 320, 32, 4, torch.float32, torch.float16, "mse"),
    (65, 384, 64, 2, torch.bfloat16, torch.bfloat16, "mse"),
    (33, 256, 128, 2, torch.float16, torch.bfloat16, "mse"),
    (19, 192, 64, 8, torch.float32, torch.bfloat16, "mse"),
    (41, 512, 64, 4, torch.bfloat16, torch.bfloat16, "minmax"),
    (7, 96, 32, 4, torch.float32, torch.float32, "mse"),
    (23, 64, 64, 2, torch.float32, torch.float16, "minmax"),
]


@pytest.mark.parametrize("chunk", [1 << 19, 1000, 64])  # one chunk; a few rows per chunk; one row per chunk
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}g{c[2]}q{c[3]}-{c[6]}")
def test_same_bytes_as_reference(case, chunk, monkeypatch):
    rows, cols, gs, bits, dt, sd, method = case
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(rows * cols + bits)
    w = torch.randn(rows, cols, generator=g) * 0.02 * torch.rand(rows, 1, generator=g) ** 3  # uneven rows
    w[1, :gs] = 0.0  # an all-zero group: scale 0
    w[2, gs: 2 * gs] = 0.5  # a constant group
    w[3, :gs] = torch.arange(gs) % 2 * 1e-3  # two values only: var > 0, ties in rounding
    w = w.to(dt)
    want = _reference(w, bits, gs, sd, method)
    got = quant.quantize(w, bits, gs, sd, method)
    assert got.scales.dtype == got.biases.dtype == sd
    assert (got.bits, got.group_size, got.shape) == (bits, gs, (rows, cols))
    assert torch.equal(got.weight, want[0])
    assert torch.equal(_bits_of(got.scales), _bits_of(want[1]))
    assert torch.equal(_bits_of(got.biases), _bits_of(want[2]))


def test_same_bytes_at_397b_geometry():
    """One 1024 x 4096 expert matrix (Qwen3.5-397B's gate/up shape) at 4 and 2 bits, several chunks."""
    w = (torch.randn(1024, 4096, generator=torch.Generator().manual_seed(4)) * 0.02).to(torch.bfloat16)
    for bits in (4, 2):
        want, got = _reference(w, bits, 64, torch.bfloat16, "mse"), quant.quantize(w, bits, 64)
        assert torch.equal(got.weight, want[0]) and torch.equal(_bits_of(got.scales), _bits_of(want[1]))
        assert torch.equal(_bits_of(got.biases), _bits_of(want[2]))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="method"):
        quant.quantize(torch.zeros(2, 64), 4, 64, method="gptq")
    with pytest.raises(ValueError, match="group size 64"):
        quant.quantize(torch.zeros(2, 96), 4, 64)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.zeros(2, 64), 3, 64)
