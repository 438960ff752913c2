"""Triton kernels for the small per-token steps of a decode layer (CUDA), each one launch.

A decode step of a Qwen3.5 layer in torch launches ~120 kernels, most of them elementwise ops on a
few thousand values; on a GPU each costs ~2 us, more than the weights they touch. These kernels
fuse the largest groups (models/layers.py calls them on CUDA tensors, the torch code elsewhere):

  rms_norm        (residual add +) RMSNorm with Qwen's (1 + w) scale: ~10 ops -> 1
  rms_norm_rope   attention's per-head q/k RMSNorm, then partial RoPE: ~7 ops -> 1
  static_attention  a static decode step's KV write, attention over the cache and sigmoid gate: ~14 -> 2
  conv_silu_step  the depthwise causal conv of one token + SiLU, conv state shifted in place: ~8 -> 1
  delta_step      Gated DeltaNet's recurrent step for one token: the gates from a, b (softplus, decay,
                  sigmoid), L2-normalized q/k (repeated over the value heads), decay, delta-rule
                  update of the fp32 state in place, output: ~45 -> 1
  gated_rms_norm  RMSNorm(core) * w * silu(z): ~12 -> 1
  route           the router's softmax, top-K and renormalization: ~6 -> 1
  add_moe         x + routed + sigmoid(gate) * shared (+ the next layer's input RMSNorm): 4 (14) -> 1
  silu_mul        silu(g) * u: 2 -> 1

Each computes what the torch code computes, in the same precision: fp32 arithmetic with the
roundings to the activation dtype where torch rounds (tests/test_triton_layers.py checks them
against the torch functions, in Triton's CPU interpreter on CI and on the GPU by scripts/gpu_check.py).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

MAX_ROW = 16384  # rms_norm rows (and router logits) up to this many values (one block per row)
MAX_K = 32  # route: experts per token

if HAVE_TRITON:

    @triton.jit
    def _rms_norm(x_ptr, r_ptr, xo_ptr, y_ptr, w_ptr, n, inner, s0, s1, eps,
                  HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        src = (row // inner) * s0 + (row % inner) * s1  # x may be a strided [rows, inner, n] view
        cols = tl.arange(0, BLOCK)
        m = cols < n
        x = tl.load(x_ptr + src + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:  # x + r rounded to x's dtype (torch adds the two in that dtype), stored as the new x
            r = tl.load(r_ptr + row * n + cols, mask=m, other=0.0).to(tl.float32)
            s = (x + r).to(xo_ptr.dtype.element_ty)
            tl.store(xo_ptr + row * n + cols, s, mask=m)
            x = s.to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        tl.store(y_ptr + row * n + cols, ((x * inv) * (1.0 + w)).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rms_norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, n, inner, s0, s1, rd, eps, BLOCK: tl.constexpr):
        """rms_norm of row (t, h) of a strided [T, inner, n] view, then RoPE on its first rd values with token t's
        cos/sin [T, rd]: x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype as torch
        does; the partner value of rotate_half is loaded and normalized alongside (same scale)."""
        row = tl.program_id(0)
        t = row // inner
        src = t * s0 + (row % inner) * s1
        cols = tl.arange(0, BLOCK)
        m = cols < n
        half = rd // 2
        pc = tl.where(cols < half, cols + half, tl.where(cols < rd, cols - half, cols))  # rotate_half's partner
        x = tl.load(x_ptr + src + cols, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(x_ptr + src + pc, mask=m, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        dt = y_ptr.dtype.element_ty
        xn = ((x * inv) * (1.0 + tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32))).to(dt).to(tl.float32)
        xpn = ((xp * inv) * (1.0 + tl.load(w_ptr + pc, mask=m, other=0.0).to(tl.float32))).to(dt).to(tl.float32)
        rm = m & (cols < rd)
        c = tl.load(cos_ptr + t * rd + cols, mask=rm, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + t * rd + cols, mask=rm, other=0.0).to(tl.float32)
        rot = tl.where(cols < half, -xpn, xpn)
        roped = ((xn * c).to(dt).to(tl.float32) + (rot * sn).to(dt).to(tl.float32)).to(dt)
        tl.store(y_ptr + row * n + cols, tl.where(cols < rd, roped, xn.to(dt)), mask=m)

    @triton.jit
    def _attn_split(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, part_ptr, cap, group, kn_s, vn_s, scale,
                    D: tl.constexpr, BD: tl.constexpr, CH: tl.constexpr, BS: tl.constexpr):
        """Query head h over cache positions [sp*CH, (sp+1)*CH) up to pos of its kv head h // group, the new
        key/value (kn, vn) standing at pos; an online softmax in fp32 -> part[h, sp] = (acc [BD], max, sum).
        The group's first head writes kn, vn into the caches at pos (the other heads take them from kn, vn,
        so what they read at pos does not matter)."""
        h = tl.program_id(0)
        sp = tl.program_id(1)
        nsp = tl.num_programs(1)
        kh = h // group
        pos = tl.load(pos_ptr).to(tl.int32)
        d = tl.arange(0, BD)
        dm = d < D
        q = tl.load(q_ptr + h * D + d, mask=dm, other=0.0).to(tl.float32) * scale
        kn = tl.load(kn_ptr + kh * kn_s + d, mask=dm, other=0.0)
        vn = tl.load(vn_ptr + kh * vn_s + d, mask=dm, other=0.0)
        base = kh * cap * D
        m = tl.full([1], float("-inf"), tl.float32)
        l_sum = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BD], dtype=tl.float32)
        start = sp * CH
        end = tl.minimum(start + CH, pos + 1)
        for s0 in range(start, end, BS):
            srow = s0 + tl.arange(0, BS)
            valid = srow < end
            m2 = valid[:, None] & dm[None, :]
            off = base + srow[:, None] * D + d[None, :]
            kb = tl.load(kc_ptr + off, mask=m2, other=0.0).to(tl.float32)
            kb = tl.where(srow[:, None] == pos, kn[None, :].to(tl.float32), kb)
            sc = tl.where(valid, tl.sum(kb * q[None, :], axis=1), float("-inf"))  # [BS]
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            p = tl.exp(sc - m_new)  # (the block holds a valid position: m_new is finite)
            alpha = tl.exp(m - m_new)
            vb = tl.load(vc_ptr + off, mask=m2, other=0.0).to(tl.float32)
            vb = tl.where(srow[:, None] == pos, vn[None, :].to(tl.float32), vb)
            acc = acc * alpha + tl.sum(p[:, None] * vb, axis=0)
            l_sum = l_sum * alpha + tl.sum(p, axis=0)
            m = m_new
        out = part_ptr + (h * nsp + sp) * (BD + 2)
        tl.store(out + d, acc)
        one = tl.arange(0, 1)
        tl.store(out + BD + one, m)
        tl.store(out + BD + 1 + one, l_sum)
        if (h % group == 0) & (start <= pos) & (pos < start + CH):
            tl.store(kc_ptr + base + pos * D + d, kn.to(kc_ptr.dtype.element_ty), mask=dm)
            tl.store(vc_ptr + base + pos * D + d, vn.to(vc_ptr.dtype.element_ty), mask=dm)

    @triton.jit
    def _attn_combine(part_ptr, gate_ptr, o_ptr, nsp, gate_s, D: tl.constexpr, BD: tl.constexpr, SB: tl.constexpr):
        """o[h] = (the splits' softmax-weighted values, combined SB splits at a time) rounded to o's dtype, times
        sigmoid(gate[h]) rounded to it, the product rounded (torch's o * torch.sigmoid(gate))."""
        h = tl.program_id(0)
        d = tl.arange(0, BD)
        dm = d < D
        m = tl.full([1], float("-inf"), tl.float32)
        l_sum = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BD], dtype=tl.float32)
        for s0 in range(0, nsp, SB):
            sp = s0 + tl.arange(0, SB)
            spm = sp < nsp
            src = part_ptr + (h * nsp + sp) * (BD + 2)
            mi = tl.load(src + BD, mask=spm, other=float("-inf"))  # [SB] (a split past pos: max -inf, sum 0)
            m_new = tl.maximum(m, tl.max(mi, axis=0))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a_old = tl.exp(m - safe)
            a_new = tl.exp(mi - safe)  # [SB]
            part = tl.load(src[:, None] + d[None, :], mask=spm[:, None], other=0.0)  # [SB, BD]
            acc = acc * a_old + tl.sum(part * a_new[:, None], axis=0)
            l_sum = l_sum * a_old + tl.sum(tl.load(src + BD + 1, mask=spm, other=0.0) * a_new, axis=0)
            m = m_new
        dt = o_ptr.dtype.element_ty
        o = (acc / l_sum).to(dt).to(tl.float32)
        g = tl.load(gate_ptr + h * gate_s + d, mask=dm, other=0.0).to(tl.float32)
        sg = (1.0 / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(o_ptr + h * D + d, (o * sg).to(dt), mask=dm)

    @triton.jit
    def _conv_silu_step(x_ptr, w_ptr, s_ptr, out_ptr, c, WID: tl.constexpr, WP: tl.constexpr,
                        BC: tl.constexpr):
        ch = tl.program_id(0) * BC + tl.arange(0, BC)
        j = tl.arange(0, WP)
        cm = ch < c
        ch2, j2 = ch[:, None], j[None, :]
        m2 = cm[:, None] & (j2 < WID)
        # the window [state (WID-1 taps) | x], in the conv weight's dtype
        old = tl.load(s_ptr + ch2 * (WID - 1) + j2, mask=m2 & (j2 < WID - 1), other=0.0)
        new = tl.load(x_ptr + ch2 + 0 * j2, mask=m2 & (j2 == WID - 1), other=0.0)
        full = tl.where(j2 < WID - 1, old.to(w_ptr.dtype.element_ty), new.to(w_ptr.dtype.element_ty))
        w = tl.load(w_ptr + ch2 * WID + j2, mask=m2, other=0.0)
        acc = tl.sum(full.to(tl.float32) * w.to(tl.float32), axis=1)
        conv = acc.to(w_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + ch, (conv / (1.0 + tl.exp(-conv))).to(out_ptr.dtype.element_ty), mask=cm)
        # the state becomes the window's last WID-1 taps: column j <- column j + 1
        nxt_old = tl.load(s_ptr + ch2 * (WID - 1) + j2 + 1, mask=m2 & (j2 + 1 < WID - 1), other=0.0)
        nxt_new = tl.load(x_ptr + ch2 + 0 * j2, mask=m2 & (j2 + 1 == WID - 1), other=0.0)
        nxt = tl.where(j2 + 1 < WID - 1, nxt_old.to(s_ptr.dtype.element_ty), nxt_new.to(s_ptr.dtype.element_ty))
        tl.debug_barrier()  # every program reads its own channels only; loads above precede the store
        tl.store(s_ptr + ch2 * (WID - 1) + j2, nxt, mask=m2 & (j2 < WID - 1))

    @triton.jit
    def _delta_step(q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, alog_ptr, dtb_ptr, s_ptr, o_ptr, ratio, dv, scale,
                    DK: tl.constexpr, BV: tl.constexpr, GATES: tl.constexpr):
        h = tl.program_id(0)
        cols = tl.program_id(1) * BV + tl.arange(0, BV)
        cm = cols < dv
        kh = h // ratio  # key head of this value head
        d = tl.arange(0, DK)
        q = tl.load(q_ptr + kh * DK + d).to(tl.float32)
        k = tl.load(k_ptr + kh * DK + d).to(tl.float32)
        q = q / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6) * scale
        k = k / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6)
        if GATES:  # g_ptr, b_ptr hold the projections a, b: delta_gates' arithmetic, in fp32
            x = tl.load(g_ptr + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
            e = tl.exp(tl.minimum(x, 20.0))
            # softplus: x above torch's threshold 20; log1p(e) by its series where 1 + e would lose e's digits
            sp = tl.where(x > 20.0, x, tl.where(e < 1e-3, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e)))
            decay = tl.exp(-tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * sp)
            bl = tl.load(b_ptr + h)
            beta = (1.0 / (1.0 + tl.exp(-bl.to(tl.float32)))).to(bl.dtype).to(tl.float32)  # sigmoid in b's dtype
        else:
            decay = tl.exp(tl.load(g_ptr + h).to(tl.float32))
            beta = tl.load(b_ptr + h).to(tl.float32)
        v = tl.load(v_ptr + h * dv + cols, mask=cm, other=0.0).to(tl.float32)
        sp_ = s_ptr + h * DK * dv + d[:, None] * dv + cols[None, :]
        m2 = cm[None, :] & (d[:, None] < DK)
        s = tl.load(sp_, mask=m2, other=0.0) * decay  # [DK, BV] fp32
        delta = (v - tl.sum(k[:, None] * s, axis=0)) * beta
        s = s + k[:, None] * delta[None, :]
        tl.store(sp_, s, mask=m2)
        tl.store(o_ptr + h * dv + cols, tl.sum(q[:, None] * s, axis=0), mask=cm)

    @triton.jit
    def _gated_rms_norm(x_ptr, z_ptr, w_ptr, y_ptr, n, eps, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < n
        dt = y_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * n + cols, mask=m, other=0.0).to(dt).to(tl.float32)
        normed = (x / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)).to(dt)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        wn = w.to(tl.float32) * normed.to(tl.float32)  # torch: w * normed, in the promoted dtype
        if ROUND:
            wn = wn.to(dt)
        z = tl.load(z_ptr + row * n + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n + cols, (wn.to(tl.float32) * (z / (1.0 + tl.exp(-z)))).to(dt), mask=m)

    @triton.jit
    def _route(x_ptr, ids_ptr, w_ptr, n, K: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr):
        t = tl.program_id(0)
        cols = tl.arange(0, BE)
        m = cols < n
        x = tl.load(x_ptr + t * n + cols, mask=m, other=float("-inf")).to(tl.float32)
        e = tl.where(m, tl.exp(x - tl.max(x, axis=0)), 0.0)
        p = e / tl.sum(e, axis=0)  # softmax in fp32
        kk = tl.arange(0, KP)
        top_p = tl.zeros([KP], dtype=tl.float32)
        top_i = tl.zeros([KP], dtype=tl.int32)
        cur = tl.where(m, p, -1.0)
        for j in tl.static_range(K):  # the K largest, largest first
            i = tl.argmax(cur, axis=0)
            top_p = tl.where(kk == j, tl.max(cur, axis=0), top_p)
            top_i = tl.where(kk == j, i, top_i)
            cur = tl.where(cols == i, -1.0, cur)
        km = kk < K
        tl.store(ids_ptr + t * K + kk, top_i.to(tl.int64), mask=km)
        tl.store(w_ptr + t * K + kk, (top_p / tl.sum(top_p, axis=0)).to(w_ptr.dtype.element_ty), mask=km)

    @triton.jit
    def _add_moe(x_ptr, r_ptr, s_ptr, g_ptr, y_ptr, w_ptr, h_ptr, n, eps, NORM: tl.constexpr, BLOCK: tl.constexpr):
        """y = x + (routed + sigmoid(gate) * shared), each op rounded to the dtype as torch does; NORM (one
        program per row): also h = rms_norm(y) with weight w, as _rms_norm (the next layer's input norm)."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        dt = y_ptr.dtype.element_ty
        gl = tl.load(g_ptr + row)
        sg = (1.0 / (1.0 + tl.exp(-gl.to(tl.float32)))).to(dt).to(tl.float32)
        sh = tl.load(s_ptr + row * n + cols, mask=m, other=0.0).to(tl.float32)
        ro = tl.load(r_ptr + row * n + cols, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * n + cols, mask=m, other=0.0).to(tl.float32)
        moe = (ro + (sg * sh).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        y = (x + moe).to(dt)
        tl.store(y_ptr + row * n + cols, y, mask=m)
        if NORM:
            yf = y.to(tl.float32)
            w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
            inv = 1.0 / tl.sqrt(tl.sum(yf * yf, axis=0) / n + eps)
            tl.store(h_ptr + row * n + cols, ((yf * inv) * (1.0 + w)).to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        """silu(g) * u, silu rounded to the dtype first as torch does."""
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        dt = y_ptr.dtype.element_ty
        g = tl.load(g_ptr + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rms_norm(x) (models/layers.py), or with `residual`: (x + residual, rms_norm(x + residual)).
    x: [..., n] with unit stride in n, at most 3 dims (q/k heads are strided views); residual
    contiguous like x."""
    n = x.shape[-1]
    x3 = x.reshape(-1, 1, n) if x.dim() <= 2 else x
    assert x3.dim() == 3 and x.stride(-1) == 1 and n <= MAX_ROW, "rms_norm kernel: [..., n] rows, unit stride"
    rows, inner = x3.shape[0] * x3.shape[1], x3.shape[1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    warps = 4 if block >= 2048 else 1
    if residual is None:
        _rms_norm[(rows,)](x3, x3, y, y, weight, n, inner, x3.stride(0), x3.stride(1), eps,
                           HAS_RES=False, BLOCK=block, num_warps=warps)
        return y
    assert residual.is_contiguous() and residual.shape == x.shape
    xo = torch.empty_like(y)
    _rms_norm[(rows,)](x3, residual, xo, y, weight, n, inner, x3.stride(0), x3.stride(1), eps,
                       HAS_RES=True, BLOCK=block, num_warps=warps)
    return xo, y


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor):
    """layers.apply_partial_rope(layers.rms_norm(x, weight, eps), cos, sin) for q or k heads x [T, heads, D]
    (unit stride in D; the heads may be a strided view), cos/sin [T, rd] in x's dtype: one launch, contiguous."""
    t, heads, n = x.shape
    rd = cos.shape[-1]
    assert x.stride(-1) == 1 and n <= MAX_ROW and rd % 2 == 0 and rd <= n
    assert cos.shape == sin.shape == (t, rd) and cos.is_contiguous() and sin.is_contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_rope[(t * heads,)](x, weight, cos, sin, y, n, heads, x.stride(0), x.stride(1), rd, eps, BLOCK=block,
                                 num_warps=4 if block >= 2048 else 1)
    return y


