"""Read a source checkpoint shard by shard: HF float (bf16/fp16/fp32), block-scaled FP8, MLX 4-bit.

`Checkpoint.iter_shard(shard)` yields what one shard holds, already in canonical form:
  Resident(name, tensor)                      non-expert tensor, float, HF semantics
  ExpertPiece(layer, expert, proj, payload)   payload: float [out, in] or QTensor (MLX passthrough)
  Skipped(name)                               vision / MTP tensors
Fused and stacked expert tensors ([E, ...]) are split into per-expert pieces here, so the writer
only ever sees one expert matrix at a time (peak memory: one source tensor).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..quant import QTensor, dequantize
from .names import ExpertName, canonical, expert_name, is_companion

INDEX_FILE = "model.safetensors.index.json"
# Norms MLX stores as (1 + w) because it runs a plain RMSNorm; we keep transformers' w.
_MLX_SHIFTED_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                      ".q_norm.weight", ".k_norm.weight")


class SourceError(Exception):
    """A source checkpoint we cannot read: names the file and tensor."""


@dataclass
class Resident:
    name: str
    tensor: torch.Tensor


@dataclass
class ExpertPiece:
    layer: int
    expert: int
    proj: str  # gate | up | down
    payload: torch.Tensor | QTensor


@dataclass
class Skipped:
    name: str


def text_config(config: dict) -> dict:
    """The text model's config: Qwen3.5 nests it under text_config."""
    return config.get("text_config") or config


