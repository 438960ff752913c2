"""Shared fixtures: tiny random Qwen3.5-MoE checkpoints written by transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before anything
# imports triton (torch.compile does, in test_model_qwen3_5_moe.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLASHMOE_VERIFY_DEMOTIONS", "1")  # every record moved down from VRAM checked again
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TINY_TEXT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                 linear_num_value_heads=4, moe_intermediate_size=64, shared_expert_intermediate_size=32,
                 num_experts=8, num_experts_per_tok=2, rope_parameters={"rope_theta": 10000.0,
                                                                        "partial_rotary_factor": 0.25,
                                                                        "rope_type": "default"})


def _randomize(model, seed: int) -> None:
    """Random weights with decisive routing and non-trivial norms / decays."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # routing not a near-tie
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # peaked next-token distributions
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g).mul(15).add(1).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def make_causal_lm(path: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """A tiny Qwen3_5MoeForCausalLM checkpoint (per-expert tensors, one shard)."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    cfg = Qwen3_5MoeTextConfig(**{**TINY_TEXT, **overrides})
    cfg._attn_implementation = "eager"
    model = Qwen3_5MoeForCausalLM(cfg).eval()
    _randomize(model, seed)
    model.to(dtype).save_pretrained(path)
    return path


def make_hub_layout(src: Path, dst: Path) -> Path:
    """Rewrite a causal-LM checkpoint in the real Qwen3.5 hub layout: nested text_config,
    model.language_model. prefix, fused experts, a vision tensor, an MTP tensor, two shards."""
    cfg = json.loads((src / "config.json").read_text())
    text = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "dtype")}
    text["model_type"] = "qwen3_5_moe_text"
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5MoeForConditionalGeneration"],
                                                "model_type": "qwen3_5_moe", "dtype": cfg.get("dtype", "float32"),
                                                "text_config": text, "vision_config": {"depth": 1}}))
    w = load_file(src / "model.safetensors")
    E, L = cfg["num_experts"], cfg["num_hidden_layers"]
    out: dict[str, torch.Tensor] = {}
    for name, t in w.items():
        if ".mlp.experts." in name:
            continue
        new = "lm_head.weight" if name == "lm_head.weight" else name.replace("model.", "model.language_model.", 1)
        out[new] = t
    for i in range(L):
        p = f"model.layers.{i}.mlp.experts"
        gate_up = torch.stack([torch.cat([w[f"{p}.{e}.gate_proj.weight"], w[f"{p}.{e}.up_proj.weight"]])
                               for e in range(E)])  # [E, 2I, H]: gate rows, then up rows
        down = torch.stack([w[f"{p}.{e}.down_proj.weight"] for e in range(E)])
        out[f"model.language_model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up.contiguous()
        out[f"model.language_model.layers.{i}.mlp.experts.down_proj"] = down.contiguous()
    out["model.visual.patch_embed.proj.weight"] = torch.zeros(8, 3)
    out["mtp.layers.0.mlp.gate.weight"] = torch.zeros(8, 64)
    names = sorted(out)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for k, part in enumerate(halves):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: out[n] for n in part}, str(dst / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    return make_causal_lm(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture(scope="session")
def tiny_hub_src(tmp_path_factory, tiny_src) -> Path:
    return make_hub_layout(tiny_src, tmp_path_factory.mktemp("hub") / "tiny-hub")


@pytest.fixture(scope="session")
def packed16(tmp_path_factory, tiny_src) -> Path:
    from flashmoe_pack.pack import quantize

    return quantize(tiny_src, tmp_path_factory.mktemp("p16") / "m", bits=16, progress=False)


@pytest.fixture(scope="session")
def packed4(tmp_path_factory, tiny_src) -> Path:
    from flashmoe_pack.pack import quantize

    return quantize(tiny_src, tmp_path_factory.mktemp("p4") / "m", bits=4, group_size=32, progress=False)


@pytest.fixture(scope="session")
def hf_reference(tiny_src):
    """ids -> float32 logits from transformers' eager modeling code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_src, dtype=torch.float32, attn_implementation="eager").eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")

    @torch.no_grad()
    def run(ids):
        return model(torch.as_tensor(ids)[None]).logits[0].float()

    return run


@pytest.fixture(autouse=True)
def _reset_cpu_dot():
    """The CLI's --cpu-dot (default auto: int8 on VNNI CPUs) sets the C kernels' process-wide decode
    arithmetic; tests that invoke the CLI in-process must not leave it set for the next test."""
    yield
    from flashmoe_pack.backends import cpu

    if cpu.available():
        cpu.set_dot(None)
