"""Qwen3.5-MoE forward in plain torch against transformers on tiny random checkpoints (fp32)."""

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig  # noqa: E402

from flashmoe_pack.models import get_model_class, layers  # noqa: E402
from flashmoe_pack.models.qwen3_5_moe import DenseExperts, Qwen35MoeConfig, Qwen35MoeModel  # noqa: E402
from flashmoe_pack.quant import QTensor  # noqa: E402

TINY = dict(
    vocab_size=101, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
    linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=23,
    shared_expert_intermediate_size=37, num_experts=8, num_experts_per_tok=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    initializer_range=0.1, eos_token_id=7,
)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def build_hf(tie: bool = False, seed: int = 0, **overrides):
    """A tiny random transformers model with weights that exercise every term."""
    torch.manual_seed(seed)
    cfg = Qwen3_5MoeTextConfig(**{**TINY, **overrides}, tie_word_embeddings=tie)
    model = Qwen3_5MoeForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")  # grouped_mm needs 16-byte strides; odd sizes here
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # zero-centred norms start at 0: make them matter
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # sharpen the router: no near-ties in top-K
                p.mul_(20)
            elif name.endswith("A_log"):  # gentle decay so the state carries across chunks
                p.copy_(torch.empty_like(p).uniform_(0.02, 0.5).log())
            elif name.endswith("dt_bias"):
                p.add_(0.5 * torch.randn_like(p))
    return model


def build_ours(hf_model, **overrides) -> Qwen35MoeModel:
    weights = hf_model.state_dict()
    cfg = Qwen35MoeConfig.from_dict(hf_model.config.to_dict(), **overrides)
    return Qwen35MoeModel(cfg, weights, DenseExperts.from_hf(weights, cfg.num_hidden_layers))


@pytest.fixture(scope="module")
def pair():
    hf = build_hf()
    return hf, build_ours(hf)


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


@pytest.mark.parametrize("length", [1, 5, 64, 130])
def test_prefill_matches_transformers(pair, length):
    hf, ours = pair
    ids = torch.randint(0, 101, (length,), generator=torch.Generator().manual_seed(length))
    got = ours.forward(ids, ours.new_state())
    assert got.dtype == torch.float32 and got.shape == (length, 101)
    assert relative_error(got, hf_logits(hf, ids)) < 1e-4


def test_tied_embeddings_and_layer_pattern():
    hf = build_hf(tie=True, seed=1, num_hidden_layers=5,
                  layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention",
                               "linear_attention"])
    weights = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    cfg = Qwen35MoeConfig.from_dict(hf.config.to_dict())
    ours = Qwen35MoeModel(cfg, weights, DenseExperts.from_hf(weights, 5))
    ids = torch.randint(0, 101, (70,), generator=torch.Generator().manual_seed(3))
    assert relative_error(ours.forward(ids, ours.new_state()), hf_logits(hf, ids)) < 1e-4