class Checkpoint:
    """A Hugging Face-style checkpoint directory (one shard or many with an index)."""

    def __init__(self, path: str | Path, shard_names: list[str] | None = None):
        """`shard_names`: for streaming, the shards that will arrive later (when there is no index)."""
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise SourceError(f"{cfg_path}: missing; a source checkpoint needs its config.json")
        self.config = json.loads(cfg_path.read_text())
        self.text_config = text_config(self.config)
        self.model_type = self.config.get("model_type", "")
        idx = self.path / INDEX_FILE
        if idx.is_file():
            self.weight_map: dict[str, str] = json.loads(idx.read_text())["weight_map"]
            self.shards = sorted(set(self.weight_map.values()))
        elif shard_names:  # streaming a single unindexed shard: names become known as it arrives
            self.shards, self.weight_map = list(shard_names), {}
        else:
            self.shards = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not self.shards:
                raise SourceError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
            self.weight_map = {}
            for s in self.shards:
                with safe_open(self.path / s, "pt") as f:
                    self.weight_map.update(dict.fromkeys(f.keys(), s))
        q = self.config.get("quantization") or self.text_config.get("quantization")
        self.mlx_quant = q if isinstance(q, dict) and "bits" in q else None
        qc = self.config.get("quantization_config") or {}
        self.fp8_block = tuple(qc.get("weight_block_size") or (128, 128))
        self.is_fp8 = qc.get("quant_method") == "fp8" or any(n.endswith("weight_scale_inv") for n in self.weight_map)
        # MLX conversions (quantized or not) name tensors language_model.model.* and store conv
        # weights [C, K, 1] and (1 + w) norms; convert those back to transformers' conventions.
        self.mlx_layout = bool(self.mlx_quant) or any(n.startswith("language_model.model.") for n in self.weight_map)
        self._handles: dict[str, object] = {}
        self.float_dtype = self._detect_float_dtype()

    # -- raw access ---------------------------------------------------------------------------------
    def _open(self, shard: str):
        if shard not in self._handles:
            p = self.path / shard
            if not p.is_file():
                raise SourceError(f"{p}: shard listed in {INDEX_FILE} is missing")
            self._handles[shard] = safe_open(p, "pt")
            for name in self._handles[shard].keys():
                self.weight_map.setdefault(name, shard)
        return self._handles[shard]

    def close_shard(self, shard: str) -> None:
        self._handles.pop(shard, None)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def raw(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise SourceError(f"{self.path}: tensor {name!r} not found in any shard")
        return self._open(self.weight_map[name]).get_tensor(name)

    def _detect_float_dtype(self) -> torch.dtype:
        """The source's float dtype: from config.json, else from a norm weight of a present shard."""
        named = self.config.get("dtype") or self.config.get("torch_dtype") or self.text_config.get("dtype")
        if named in ("float32", "float16", "bfloat16") and not self.is_fp8:
            return getattr(torch, named)
        for name, shard in self.weight_map.items():
            if name.endswith("norm.weight") and (self.path / shard).is_file():
                dt = self.raw(name).dtype
                if dt.is_floating_point and dt.itemsize >= 2:
                    return dt
        return torch.bfloat16

    # -- decoding -----------------------------------------------------------------------------------
    def mlx_params(self, name: str) -> tuple[int, int]:
        """(bits, group_size) of an MLX-quantized tensor: config.json's "quantization" holds the
        defaults plus per-module overrides keyed by module path (mlx-lm stores routers at 8 bits)."""
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        q = self.mlx_quant
        own = q.get(base)
        if isinstance(own, dict) and "bits" in own:
            return int(own["bits"]), int(own.get("group_size", q["group_size"]))
        return int(q["bits"]), int(q["group_size"])

    def _mlx_q(self, name: str, w: torch.Tensor) -> QTensor:
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        return QTensor(w.view(torch.int32), self.raw(base + ".scales"), self.raw(base + ".biases"),
                       *self.mlx_params(name))

    def _decode(self, name: str) -> torch.Tensor | QTensor:
        """A source tensor as float, or as QTensor when it is MLX-quantized."""
        t = self.raw(name)
        if t.dtype == torch.float8_e4m3fn or t.dtype == torch.float8_e5m2:
            inv_name = name + "_scale_inv"
            if not self.has(inv_name):
                raise SourceError(f"{self.path}: FP8 tensor {name!r} has no {inv_name!r}")
            return fp8_dequantize(t, self.raw(inv_name), self.fp8_block)
        if self.mlx_quant and t.dtype in (torch.uint32, torch.int32):
            base = name[: -len(".weight")] if name.endswith(".weight") else name
            if self.has(base + ".scales"):
                return self._mlx_q(name, t)
        if not t.dtype.is_floating_point:
            raise SourceError(f"{self.path}: tensor {name!r} has dtype {t.dtype}; expected a float dtype")
        return t

    # -- random access, for verification ------------------------------------------------------------
    def _expert_sources(self) -> dict[tuple[int, int | None, str], str]:
        if not hasattr(self, "_experts_map"):
            self._experts_map = {}
            for name in self.weight_map:
                canon = canonical(name)
                en = expert_name(canon) if canon else None
                if en is not None and en.part == "weight":
                    self._experts_map[(en.layer, en.expert, en.proj)] = name
        return self._experts_map

    def expert_matrix(self, layer: int, expert: int, proj: str) -> torch.Tensor:
        """One expert projection as float32 [out, in], read lazily (a slice of a fused tensor)."""
        srcs = self._expert_sources()
        if (name := srcs.get((layer, expert, proj))) is not None:
            value = self._decode(name)
            return dequantize(value) if isinstance(value, QTensor) else value.float()
        fused = "gate_up" if proj in ("gate", "up") else "down"
        name = srcs.get((layer, None, fused)) or srcs.get((layer, None, proj))
        if name is None:
            raise SourceError(f"{self.path}: no tensor holds layer {layer} expert {expert} {proj}_proj")
        f = self._open(self.weight_map[name])
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        if self.mlx_quant and self.has(base + ".scales"):
            q = QTensor(f.get_slice(name)[expert].view(torch.int32), f.get_slice(base + ".scales")[expert],
                        f.get_slice(base + ".biases")[expert], *self.mlx_params(name))
            return dequantize(q)
        one = f.get_slice(name)[expert: expert + 1]  # [1, out, in]
        en = expert_name(canonical(name))
        for piece in _split_experts(name, en, one, self.text_config):
            if piece.proj == proj:
                return piece.payload.float()
        raise SourceError(f"{name}: no {proj} part")

    def resident_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every non-expert text-model tensor, canonical name and float value."""
        for name in self.weight_map:
            canon = canonical(name)
            if canon is None or expert_name(canon) is not None or (is_companion(name) and
                                                                   self.has(_companion_base(name))):
                continue
            value = self._decode(name)
            if isinstance(value, QTensor):
                value = dequantize(value, torch.float32)
            yield canon, _mlx_to_hf(canon, value) if self.mlx_layout else value

    def iter_shard(self, shard: str) -> Iterator[Resident | ExpertPiece | Skipped]:
        """Everything one shard holds, in canonical form."""
        f = self._open(shard)
        for name in f.keys():
            canon = canonical(name)
            if canon is None:
                yield Skipped(name)
                continue
            if is_companion(name) and self.has(_companion_base(name)):
                continue  # read together with its weight
            en = expert_name(canon)
            value = self._decode(name)
            if en is not None:
                yield from _split_experts(name, en, value, self.text_config)
                continue
            if isinstance(value, QTensor):  # an MLX-quantized resident matrix (attention, router...)
                value = dequantize(value, torch.float32)
            if self.mlx_layout:
                value = _mlx_to_hf(canon, value)
            yield Resident(canon, value)
        self.close_shard(shard)


def _companion_base(name: str) -> str:
    """The weight a scale tensor belongs to: x.weight_scale_inv / x.scales / x.biases -> x.weight."""
    for sfx in (".weight_scale_inv", ".scales", ".biases"):
        if name.endswith(sfx):
            return name[: -len(sfx)] + ".weight"
    return name


def fp8_dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-scaled FP8 -> float32: each block[0] x block[1] tile is multiplied by its scale_inv."""
    out, inp = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return w.float() * s


def _mlx_to_hf(canon: str, t: torch.Tensor) -> torch.Tensor:
    if canon.endswith("conv1d.weight") and t.dim() == 3 and t.shape[-1] == 1:
        t = t.movedim(2, 1)  # MLX conv weight [C, K, 1] -> torch [C, 1, K]
    if canon.endswith(_MLX_SHIFTED_NORMS) and t.dim() == 1:
        t = t.float() - 1.0  # fp32 so (1 + w) reproduces MLX's stored value exactly enough
    return t


def _split_experts(name: str, en: ExpertName, value, tcfg: dict) -> Iterator[ExpertPiece]:
    """Per-expert pieces from a per-expert, fused [E, 2I, H] / [E, H, I], or MLX stacked tensor."""
    if en.expert is not None:
        yield ExpertPiece(en.layer, en.expert, en.proj, value)
        return
    if isinstance(value, QTensor):  # MLX switch_mlp: [E, out, in*bits/32] with stacked scales
        for e in range(value.weight.shape[0]):
            yield ExpertPiece(en.layer, e, en.proj, QTensor(value.weight[e], value.scales[e], value.biases[e],
                                                             value.bits, value.group_size))
        return
    if value.dim() != 3:
        raise SourceError(f"{name}: expected a stacked [experts, out, in] tensor, got {tuple(value.shape)}")
    hidden, inter = tcfg["hidden_size"], tcfg["moe_intermediate_size"]
    if en.proj == "gate_up":
        if value.shape[1:] == (2 * inter, hidden):
            gate_up = value
        elif value.shape[1:] == (hidden, 2 * inter):  # transposed storage, as some exporters write it
            gate_up = value.transpose(1, 2)
        else:
            raise SourceError(f"{name}: shape {tuple(value.shape)}, expected [E, {2 * inter}, {hidden}]")
        for e in range(gate_up.shape[0]):
            yield ExpertPiece(en.layer, e, "gate", gate_up[e, :inter])
            yield ExpertPiece(en.layer, e, "up", gate_up[e, inter:])
        return
    want = (hidden, inter) if en.proj == "down" else (inter, hidden)
    if value.shape[1:] == want:
        stacked = value
    elif value.shape[1:] == want[::-1]:
        stacked = value.transpose(1, 2)
    else:
        raise SourceError(f"{name}: shape {tuple(value.shape)}, expected [E, {want[0]}, {want[1]}]")
    for e in range(stacked.shape[0]):
        yield ExpertPiece(en.layer, e, en.proj, stacked[e])
