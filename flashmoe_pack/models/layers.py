"""Shared building blocks of the model files: small pure functions over plain tensors.

Shapes use T = new tokens, S = tokens in the KV cache, H = hidden size, D = head dim.
Everything runs in the dtype of its inputs (the resident weights' dtype), except where
transformers computes in fp32 (norms, softmax, the delta rule); we do the same there so
that fp32 runs agree with transformers to rounding and bf16 runs round the same way.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant import QTensor, dequantize

# ------------------------------------------------------------------------------ fused kernels


def _fused(x: Tensor):
    """backends.triton_layers for a CUDA tensor (one launch per norm / conv step / delta step),
    else None; FLASHMOE_CUDA_LAYER_KERNELS=0 turns them off (A/B)."""
    if x.device.type != "cuda" or os.environ.get("FLASHMOE_CUDA_LAYER_KERNELS", "1") == "0":
        return None
    from ..backends import triton_layers

    return triton_layers if triton_layers.HAVE_TRITON else None


def _gpu_qkernels(x: Tensor):
    """backends.triton_kernels for quantized resident matrices times a CUDA tensor, else None."""
    if x.device.type != "cuda":
        return None
    from ..backends import triton_kernels

    return triton_kernels if triton_kernels.HAVE_TRITON else None


# ---------------------------------------------------------------------------------------- linear

# From this many rows of x on, a quantized product on the CPU dequantizes the weight in row chunks
# (C, 0.2 ns per weight) and multiplies in torch; below, the C kernels multiply straight from the
# packed words. Measured on the 2-core AVX-512 box, one thread, q8 32768x4096 (ms, torch bf16 /
# C q8 / dequantize + torch): T=16 19.8 / 30.0 / 43.7, T=32 29.0 / 50.2 / 53.3, T=64 45.3 / 99.8 / 71.5.
DEQUANT_FROM_T = 40
_CHUNK_ELEMENTS = 1 << 23  # weights dequantized per chunk (16 MiB in bf16)
# Smaller decode products run on the calling thread alone: waking the pool costs more than it saves
# (a router's 512 x 4096, linear attention's 64 x 4096 gates).
_ONE_THREAD_BELOW = 1 << 22


def _c_kernels():
    """backends.cpu when its C kernels can run resident products, else None (FLASHMOE_CPU_KERNEL=torch
    turns them off here as for the experts)."""
    if os.environ.get("FLASHMOE_CPU_KERNEL", "").lower() == "torch":
        return None
    from ..backends import cpu

    return cpu if cpu.available() else None


def linear(x: Tensor, w: Tensor | QTensor, bias: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """x [..., in] @ w^T (+ bias) -> [..., out] in out_dtype (default x's dtype); every weight matrix
    of the model goes through here.

    A float w runs as torch's F.linear (on the CPU faster than the C float path at every T measured:
    bf16 32768x4096, one thread, T=1 15.0 ms vs 23.9). A QTensor on the CPU runs in the C kernels
    (float32 arithmetic on the exact dequantized values; threads as the expert kernels:
    FLASHMOE_THREADS, else torch's). On CUDA, up to triton_kernels.DECODE_MAX_T rows of x run in a
    Triton kernel straight from the packed words (the expert decode kernels' float32 arithmetic);
    more rows, other devices, or no C kernels: the matrix is dequantized to x's dtype a chunk of
    rows at a time and multiplied in torch (the whole float matrix never exists)."""
    if not isinstance(w, QTensor):
        y = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))  # (the model's are in w's dtype)
        return y.to(out_dtype or x.dtype)
    out_dtype = out_dtype or x.dtype
    rows, cols = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)  # [T, in]
    cpu = _c_kernels() if x.device.type == "cpu" and w.weight.device.type == "cpu" else None
    gpu = _gpu_qkernels(x) if cpu is None else None
    if gpu is not None and x2.shape[0] <= gpu.DECODE_MAX_T and gpu.supported(w):
        y = gpu.qmatvec(x2.contiguous(), w, torch.float32)
    elif cpu is None:
        y = torch.empty(x2.shape[0], rows, dtype=x.dtype, device=x.device)
        step = max(1, (_CHUNK_ELEMENTS * (8 if x.device.type == "cuda" else 1)) // cols)
        for r in range(0, rows, step):
            part = QTensor(w.weight[r: r + step], w.scales[r: r + step], w.biases[r: r + step], w.bits, w.group_size)
            y[:, r: r + step] = x2 @ dequantize(part, x.dtype).T
    elif x2.shape[0] < DEQUANT_FROM_T:
        threads = 1 if rows * cols * x2.shape[0] < _ONE_THREAD_BELOW else None
        y = cpu.matmul(x2.to(torch.float32).contiguous(), w, threads)  # [T, out] float32
    else:  # prefill: dequantize a chunk of rows at a time, multiply in torch in x's dtype
        y = torch.empty(x2.shape[0], rows, dtype=x.dtype)
        step = max(1, _CHUNK_ELEMENTS // cols)
        buf = torch.empty(min(step, rows), cols, dtype=x.dtype)
        for r in range(0, rows, step):
            n = min(step, rows - r)
            chunk = cpu.dequantize_rows(w, r, r + n, x.dtype, out=buf[:n])
            torch.matmul(x2, chunk.T, out=y[:, r: r + n])
    if bias is not None:
        y = y + bias
    return y.to(out_dtype).reshape(*lead, rows)


def embedding(ids: Tensor, w: Tensor | QTensor, dtype: torch.dtype) -> Tensor:
    """Rows ids [T] of the embedding matrix, [T, H] in dtype: a lookup; a quantized matrix has only
    the T rows it returns dequantized."""
    if not isinstance(w, QTensor):
        return F.embedding(ids, w).to(dtype)
    ids = ids.to(w.weight.device)
    rows = QTensor(w.weight[ids], w.scales[ids], w.biases[ids], w.bits, w.group_size)
    cpu = _c_kernels() if w.weight.device.type == "cpu" and dtype in (torch.float32, torch.float16,
                                                                        torch.bfloat16) else None
    return cpu.dequantize_rows(rows, dtype=dtype) if cpu is not None else dequantize(rows, dtype)


# ---------------------------------------------------------------------------------------- norms


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Qwen3.5 RMSNorm: weights are stored zero-centred, so the scale is (1 + weight).

    Normalizes and scales in fp32, then casts back to x's dtype (as transformers does).
    """
    fused = _fused(x)
    if fused is not None and x.dim() <= 3 and x.stride(-1) == 1 and x.shape[-1] <= fused.MAX_ROW:
        return fused.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def add_rms_norm(x: Tensor, h: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual step: x + h, and rms_norm of it."""
    fused = _fused(x)
    if fused is not None and x.is_contiguous() and h.is_contiguous() and x.shape[-1] <= fused.MAX_ROW:
        return fused.rms_norm(x, weight, eps, residual=h)
    x = x + h
    return x, rms_norm(x, weight, eps)


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float, dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm(x) * weight * silu(gate) over the last dim; the plain weight here is not zero-centred.
    dtype: that of x.to(dtype) first (default x's), which the fused kernel does as it loads x (no cast launch)."""
    fused = _fused(x)
    if fused is not None and x.is_contiguous() and gate.is_contiguous() and x.shape[-1] <= fused.MAX_ROW:
        return fused.gated_rms_norm(x, gate, weight, eps, dtype or x.dtype)
    x = x.to(dtype or x.dtype)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return ((weight * normed) * F.silu(gate.float())).to(x.dtype)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the FLA library's convention)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------- rope


def rope_inv_freq(rotary_dim: int, theta: float) -> Tensor:
    """Inverse frequencies of standard RoPE over `rotary_dim` dims: fp32 [rotary_dim // 2]."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables [T, rotary_dim] for integer positions [T], computed in fp32, cast to dtype.

    Qwen3.5's text mRoPE gives the t, h and w sections the same position for text tokens, so
    whatever the section split (or its interleaving) it reduces to this plain RoPE.
    """
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, rotary_dim // 2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, rotary_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rms_norm_rope(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_partial_rope(rms_norm(x, weight, eps), cos, sin) for heads x [T, heads, D]; on CUDA one launch."""
    fused = _fused(x)
    if (fused is not None and x.dim() == 3 and x.stride(-1) == 1 and x.shape[-1] <= fused.MAX_ROW
            and cos.dtype == x.dtype and cos.is_contiguous() and sin.is_contiguous()):
        return fused.rms_norm_rope(x, weight, eps, cos, sin)
    return apply_partial_rope(rms_norm(x, weight, eps), cos, sin)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] dims of x [T, heads, D]; the remaining dims pass through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, rd]: broadcast over heads
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


# ---------------------------------------------------------------------------- short convolution


def causal_conv1d(x: Tensor, weight: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over time with carried left context (no activation).

    x [T, C], weight [C, W], state [C, W-1] = the last W-1 inputs seen so far (zeros at start).
    Returns (out [T, C], new state [C, W-1]). One function serves prefill, continued prefill
    and single-token decode, because the state is exactly the left padding a fresh conv would use.
    """
    width = weight.shape[-1]
    full = torch.cat([state, x.transpose(0, 1).to(weight.dtype)], dim=-1)  # [C, W-1+T]
    if x.shape[0] == 1:  # decode: one dot of W taps per channel (a conv call costs ~20x more here)
        out = (full.float() * weight.float()).sum(-1, keepdim=True).to(weight.dtype)  # [C, 1]
    else:
        out = F.conv1d(full[None], weight[:, None, :], groups=weight.shape[0])[0]  # [C, T]
    new_state = full[:, full.shape[-1] - (width - 1) :]  # a view: the model copies it into its state
    return out.transpose(0, 1).to(x.dtype), new_state


def conv_silu_(x: Tensor, weight: Tensor, state: Tensor) -> Tensor:
    """silu(causal_conv1d(x, weight, state)), with `state` [C, W-1] updated in place."""
    fused = _fused(x)
    if fused is not None and x.shape[0] == 1 and x.is_contiguous() and weight.is_contiguous():
        return fused.conv_silu_step(x, weight, state)
    out, new_state = causal_conv1d(x, weight, state)
    state.copy_(new_state)
    return F.silu(out)


# ------------------------------------------------------------------------------ gated delta rule


def delta_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor):
    """Gated delta rule, one token at a time (the decode path).

    q, k [Hv, T, Dk] (normalized), v [Hv, T, Dv], g (log decay) and beta [Hv, T], state [Hv, Dk, Dv],
    all fp32. Per token: S = e^g S;  S += k (beta (v - S^T k))^T;  o = S^T q.
    Returns (out [Hv, T, Dv], new state).
    """
    out = torch.empty_like(v)
    for t in range(q.shape[1]):
        state = state * g[:, t, None, None].exp()  # a new tensor: the caller's state is never written
        k_t = k[:, t, None, :]  # [Hv, 1, Dk]
        predicted = torch.bmm(k_t, state)  # [Hv, 1, Dv]: what the state already recalls for k_t
        delta = (v[:, t, None, :] - predicted) * beta[:, t, None, None]  # [Hv, 1, Dv]
        state.baddbmm_(k_t.mT, delta)  # S += k delta^T, in place on this step's own tensor
        out[:, t] = torch.bmm(q[:, t, None, :], state)[:, 0]
    return out, state


def delta_rule_chunked(q, k, v, g, beta, state, chunk_size: int = 64):
    """Gated delta rule over chunks of `chunk_size` tokens (the prefill path); same contract as
    delta_rule_recurrent and the same result up to rounding.

    Inside a chunk with cumulative log decay G_i = g_1 + ... + g_i, the corrections
    u_i = beta_i (v_i - e^{G_i} k_i^T S_0 - sum_{j<i} e^{G_i - G_j} (k_i . k_j) u_j)
    form a unit lower-triangular system (I + A) U = beta V - beta e^G K S_0, solved with one
    triangular solve per chunk; outputs and the next state then follow by matmuls.
    """
    out = torch.empty_like(v)
    n = q.shape[1]
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        q_c, k_c, v_c, g_c, b_c = q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl]
        c = q_c.shape[1]
        cum = g_c.cumsum(-1)  # [Hv, c]
        future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
        # decay[i, j] = e^{G_i - G_j} for j <= i; masked before exp because G_i - G_j > 0 when j > i
        decay = (cum[:, :, None] - cum[:, None, :]).masked_fill(future, float("-inf")).exp()  # [Hv, c, c]
        k_beta = k_c * b_c[..., None]  # [Hv, c, Dk]
        system = ((k_beta @ k_c.mT) * decay).tril(-1) + torch.eye(c, dtype=q.dtype, device=q.device)
        rhs = torch.cat([v_c * b_c[..., None], k_beta * cum.exp()[..., None]], dim=-1)
        sol = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        u = sol[..., : v.shape[-1]] - sol[..., v.shape[-1] :] @ state  # [Hv, c, Dv]
        attn = (q_c @ k_c.mT) * decay  # [Hv, c, c], diagonal included: o_i reads its own write
        out[:, sl] = (q_c * cum.exp()[..., None]) @ state + attn @ u
        last = cum[:, -1:]  # [Hv, 1]
        k_tail = k_c * (last - cum).exp()[..., None]  # decay from each token to the chunk end
        state = state * last.exp()[..., None] + k_tail.mT @ u
    return out, state


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                     chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Gated DeltaNet core for one sequence.

    q, k [T, Hk, Dk]; v [T, Hv, Dv]; g (log decay, <= 0) and beta [T, Hv]; state fp32 [Hv, Dk, Dv].
    Each key head serves Hv // Hk consecutive value heads. q and k are L2-normalized and q is
    scaled by Dk^-0.5, all in fp32. Uses the recurrent form for T == 1 and the chunked form
    otherwise (as transformers does). Returns (out fp32 [T, Hv, Dv], new state).
    """
    rep = v.shape[1] // k.shape[1]
    q, k = (l2_normalize(x.float().repeat_interleave(rep, dim=1)) for x in (q, k))
    q = q * q.shape[-1] ** -0.5
    q, k, v = (x.transpose(0, 1).contiguous() for x in (q, k, v.float()))  # [Hv, T, D]
    g, beta = g.float().transpose(0, 1), beta.float().transpose(0, 1)  # [Hv, T]
    if q.shape[1] == 1:
        out, state = delta_rule_recurrent(q, k, v, g, beta, state)
    else:
        out, state = delta_rule_chunked(q, k, v, g, beta, state, chunk_size)
    return out.transpose(0, 1), state


# ------------------------------------------------------------------------ routing and the MoE sum


def add_moe(x: Tensor, routed: Tensor, shared: Tensor, shared_gate: Tensor) -> Tensor:
    """x + routed experts + the shared expert scaled by sigmoid(its gate logit [T, 1]); on CUDA one launch."""
    fused = _fused(x)
    if _add_moe_fits(fused, x, routed, shared, shared_gate):
        return fused.add_moe(x, routed, shared, shared_gate)
    return x + (routed + torch.sigmoid(shared_gate) * shared)


def add_moe_rms_norm(x: Tensor, routed: Tensor, shared: Tensor, shared_gate: Tensor, weight: Tensor,
                     eps: float) -> tuple[Tensor, Tensor]:
    """(y = add_moe(...), rms_norm(y, weight, eps)): a layer's last step and the next layer's first; on CUDA
    one launch."""
    fused = _fused(x)
    if _add_moe_fits(fused, x, routed, shared, shared_gate) and x.shape[-1] <= fused.MAX_ROW:
        return fused.add_moe(x, routed, shared, shared_gate, norm=(weight, eps))
    y = add_moe(x, routed, shared, shared_gate)
    return y, rms_norm(y, weight, eps)


def _add_moe_fits(fused, x: Tensor, routed: Tensor, shared: Tensor, shared_gate: Tensor) -> bool:
    return (fused is not None and x.dim() == 2 and x.dtype == routed.dtype == shared.dtype == shared_gate.dtype
            and x.is_contiguous() and routed.is_contiguous() and shared.is_contiguous())


def route(router_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax top-K routing: logits [T, E] -> (expert ids [T, K], largest first, weights [T, K] summing
    to 1, in the logits' dtype). On CUDA one launch (backends/triton_layers.route)."""
    fused = _fused(router_logits)
    if fused is not None and k <= fused.MAX_K and router_logits.shape[-1] <= fused.MAX_ROW:
        return fused.route(router_logits.contiguous(), k)
    probs = torch.softmax(router_logits.float(), dim=-1)
    top_p, top_ids = probs.topk(k, dim=-1)
    return top_ids, (top_p / top_p.sum(-1, keepdim=True)).to(router_logits.dtype)


# ------------------------------------------------------------------- gated delta rule: gates and step


def _one_token_pow2(q: Tensor) -> bool:
    """What triton_layers.delta_step takes: one token, a power-of-two key head dim."""
    return q.shape[0] == 1 and q.shape[-1] == 1 << (q.shape[-1] - 1).bit_length()


def delta_gates(a: Tensor, b: Tensor, a_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """Gated DeltaNet's per-head gates from a, b [T, hv]: (log decay g <= 0 in fp32, because
    exp(A_log) can overflow half precision; write strength beta = sigmoid(b))."""
    return -a_log.float().exp() * F.softplus(a.float() + dt_bias), torch.sigmoid(b)


def gated_delta_step_(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, a_log: Tensor, dt_bias: Tensor,
                      state: Tensor) -> Tensor:
    """delta_gates, then gated_delta_rule_ (state updated in place); on CUDA, one token is one launch."""
    fused = _fused(v)
    if fused is not None and _one_token_pow2(q):
        return fused.delta_step(q, k, v, None, None, state, gates=(a, b, a_log, dt_bias))
    g, beta = delta_gates(a, b, a_log, dt_bias)
    return gated_delta_rule_(q, k, v, g, beta, state)


def gated_delta_rule_(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> Tensor:
    """gated_delta_rule with `state` updated in place; returns out fp32 [T, Hv, Dv]."""
    fused = _fused(v)
    if fused is not None and _one_token_pow2(q):
        return fused.delta_step(q, k, v, g, beta, state)
    out, new_state = gated_delta_rule(q, k, v, g, beta, state)
    state.copy_(new_state)
    return out


# ------------------------------------------------------------------------------------ attention


class KVCache:
    """Keys and values of one attention layer, [Hkv, S, D], in a buffer that grows by doubling.

    The buffer is zero-filled, so a static decode step (write_at + decode_attention) can attend over
    all of it with the unused tail masked: masked weights are exactly 0, and 0 * 0 stays 0."""

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 256):
        self.k = torch.zeros(num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, n: int) -> None:
        """Make room for n tokens in all (doubling; a new buffer keeps the cached part)."""
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], cap, old.shape[2])
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [Hkv, T, D]; return views of all cached keys and values [Hkv, S, D]."""
        end = self.length + k.shape[1]
        self.reserve(end)
        self.k[:, self.length : end] = k
        self.v[:, self.length : end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def write_at(self, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Static step: write k, v [Hkv, 1, D] at the device position pos [1] (< capacity; length is
        not changed: the caller advances it) and return the whole buffers [Hkv, capacity, D]."""
        self.k.index_copy_(1, pos, k.to(self.k.dtype))
        self.v.index_copy_(1, pos, v.to(self.v.dtype))
        return self.k, self.v

    def clone(self) -> KVCache:
        """Independent copy holding only the used part."""
        other = KVCache.__new__(KVCache)
        other.k, other.v = self.k[:, : self.length].clone(), self.v[:, : self.length].clone()
        other.length = self.length
        return other


def attention(q: Tensor, k: Tensor, v: Tensor, past: int) -> Tensor:
    """Causal GQA attention of T new queries over S = past + T cached keys.

    q [Hq, T, D]; k, v [Hkv, S, D] with Hq a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)).
    Query i sits at position past + i and sees keys 0..past + i. Returns [Hq, T, D].
    """
    t, s = q.shape[1], k.shape[1]
    mask = None
    if t > 1:  # a single new token sees the whole cache, no mask needed
        mask = torch.arange(s, device=q.device)[None, :] <= past + torch.arange(t, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
    """One query per head at device position pos [1] over whole KV buffers whose slots > pos are
    masked (the static decode step: shapes fixed by the buffer, no host value involved).

    q [Hq, 1, D]; k, v [Hkv, C, D] -> [Hq, 1, D]. Scores and softmax in fp32."""
    hq, _, d = q.shape
    hkv, cap = k.shape[0], k.shape[1]
    qg = q.reshape(hkv, hq // hkv, d)  # query head h reads kv head h // (Hq/Hkv)
    scores = torch.bmm(qg, k.mT).float() * d**-0.5  # [Hkv, G, C]
    scores = scores.masked_fill(torch.arange(cap, device=q.device) > pos, float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [Hkv, G, D]
    return out.reshape(hq, 1, d)


def static_attention(q: Tensor, k: Tensor, v: Tensor, cache: KVCache, pos: Tensor, gate: Tensor) -> Tensor:
    """The static decode step's attention: k, v [1, Hkv, D] written into `cache` at the device position pos [1],
    q [1, Hq, D] over it (decode_attention), times sigmoid(gate [1, Hq, D]) -> [1, Hq * D]; on CUDA two launches."""
    fused = _fused(q)
    if (fused is not None and q.is_contiguous() and k.stride(-1) == v.stride(-1) == gate.stride(-1) == 1
            and k.dtype == v.dtype == cache.k.dtype == q.dtype == gate.dtype):
        return fused.static_attention(q, k, v, cache.k, cache.v, pos, gate)
    keys, values = cache.write_at(k.transpose(0, 1), v.transpose(0, 1), pos)  # [Hkv, capacity, D]
    o = decode_attention(q.transpose(0, 1), keys, values, pos)  # [Hq, 1, D]
    return o.transpose(0, 1).reshape(1, -1) * torch.sigmoid(gate.reshape(1, -1))


# ------------------------------------------------------------------------------------------ mlp


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """down(silu(gate x) * up x): x [T, H], gate/up [I, H], down [H, I] -> [T, H] (float or QTensor weights)."""
    return silu_down(linear(x, gate), linear(x, up), down)


def swiglu_fused(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """swiglu with gate and up concatenated by rows into one matrix gate_up [2I, H]."""
    g, u = linear(x, gate_up).chunk(2, dim=-1)
    return silu_down(g, u, down)


def silu_down(g: Tensor, u: Tensor, down: Tensor) -> Tensor:
    """down(silu(g) * u): swiglu's second half, for gate and up products g, u [T, I] computed elsewhere."""
    fused = _fused(g)
    if fused is not None and g.dtype == u.dtype and g.is_contiguous() and u.is_contiguous():
        return linear(fused.silu_mul(g, u), down)
    return linear(F.silu(g) * u, down)
