"""The fused decode-layer kernels (backends/triton_layers.py) against the torch functions they replace.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is
imported); scripts/gpu_check.py runs this file on the H200.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from flashmoe_pack.backends import triton_layers as tl  # noqa: E402
from flashmoe_pack.models import layers  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def rand(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def close(got, want, dtype):
    """Equal up to fp32 reassociation, plus one rounding step of the activation dtype (the interpreter
    truncates to bfloat16 where the GPU rounds to nearest)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 77), (3, 1000), (1, 5, 24)])
def test_rms_norm(dtype, shape):
    g = gen(0)
    x, w = rand(*shape, g=g, dtype=dtype), rand(shape[-1], g=g, dtype=dtype, scale=0.3)
    close(tl.rms_norm(x, w, 1e-6), _torch_rms_norm(x, w, 1e-6), dtype)


def _torch_rms_norm(x, w, eps):
    """layers.rms_norm's torch code (layers.rms_norm itself takes the kernel on a GPU)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + w.float())).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_a_strided_head_view_and_with_residual(dtype):
    g = gen(1)
    t, heads, d = 2, 3, 40
    proj = rand(t, heads * 2 * d, g=g, dtype=dtype)
    q, _ = proj.view(t, heads, 2 * d).chunk(2, dim=-1)  # the q half of q_proj's [query | gate] heads
    w = rand(d, g=g, dtype=dtype, scale=0.3)
    assert not q.is_contiguous()
    close(tl.rms_norm(q, w, 1e-6), _torch_rms_norm(q, w, 1e-6), dtype)
    x, h = rand(t, 333, g=g, dtype=dtype), rand(t, 333, g=g, dtype=dtype)
    w = rand(333, g=g, dtype=dtype, scale=0.3)
    xo, y = tl.rms_norm(x, w, 1e-6, residual=h)
    if DEV == "cuda":  # the residual stream rounds exactly as torch's add
        assert torch.equal(xo, x + h)
    else:  # Triton's interpreter truncates to bfloat16 where the GPU rounds to nearest
        close(xo, x + h, dtype)
    close(y, _torch_rms_norm(x + h, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,heads,d,rd", [(1, 5, 40, 10), (3, 2, 24, 24), (2, 3, 72, 18)])
def test_rms_norm_rope_of_strided_heads(dtype, t, heads, d, rd):
    """q heads (the strided query half of q_proj's [query | gate] heads) and contiguous k heads: RMSNorm,
    then RoPE on the first rd dims, against layers' torch code; the pass-through dims are the norm's alone."""
    g = gen(9)
    proj = rand(t, heads * 2 * d, g=g, dtype=dtype)
    q, _ = proj.view(t, heads, 2 * d).chunk(2, dim=-1)
    k = rand(t, heads, d, g=g, dtype=dtype)
    w = rand(d, g=g, dtype=dtype, scale=0.3)
    inv = layers.rope_inv_freq(rd, 10000.0)
    cos, sin = layers.rope_cos_sin(torch.arange(7, 7 + t), inv, dtype)
    cos, sin = cos.to(DEV), sin.to(DEV)
    for x in (q, k):
        want = layers.apply_partial_rope(_torch_rms_norm(x, w, 1e-6), cos, sin)
        got = tl.rms_norm_rope(x, w, 1e-6, cos, sin)
        assert got.is_contiguous() and got.dtype == dtype
        if dtype == torch.float32:
            close(got, want, dtype)
        else:  # bfloat16 roundings of the norm and of both products (|x| < 4: an ulp <= 2^-6) then the sum,
            # truncated by the interpreter: up to 2 ulps of the products apart, also where the sum cancels
            torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-6 + 1e-3, atol=2.0**-5)
        close(got[..., rd:], _torch_rms_norm(x, w, 1e-6)[..., rd:], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,cap,pos", [(6, 2, 40, 600, 0), (6, 2, 40, 600, 256), (4, 4, 16, 300, 299),
                                             (8, 1, 32, 257, 130), (4, 2, 16, 1100, 1050)])  # 18 splits
def test_static_attention_equals_write_at_then_decode_attention(dtype, hq, hkv, d, cap, pos):
    """The static decode step (KV write at a device position, attention over 0..pos split into chunks of
    ATTN_CHUNK positions and combined, sigmoid gate) against layers' torch code, from q_proj's strided gate
    half and a strided v; the caches end equal: the new key/value at pos, every other slot untouched."""
    g = gen(11)
    q = rand(1, hq, d, g=g, dtype=dtype)
    gate = rand(1, hq, 2 * d, g=g, dtype=dtype)[..., :d]  # a strided view, as q_proj's [query | gate] split
    k = rand(1, hkv, d, g=g, dtype=dtype)
    v = rand(1, hkv, 3 * d, g=g, dtype=dtype)[..., d: 2 * d]
    ref = layers.KVCache(hkv, d, dtype, DEV, capacity=cap)
    ref.k.copy_(rand(hkv, cap, d, g=g, dtype=dtype))
    ref.v.copy_(rand(hkv, cap, d, g=g, dtype=dtype))
    ours = ref.clone()
    ours.k, ours.v = ref.k.clone(), ref.v.clone()  # the whole buffers (clone keeps the used part only)
    p = torch.tensor([pos], device=DEV)
    want = layers.static_attention(q, k, v, ref, p, gate) if DEV == "cpu" else None
    if want is None:  # on the GPU layers takes the kernel: the torch code spelled out
        keys, values = ref.write_at(k.transpose(0, 1), v.transpose(0, 1), p)
        o = layers.decode_attention(q.transpose(0, 1), keys, values, p)
        want = o.transpose(0, 1).reshape(1, -1) * torch.sigmoid(gate.reshape(1, -1))
    got = tl.static_attention(q, k, v, ours.k, ours.v, p, gate)
    assert got.shape == (1, hq * d) and got.dtype == dtype
    if dtype == torch.float32:
        close(got, want, dtype)
    else:  # torch rounds the scores and the probabilities to bfloat16, the kernel keeps them in fp32
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    assert torch.equal(ours.k, ref.k) and torch.equal(ours.v, ref.v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,wid", [(300, 4), (129, 3)])
def test_conv_silu_step_shifts_the_state_in_place(dtype, c, wid):
    g = gen(2)
    x, w = rand(1, c, g=g, dtype=dtype), rand(c, wid, g=g, dtype=dtype, scale=0.5)
    state = rand(c, wid - 1, g=g, dtype=dtype)
    want_out, want_state = layers.causal_conv1d(x, w, state.clone())
    got = tl.conv_silu_step(x, w, state)
    close(got, torch.nn.functional.silu(want_out), dtype)
    assert torch.equal(state, want_state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk,hv,dk,dv", [(2, 6, 16, 24), (1, 1, 32, 40)])
def test_delta_step_equals_the_recurrent_rule(dtype, hk, hv, dk, dv):
    g = gen(3)
    q, k = rand(1, hk, dk, g=g, dtype=dtype), rand(1, hk, dk, g=g, dtype=dtype)
    v = rand(1, hv, dv, g=g, dtype=dtype)
    decay = -torch.rand(1, hv, generator=g).to(DEV)
    beta = torch.rand(1, hv, generator=g).to(dtype).to(DEV)
    state = rand(hv, dk, dv, g=g)
    want_out, want_state = layers.gated_delta_rule(q, k, v, decay, beta, state.clone())
    got = tl.delta_step(q, k, v, decay, beta, state)
    torch.testing.assert_close(got, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk,hv,dk,dv", [(2, 6, 16, 24), (1, 3, 32, 40)])
def test_delta_step_with_gates_equals_delta_gates_then_the_rule(dtype, hk, hv, dk, dv):
    """The gates computed in the kernel (softplus over its whole range: below the log1p series' switch,
    around it, past torch's threshold of 20) give delta_gates' decay and beta."""
    g = gen(8)
    q, k = rand(1, hk, dk, g=g, dtype=dtype), rand(1, hk, dk, g=g, dtype=dtype)
    v = rand(1, hv, dv, g=g, dtype=dtype)
    a = torch.tensor([-30.0, -7.2, 0.3, 6.9, 21.5, -0.1][:hv]).reshape(1, hv).to(dtype).to(DEV)
    b = rand(1, hv, g=g, dtype=dtype, scale=3.0)
    a_log = rand(hv, g=g, scale=0.5)  # float32, as the model keeps A_log
    dt_bias = rand(hv, g=g, dtype=dtype)
    state = rand(hv, dk, dv, g=g)
    decay, beta = layers.delta_gates(a, b, a_log, dt_bias)
    want_out, want_state = layers.gated_delta_rule(q, k, v, decay, beta, state.clone())
    got = tl.delta_step(q, k, v, None, None, state, gates=(a, b, a_log, dt_bias))
    close(got, want_out, dtype)  # bf16: beta is rounded to b's dtype, which the interpreter truncates
    close(state, want_state, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,e,k", [(1, 512, 10), (3, 37, 1), (2, 129, 8), (1, 16, 16)])
def test_route_equals_softmax_topk(dtype, t, e, k):
    """Same experts in the same order (largest first) and the same renormalized weights; k == E too.
    bf16 logits tie (8 bits of mantissa) and the two break ties differently: there the logits of the
    chosen experts must be the same values, in the same order."""
    logits = rand(t, e, g=gen(9), dtype=dtype, scale=2.0)
    want_ids, want_w = layers.route(logits.cpu(), k)  # the torch path
    ids, w = tl.route(logits, k)
    ids = ids.cpu()
    assert ids.dtype == torch.int64 and w.dtype == dtype
    assert all(len(set(r.tolist())) == k for r in ids)
    if dtype == torch.float32:
        assert torch.equal(ids, want_ids)
    else:
        assert torch.equal(logits.cpu().gather(1, ids), logits.cpu().gather(1, want_ids))
    close(w.cpu(), want_w, dtype)  # (want_w is the CPU path's: on the GPU, w is compared on the CPU)
    torch.testing.assert_close(w.float().sum(-1).cpu(), torch.ones(t), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,n", [(1, 4096), (3, 1000), (2, 1025)])
def test_add_moe_and_silu_mul(dtype, t, n):
    """The roundings where torch rounds: float16 (which the interpreter rounds to nearest, as the GPU
    does) within one unit in the last place; bfloat16 (truncated in the interpreter) within a few."""
    g = gen(10)
    x, routed, shared = (rand(t, n, g=g, dtype=dtype) for _ in range(3))
    gate = rand(t, 1, g=g, dtype=dtype, scale=3.0)
    a, b = rand(t, n, g=g, dtype=dtype, scale=4.0), rand(t, n, g=g, dtype=dtype)
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 4e-3), torch.bfloat16: (3e-2, 1e-1)}[dtype]
    moe = x + (routed + torch.sigmoid(gate) * shared)
    for got, want in ((tl.add_moe(x, routed, shared, gate), moe), (tl.silu_mul(a, b), torch.nn.functional.silu(a) * b)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1])
    # with the next layer's input norm in the same launch: the same sum, and rms_norm of the sum it stored
    w = rand(n, g=g, dtype=dtype, scale=0.3)
    y, h = tl.add_moe(x, routed, shared, gate, norm=(w, 1e-6))
    torch.testing.assert_close(y, tl.add_moe(x, routed, shared, gate), rtol=0, atol=0)
    close(h, _torch_rms_norm(y, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", DTYPES)
def test_gated_rms_norm(dtype, wdtype):
    g = gen(4)
    core = rand(1, 5, 48, g=g)
    z = rand(1, 5, 48, g=g, dtype=dtype)
    w = rand(48, g=g, dtype=wdtype)
    want = _torch_gated(core.to(dtype), z, w, 1e-6)
    close(tl.gated_rms_norm(core.to(dtype), z, w, 1e-6, dtype), want, dtype)
    # float32 core, rounded to dtype as the kernel loads it (the model's call: no cast before), and the torch
    # path of layers.gated_rms_norm with the same dtype argument. The interpreter truncates float32 -> bfloat16
    # where torch and the GPU round to nearest: on the CPU a few outputs move by a bf16 step or two
    got = tl.gated_rms_norm(core.float(), z, w, 1e-6, dtype)
    if DEV == "cuda" or dtype == torch.float32:
        close(got, want, dtype)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=4e-2, atol=4e-2)
    from flashmoe_pack.models import layers

    close(layers.gated_rms_norm(core.float().cpu(), z.cpu(), w.cpu(), 1e-6, dtype).to(want.device), want, dtype)


def _torch_gated(x, gate, weight, eps):
    """layers.gated_rms_norm's torch code."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return ((weight * normed) * torch.nn.functional.silu(gate.float())).to(x.dtype)


@pytest.mark.skipif(DEV == "cuda", reason="on the GPU the model uses the kernels already (gpu_check compares)")
@pytest.mark.parametrize("fuse", [False, True])
def test_model_decode_through_the_kernels_equals_torch(monkeypatch, fuse):
    """The model's wiring: decode steps with every fused kernel (forced on for CPU tensors) give the
    torch path's logits and states, with separate or fused projections (their slices feed the kernels).
    fp32: the interpreter's bfloat16 truncation (above) compounds over layers, and the kernels' bfloat16
    roundings are checked one by one."""
    dtype = torch.float32
    from test_model_qwen3_5_moe import DenseExperts, Qwen35MoeConfig, Qwen35MoeModel, build_hf

    hf = build_hf()
    w = {k: v.to(dtype) for k, v in hf.state_dict().items()}
    cfg = Qwen35MoeConfig.from_dict(hf.config.to_dict())
    m = Qwen35MoeModel(cfg, dict(w), DenseExperts.from_hf(w, cfg.num_hidden_layers), fuse=fuse)
    ids = torch.randint(0, 101, (14,), generator=gen(5))
    plain, fused = m.new_state(), m.new_state()
    m.forward(ids[:12], plain)
    m.forward(ids[:12], fused)
    for t in (12, 13):
        static = t == 13  # the second step as a CUDA graph runs it: static shapes, the position on the device
        for s in (plain, fused) if static else ():
            for kv in s.kv.values():
                kv.reserve(s.pos + 1)
        pos = torch.tensor([plain.pos], device=DEV) if static else None
        want = m.forward(ids[t : t + 1], plain, pos=pos)
        with monkeypatch.context() as mp:
            mp.setattr(layers, "_fused", lambda x: tl)
            got = m.forward(ids[t : t + 1], fused, pos=pos)
        if static:
            plain.advance(1)
            fused.advance(1)
        close(got, want, dtype)
    for i in plain.recurrent:
        close(fused.recurrent[i], plain.recurrent[i], dtype)
        close(fused.conv[i], plain.conv[i], dtype)
    for i, c in plain.kv.items():  # the static step's key and value written at their position
        n = plain.pos
        close(fused.kv[i].k[:, :n], c.k[:, :n], dtype)
        close(fused.kv[i].v[:, :n], c.v[:, :n], dtype)
