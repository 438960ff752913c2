"""Every source layout packs correctly.

Tiny random Qwen3.5-MoE checkpoints in each layout the source readers accept (HF float fp32 / bf16 /
fp16, one shard or many; fused experts; the Qwen3.5 hub layout with vision and MTP tensors;
block-scaled FP8; MLX 4-bit), each packed with `flashmoe_pack.pack.quantize` and checked against
the source: exactly where the format promises bytes (16-bit, fused vs per-expert, MLX repack),
within the numerical limits where it quantizes. Plus the quantizer itself: bit layout and the
2-bit error of the error-minimising scales against plain min/max.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flashmoe_pack import quant
from flashmoe_pack.pack import format as fmt
from flashmoe_pack.pack import load_index, quantize
from flashmoe_pack.pack.reader import ExpertWeights, decode_record, read_record
from flashmoe_pack.sources.checkpoint import Checkpoint
from flashmoe_pack.verify import verify_numerics
from flashmoe_pack.verify.numerical import WEIGHT_LIMITS

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
)

H, I, E, L = 64, 64, 4, 2  # hidden, moe_intermediate, experts, layers
TINY = dict(
    vocab_size=64, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
    linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=I,
    shared_expert_intermediate_size=32, num_experts=E, num_experts_per_tok=2,
    layer_types=["linear_attention", "full_attention"],
)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=H, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
INFO = {"path": "test-source"}  # fixed source_info: two packs of the same weights give the same index


# -- helpers ------------------------------------------------------------------------------------------
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded Gaussian weights everywhere (transformers' init leaves norms at 0 and is version-bound)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def causal_lm(seed: int = 0, **over) -> Qwen3_5MoeForCausalLM:
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**{**TINY, **over}))
    _randomize(model, seed)
    return model


def hf_source(d: Path, dtype: torch.dtype = torch.float32, seed: int = 0, max_shard_size=None,
              **over) -> Path:
    model = causal_lm(seed, **over).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(d, **kw)
    return d


def read_sources(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def write_source(d: Path, tensors: dict[str, torch.Tensor], config: dict,
                 shards: dict[str, str] | None = None) -> Path:
    """A checkpoint written by hand: one model.safetensors, or the shards named by `shards` + an index."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    if shards is None:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d
    for shard in sorted(set(shards.values())):
        part = {k: v for k, v in tensors.items() if shards[k] == shard}
        save_file(part, str(d / shard), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    return d


def expert(idx, layer: int, e: int) -> ExpertWeights:
    return decode_record(read_record(idx, layer, e), idx)


def expert_key(layer: int, e: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"


def residents(idx) -> dict[str, torch.Tensor]:
    out = {}
    for name, meta in idx.raw["resident"]["tensors"].items():
        with safe_open(idx.path / meta["file"], "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def expert_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / fmt.EXPERT_DIR).iterdir())}


def failures(results) -> list[str]:
    return [f"layer {r.layer}: {f}" for r in results for f in r.failures]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_kind = a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    return same_kind and fmt.tensor_bytes(a) == fmt.tensor_bytes(b)


# -- HF float layouts ---------------------------------------------------------------------------------
def test_fp32_one_shard_bits16_is_exact(tmp_path):
    src = hf_source(tmp_path / "src", torch.float32)
    assert [p.name for p in src.glob("*.safetensors")] == ["model.safetensors"]
    idx = load_index(quantize(src, tmp_path / "q16", bits=16, progress=False))
    assert idx.raw["quantization"]["weight_dtype"] == idx.raw["source"]["float_dtype"] == "float32"
    sd = read_sources(src)
    for layer in range(L):
        for e in range(E):
            w = expert(idx, layer, e)
            for proj in fmt.PROJS:
                assert same_bytes(getattr(w, proj), sd[expert_key(layer, e, proj)]), (layer, e, proj)
    res = residents(idx)
    want = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    assert sorted(res) == sorted(want)
    for k, v in want.items():
        assert same_bytes(res[k], v), k
    results = verify_numerics(idx, Checkpoint(src))
    assert failures(results) == [] and max(r.worst_rel for r in results) == 0.0


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def sharded(request, tmp_path_factory):
    """A half-precision source in many small shards, with one layer's experts spread over several."""
    src = hf_source(tmp_path_factory.mktemp("sharded"), request.param, seed=1, max_shard_size="20KB")
    wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    layer0 = {wm[expert_key(0, e, p)] for e in range(E) for p in fmt.PROJS}
    assert len(layer0) > 1 and len(set(wm.values())) > 3
    return src, request.param


@pytest.mark.parametrize("bits", [4, 2])
def test_sharded_half_sources_quantize_within_limits(sharded, tmp_path, bits):
    src, dtype = sharded
    idx = load_index(quantize(src, tmp_path / "q", bits=bits, group_size=32, progress=False))
    assert idx.raw["source"]["float_dtype"] == fmt.DTYPE_NAMES[dtype]
    assert idx.raw["quantization"]["method"] == "mse"
    results = verify_numerics(idx, Checkpoint(src))
    assert failures(results) == []
    assert [r.experts for r in results] == [E] * L
    assert 0 < max(r.worst_rel for r in results) < WEIGHT_LIMITS[bits]
    sd = read_sources(src)
    res = residents(idx)
    assert sorted(res) == sorted(k for k in sd if ".mlp.experts." not in k)
    for k, t in res.items():  # matrices in the resident dtype (bf16), vectors in fp32
        assert t.dtype == (torch.float32 if t.dim() <= 1 else torch.bfloat16), k
        assert torch.equal(t, sd[k].to(t.dtype)), k


def test_sharded_half_sources_bits16_keep_dtype(sharded, tmp_path):
    src, dtype = sharded
    idx = load_index(quantize(src, tmp_path / "q16", bits=16, progress=False))
    assert idx.raw["quantization"]["weight_dtype"] == fmt.DTYPE_NAMES[dtype]
    assert idx.raw["resident"]["dtype"] == fmt.DTYPE_NAMES[dtype]
    sd = read_sources(src)
    for layer in range(L):
        for e in range(E):
            w = expert(idx, layer, e)
            for proj in fmt.PROJS:
                assert same_bytes(getattr(w, proj), sd[expert_key(layer, e, proj)]), (layer, e, proj)
    for k, t in residents(idx).items():
        assert t.dtype == (torch.float32 if t.dim() <= 1 else dtype), k
        assert torch.equal(t, sd[k].to(t.dtype)), k
    assert failures(verify_numerics(idx, Checkpoint(src))) == []


# -- fused experts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 16])
def test_fused_experts_pack_like_per_expert(tmp_path, bits):
    per = hf_source(tmp_path / "per", torch.bfloat16, seed=2)
    sd = read_sources(per)
    fused = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for layer in range(L):
        pre = f"model.layers.{layer}.mlp.experts"
        fused[f"{pre}.gate_up_proj"] = torch.stack(  # [E, 2I, H]: gate rows first, then up rows
            [torch.cat([sd[expert_key(layer, e, "gate")], sd[expert_key(layer, e, "up")]]) for e in range(E)])
        fused[f"{pre}.down_proj"] = torch.stack(  # [E, H, I]
            [sd[expert_key(layer, e, "down")] for e in range(E)])
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)
    src = write_source(tmp_path / "fused", fused, json.loads((per / "config.json").read_text()))
    shutil.copyfile(per / "generation_config.json", src / "generation_config.json")
    a = quantize(per, tmp_path / "qa", bits=bits, group_size=32, progress=False, source_info=INFO)
    b = quantize(src, tmp_path / "qb", bits=bits, group_size=32, progress=False, source_info=INFO)
    assert expert_files(a) == expert_files(b)
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())
    assert failures(verify_numerics(load_index(b), Checkpoint(src))) == []


# -- the Qwen3.5 hub layout ---------------------------------------------------------------------------
def test_qwen35_hub_layout_skips_vision_and_mtp(tmp_path):
    text = causal_lm(seed=3)
    cg = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=TINY, vision_config=VISION))
    _randomize(cg, 4)
    with torch.no_grad():
        cg.model.language_model.load_state_dict(text.model.state_dict())
        cg.lm_head.load_state_dict(text.lm_head.state_dict())
    text.to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    hub = tmp_path / "hub"
    cg.to(torch.bfloat16).save_pretrained(hub)
    cfg = json.loads((hub / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_moe" and cfg["text_config"]["num_experts"] == E
    # Real hub checkpoints also carry the multi-token-prediction head: add a few fake tensors.
    tensors = read_sources(hub)
    g = torch.Generator().manual_seed(5)
    mtp = {"mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,), "mtp.pre_fc_norm_hidden.weight": (H,),
           "mtp.layers.0.mlp.experts.0.gate_proj.weight": (I, H)}
    tensors.update({k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in mtp.items()})
    (hub / "model.safetensors").unlink()
    save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
    visual = [k for k in tensors if k.startswith("model.visual.")]
    assert visual and all(k.startswith(("model.language_model.", "model.visual.", "mtp.", "lm_head."))
                          for k in tensors)

    a = quantize(tmp_path / "plain", tmp_path / "qa", bits=4, group_size=32, progress=False, source_info=INFO)
    b = quantize(hub, tmp_path / "qb", bits=4, group_size=32, progress=False, source_info=INFO)
    assert expert_files(a) == expert_files(b)
    ia, ib = load_index(a), load_index(b)
    assert ib.raw["source"]["skipped_tensors"] == len(visual) + len(mtp)
    assert ia.raw["source"]["skipped_tensors"] == 0
    assert ib.raw["model_type"] == "qwen3_5_moe" and ib.raw["config"]["num_experts"] == E
    ra, rb = residents(ia), residents(ib)
    assert sorted(rb) == sorted(ra)
    assert not [k for k in rb if "visual" in k or "mtp" in k or "language_model" in k]
    for k in ra:
        assert same_bytes(ra[k], rb[k]), k
    assert failures(verify_numerics(ib, Checkpoint(hub))) == []


# -- block-scaled FP8 ---------------------------------------------------------------------------------
FP8_BLOCK = 128
FP8 = dict(hidden_size=192, moe_intermediate_size=160, shared_expert_intermediate_size=96)  # edge blocks


def _fp8_block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(out/128), ceil(in/128)]), value = fp8 * scale_inv."""
    rows, cols = (math.ceil(n / FP8_BLOCK) for n in w.shape)
    w8 = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    sinv = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(rows):
        for j in range(cols):
            rs, cs = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK)
            blk = w[rs, cs].float()
            s = blk.abs().max() / 448.0  # e4m3's largest value
            sinv[i, j] = s
            w8[rs, cs] = (blk / s).to(torch.float8_e4m3fn)
    return w8, sinv


def _fp8_reference(w8: torch.Tensor, sinv: torch.Tensor) -> torch.Tensor:
    """Block dequantization written out tile by tile (independent of checkpoint.fp8_dequantize)."""
    ref = torch.empty(w8.shape, dtype=torch.float32)
    for i in range(sinv.shape[0]):
        for j in range(sinv.shape[1]):
            rs, cs = slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK)
            ref[rs, cs] = w8[rs, cs].float() * sinv[i, j].item()
    return ref


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def fp8_source(request, tmp_path_factory):
    """Experts and every *_proj matrix in block-scaled FP8 (two shards: the scales of layer 1's tensors
    live in the other shard than their weights); everything else in `param` dtype."""
    dtype = getattr(torch, request.param)
    model = causal_lm(seed=6, **FP8)
    cfg = {**model.config.to_dict(), "dtype": request.param,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}}
    d = tmp_path_factory.mktemp("fp8")
    model.save_pretrained(d / "hf")
    tensors, refs, shards = {}, {}, {}
    for k, v in read_sources(d / "hf").items():
        home = "model-00002-of-00002.safetensors" if ".layers.1." in k else "model-00001-of-00002.safetensors"
        other = "model-00001-of-00002.safetensors" if ".layers.1." in k else home
        if k.endswith("_proj.weight") and v.dim() == 2:
            w8, sinv = _fp8_block_quantize(v)
            tensors[k], tensors[k + "_scale_inv"] = w8, sinv
            shards[k], shards[k + "_scale_inv"] = home, other
            refs[k] = _fp8_reference(w8, sinv)
        else:
            tensors[k], shards[k] = v.to(dtype), home
    assert tensors[expert_key(0, 0, "gate")].shape == (160, 192)
    assert tensors[expert_key(0, 0, "gate") + "_scale_inv"].shape == (2, 2)
    assert tensors["model.layers.1.self_attn.q_proj.weight_scale_inv"].shape == (1, 2)
    src = write_source(d / "fp8", tensors, cfg, shards)
    return src, dtype, refs


def test_fp8_bits16_equals_block_dequantized(fp8_source, tmp_path):
    src, dtype, refs = fp8_source
    idx = load_index(quantize(src, tmp_path / "q16", bits=16, progress=False))
    assert idx.raw["source"]["kind"] == "fp8"
    assert idx.raw["quantization"]["weight_dtype"] == fmt.DTYPE_NAMES[dtype]
    for layer in range(L):
        for e in range(E):
            w = expert(idx, layer, e)
            for proj in fmt.PROJS:
                ref = refs[expert_key(layer, e, proj)].to(dtype)
                assert same_bytes(getattr(w, proj), ref), (layer, e, proj)
    res = residents(idx)
    assert not [k for k in res if "scale_inv" in k]
    proj_names = [k for k in refs if ".mlp.experts." not in k]
    assert "model.layers.1.self_attn.q_proj.weight" in proj_names
    assert "model.layers.0.linear_attn.out_proj.weight" in proj_names
    for k in proj_names:  # attention / shared-expert projections: block-dequantized too
        assert same_bytes(res[k], refs[k].to(dtype)), k


def test_fp8_bits16_verifies(fp8_source, tmp_path):
    src, dtype, _ = fp8_source
    idx = load_index(quantize(src, tmp_path / "q16", bits=16, progress=False))
    assert failures(verify_numerics(idx, Checkpoint(src))) == []


def test_fp8_bits4_within_limits(fp8_source, tmp_path):
    src, _, _ = fp8_source
    idx = load_index(quantize(src, tmp_path / "q4", bits=4, group_size=32, progress=False))
    results = verify_numerics(idx, Checkpoint(src))
    assert failures(results) == [] and 0 < max(r.worst_rel for r in results) < WEIGHT_LIMITS[4]


# -- MLX 4-bit ----------------------------------------------------------------------------------------
MLX_GROUP = 64
MLX_SHIFTED = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
               ".q_norm.weight", ".k_norm.weight")


def _mlx_quantize(w: torch.Tensor, bits: int = 4) -> dict[str, torch.Tensor]:
    q = quant.quantize(w.float(), bits, MLX_GROUP, torch.bfloat16)
    return {"weight": q.weight.view(torch.uint32), "scales": q.scales, "biases": q.biases}


def mlx_layout(hf: dict[str, torch.Tensor], gate_bits: int | None = None,
               quantized: bool = True) -> dict[str, torch.Tensor]:
    """What mlx-lm's convert writes for Qwen3.5-MoE: `language_model.` prefix, experts stacked in
    switch_mlp, Linear/Embedding weights with an input width divisible by 64 quantized, conv1d as
    [C, K, 1], the five RMSNorm weights stored as (1 + w). `gate_bits`: quantize the router and the
    shared-expert gate too (mlx-lm's quant_predicate gives them 8 bits). `quantized=False`: an MLX
    bf16 conversion (same names and conventions, nothing quantized)."""
    out = {}
    for layer in range(L):
        for proj in fmt.PROJS:
            if not quantized:
                out[f"language_model.model.layers.{layer}.mlp.switch_mlp.{proj}_proj.weight"] = torch.stack(
                    [hf[expert_key(layer, e, proj)] for e in range(E)]).to(torch.bfloat16)
                continue
            parts = [_mlx_quantize(hf[expert_key(layer, e, proj)]) for e in range(E)]
            for part in ("weight", "scales", "biases"):
                out[f"language_model.model.layers.{layer}.mlp.switch_mlp.{proj}_proj.{part}"] = torch.stack(
                    [p[part] for p in parts])
    for k, v in hf.items():
        if ".mlp.experts." in k:
            continue
        name = "language_model." + k
        is_gate = k.endswith((".mlp.gate.weight", ".shared_expert_gate.weight"))
        if k.endswith("conv1d.weight"):
            out[name] = v.movedim(2, 1).to(torch.bfloat16)  # mlx-lm: moveaxis(2, 1)
        elif k.endswith(MLX_SHIFTED) and v.dim() == 1:
            out[name] = (v + 1.0).to(torch.bfloat16)
        elif quantized and v.dim() == 2 and v.shape[1] % MLX_GROUP == 0 and (not is_gate or gate_bits):
            base = name[: -len(".weight")]
            for part, t in _mlx_quantize(v, gate_bits if is_gate else 4).items():
                out[f"{base}.{part}"] = t
        else:
            out[name] = v.to(torch.bfloat16)
    return out


def mlx_config(model, gate_bits: int | None = None) -> dict:
    q = {"group_size": MLX_GROUP, "bits": 4}
    if gate_bits:  # mlx-lm writes per-module overrides next to the defaults
        for layer in range(L):
            for mod in ("mlp.gate", "mlp.shared_expert_gate"):
                q[f"language_model.model.layers.{layer}.{mod}"] = {"group_size": MLX_GROUP, "bits": gate_bits}
    text = {**model.config.to_dict(), "dtype": "bfloat16"}  # the dtype mlx-lm converted from
    return {"model_type": "qwen3_5_moe", "text_config": text, "quantization": q,
            "quantization_config": q}


def mlx_q(mlx: dict[str, torch.Tensor], base: str, e: int | None = None) -> quant.QTensor:
    """The 4-bit QTensor MLX stores under base.{weight,scales,biases} (expert e of a stacked one)."""
    w, s, b = (mlx[f"{base}.{part}"] for part in ("weight", "scales", "biases"))
    if e is not None:
        w, s, b = w[e], s[e], b[e]
    return quant.QTensor(w.view(torch.int32), s, b, 4, MLX_GROUP)


@pytest.fixture(scope="module")
def mlx_source(tmp_path_factory):
    model = causal_lm(seed=7)
    d = tmp_path_factory.mktemp("mlx")
    model.save_pretrained(d / "hf")
    hf = read_sources(d / "hf")
    mlx = mlx_layout(hf)
    assert mlx["language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"].shape == (E, I, H * 4 // 32)
    assert mlx["language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"].dtype == torch.uint32
    assert mlx["language_model.model.layers.0.linear_attn.conv1d.weight"].shape[-1] == 1
    return write_source(d / "mlx", mlx, mlx_config(model)), hf, mlx


def test_mlx_4bit_repacks_byte_for_byte(mlx_source, tmp_path):
    src, hf, mlx = mlx_source
    idx = load_index(quantize(src, tmp_path / "q4", bits=4, group_size=64, progress=False))
    q = idx.raw["quantization"]
    assert (q["method"], q["scale_dtype"], idx.raw["source"]["kind"]) == ("mlx-repack", "bfloat16", "mlx")
    for layer in range(L):
        for e in range(E):
            w = expert(idx, layer, e)
            for proj in fmt.PROJS:
                pre = f"language_model.model.layers.{layer}.mlp.switch_mlp.{proj}_proj"
                got = getattr(w, proj)
                assert same_bytes(got.weight, mlx[pre + ".weight"][e].view(torch.int32)), (layer, e, proj)
                assert same_bytes(got.scales, mlx[pre + ".scales"][e]), (layer, e, proj)
                assert same_bytes(got.biases, mlx[pre + ".biases"][e]), (layer, e, proj)
    results = verify_numerics(idx, Checkpoint(src))  # the source's experts, dequantized: no error at all
    assert failures(results) == [] and max(r.worst_rel for r in results) == 0.0


def test_mlx_resident_tensors_come_back_in_hf_form(mlx_source, tmp_path):
    src, hf, mlx = mlx_source
    res = residents(load_index(quantize(src, tmp_path / "q4", bits=4, group_size=64, progress=False)))
    assert sorted(res) == sorted(k for k in hf if ".mlp.experts." not in k)
    conv = "model.layers.0.linear_attn.conv1d.weight"
    assert res[conv].shape == hf[conv].shape == (80, 1, 4)
    assert torch.equal(res[conv], hf[conv].to(torch.bfloat16))
    shifted = [k for k in hf if k.endswith(MLX_SHIFTED)]
    assert len(shifted) == 2 * L + 1 + 2  # two per layer, the final norm, q/k norms of the attention layer
    for k in shifted:
        assert torch.equal(res[k], mlx["language_model." + k].float() - 1.0), k
        assert (res[k] - hf[k]).abs().max() <= 2 ** -8, k  # w, up to bf16 rounding of (1 + w)
    gated = "model.layers.0.linear_attn.norm.weight"  # RMSNormGated: not shifted
    assert torch.equal(res[gated], hf[gated].to(torch.bfloat16).float())
    q_proj = "model.layers.1.self_attn.q_proj"  # an MLX-quantized resident matrix: dequantized
    for name in (q_proj, "lm_head", "model.embed_tokens"):
        want = quant.dequantize(mlx_q(mlx, "language_model." + name)).to(torch.bfloat16)
        assert torch.equal(res[name + ".weight"], want), name


def test_mlx_2bit_requantizes(mlx_source, tmp_path):
    src, _, mlx = mlx_source
    # Group 32, not MLX's 64: requantizing needs no matching group. (At group 64 the output error of these
    # tiny random experts on verify's 8 probes is ~0.53, up to ~0.65: around verify's OUTPUT_LIMITS[2].)
    idx = load_index(quantize(src, tmp_path / "q2", bits=2, group_size=32, progress=False))
    assert idx.raw["quantization"]["method"] == "mse" and idx.raw["quantization"]["bits"] == 2
    results = verify_numerics(idx, Checkpoint(src))  # against the MLX values, dequantized
    assert failures(results) == [] and max(r.worst_rel for r in results) > 0


def test_mlx_bits16_is_the_dequantized_mlx_weights(mlx_source, tmp_path):
    src, _, mlx = mlx_source
    idx = load_index(quantize(src, tmp_path / "q16", bits=16, progress=False))
    assert idx.raw["quantization"]["weight_dtype"] == "bfloat16"
    pre = "language_model.model.layers.1.mlp.switch_mlp.down_proj"
    assert torch.equal(expert(idx, 1, 3).down, quant.dequantize(mlx_q(mlx, pre, 3)).bfloat16())


def test_mlx_per_module_bits_overrides(tmp_path):
    model = causal_lm(seed=8)
    model.save_pretrained(tmp_path / "hf")
    hf = read_sources(tmp_path / "hf")
    src = write_source(tmp_path / "mlx", mlx_layout(hf, gate_bits=8), mlx_config(model, gate_bits=8))
    res = residents(load_index(quantize(src, tmp_path / "q4", bits=4, group_size=64, progress=False)))
    gate = "model.layers.0.mlp.gate.weight"
    assert (res[gate].float() - hf[gate]).abs().max() < 0.01


def test_mlx_unquantized_conversion(tmp_path):
    model = causal_lm(seed=9)
    model.save_pretrained(tmp_path / "hf")
    hf = read_sources(tmp_path / "hf")
    cfg = {k: v for k, v in mlx_config(model).items() if not k.startswith("quantization")}
    src = write_source(tmp_path / "mlx", mlx_layout(hf, quantized=False), cfg)
    idx = load_index(quantize(src, tmp_path / "q16", bits=16, progress=False))
    assert torch.equal(expert(idx, 1, 2).up, hf[expert_key(1, 2, "up")].to(torch.bfloat16))  # experts: fine
    res = residents(idx)
    conv = "model.layers.0.linear_attn.conv1d.weight"
    assert res[conv].shape == hf[conv].shape
    norm = "model.layers.0.input_layernorm.weight"
    assert (res[norm] - hf[norm]).abs().max() <= 2 ** -8


# -- unsupported models -------------------------------------------------------------------------------
def test_unsupported_model_type_fails_without_index(tmp_path):
    src = hf_source(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"llama") as err:
        quantize(src, out, bits=4, progress=False)
    assert "qwen3_5_moe" in str(err.value) and "supported" in str(err.value)
    assert not (out / fmt.INDEX_NAME).exists()


# -- the quantizer ------------------------------------------------------------------------------------
def _student_t(shape, df: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn(*shape, df, generator=g).pow(2).sum(-1)
    return z / (chi2 / df).sqrt()


# Measured by the test below (256 x 1024 weights x 0.02, group 64, bf16 scales; relative Frobenius
# error of the error-minimising method vs plain min/max; squared-error ratio in brackets):
#   Gaussian        2-bit 0.322 vs 0.450: min/max 1.40x the error (1.95x the squared error)
#   Student-t df=3  2-bit 0.419 vs 0.660: min/max 1.58x the error (2.48x the squared error)
# and at 4 / 8 bits (same shapes, another seed) only 1.08x / 1.01x. So at 2 bits the chosen
# scales halve (Gaussian) to 2.5x-reduce (heavy tails) the squared error of plain min/max, the
# requantization whose 2-bit experts broke JSON in Flash-MoE.
@pytest.mark.parametrize("dist,margin", [("gaussian", 1.3), ("student_t3", 1.4)])
def test_2bit_error_minimising_beats_minmax(dist, margin):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(256, 1024, generator=g) if dist == "gaussian" else _student_t((256, 1024), 3, g)) * 0.02
    err = {m: quant.error_stats(w, quant.dequantize(quant.quantize(w, 2, 64, torch.bfloat16, m)))["rel_err"]
           for m in ("mse", "minmax")}
    ratio = err["minmax"] / err["mse"]
    print(f"\n2-bit {dist}: rel err mse {err['mse']:.4f}, minmax {err['minmax']:.4f}, "
          f"minmax/mse {ratio:.3f} (squared error {ratio ** 2:.3f})")
    assert ratio > margin
    assert err["mse"] < WEIGHT_LIMITS[2]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (7, 256), generator=g)
    q[0, :] = (1 << bits) - 1  # all ones: the top bit of every word is set (negative as int32)
    words = quant.pack_bits(q, bits)
    assert words.dtype == torch.int32 and words.shape == (7, 256 * bits // 32)
    assert (words[0] == -1).all()
    assert torch.equal(quant.unpack_bits(words, bits), q.to(torch.uint8))


def test_mlx_bit_order_hand_computed():
    # 4 bits: element j of the row lives at bits 4j..4j+3 of word 0 (element 0 in the low nibble).
    q4 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0xF, 0, 0, 0, 0, 0, 0, 0xA]])
    assert quant.pack_bits(q4, 4).view(torch.uint32).tolist() == [[0x87654321, 0xA000000F]]
    # 2 bits: 16 elements per word, element 0 in bits 0-1.
    q2 = torch.tensor([[1, 2, 3, 0] + [0] * 11 + [3]])
    assert quant.pack_bits(q2, 2).view(torch.uint32).tolist() == [[0b111001 | (3 << 30)]]
    # 8 bits: little-endian bytes; on disk the first byte of the word is element 0.
    q8 = torch.tensor([[0x11, 0x22, 0x33, 0xF4]])
    w8 = quant.pack_bits(q8, 8)
    assert w8.view(torch.uint32).tolist() == [[0xF4332211]]
    assert fmt.tensor_bytes(w8) == bytes([0x11, 0x22, 0x33, 0xF4])
    # Dequantization: value = q * scale + bias, per group.
    qt = quant.QTensor(quant.pack_bits(q4, 4), torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 3.0]]), 4, 8)
    assert quant.dequantize(qt).tolist() == [[-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0,
                                              33.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 23.0]]