# static_attention: cache positions per program (a split; 2 blocks of ATTN_BLOCK): small, so that a step's few
# hundred positions spread over many programs (16 query heads x 8 splits at 512 cached tokens) that each wait
# on two loads, not one program per head looping over them all (chosen, not measured)
ATTN_CHUNK, ATTN_BLOCK = 64, 32


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, pos: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """layers.static_attention in two launches: k, v [1, Hkv, D] written into the caches [Hkv, C, D] at the
    device position pos [1]; q [1, Hq, D] (contiguous) over positions 0..pos (split over positions, then
    combined: flash decoding), times sigmoid(gate [1, Hq, D], unit stride in D) -> [1, Hq * D] in q's dtype."""
    _, hq, d = q.shape
    hkv, cap = cache_k.shape[0], cache_k.shape[1]
    assert q.is_contiguous() and cache_k.is_contiguous() and cache_v.is_contiguous() and hq % hkv == 0
    assert cache_k.shape == cache_v.shape == (hkv, cap, d) and k.shape == v.shape == (1, hkv, d)
    assert k.stride(-1) == v.stride(-1) == gate.stride(-1) == 1 and gate.shape == q.shape
    bd = triton.next_power_of_2(d)
    nsp = triton.cdiv(cap, ATTN_CHUNK)
    part = torch.empty(hq, nsp, bd + 2, dtype=torch.float32, device=q.device)
    _attn_split[(hq, nsp)](q, k, v, cache_k, cache_v, pos, part, cap, hq // hkv, k.stride(1), v.stride(1),
                           d**-0.5, D=d, BD=bd, CH=ATTN_CHUNK, BS=ATTN_BLOCK, num_warps=4)
    o = torch.empty(1, hq * d, dtype=q.dtype, device=q.device)
    _attn_combine[(hq,)](part, gate, o, nsp, gate.stride(1), D=d, BD=bd, SB=16, num_warps=4)
    return o


