"""Triton kernels for group-wise affine (MLX layout) experts: all experts of a layer in one launch.

An `ExpertTable` says where each expert's nine components live: one int32 base tensor for the
packed words, one base tensor for scales and biases (bf16/fp16/fp32), and per expert nine element
offsets from those bases (`OFFS`). The VRAM cache keeps every expert in one slot pool, so the
table is (pool viewed as int32, pool viewed as the scale dtype, slot * slot_elems + component).

Two kernel pairs, each with a torch twin that computes the same function:
  decode (T <= DECODE_MAX_T): one program per (row block, assignment) computes silu(gate x) * up x,
      then one per (row block, token) computes down h for the token's K experts and sums them with
      their router weights (or, with a config's split, one per (row block, assignment), summed after by
      _sum_k). float32 throughout, in qmv_twin's (mps.py) FMA form: per 32-bit word s1 = sum q*x,
      s2 = sum x, then scale * s1 + bias * s2 with the word's group (values unpacked by a bit trick, _qmv).
  prefill (grouped GEMM): assignments sorted by expert, tiles of BM assignments of one expert;
      weight tiles are dequantized to x's dtype (as TorchKernel does) and multiplied with tl.dot,
      float32 accumulation; h = silu(g) * u is rounded to x's dtype; down writes each assignment's
      weighted row into y [T*K, H] float32, summed over K in torch (deterministic, no atomics).
Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (the CPU tests use that).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..quant import QTensor, dequantize
from .mps import qmv_twin

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the twins stay usable without triton
    HAVE_TRITON = False

BITS = (2, 4, 8)
# Component order of a row of `offs`: words offsets (int32 elements), then scale/bias offsets.
OFFS = ("gate.weight", "up.weight", "down.weight", "gate.scales", "gate.biases", "up.scales", "up.biases",
        "down.scales", "down.biases")
DECODE_MAX_T = 4  # up to this many tokens per layer use the GEMV kernels
# Decode launch configs: (rows per program, columns per step, warps[, split[, pair[, align[, i8[, down rows]]]]]),
# down rows (0: rows) for the down kernel's programs, whose rows are shorter (I against H columns); split 1
# computes the down product with a program per assignment and sums the K rows after (_decode_down_each +
# _sum_k); pair 1 computes gate and up in one pass (_qmv_pair); align 1 tells the compiler the word rows are
# 16-byte aligned where the table says so (ExpertTable.aligned), for 16-byte loads; i8 1 rounds the activations
# to int8 per word span and computes the products as dp4a integer sums (_quant_x, _qmv_i8; twin round_i8), i8 2
# the same with one activation scale per weight group, so a group's words sum as integers and fold once.
# Tuned ones are data, keyed by GPU name and "bits/group" (decode_configs.json beside this file, or the file
# FLASHMOE_DECODE_CONFIGS names), written by scripts/gpu_check.py's sweep on that GPU; DECODE_CFG (by bits)
# serves the rest. H200, graph replay, 397B geometry, K=10 (scripts/results/gpu_check_h200_2026-12-04.json):
# i8 2 with whole rows per step and one warp per row wins at every width (q4 g64 33.5 us, ~2.1 TB/s, against
# 55.5 for the best float32 config and 51.0 for i8 1; q2 27.7 against 39.8 (i8 1); q8 45.9 against 74.2). In
# the float32 kernels pair won and align lost (2026-12-03: q4 g64 55.7 against 58.4, align 71.3), and _qmv's
# bit-trick unpacking beat converting each value int -> float on the same tiles (q4 g64 63 against 74 us).
# GEMM: BM assignments x BN rows tiles.
DECODE_CFG = {2: (8, 2048, 4), 4: (8, 1024, 4), 8: (8, 512, 4)}
# A CUDA GPU with no tuned configs: the H200 winners' design (int8 per group, whole rows per step, a warp per row)
# in 4-warp programs, within 3-6% of the H200's best in that sweep (q4 g64 35.6 against 33.5 us, q2 29.5 against
# 27.7, q8 47.3 against 45.9), so that a consumer GPU's cap on resident blocks per multiprocessor (16 on sm_86,
# 24 on sm_89) does not hold its resident warps (48 there) to 16 or 24 as one-warp programs would; not measured
# on any GPU but the H200. FLASHMOE_DECODE_I8=0: DECODE_CFG.
GENERIC_CFG = {2: (4, 4096, 4, 1, 1, 1, 2, 16), 4: (4, 4096, 4, 1, 1, 1, 2, 16), 8: (4, 1024, 4, 1, 1, 1, 2, 8)}
TUNED_FILE = Path(__file__).with_name("decode_configs.json")
QUANT_BW = 64  # word spans per program of _quant_x
GEMM_CFG = {"BM": 64, "BN": 64, "BK": 64, "warps": 4, "stages": 3, "magic": 0}  # magic: _dequant_tile's MAGIC


@dataclass
class ExpertTable:
    """Where the experts of one launch live (see module docstring). offs: int64 [E, 9] on device."""

    words: torch.Tensor  # int32 base
    scales: torch.Tensor  # scale-dtype base (scales and biases)
    offs: torch.Tensor  # [E, 9] element offsets, columns as OFFS
    bits: int
    group_size: int
    hidden: int  # H
    inter: int  # I
    aligned: bool = False  # every word offset a multiple of 4 int32s (16 bytes): a config's align may rely on it


def _base_offsets(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """A base tensor and each tensor's element offset from it (all same dtype, base = lowest address)."""
    base = min(tensors, key=lambda t: t.data_ptr())
    size = base.element_size()
    offs = []
    for t in tensors:
        d = t.data_ptr() - base.data_ptr()
        assert d % size == 0 and t.is_contiguous() and t.dtype == base.dtype, "components: aligned views"
        offs.append(d // size)
    return base, offs


def table_from_experts(experts: list, hidden: int, inter: int) -> ExpertTable:
    """An ExpertTable over ExpertWeights whose projections are QTensors (any storage, one device)."""
    projs = [(w.gate, w.up, w.down) for w in experts]
    q0 = projs[0][0]
    words = [p.weight for ps in projs for p in ps]
    scales = [t for ps in projs for p in ps for t in (p.scales, p.biases)]
    wb, wo = _base_offsets(words)
    sb, so = _base_offsets(scales)
    rows = [wo[3 * i : 3 * i + 3] + so[6 * i : 6 * i + 6] for i in range(len(experts))]
    offs = torch.tensor(rows, dtype=torch.int64).to(wb.device)
    aligned = wb.data_ptr() % 16 == 0 and all(o % 4 == 0 for r in rows for o in r[:3])
    return ExpertTable(wb, sb, offs, q0.bits, q0.group_size, hidden, inter, aligned)


def supported(qt: QTensor) -> bool:
    """Shapes and dtypes the kernels handle (others run the torch kernel)."""
    g = qt.group_size
    return (qt.bits in BITS and qt.scales.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and g >= 32 // qt.bits and g & (g - 1) == 0 and g <= 1024)


# ------------------------------------------------------------------------------------------ twins


def i8_span(i8: int, bits: int, group: int) -> int:
    """Values per activation scale of a config's i8: 1 -> a weight word's span (32 // bits), 2 -> a weight
    group's (group), so that a group's integer sums need one scale (see _qmv_i8)."""
    return {1: 32 // bits, 2: group}[i8]


def round_i8(x: torch.Tensor, span: int) -> torch.Tensor:
    """x [..., n] rounded as _quant_x rounds it, back in float32: int8 per span of `span` values, scale
    max|x| / 127, halves rounded up."""
    v = x.float().reshape(*x.shape[:-1], -1, span)
    m = v.abs().amax(-1, keepdim=True)
    q = torch.floor(v * (127.0 / m.clamp_min(1e-30)) + 0.5)
    return (q * (m / 127.0)).reshape(x.shape)


def decode_twin(x: torch.Tensor, experts: list, ids: torch.Tensor, weights: torch.Tensor,
                i8: int = 0) -> torch.Tensor:
    """The decode kernels' function: x [T, H], ids [T, K] into `experts`, weights [T, K] -> [T, H].
    i8 (1 or 2): a config's i8 kernels', whose products take x and h rounded to int8 (round_i8, i8_span)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    q0 = experts[int(ids[0, 0])].gate
    span = i8_span(int(i8), q0.bits, q0.group_size) if i8 else 0
    rnd = (lambda v: round_i8(v, span)) if i8 else (lambda v: v)  # noqa: E731
    for t in range(x.shape[0]):
        xt = rnd(x[t])
        for k in range(ids.shape[1]):
            w = experts[int(ids[t, k])]
            g = qmv_twin(w.gate.weight, w.gate.scales, w.gate.biases, xt, w.gate.bits, w.gate.group_size)
            u = qmv_twin(w.up.weight, w.up.scales, w.up.biases, xt, w.up.bits, w.up.group_size)
            h = rnd(F.silu(g) * u)  # float32 [I]
            y = qmv_twin(w.down.weight, w.down.scales, w.down.biases, h, w.down.bits, w.down.group_size)
            out[t] += weights[t, k].float() * y
    return out.to(x.dtype)


def gemm_twin(x: torch.Tensor, experts: list, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The prefill kernels' function: weights dequantized to x's dtype, float32 products, h in x's
    dtype, the K weighted rows summed in float32."""
    dt = x.dtype
    y = torch.zeros(ids.shape + (x.shape[1],), dtype=torch.float32, device=x.device)  # [T, K, H]
    for e in torch.unique(ids).tolist():
        w = experts[e]
        gate, up, down = (dequantize(p, torch.float32).to(dt).float() for p in (w.gate, w.up, w.down))
        t, k = torch.nonzero(ids == e, as_tuple=True)
        xe = x[t].float()
        h = (F.silu(xe @ gate.T) * (xe @ up.T)).to(dt).float()
        y[t, k] = (h @ down.T) * weights[t, k].float()[:, None]
    return y.sum(1).to(dt)


# ----------------------------------------------------------------------------------------- kernels
# Variants timed on the H200 (scripts/gpu_check.py, Qwen3.5-397B geometry, q4, K=10) and dropped: decode
# converting each value int -> float (74 us, against 63 for _qmv's bit tricks on the same tiles); reducing a
# [BN, BKW, P] tile over P (132 us); reducing per group after unpacking to [BN, BK] (171 us); GEMM dequant
# that gathers each value's word and scale (duplicate addresses) instead of unpack + reshape: 10x slower.

if HAVE_TRITON:

    @triton.jit
    def _unpack(words, j: tl.constexpr, BITS: tl.constexpr):
        """Value j of each word as f = 1 + q / 2^BITS (float32): its bits moved under exponent 0 (_qmv)."""
        MB: tl.constexpr = 23 - BITS  # the mantissa bit where q lands
        if MB >= j * BITS:
            v = words << (MB - j * BITS)
        else:
            v = words >> (j * BITS - MB)
        return ((v & (((1 << BITS) - 1) << MB)) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _fold(s_ptr, s_off, b_off, gi, wm, s1, xs, BITS: tl.constexpr):
        """A [BN, BKW] tile of words' sums (s1 = sum f x per word, xs = sum x) -> their share of W x:
        2^BITS * scale * (s1 - xs) + bias * xs with each word's group's scale and bias (_qmv's fold)."""
        sc = tl.load(s_ptr + s_off + gi, mask=wm, other=0.0).to(tl.float32)
        bi = tl.load(s_ptr + b_off + gi, mask=wm, other=0.0).to(tl.float32)
        return sc * (1 << BITS) * (s1 - xs[None, :]) + bi * xs[None, :]

    @triton.jit
    def _qmv(w_ptr, s_ptr, w_off, s_off, b_off, rows, rmask, xrow_ptr, n_in,
             BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, ALIGN: tl.constexpr):
        """y[rows] = W x over all n_in columns, x (any float dtype) read from xrow_ptr; float32, qmv_twin's
        per-word FMA form. [BN, BKW] tiles of words; the P values of a word are taken one shift at a time
        against x's every P-th column, with no int -> float conversion: value j's BITS bits are moved to the
        top of a float32 mantissa under exponent 0 (a shift, then and/or), which reads as f = 1 + q / 2^BITS
        exactly, and a word adds 2^BITS * scale * (sum f x - sum x) + bias * sum x (the conversions, at a
        fraction of the FMA rate, bound the kernel before: its GB/s fell as values per byte rose, q8 > q4 > q2).
        Words' sums accumulate elementwise in [BN, BKW] and are reduced across the block once, at the end.
        ALIGN: the caller vouches that w_off and the words per row are multiples of 4 (16-byte rows), which the
        compiler cannot see in an offset read from the table, so the word loads may be 16 bytes wide (they are,
        in sm_90 PTX; on the H200 that layout was slower, 2026-12-03)."""
        P: tl.constexpr = 32 // BITS
        BKW: tl.constexpr = BK // P
        n_words = n_in // P
        if ALIGN:  # (x // 4) * 4, a no-op here, is what tells the compiler (tl.multiple_of on a scalar does not)
            w_off = (w_off // 4) * 4
            n_words = (n_words // 4) * 4
        acc = tl.zeros([BN, BKW], dtype=tl.float32)
        for k0 in range(0, n_in, BK):
            cw = k0 // P + tl.arange(0, BKW)
            cm = cw < n_words
            wm = rmask[:, None] & cm[None, :]
            words = tl.load(w_ptr + w_off + rows[:, None] * n_words + cw[None, :], mask=wm, other=0)
            s1 = tl.zeros([BN, BKW], dtype=tl.float32)
            xs = tl.zeros([BKW], dtype=tl.float32)
            for j in tl.static_range(P):
                xj = tl.load(xrow_ptr + cw * P + j, mask=cm, other=0.0).to(tl.float32)
                s1 += _unpack(words, j, BITS) * xj[None, :]
                xs += xj
            gi = rows[:, None] * (n_in // G) + (cw // (G // P))[None, :]
            acc += _fold(s_ptr, s_off, b_off, gi, wm, s1, xs, BITS)
        return tl.sum(acc, axis=1)

    @triton.jit
    def _qmv_pair(w_ptr, s_ptr, wa, sa, ba, wb, sb, bb, rows, rmask, xrow_ptr, n_in,
                  BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, ALIGN: tl.constexpr):
        """(A x, B x) for two matrices of one shape (an expert's gate and up) in one pass over the columns:
        _qmv's arithmetic, with x's loads and sums shared and both matrices' words in flight together."""
        P: tl.constexpr = 32 // BITS
        BKW: tl.constexpr = BK // P
        n_words = n_in // P
        if ALIGN:  # as in _qmv
            wa = (wa // 4) * 4
            wb = (wb // 4) * 4
            n_words = (n_words // 4) * 4
        acc_a = tl.zeros([BN, BKW], dtype=tl.float32)
        acc_b = tl.zeros([BN, BKW], dtype=tl.float32)
        for k0 in range(0, n_in, BK):
            cw = k0 // P + tl.arange(0, BKW)
            cm = cw < n_words
            wm = rmask[:, None] & cm[None, :]
            wi = rows[:, None] * n_words + cw[None, :]
            words_a = tl.load(w_ptr + wa + wi, mask=wm, other=0)
            words_b = tl.load(w_ptr + wb + wi, mask=wm, other=0)
            s1a = tl.zeros([BN, BKW], dtype=tl.float32)
            s1b = tl.zeros([BN, BKW], dtype=tl.float32)
            xs = tl.zeros([BKW], dtype=tl.float32)
            for j in tl.static_range(P):
                xj = tl.load(xrow_ptr + cw * P + j, mask=cm, other=0.0).to(tl.float32)
                s1a += _unpack(words_a, j, BITS) * xj[None, :]
                s1b += _unpack(words_b, j, BITS) * xj[None, :]
                xs += xj
            gi = rows[:, None] * (n_in // G) + (cw // (G // P))[None, :]
            acc_a += _fold(s_ptr, sa, ba, gi, wm, s1a, xs, BITS)
            acc_b += _fold(s_ptr, sb, bb, gi, wm, s1b, xs, BITS)
        return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1)

    @triton.jit
    def _dp4a(a, b, c, ASM: tl.constexpr):
        """c + the dot product of a's 4 bytes (unsigned) with b's (signed), int32: one dp4a instruction on the
        GPU (ASM), the same sum in plain integer ops where inline asm cannot run (the CPU interpreter)."""
        if ASM:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            for i in tl.static_range(4):
                c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
            return c

    @triton.jit
    def _lane(words, j: tl.constexpr, BITS: tl.constexpr):
        """Lane j of each word: values j, L+j, 2L+j, 3L+j (L = 8 // BITS), one per byte (_qmv_i8)."""
        if BITS == 8:
            return words
        else:
            return (words >> (j * BITS)) & (((1 << BITS) - 1) * 0x01010101)

    @triton.jit
    def _quant_x(x_ptr, xq_ptr, xf_ptr, n, BW: tl.constexpr, BITS: tl.constexpr, S: tl.constexpr):
        """Rows of x [R, n] rounded to int8 per span of S values (a multiple of a weight word's P = 32 // BITS),
        scale max|x| / 127: xq [R, L, n / P] int32 (L = P / 4 lanes), lane j of word span w holding its values
        j, L+j, 2L+j, 3L+j, a byte each, as _lane lays out the weights' values; xf [R, 2, n / S] float32, each
        span's scale, then the sum of its rounded values (times the scale). One program per BW spans of a row."""
        P: tl.constexpr = 32 // BITS
        L: tl.constexpr = P // 4
        WS: tl.constexpr = S // P  # word spans per span
        r = tl.program_id(1)
        nw = n // P
        ns = n // S
        sp = tl.program_id(0) * BW + tl.arange(0, BW)
        sm = sp < ns
        w = sp[:, None] * WS + tl.arange(0, WS)[None, :]  # [BW, WS] word spans
        b = tl.arange(0, 4)
        idx = w[:, :, None, None] * P + b[None, None, :, None] * L + tl.arange(0, L)[None, None, None, :]
        x = tl.load(x_ptr + r * n + idx, mask=sm[:, None, None, None], other=0.0).to(tl.float32)
        m = tl.max(tl.max(tl.max(tl.abs(x), axis=3), axis=2), axis=1)
        # divisions rounded as torch's (round_i8); Triton's plain float32 division is approximate
        q = tl.floor(x * tl.div_rn(127.0, tl.maximum(m, 1e-30))[:, None, None, None] + 0.5).to(tl.int32)
        packed = tl.sum((q & 0xFF) << (b * 8)[None, None, :, None], axis=2)  # disjoint bytes: the sum is their or
        tl.store(xq_ptr + r * (nw * L) + tl.arange(0, L)[None, None, :] * nw + w[:, :, None], packed,
                 mask=sm[:, None, None])
        sx = tl.div_rn(m, 127.0)
        tl.store(xf_ptr + r * 2 * ns + sp, sx, mask=sm)
        qs = tl.sum(tl.sum(tl.sum(q, axis=3), axis=2), axis=1)
        tl.store(xf_ptr + r * 2 * ns + ns + sp, qs.to(tl.float32) * sx, mask=sm)

    @triton.jit
    def _qmv_i8(w_ptr, s_ptr, wa, sa, ba, wb, sb, bb, rows, rmask, xq_ptr, xf_ptr, n_in,
                BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
                ALIGN: tl.constexpr, PAIR: tl.constexpr, ASM: tl.constexpr):
        """(A x, B x) (B only with PAIR; else (A x, A x)) for x rounded to int8 per span of S values (_quant_x;
        S divides G): the exact dot products of the weights with the rounded x, as integer sums. [BN, NS, WS]
        tiles of words (NS spans of WS words); per word, its lanes (_lane) against x's lanes give sum q xq in
        dp4a instructions (a few integer ops per 8 values at 4 bits, where _qmv spends about four per value);
        a span's words are summed as integers, then scale * sx * sum q xq + bias * sx * sum xq once per span,
        with its weight group's scale and bias: with S = G one fold (two scale loads) per group, not per word."""
        P: tl.constexpr = 32 // BITS
        L: tl.constexpr = P // 4
        WS: tl.constexpr = S // P
        NS: tl.constexpr = BK // S
        n_words = n_in // P
        n_sp = n_in // S
        if ALIGN:  # as in _qmv
            wa = (wa // 4) * 4
            n_words = (n_words // 4) * 4
            if PAIR:  # (else wb is a placeholder 0)
                wb = (wb // 4) * 4
        acc_a = tl.zeros([BN, NS], dtype=tl.float32)
        acc_b = tl.zeros([BN, NS], dtype=tl.float32)
        for k0 in range(0, n_sp, NS):
            sp = tl.multiple_of(k0, NS) + tl.arange(0, NS)
            spm = sp < n_sp
            cw = sp[:, None] * WS + tl.arange(0, WS)[None, :]  # [NS, WS] word columns
            cm = spm[:, None]
            wm = rmask[:, None, None] & cm[None, :, :]
            wi = rows[:, None, None] * n_words + cw[None, :, :]
            words_a = tl.load(w_ptr + wa + wi, mask=wm, other=0)
            if PAIR:
                words_b = tl.load(w_ptr + wb + wi, mask=wm, other=0)
            ia = tl.zeros([BN, NS, WS], dtype=tl.int32)
            ib = tl.zeros([BN, NS, WS], dtype=tl.int32)
            for j in tl.static_range(L):
                xj = tl.load(xq_ptr + j * n_words + cw, mask=cm, other=0)[None, :, :]
                ia = _dp4a(_lane(words_a, j, BITS), xj, ia, ASM)
                if PAIR:
                    ib = _dp4a(_lane(words_b, j, BITS), xj, ib, ASM)
            sx = tl.load(xf_ptr + sp, mask=spm, other=0)[None, :]
            xs = tl.load(xf_ptr + n_sp + sp, mask=spm, other=0)[None, :]
            gm = rmask[:, None] & spm[None, :]
            gi = rows[:, None] * (n_in // G) + (sp // (G // S))[None, :]
            acc_a += (tl.load(s_ptr + sa + gi, mask=gm, other=0).to(tl.float32) * sx
                      * tl.sum(ia, axis=2).to(tl.float32)
                      + tl.load(s_ptr + ba + gi, mask=gm, other=0).to(tl.float32) * xs)
            if PAIR:
                acc_b += (tl.load(s_ptr + sb + gi, mask=gm, other=0).to(tl.float32) * sx
                          * tl.sum(ib, axis=2).to(tl.float32)
                          + tl.load(s_ptr + bb + gi, mask=gm, other=0).to(tl.float32) * xs)
        a_x = tl.sum(acc_a, axis=1)
        if PAIR:
            return a_x, tl.sum(acc_b, axis=1)
        else:
            return a_x, a_x

    @triton.jit
    def _offs(offs_ptr, aexp_ptr, smap_ptr, a, MAP: tl.constexpr):
        """The offsets row of assignment a: aexp[a] is its slot, or with MAP the router's expert id, mapped to its
        slot through smap (the slot map's row of the layer: no separate lookup launch)."""
        if MAP:
            slot = tl.load(smap_ptr + tl.load(aexp_ptr + a))
        else:
            slot = tl.load(aexp_ptr + a)
        return offs_ptr + slot.to(tl.int64) * 9

    @triton.jit
    def _decode_gate_up_i8(xq_ptr, xf_ptr, h_ptr, w_ptr, s_ptr, offs_ptr, aexp_ptr, smap_ptr, n_in, n_out, K,
                           BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                           S: tl.constexpr, PAIR: tl.constexpr, ALIGN: tl.constexpr, ASM: tl.constexpr,
                           MAP: tl.constexpr):
        """_decode_gate_up on x rounded to int8 per span of S values (_quant_x's xq, xf) through _qmv_i8."""
        pid_n = tl.program_id(0)
        a = tl.program_id(1)
        o = _offs(offs_ptr, aexp_ptr, smap_ptr, a, MAP)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < n_out
        t = a // K
        xq = xq_ptr + t * (n_in // 4)
        xf = xf_ptr + t * (2 * (n_in // S))
        if PAIR:
            g, u = _qmv_i8(w_ptr, s_ptr, tl.load(o + 0), tl.load(o + 3), tl.load(o + 4), tl.load(o + 1),
                           tl.load(o + 5), tl.load(o + 6), rows, rmask, xq, xf, n_in, BN, BK, BITS, G, S, ALIGN, 1, ASM)
        else:
            g, _ = _qmv_i8(w_ptr, s_ptr, tl.load(o + 0), tl.load(o + 3), tl.load(o + 4), 0, 0, 0,
                           rows, rmask, xq, xf, n_in, BN, BK, BITS, G, S, ALIGN, 0, ASM)
            u, _ = _qmv_i8(w_ptr, s_ptr, tl.load(o + 1), tl.load(o + 5), tl.load(o + 6), 0, 0, 0,
                           rows, rmask, xq, xf, n_in, BN, BK, BITS, G, S, ALIGN, 0, ASM)
        tl.store(h_ptr + a * n_out + rows, g / (1.0 + tl.exp(-g)) * u, mask=rmask)

    @triton.jit
    def _decode_down_i8(hq_ptr, hf_ptr, y_ptr, w_ptr, s_ptr, offs_ptr, aexp_ptr, smap_ptr, rw_ptr, n_in, n_out,
                        BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                        S: tl.constexpr, ALIGN: tl.constexpr, ASM: tl.constexpr, MAP: tl.constexpr):
        """_decode_down_each on h rounded to int8 per span of S values (_quant_x) through _qmv_i8."""
        pid_n = tl.program_id(0)
        a = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < n_out
        o = _offs(offs_ptr, aexp_ptr, smap_ptr, a, MAP)
        y, _ = _qmv_i8(w_ptr, s_ptr, tl.load(o + 2), tl.load(o + 7), tl.load(o + 8), 0, 0, 0, rows, rmask,
                       hq_ptr + a * (n_in // 4), hf_ptr + a * (2 * (n_in // S)), n_in,
                       BN, BK, BITS, G, S, ALIGN, 0, ASM)
        tl.store(y_ptr + a * n_out + rows, tl.load(rw_ptr + a).to(tl.float32) * y, mask=rmask)

    @triton.jit
    def _decode_gate_up(x_ptr, h_ptr, w_ptr, s_ptr, offs_ptr, aexp_ptr, smap_ptr, n_in, n_out, K,
                        BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                        PAIR: tl.constexpr, ALIGN: tl.constexpr, MAP: tl.constexpr):
        """h[a] = silu(G_e x_t) * (U_e x_t) for assignment a = t*K + k of expert e, float32; PAIR: both
        products in one pass (_qmv_pair), else one after the other."""
        pid_n = tl.program_id(0)
        a = tl.program_id(1)
        o = _offs(offs_ptr, aexp_ptr, smap_ptr, a, MAP)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < n_out
        xrow = x_ptr + (a // K) * n_in
        if PAIR:
            g, u = _qmv_pair(w_ptr, s_ptr, tl.load(o + 0), tl.load(o + 3), tl.load(o + 4), tl.load(o + 1),
                             tl.load(o + 5), tl.load(o + 6), rows, rmask, xrow, n_in, BN, BK, BITS, G, ALIGN)
        else:
            g = _qmv(w_ptr, s_ptr, tl.load(o + 0), tl.load(o + 3), tl.load(o + 4), rows, rmask, xrow, n_in,
                     BN, BK, BITS, G, ALIGN)
            u = _qmv(w_ptr, s_ptr, tl.load(o + 1), tl.load(o + 5), tl.load(o + 6), rows, rmask, xrow, n_in,
                     BN, BK, BITS, G, ALIGN)
        tl.store(h_ptr + a * n_out + rows, g / (1.0 + tl.exp(-g)) * u, mask=rmask)

    @triton.jit
    def _decode_down(h_ptr, out_ptr, w_ptr, s_ptr, offs_ptr, aexp_ptr, smap_ptr, rw_ptr, n_in, n_out, K,
                     BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, ALIGN: tl.constexpr,
                     MAP: tl.constexpr):
        """out[t] = sum_k rw[t*K+k] * D_e h[t*K+k], summed in float32, stored in out's dtype."""
        pid_n = tl.program_id(0)
        t = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < n_out
        total = tl.zeros([BN], dtype=tl.float32)
        for k in range(0, K):
            a = t * K + k
            o = _offs(offs_ptr, aexp_ptr, smap_ptr, a, MAP)
            y = _qmv(w_ptr, s_ptr, tl.load(o + 2), tl.load(o + 7), tl.load(o + 8), rows, rmask,
                     h_ptr + a * n_in, n_in, BN, BK, BITS, G, ALIGN)
            total += tl.load(rw_ptr + a).to(tl.float32) * y
        tl.store(out_ptr + t * n_out + rows, total.to(out_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _decode_down_each(h_ptr, y_ptr, w_ptr, s_ptr, offs_ptr, aexp_ptr, smap_ptr, rw_ptr, n_in, n_out,
                          BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                          ALIGN: tl.constexpr, MAP: tl.constexpr):
        """y[a] = rw[a] * D_e h[a], float32, one program per (row block, assignment): the K experts of a
        token are read in parallel rather than one after another (_sum_k adds them up)."""
        pid_n = tl.program_id(0)
        a = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < n_out
        o = _offs(offs_ptr, aexp_ptr, smap_ptr, a, MAP)
        y = _qmv(w_ptr, s_ptr, tl.load(o + 2), tl.load(o + 7), tl.load(o + 8), rows, rmask,
                 h_ptr + a * n_in, n_in, BN, BK, BITS, G, ALIGN)
        tl.store(y_ptr + a * n_out + rows, tl.load(rw_ptr + a).to(tl.float32) * y, mask=rmask)

    @triton.jit
    def _sum_k(y_ptr, out_ptr, n, K, BLOCK: tl.constexpr):
        """out[t] = sum_k y[t*K + k] over rows of n floats, in order (deterministic), in out's dtype."""
        t = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, K):
            total += tl.load(y_ptr + (t * K + k) * n + cols, mask=m, other=0.0)
        tl.store(out_ptr + t * n + cols, total.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dequant_tile(w_ptr, s_ptr, w_off, s_off, b_off, rows, rmask, k0, n_in,
                      BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                      MAGIC: tl.constexpr = 0):
        """Weight tile [BN, BK] = q * scale + bias in float32 (callers round it to x's dtype). MAGIC: q read as
        f = 1 + q / 2^BITS through _qmv's bit trick (no int -> float conversion), then
        f * 2^BITS scale + (bias - 2^BITS scale); no faster on the H200 (2026-12-03), so off by default."""
        P: tl.constexpr = 32 // BITS
        BKW: tl.constexpr = BK // P
        NG: tl.constexpr = BK // G
        n_words = n_in // P
        n_groups = n_in // G
        cw = k0 // P + tl.arange(0, BKW)
        words = tl.load(w_ptr + w_off + rows[:, None] * n_words + cw[None, :],
                        mask=rmask[:, None] & (cw < n_words)[None, :], other=0)
        q = (words[:, :, None] >> (tl.arange(0, P) * BITS)[None, None, :]) & ((1 << BITS) - 1)
        cg = k0 // G + tl.arange(0, NG)
        gm = rmask[:, None] & (cg < n_groups)[None, :]
        gi = rows[:, None] * n_groups + cg[None, :]
        s = tl.load(s_ptr + s_off + gi, mask=gm, other=0.0).to(tl.float32)
        b = tl.load(s_ptr + b_off + gi, mask=gm, other=0.0).to(tl.float32)
        if MAGIC:
            f = ((q << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
            f = tl.reshape(f, (BN, NG, G))  # value j of a word at bits * j (MLX)
            s2 = s * (1 << BITS)
            return tl.reshape(f * s2[:, :, None] + (b - s2)[:, :, None], (BN, BK))
        q = tl.reshape(q.to(tl.float32), (BN, NG, G))  # value j of a word at bits * j (MLX)
        return tl.reshape(q * s[:, :, None] + b[:, :, None], (BN, BK))

    @triton.jit
    def _gemm(x_ptr, out_ptr, w_ptr, s_ptr, offs_ptr, order_ptr, tile_ptr, rw_ptr, n_in, n_out, K,
              DOWN: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, MAGIC: tl.constexpr):
        """One tile of BM assignments of one expert (tile_ptr rows: expert, lo, hi into `order`).
        gate+up (DOWN=0): x rows x[p // K] -> out[p] = silu(g) * u in out's dtype.
        down (DOWN=1): x rows h[p] -> out[p] = rw[p] * D h[p] in float32."""
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(tile_ptr + tile * 3).to(tl.int64)
        lo = tl.load(tile_ptr + tile * 3 + 1)
        hi = tl.load(tile_ptr + tile * 3 + 2)
        ar = lo + tl.arange(0, BM)
        amask = ar < hi
        p = tl.load(order_ptr + ar, mask=amask, other=0).to(tl.int64)  # flat assignment t*K + k
        if DOWN:
            src = p
        else:
            src = p // K
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < n_out
        o = offs_ptr + e * 9
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, n_in, BK):
            cols = k0 + tl.arange(0, BK)
            xm = amask[:, None] & (cols < n_in)[None, :]
            xt = tl.load(x_ptr + src[:, None] * n_in + cols[None, :], mask=xm, other=0.0)
            if DOWN:
                w = _dequant_tile(w_ptr, s_ptr, tl.load(o + 2), tl.load(o + 7), tl.load(o + 8), rows, rmask,
                                  k0, n_in, BN, BK, BITS, G, MAGIC)
                acc += tl.dot(xt, tl.trans(w.to(x_ptr.dtype.element_ty)), input_precision=PREC)
            else:
                wg = _dequant_tile(w_ptr, s_ptr, tl.load(o + 0), tl.load(o + 3), tl.load(o + 4), rows, rmask,
                                   k0, n_in, BN, BK, BITS, G, MAGIC)
                wu = _dequant_tile(w_ptr, s_ptr, tl.load(o + 1), tl.load(o + 5), tl.load(o + 6), rows, rmask,
                                   k0, n_in, BN, BK, BITS, G, MAGIC)
                acc += tl.dot(xt, tl.trans(wg.to(x_ptr.dtype.element_ty)), input_precision=PREC)
                acc_u += tl.dot(xt, tl.trans(wu.to(x_ptr.dtype.element_ty)), input_precision=PREC)
        if DOWN:
            res = acc * tl.load(rw_ptr + p, mask=amask, other=0.0).to(tl.float32)[:, None]
        else:
            res = acc / (1.0 + tl.exp(-acc)) * acc_u
        om = amask[:, None] & rmask[None, :]
        tl.store(out_ptr + p[:, None] * n_out + rows[None, :], res.to(out_ptr.dtype.element_ty), mask=om)


    @triton.jit
    def _qmatvec(x_ptr, y_ptr, w_ptr, s_ptr, s_off, b_off, n_in, n_out,
                 BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr):
        """y[t, rows] = W x[t] for one quantized matrix (a resident weight), float32 arithmetic."""
        pid_n = tl.program_id(0)
        t = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < n_out
        y = _qmv(w_ptr, s_ptr, 0, s_off, b_off, rows, rmask, x_ptr + t * n_in, n_in, BN, BK, BITS, G, 0)
        tl.store(y_ptr + t * n_out + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


# --------------------------------------------------------------------------------------- launchers


def _check(x: torch.Tensor, table: ExpertTable) -> None:
    assert HAVE_TRITON, "triton is not installed"
    assert x.dim() == 2 and x.shape[1] == table.hidden and x.is_contiguous(), "x: contiguous [T, H]"
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"x dtype {x.dtype}"
    assert table.words.dtype == torch.int32 and table.offs.dtype == torch.int64
    assert table.offs.dim() == 2 and table.offs.shape[1] == len(OFFS) and table.offs.is_contiguous()
    assert table.bits in BITS and table.hidden % table.group_size == 0 and table.inter % table.group_size == 0
    assert table.words.device == x.device == table.scales.device == table.offs.device


@functools.cache
def _tuned(path: str) -> dict:
    """{gpu name: {"bits/group": config}} from a tuned-configs file (none: {})."""
    if not os.path.isfile(path):
        return {}
    try:
        data = json.loads(Path(path).read_text())
        for gpu, table in data.items():
            for key, cfg in table.items():
                bits, group = (int(v) for v in key.split("/"))
                if not (isinstance(cfg, list) and 3 <= len(cfg) <= 8 and all(isinstance(v, int) for v in cfg)):
                    raise ValueError(f"{gpu!r} {key!r}: {cfg!r} is not a list of 3 to 8 ints")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a decode-config file ({{gpu: {{'bits/group': [rows, cols, warps, "
                         f"split, pair, align, i8, down rows]}}}}): {e}") from None
    return data


@functools.cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def decode_cfg(bits: int, group: int, device: torch.device) -> tuple:
    """The decode launch config for `bits`/`group` on `device`: tuned for its GPU where listed, else on CUDA
    GENERIC_CFG, else (the CPU interpreter) DECODE_CFG. FLASHMOE_DECODE_I8=0 takes a tuned config's i8 away
    and gives DECODE_CFG for the rest (the float32 kernels, activations not rounded)."""
    if device.type == "cuda":
        exact = os.environ.get("FLASHMOE_DECODE_I8") == "0"
        table = _tuned(os.environ.get("FLASHMOE_DECODE_CONFIGS", str(TUNED_FILE))).get(_gpu_name(device), {})
        cfg = table.get(f"{bits}/{group}")
        if cfg is not None:
            cfg = _cfg(tuple(cfg))
            return cfg[:6] + (0,) + cfg[7:] if exact else cfg
        return DECODE_CFG[bits] if exact else GENERIC_CFG[bits]
    return DECODE_CFG[bits]


def _cfg(cfg: tuple) -> tuple[int, int, int, int, int, int, int, int]:
    """(rows per program, columns per step, warps[, split[, pair[, align[, i8[, down rows]]]]]), the rest (default
    0) filled in; down rows 0: the down kernel's programs take `rows` rows too."""
    if not 3 <= len(cfg) <= 8:
        raise ValueError(f"decode config {cfg!r}: expected (rows, columns, warps[, split[, pair[, align[, i8"
                         "[, down rows]]]]])")
    return tuple(cfg) + (0, 0, 0, 0, 0)[len(cfg) - 3:]


def moe_decode(x: torch.Tensor, table: ExpertTable, aexp: torch.Tensor, rw: torch.Tensor, k: int,
               cfg: tuple | None = None, smap: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H]; aexp int32 [T*K]: row of `table.offs` of assignment t*K + k; rw [T*K] router
    weights -> [T, H] in x's dtype (decode kernels). With `smap` (int32 [E], the slot map's row of the
    layer), aexp holds the router's expert ids (int32 or int64) and the kernels look their slots up."""
    _check(x, table)
    t = x.shape[0]
    assert aexp.numel() == t * k and rw.numel() == t * k
    if smap is None:
        assert aexp.dtype == torch.int32
    else:
        assert smap.dtype == torch.int32 and smap.dim() == 1 and smap.is_contiguous()
        assert aexp.dtype in (torch.int32, torch.int64)
    mp = int(smap is not None)
    smap = aexp if smap is None else smap  # (unused without MAP)
    aexp = aexp.contiguous()
    bn, bk, warps, split, pair, align, i8, bn_dn = _cfg(cfg or decode_cfg(table.bits, table.group_size, x.device))
    bn_dn = bn_dn or bn
    g = table.group_size
    p = 32 // table.bits  # values per word: 16-byte rows need words per row divisible by 4
    align = int(bool(align) and table.aligned and (table.hidden // p) % 4 == 0 and (table.inter // p) % 4 == 0)
    # a step no wider than the row (35B geometry: H = 2048 under a 4096-column tuned step), nor than a group
    bk_in = max(min(bk, triton.next_power_of_2(table.hidden)), g)
    bk_mid = max(min(bk, triton.next_power_of_2(table.inter)), g)
    if i8:
        return _moe_decode_i8(x, table, aexp, smap, mp, rw, k, bn, bn_dn, bk_in, bk_mid, warps, pair, align, i8)
    h = torch.empty(t * k, table.inter, dtype=torch.float32, device=x.device)
    _decode_gate_up[(triton.cdiv(table.inter, bn), t * k)](
        x, h, table.words, table.scales, table.offs, aexp, smap, table.hidden, table.inter, k,
        BN=bn, BK=bk_in, BITS=table.bits, G=g, PAIR=pair, ALIGN=align, MAP=mp, num_warps=warps)
    out = torch.empty_like(x)
    if split:
        y = torch.empty(t * k, table.hidden, dtype=torch.float32, device=x.device)
        _decode_down_each[(triton.cdiv(table.hidden, bn_dn), t * k)](
            h, y, table.words, table.scales, table.offs, aexp, smap, rw.contiguous(), table.inter, table.hidden,
            BN=bn_dn, BK=bk_mid, BITS=table.bits, G=g, ALIGN=align, MAP=mp, num_warps=warps)
        return sum_k(y, out, k)
    _decode_down[(triton.cdiv(table.hidden, bn_dn), t)](
        h, out, table.words, table.scales, table.offs, aexp, smap, rw.contiguous(), table.inter, table.hidden, k,
        BN=bn_dn, BK=bk_mid, BITS=table.bits, G=g, ALIGN=align, MAP=mp, num_warps=warps)
    return out


def quant_rows_i8(x: torch.Tensor, bits: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, n] -> (xq, xf) of _quant_x: int8 per span of `span` values (a multiple of 32 // bits dividing n),
    laid out for _qmv_i8."""
    r, n = x.shape
    assert span % (32 // bits) == 0 and n % span == 0, (n, span, bits)
    xq = torch.empty(r, n // 4, dtype=torch.int32, device=x.device)
    xf = torch.empty(r, 2 * (n // span), dtype=torch.float32, device=x.device)
    bw = max(1, QUANT_BW * (32 // bits) // span)  # about QUANT_BW word spans per program
    _quant_x[(triton.cdiv(n // span, bw), r)](x, xq, xf, n, BW=bw, BITS=bits, S=span, num_warps=2)
    return xq, xf


def _moe_decode_i8(x, table: ExpertTable, aexp, smap, mp: int, rw, k: int, bn: int, bn_dn: int, bk_in: int,
                   bk_mid: int, warps: int, pair: int, align: int, i8: int) -> torch.Tensor:
    """moe_decode with activations rounded to int8 per span (a config's i8, i8_span): x, then h, through
    _quant_x; the products in dp4a integer sums (_qmv_i8); the down product a program per assignment."""
    t, bits, g = x.shape[0], table.bits, table.group_size
    s = i8_span(i8, bits, g)
    asm = int(os.environ.get("TRITON_INTERPRET") != "1")  # the interpreter runs no inline asm
    xq, xf = quant_rows_i8(x, bits, s)
    h = torch.empty(t * k, table.inter, dtype=torch.float32, device=x.device)
    _decode_gate_up_i8[(triton.cdiv(table.inter, bn), t * k)](
        xq, xf, h, table.words, table.scales, table.offs, aexp, smap, table.hidden, table.inter, k,
        BN=bn, BK=bk_in, BITS=bits, G=g, S=s, PAIR=pair, ALIGN=align, ASM=asm, MAP=mp, num_warps=warps)
    hq, hf = quant_rows_i8(h, bits, s)
    y = torch.empty(t * k, table.hidden, dtype=torch.float32, device=x.device)
    _decode_down_i8[(triton.cdiv(table.hidden, bn_dn), t * k)](
        hq, hf, y, table.words, table.scales, table.offs, aexp, smap, rw.contiguous(), table.inter, table.hidden,
        BN=bn_dn, BK=bk_mid, BITS=bits, G=g, S=s, ALIGN=align, ASM=asm, MAP=mp, num_warps=warps)
    return sum_k(y, torch.empty_like(x), k)


def sum_k(y: torch.Tensor, out: torch.Tensor, k: int) -> torch.Tensor:
    """out [T, H] = the K float32 rows of each token in y [T*K, H] summed in order (_sum_k), in out's dtype."""
    n = out.shape[1]
    _sum_k[(triton.cdiv(n, 1024), out.shape[0])](y, out, n, k, BLOCK=1024, num_warps=4)
    return out


def sort_assignments(ids, bm: int) -> tuple[np.ndarray, np.ndarray]:
    """Host side of the grouped GEMM: ids [T, K] (rows of the table) -> (order, tiles): order lists
    flat assignments t*K + k grouped by expert (stable), tiles holds (expert, lo, hi) per tile of
    at most bm assignments of one expert, flattened. int32 arrays."""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    order = np.argsort(flat, kind="stable")
    uniq, start, count = np.unique(flat[order], return_index=True, return_counts=True)
    n = (count + bm - 1) // bm  # tiles per expert
    first = np.repeat(np.cumsum(n) - n, n)
    lo = np.repeat(start, n) + (np.arange(n.sum()) - first) * bm
    hi = np.minimum(lo + bm, np.repeat(start + count, n))
    return order.astype(np.int32), np.stack([np.repeat(uniq, n), lo, hi], 1).reshape(-1).astype(np.int32)


def _to(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def moe_gemm(x: torch.Tensor, table: ExpertTable, ids, rw: torch.Tensor, cfg: dict | None = None
             ) -> torch.Tensor:
    """x [T, H], ids [T, K] rows of `table.offs` (host lists or arrays), rw [T, K] -> [T, H] (prefill)."""
    _check(x, table)
    c = {**GEMM_CFG, **(cfg or {})}
    t, k = x.shape[0], len(ids[0])
    order, tiles = sort_assignments(ids, c["BM"])
    dev = x.device
    order_d, tiles_d = _to(order, dev), _to(tiles, dev)
    n_tiles = len(tiles) // 3
    g = table.group_size
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only matters for float32 inputs
    h = torch.empty(t * k, table.inter, dtype=x.dtype, device=dev)
    y = torch.empty(t * k, table.hidden, dtype=torch.float32, device=dev)
    rwf = rw.reshape(-1).to(torch.float32).contiguous()
    common = dict(PREC=prec, BM=c["BM"], BN=c["BN"], BK=max(c["BK"], g), BITS=table.bits, G=g, MAGIC=c["magic"],
                  num_warps=c["warps"], num_stages=c["stages"])
    _gemm[(n_tiles, triton.cdiv(table.inter, c["BN"]))](
        x, h, table.words, table.scales, table.offs, order_d, tiles_d, rwf, table.hidden, table.inter, k,
        DOWN=0, **common)
    _gemm[(n_tiles, triton.cdiv(table.hidden, c["BN"]))](
        h, y, table.words, table.scales, table.offs, order_d, tiles_d, rwf, table.inter, table.hidden, k,
        DOWN=1, **common)
    return y.view(t, k, table.hidden).sum(1).to(x.dtype)


def moe_forward(x: torch.Tensor, table: ExpertTable, ids, rw: torch.Tensor) -> torch.Tensor:
    """Routed experts of a layer: decode kernels for few tokens, grouped GEMM otherwise.
    ids [T, K] rows of `table.offs` (host lists), rw [T, K] router weights."""
    if x.shape[0] <= DECODE_MAX_T:
        aexp = _to(np.asarray(ids, dtype=np.int32).reshape(-1), x.device)
        return moe_decode(x, table, aexp, rw.reshape(-1), len(ids[0]))
    return moe_gemm(x, table, ids, rw)


def qmatvec(x: torch.Tensor, qt: QTensor, out_dtype: torch.dtype | None = None,
            cfg: tuple | None = None) -> torch.Tensor:
    """x [T, in] (T <= DECODE_MAX_T, contiguous) @ qt^T -> [T, out] in out_dtype (default x's): one
    quantized matrix (a resident weight) in the decode kernels' arithmetic (qmv_twin's)."""
    assert HAVE_TRITON and supported(qt) and x.dim() == 2 and x.is_contiguous()
    rows, cols = qt.shape
    assert x.shape[1] == cols and cols % qt.group_size == 0 and qt.weight.is_contiguous()
    assert qt.scales.dtype == qt.biases.dtype and qt.scales.is_contiguous() and qt.biases.is_contiguous()
    base, (s_off, b_off) = _base_offsets([qt.scales, qt.biases])
    if cfg is None:  # a tuned config's tiles, where they were tuned for these (float32) kernels
        cfg = decode_cfg(qt.bits, qt.group_size, x.device)
        cfg = DECODE_CFG[qt.bits] if _cfg(cfg)[6] else cfg
    bn, bk, warps, *_ = _cfg(cfg)
    y = torch.empty(x.shape[0], rows, dtype=out_dtype or x.dtype, device=x.device)
    _qmatvec[(triton.cdiv(rows, bn), x.shape[0])](x, y, qt.weight, base, s_off, b_off, cols, rows, BN=bn,
                                                 BK=max(bk, qt.group_size), BITS=qt.bits, G=qt.group_size,
                                                 num_warps=warps)
    return y
