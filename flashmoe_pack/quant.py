"""Group-wise affine quantization of expert matrices, and its torch reference dequantization.

A weight row is split into groups of `group_size` consecutive input columns; each group
stores `value = q * scale + bias` with q an unsigned `bits`-bit integer. Packing follows MLX:
element j of a row lives in 32-bit word j // (32 // bits), at bit offset bits * (j % (32 // bits)),
little-endian, so MLX 4-bit checkpoints repack without requantizing. SPEC.md has the details.

Scale and bias are chosen to minimise the squared error of each group, not just spanned
min..max: a small grid of shrunken ranges, each refined by alternating least squares
(fix q, solve scale/bias in closed form; fix scale/bias, round q). At 2 bits this roughly
halves the error of plain min/max (tests/test_sources.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QTensor:
    """One quantized matrix [out, in]: packed words, per-group scales and biases."""

    weight: torch.Tensor  # uint32 as int32 storage  [out, in * bits // 32]
    scales: torch.Tensor  # [out, in // group_size]
    biases: torch.Tensor  # [out, in // group_size]
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * 32 // self.bits


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers q [rows, n] (values < 2**bits) into int32 words [rows, n*bits/32]."""
    per_word = 32 // bits
    rows, n = q.shape
    if n % per_word:
        raise ValueError(f"row length {n} is not a multiple of {per_word} ({bits}-bit packing)")
    q = q.to(torch.int64).reshape(rows, n // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (q << shifts).sum(dim=-1)  # [rows, n/per_word], fits in 32 bits
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed int32


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 words [rows, m] -> uint8 values [rows, m*32/bits]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    q = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, m, per_word]
    return q.reshape(words.shape[0], -1).to(torch.uint8)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization: [out, in] in `dtype` (computed in float32)."""
    q = unpack_bits(qt.weight, qt.bits).to(torch.float32)
    out, n = q.shape
    q = q.reshape(out, n // qt.group_size, qt.group_size)
    w = q * qt.scales.float().unsqueeze(-1) + qt.biases.float().unsqueeze(-1)
    return w.reshape(out, n).to(dtype)


def _round_q(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, qmax: int) -> torch.Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round((w - bias) / safe), 0, qmax)


def _fit_scale_bias(w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale/bias for fixed q, per group (last dim)."""
    qm, wm = q.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
    var = ((q - qm) ** 2).mean(-1, keepdim=True)
    cov = ((q - qm) * (w - wm)).mean(-1, keepdim=True)
    scale = torch.where(var > 0, cov / torch.where(var > 0, var, torch.ones_like(var)), torch.zeros_like(var))
    return scale, wm - scale * qm


def _minmax(w: torch.Tensor, qmax: int, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = w.amin(-1, keepdim=True) * shrink, w.amax(-1, keepdim=True) * shrink
    return (hi - lo) / qmax, lo


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int = 64,
    scale_dtype: torch.dtype = torch.bfloat16,
    method: str = "mse",
) -> QTensor:
    """Quantize a matrix w [out, in] group-wise. method: "mse" (error-minimising) or "minmax"."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out, n = w.shape
    if n % group_size:
        raise ValueError(f"input width {n} is not a multiple of the group size {group_size}")
    qmax = (1 << bits) - 1
    g = w.detach().to(torch.float32).reshape(out, n // group_size, group_size)  # [out, G, gs]

    def storage(scale, bias):  # what a reader sees: scale/bias rounded to their stored dtype
        return scale.to(scale_dtype).float(), bias.to(scale_dtype).float()

    def error(scale, bias):
        q = _round_q(g, scale, bias, qmax)
        return ((q * scale + bias - g) ** 2).sum(-1, keepdim=True), q

    best_s, best_b = storage(*_minmax(g, qmax))
    best_err, _ = error(best_s, best_b)
    if method == "mse":
        for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6) if bits <= 4 else (1.0,):
            scale, bias = _minmax(g, qmax, shrink)
            for _ in range(3):  # alternate: round q, then refit scale/bias by least squares
                q = _round_q(g, scale, bias, qmax)
                scale, bias = _fit_scale_bias(g, q)
            scale, bias = storage(scale, bias)
            err, _ = error(scale, bias)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, scale, best_s)
            best_b = torch.where(better, bias, best_b)
    elif method != "minmax":
        raise ValueError(f"unknown quantization method {method!r} (use 'mse' or 'minmax')")
    q = _round_q(g, best_s, best_b, qmax).to(torch.uint8).reshape(out, n)
    return QTensor(
        weight=pack_bits(q, bits),
        scales=best_s.squeeze(-1).to(scale_dtype),
        biases=best_b.squeeze(-1).to(scale_dtype),
        bits=bits,
        group_size=group_size,
    )


def error_stats(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error and SNR (dB) of approx against ref."""
    ref, approx = ref.float(), approx.float()
    noise = (approx - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    rel = (noise / signal) ** 0.5 if signal > 0 else (0.0 if noise == 0 else float("inf"))
    snr = 10 * torch.log10(torch.tensor(signal / noise)).item() if noise > 0 else float("inf")
    return {"rel_err": rel, "snr_db": snr}
