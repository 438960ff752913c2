"""Map source tensor names to the canonical text-model names (transformers' *ForCausalLM layout).

Canonical names: "model.embed_tokens.weight", "model.layers.{i}....", "model.norm.weight",
"lm_head.weight". Routed experts are not canonical tensors: they become ExpertKey pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (source prefix, canonical prefix): Qwen3.5 hub layout, MLX layout, plain causal-LM layout.
_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.lm_head.", "lm_head."),
)
# Tensors of other modalities and of multi-token prediction: not part of the text model we run.
_SKIP = re.compile(r"^(model\.visual\.|visual\.|mtp\.|model\.mtp\.|vision_tower\.|model\.vision_tower\.)")

_PER_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.(weight|scales|biases|weight_scale_inv)$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj(?:\.weight)?$")
_SWITCH = re.compile(r"^model\.layers\.(\d+)\.mlp\.switch_mlp\.(gate|up|down)_proj\.(weight|scales|biases)$")


@dataclass(frozen=True)
class ExpertName:
    """A source tensor that holds routed-expert weights."""

    layer: int
    expert: int | None  # None: stacked over all experts (fused or MLX switch_mlp)
    proj: str  # "gate", "up", "down" or "gate_up"
    part: str  # "weight", "scales", "biases", "weight_scale_inv"


def canonical(name: str) -> str | None:
    """Canonical name, or None if the tensor belongs to a part we skip (vision, MTP)."""
    if _SKIP.match(name):
        return None
    for src, dst in _PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def expert_name(canon: str) -> ExpertName | None:
    """Parse a canonical name as a routed-expert tensor, or None."""
    if m := _PER_EXPERT.match(canon):
        return ExpertName(int(m[1]), int(m[2]), m[3], m[4])
    if m := _FUSED.match(canon):
        return ExpertName(int(m[1]), None, m[2], "weight")
    if m := _SWITCH.match(canon):
        return ExpertName(int(m[1]), None, m[2], m[3])
    return None


def is_companion(name: str) -> bool:
    """Scales of FP8/MLX weights: read together with their weight, never on their own."""
    return name.endswith((".weight_scale_inv", ".scales", ".biases"))