def test_decode_and_split_prefill_match_full_sequence(pair):
    _, ours = pair
    ids = torch.randint(0, 101, (80,), generator=torch.Generator().manual_seed(7))
    full = ours.forward(ids, ours.new_state())
    # prefill 70 (crosses the 64-token chunk), then 10 single-token decode steps
    state = ours.new_state()
    steps = [ours.forward(ids[:70], state)] + [ours.forward(ids[t : t + 1], state) for t in range(70, 80)]
    assert state.pos == 80
    assert relative_error(torch.cat(steps), full) < 1e-4
    # two prefills (multi-turn), the second starting from a snapshot of the first
    state = ours.new_state()
    first = ours.forward(ids[:33], state)
    snapshot = state.clone()
    second = ours.forward(ids[33:], state)
    assert relative_error(torch.cat([first, second]), full) < 1e-4
    again = ours.forward(ids[33:], snapshot)  # the snapshot was not disturbed
    assert relative_error(again, second) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_step_equals_eager_decode(pair, dtype):
    """The step a CUDA graph captures (forward with a device `pos`: KV written at pos, masked attention
    over the whole buffer, states updated in place, host bookkeeping left to state.advance) gives the
    eager decode's logits and state, also across the KV buffer's growth (capacity 256)."""
    hf, _ = pair
    w = {k: v.to(dtype) for k, v in hf.state_dict().items()}
    cfg = Qwen35MoeConfig.from_dict(hf.config.to_dict())
    ours = Qwen35MoeModel(cfg, w, DenseExperts.from_hf(w, cfg.num_hidden_layers))
    ids = torch.randint(0, 101, (262,), generator=torch.Generator().manual_seed(3))
    eager, static = ours.new_state(), ours.new_state()
    ours.forward(ids[:250], eager)
    ours.forward(ids[:250], static)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for t in range(250, 262):
        want = ours.forward(ids[t : t + 1], eager)
        for kv in static.kv.values():
            kv.reserve(static.pos + 1)
        before = static.pos
        got = ours.forward(ids[t : t + 1], static, pos=torch.tensor([static.pos]))
        assert static.pos == before  # nothing on the host moved
        static.advance(1)
        assert relative_error(got.float(), want.float()) < tol, t
    assert static.pos == eager.pos == 262
    assert all(c.capacity == 512 for c in static.kv.values())
    for i, c in eager.kv.items():
        assert static.kv[i].length == c.length
        assert relative_error(static.kv[i].k[:, : c.length].float(), c.k[:, : c.length].float()) < tol
    for i in eager.recurrent:
        assert relative_error(static.recurrent[i], eager.recurrent[i]) < tol
        assert relative_error(static.conv[i].float(), eager.conv[i].float()) < tol
    with pytest.raises(ValueError, match="one token"):
        ours.forward(ids[:2], static, pos=torch.tensor([static.pos]))


def test_fused_projections_equal_the_separate_ones(pair):
    """fuse=True (what the runtime does on CUDA): the matrices that read one input are concatenated and
    leave the caller's dict; prefill, decode and the static step give the separate products' logits."""
    hf, plain = pair
    w = dict(hf.state_dict())
    cfg = Qwen35MoeConfig.from_dict(hf.config.to_dict())
    experts = DenseExperts.from_hf(w, cfg.num_hidden_layers)
    fused = Qwen35MoeModel(cfg, w, experts, fuse=True)
    kinds = cfg.layer_types
    lin, full = kinds.index("linear_attention"), kinds.index("full_attention")
    assert "linear_attn.in_proj_qkvzba.weight" in fused.layers[lin]
    assert "self_attn.qkv_proj.weight" in fused.layers[full]
    for i in (lin, full):
        assert "mlp.router_shared.weight" in fused.layers[i]  # router, shared gate logit, shared gate and up
        assert fused.layers[i]["mlp.router_shared.weight.split"] == [cfg.num_experts, 1] + [
            cfg.shared_expert_intermediate_size] * 2
        for part in ("gate", "shared_expert_gate", "shared_expert.gate_proj", "shared_expert.up_proj"):
            assert f"mlp.{part}.weight" not in fused.layers[i] and f"model.layers.{i}.mlp.{part}.weight" not in w
    assert f"model.layers.{lin}.linear_attn.in_proj_z.weight" not in w
    assert f"model.layers.{full}.self_attn.k_proj.weight" not in w
    ids = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(11))
    a, b = plain.new_state(), fused.new_state()
    assert relative_error(fused.forward(ids[:30], b), plain.forward(ids[:30], a)) < 1e-5
    for t in range(30, 36):
        assert relative_error(fused.forward(ids[t : t + 1], b), plain.forward(ids[t : t + 1], a)) < 1e-5
    for kv in b.kv.values():
        kv.reserve(b.pos + 1)
    got = fused.forward(ids[36:37], b, pos=torch.tensor([b.pos]))
    assert relative_error(got, plain.forward(ids[36:37], a)) < 1e-5


