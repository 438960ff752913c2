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
    q = q.to(torch.int32).reshape(rows, n // per_word, per_word)
    words = torch.empty(rows, n // per_word, dtype=torch.int32).copy_(q[..., 0])  # [rows, n/per_word]
    for k in range(1, per_word):  # shifts wrap in 32 bits: the top value's high bit becomes the sign bit
        words |= q[..., k] << (k * bits)
    return words


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


def _round_q(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, qmax: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """clamp(round((w - bias) / scale), 0, qmax), a zero scale read as 1; into `out` if given."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.sub(w, bias, out=out) if out is not None else w - bias
    return q.div_(safe).round_().clamp_(0, qmax)


def _minmax(lo: torch.Tensor, hi: torch.Tensor, qmax: int, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/bias spanning the group's range [lo, hi] shrunk by `shrink`."""
    lo, hi = lo * shrink, hi * shrink
    return (hi - lo) / qmax, lo


# Rows quantized together: big enough that torch's per-call overhead is small (1 << 17: 1.5x slower on a
# 1024x4096 matrix), small enough that the scratch buffers stay in cache (1 << 21: 1.15x slower).
CHUNK_ELEMENTS = 1 << 19


class _Groups:
    """Scratch for one chunk of groups g [rows, G, gs]: every per-element pass writes into these
    preallocated buffers instead of a fresh tensor (a fresh tensor of this size costs page faults)."""

    def __init__(self, g: torch.Tensor, qmax: int, scale_dtype: torch.dtype):
        self.g, self.qmax, self.scale_dtype = g, qmax, scale_dtype
        self.wm = g.mean(-1, keepdim=True)  # constant over every refit
        self.gc = g - self.wm
        self.q, self.t = torch.empty_like(g), torch.empty_like(g)

    def storage(self, scale, bias):  # what a reader sees: scale/bias rounded to their stored dtype
        return scale.to(self.scale_dtype).float(), bias.to(self.scale_dtype).float()

    def error(self, scale, bias) -> torch.Tensor:
        """Squared error of each group [rows, G, 1] with this scale/bias (q rounded to them)."""
        q = _round_q(self.g, scale, bias, self.qmax, self.q)
        t = torch.mul(q, scale, out=self.t).add_(bias).sub_(self.g)
        return t.pow_(2).sum(-1, keepdim=True)

    def refit(self, scale, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """Round q to scale/bias, then the least-squares scale/bias for that q, per group."""
        q = _round_q(self.g, scale, bias, self.qmax, self.q)
        qm = q.mean(-1, keepdim=True)
        d = q.sub_(qm)  # q - qm; q is not needed any more
        var = torch.pow(d, 2, out=self.t).mean(-1, keepdim=True)
        cov = d.mul_(self.gc).mean(-1, keepdim=True)
        scale = torch.where(var > 0, cov / torch.where(var > 0, var, torch.ones_like(var)), torch.zeros_like(var))
        return scale, self.wm - scale * qm


def _choose(g: torch.Tensor, bits: int, scale_dtype: torch.dtype, method: str):
    """Best (scale, bias) per group of g [rows, G, gs], as float32 [rows, G, 1] holding values of
    scale_dtype; the q to store with them."""
    qmax = (1 << bits) - 1
    c = _Groups(g, qmax, scale_dtype)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_s, best_b = c.storage(*_minmax(lo, hi, qmax))
    best_err = c.error(best_s, best_b)
    if method == "mse":
        for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6) if bits <= 4 else (1.0,):
            scale, bias = _minmax(lo, hi, qmax, shrink)
            for _ in range(3):  # alternate: round q, then refit scale/bias by least squares
                scale, bias = c.refit(scale, bias)
            scale, bias = c.storage(scale, bias)
            err = c.error(scale, bias)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, scale, best_s)
            best_b = torch.where(better, bias, best_b)
    return best_s, best_b, _round_q(g, best_s, best_b, qmax, c.q)


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int = 64,
    scale_dtype: torch.dtype = torch.bfloat16,
    method: str = "mse",
) -> QTensor:
    """Quantize a matrix w [out, in] group-wise. method: "mse" (error-minimising) or "minmax".

    Rows are processed in chunks of about CHUNK_ELEMENTS values; each group's result depends only
    on its own values, so the output is the same for any chunking (tests/test_quant.py checks it
    against the unchunked reference)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if method not in ("mse", "minmax"):
        raise ValueError(f"unknown quantization method {method!r} (use 'mse' or 'minmax')")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out, n = w.shape
    if n % group_size:
        raise ValueError(f"input width {n} is not a multiple of the group size {group_size}")
    G = n // group_size
    scales = torch.empty(out, G, dtype=scale_dtype)
    biases = torch.empty(out, G, dtype=scale_dtype)
    q = torch.empty(out, n, dtype=torch.uint8)
    step = max(1, CHUNK_ELEMENTS // n)
    for r in range(0, out, step):
        g = w[r: r + step].detach().to(torch.float32).reshape(-1, G, group_size)  # [rows, G, gs]
        s, b, qc = _choose(g, bits, scale_dtype, method)
        scales[r: r + step] = s.squeeze(-1).to(scale_dtype)
        biases[r: r + step] = b.squeeze(-1).to(scale_dtype)
        q[r: r + step] = qc.reshape(-1, n).to(torch.uint8)
    return QTensor(weight=pack_bits(q, bits), scales=scales, biases=biases, bits=bits, group_size=group_size)


def error_stats(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error and SNR (dB) of approx against ref."""
    ref, approx = ref.float(), approx.float()
    noise = (approx - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    rel = (noise / signal) ** 0.5 if signal > 0 else (0.0 if noise == 0 else float("inf"))
    snr = 10 * torch.log10(torch.tensor(signal / noise)).item() if noise > 0 else float("inf")
    return {"rel_err": rel, "snr_db": snr}