def conv_silu_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One token: silu(causal_conv1d(x)) for x [1, C] (contiguous), weight [C, W]; state [C, W-1]
    shifted in place."""
    c, wid = weight.shape
    assert x.shape == (1, c) and x.is_contiguous() and state.shape == (c, wid - 1) and state.is_contiguous()
    assert weight.is_contiguous()
    out = torch.empty_like(x)
    bc = 128
    _conv_silu_step[(triton.cdiv(c, bc),)](x, weight, state, out, c, WID=wid, WP=triton.next_power_of_2(wid),
                                            BC=bc, num_warps=4)
    return out


def delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None,
               state: torch.Tensor, gates: tuple | None = None) -> torch.Tensor:
    """One token of gated_delta_rule: q, k [1, Hk, Dk], v [1, Hv, Dv], g, beta [1, Hv]; state fp32
    [Hv, Dk, Dv] updated in place. Returns out fp32 [1, Hv, Dv]. gates=(a, b, A_log, dt_bias) instead
    of g and beta: the gates are computed in the same launch (layers.delta_gates' arithmetic)."""
    _, hk, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    for t in (q, k, v):
        assert t.shape[0] == 1 and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1], "delta_step: dense heads"
    assert state.dtype == torch.float32 and state.is_contiguous() and state.shape == (hv, dk, dv)
    assert dk == triton.next_power_of_2(dk) and hv % hk == 0
    if gates is not None:
        a, b, a_log, dt_bias = (t.contiguous() for t in gates)
        assert a.numel() == b.numel() == a_log.numel() == dt_bias.numel() == hv
        args = (a, b, a_log, dt_bias)
    else:
        args = (g.contiguous(), beta.contiguous(), state, state)  # the last two unused
    out = torch.empty(1, hv, dv, dtype=torch.float32, device=v.device)
    bv = min(32, triton.next_power_of_2(dv))
    _delta_step[(hv, triton.cdiv(dv, bv))](q, k, v, *args, state, out, hv // hk, dv, dk**-0.5, DK=dk, BV=bv,
                                           GATES=gates is not None, num_warps=4)
    return out