def test_fused_projections_of_quantized_matrices(pair):
    """Resident matrices kept 8-bit (QTensors, resident="q8"): fused by stacking words, scales and biases,
    the same logits as the separate products."""
    from flashmoe_pack.quant import quantize

    hf, _ = pair
    cfg = Qwen35MoeConfig.from_dict(hf.config.to_dict())
    w = {k: v.float() for k, v in hf.state_dict().items()}
    experts = DenseExperts.from_hf(w, cfg.num_hidden_layers)
    for k in list(w):
        if k.startswith("model.layers.") and ".experts." not in k and w[k].dim() == 2 and w[k].shape[1] % 32 == 0:
            w[k] = quantize(w[k], 8, 32, torch.float32, "minmax")
    plain = Qwen35MoeModel(cfg, dict(w), experts)
    fused = Qwen35MoeModel(cfg, dict(w), experts, fuse=True)
    assert isinstance(fused.layers[0]["mlp.router_shared.weight"], QTensor)
    ids = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(12))
    a, b = plain.new_state(), fused.new_state()
    assert relative_error(fused.forward(ids[:17], b), plain.forward(ids[:17], a)) < 1e-5
    for t in range(17, 20):
        assert relative_error(fused.forward(ids[t : t + 1], b), plain.forward(ids[t : t + 1], a)) < 1e-5


def test_decode_attention_masks_the_tail_and_matches_sdpa():
    g = torch.Generator().manual_seed(4)
    hq, hkv, cap, d, pos = 6, 2, 37, 16, 20
    q = torch.randn(hq, 1, d, generator=g)
    k, v = torch.randn(hkv, cap, d, generator=g), torch.randn(hkv, cap, d, generator=g)
    want = layers.attention(q, k[:, : pos + 1], v[:, : pos + 1], pos)
    got = layers.decode_attention(q, k, v, torch.tensor([pos]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[:, pos + 1 :], v2[:, pos + 1 :] = 1e4, 1e4  # whatever lies past pos is not read
    torch.testing.assert_close(layers.decode_attention(q, k2, v2, torch.tensor([pos])), got)


def test_smaller_k_changes_output_but_runs(pair):
    hf, ours = pair
    ids = torch.arange(20) % 101
    k1 = build_ours(hf, num_experts_per_tok=1)
    base, small = ours.forward(ids, ours.new_state()), k1.forward(ids, k1.new_state())
    assert torch.isfinite(small).all()
    assert relative_error(small, base) > 1e-3


def test_rope_equals_transformers_mrope_for_text():
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding

    cfg = Qwen3_5MoeTextConfig(**{**TINY, "head_dim": 128, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
        "mrope_section": [11, 11, 10], "mrope_interleaved": True}})
    pos = torch.arange(3, 300)
    ref_cos, ref_sin = Qwen3_5MoeTextRotaryEmbedding(cfg)(torch.zeros(1), pos.view(1, 1, -1).expand(3, 1, -1))
    cos, sin = layers.rope_cos_sin(pos, layers.rope_inv_freq(64, 1e7), torch.float32)
    torch.testing.assert_close(cos, ref_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0], rtol=0, atol=1e-6)


def test_chunked_delta_rule_equals_recurrent():
    g = torch.Generator().manual_seed(0)
    hv, t, dk, dv = 3, 150, 8, 5
    q, k = (layers.l2_normalize(torch.randn(hv, t, dk, generator=g)) for _ in range(2))
    v = torch.randn(hv, t, dv, generator=g)
    decay = -torch.rand(hv, t, generator=g) * 0.3
    beta = torch.rand(hv, t, generator=g)
    s0 = torch.randn(hv, dk, dv, generator=g)
    o_rec, s_rec = layers.delta_rule_recurrent(q, k, v, decay, beta, s0)
    o_chk, s_chk = layers.delta_rule_chunked(q, k, v, decay, beta, s0, chunk_size=64)
    torch.testing.assert_close(o_chk, o_rec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_chk, s_rec, rtol=1e-4, atol=1e-4)