def gated_rms_norm(core: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """layers.gated_rms_norm(core.to(dtype), z, weight, eps) for core [..., n] (any float dtype),
    z [..., n], both contiguous."""
    n = core.shape[-1]
    assert core.is_contiguous() and z.is_contiguous() and z.shape == core.shape and n <= MAX_ROW
    y = torch.empty(core.shape, dtype=dtype, device=core.device)
    block = triton.next_power_of_2(n)
    rnd = torch.promote_types(weight.dtype, dtype) != torch.float32
    _gated_rms_norm[(core.numel() // n,)](core, z, weight, y, n, eps, ROUND=rnd, BLOCK=block,
                                          num_warps=1 if block <= 512 else 4)
    return y


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.route: router logits [T, E] -> (expert ids int64 [T, K], largest first; weights [T, K]
    summing to 1 in the logits' dtype), softmax and renormalization in fp32."""
    t, n = logits.shape
    assert logits.is_contiguous() and 1 <= k <= min(n, MAX_K) and n <= MAX_ROW
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    w = torch.empty(t, k, dtype=logits.dtype, device=logits.device)
    block = triton.next_power_of_2(n)
    _route[(t,)](logits, ids, w, n, K=k, KP=triton.next_power_of_2(k), BE=block, num_warps=4 if block >= 1024 else 1)
    return ids, w


def add_moe(x: torch.Tensor, routed: torch.Tensor, shared: torch.Tensor, gate: torch.Tensor,
            norm: tuple[torch.Tensor, float] | None = None):
    """layers.add_moe for x, routed, shared [T, H] (one dtype, contiguous) and gate logits [T, 1]; with
    norm = (weight, eps): (that sum, rms_norm of it) in the same launch."""
    t, n = x.shape
    assert routed.shape == shared.shape == x.shape and gate.numel() == t
    assert routed.dtype == shared.dtype == x.dtype == gate.dtype
    assert x.is_contiguous() and routed.is_contiguous() and shared.is_contiguous()
    y = torch.empty_like(x)
    if norm is None:
        _add_moe[(t, triton.cdiv(n, 1024))](x, routed, shared, gate.contiguous(), y, y, y, n, 0.0, NORM=False,
                                            BLOCK=1024, num_warps=4)
        return y
    assert n <= MAX_ROW
    h = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _add_moe[(t, 1)](x, routed, shared, gate.contiguous(), y, norm[0], h, n, norm[1], NORM=True, BLOCK=block,
                     num_warps=4 if block >= 2048 else 1)
    return y, h


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """F.silu(g) * u for g, u of one shape and dtype, contiguous."""
    assert g.shape == u.shape and g.dtype == u.dtype and g.is_contiguous() and u.is_contiguous()
    y = torch.empty_like(g)
    _silu_mul[(triton.cdiv(g.numel(), 1024),)](g, u, y, g.numel(), BLOCK=1024, num_warps=4)
    return y