def test_recurrent_delta_rule_matches_the_formula_and_leaves_the_callers_state():
    """The batched recurrent step against the per-head formula, written out; the state passed in is
    not written (session snapshots keep references to it)."""
    g = torch.Generator().manual_seed(1)
    hv, t, dk, dv = 5, 3, 7, 6
    q, k = (layers.l2_normalize(torch.randn(hv, t, dk, generator=g)) for _ in range(2))
    v = torch.randn(hv, t, dv, generator=g)
    decay, beta = -torch.rand(hv, t, generator=g), torch.rand(hv, t, generator=g)
    s0 = torch.randn(hv, dk, dv, generator=g)
    kept = s0.clone()
    out, state = layers.delta_rule_recurrent(q, k, v, decay, beta, s0)
    assert torch.equal(s0, kept)
    ref = s0.double().clone()
    for i in range(t):
        for h in range(hv):
            ref[h] *= decay[h, i].double().exp()
            kk, qq = k[h, i].double(), q[h, i].double()
            ref[h] += torch.outer(kk, (v[h, i].double() - ref[h].T @ kk) * beta[h, i].double())
            torch.testing.assert_close(out[h, i].double(), ref[h].T @ qq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_one_token_at_a_time_equals_all_at_once(dtype):
    g = torch.Generator().manual_seed(2)
    c, w, t = 37, 4, 6
    x = torch.randn(t, c, generator=g).to(dtype)
    weight = torch.randn(c, w, generator=g).to(dtype)
    state = torch.randn(c, w - 1, generator=g).to(dtype)
    whole, s_whole = layers.causal_conv1d(x, weight, state)
    steps, s = [], state
    for i in range(t):
        o, s = layers.causal_conv1d(x[i : i + 1], weight, s)
        steps.append(o)
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(torch.cat(steps), whole, rtol=tol, atol=tol if tol else 1e-6)
    assert torch.equal(s, s_whole)

def test_config_from_multimodal_json_and_errors():
    d = {"model_type": "qwen3_5_moe", "tie_word_embeddings": False, "vision_config": {"depth": 2},
         "text_config": {**TINY, "num_hidden_layers": 8, "rope_parameters": None, "rope_theta": 1e6,
                         "partial_rotary_factor": 0.25, "eos_token_id": [5, 6], "unknown_key": 1}}
    cfg = Qwen35MoeConfig.from_dict(d, num_experts_per_tok=1)
    assert cfg.layer_types.count("full_attention") == 2 and cfg.layer_types[3] == "full_attention"
    assert (cfg.rope_theta, cfg.rotary_dim, cfg.eos_token_ids) == (1e6, 4, (5, 6))
    assert cfg.num_experts_per_tok == 1 and not cfg.tie_word_embeddings
    every_other = Qwen35MoeConfig.from_dict({**TINY, "full_attention_interval": 2})
    assert every_other.layer_types == ["linear_attention", "full_attention"] * 2
    with pytest.raises(ValueError, match="qwen3_5_moe_text"):
        get_model_class("llama")
    assert get_model_class("qwen3_5_moe") is get_model_class("qwen3_5_moe_text") is Qwen35MoeModel


def test_missing_weight_is_named(pair):
    hf, _ = pair
    weights = dict(hf.state_dict())
    del weights["model.layers.2.linear_attn.A_log"]
    with pytest.raises(KeyError, match="model.layers.2.linear_attn.A_log"):
        Qwen35MoeModel(Qwen35MoeConfig.from_dict(hf.config.to_dict()), weights, None)


def test_profiler_sections(pair):
    hf, ours = pair
    seen = []

    class Recorder:
        def section(self, name, layer):
            seen.append((name, layer))
            return contextlib.nullcontext()

    ours.forward(torch.arange(5), ours.new_state(), profiler=Recorder())
    names = {n for n, _ in seen}
    assert names == {"linear_attn", "full_attn", "routing", "experts", "other"}
    assert ("full_attn", 3) in seen and ("linear_attn", 0) in seen
    assert [layer for name, layer in seen if name == "experts"] == [0, 1, 2, 3]
