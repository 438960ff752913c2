"""Qwen3.5-MoE text model (HF model_type "qwen3_5_moe" / "qwen3_5_moe_text") in plain torch.

Layer i: x += mixer(rms_norm(x)); x += moe(rms_norm(x)). The mixer is Gated DeltaNet
("linear_attention", a conv + recurrent state) or gated GQA ("full_attention", a KV cache),
by config.layer_types. The MoE is a softmax top-K router over routed experts, which this class
does not hold (they come from an `experts` object, e.g. a streaming store), plus a resident
shared expert gated by a sigmoid.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flashmoe_pack.models import register
from flashmoe_pack.models.layers import (
    KVCache,
    add_moe_rms_norm,
    add_rms_norm,
    attention,
    conv_silu_,
    embedding,
    gated_delta_step_,
    gated_rms_norm,
    linear,
    rms_norm,
    rms_norm_rope,
    rope_cos_sin,
    rope_inv_freq,
    route,
    silu_down,
    static_attention,
    swiglu,
    swiglu_fused,
)
from flashmoe_pack.quant import QTensor


@dataclass
class Qwen35MoeConfig:
    """Text-model hyperparameters; defaults are transformers' Qwen3_5MoeTextConfig defaults."""

    vocab_size: int = 248320
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts: int = 256
    num_experts_per_tok: int = 8
    full_attention_interval: int = 4
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    eos_token_id: int | list[int] | None = None
    eos_token_ids: tuple[int, ...] = field(default=())  # derived from eos_token_id

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.layer_types is None:  # transformers' default: every `interval`-th layer is full attention
            every = self.full_attention_interval
            self.layer_types = [
                "full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)
            ]
        bad = set(self.layer_types) - {"full_attention", "linear_attention"}
        if len(self.layer_types) != n or bad:
            raise ValueError(f"need {n} layer_types of full_attention|linear_attention: {self.layer_types}")
        rope = self.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope['rope_type']!r} (only 'default')")
        self.rope_theta = float(rope.get("rope_theta", self.rope_theta))
        self.partial_rotary_factor = float(rope.get("partial_rotary_factor", self.partial_rotary_factor))
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (only 'silu')")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} not in 1..{self.num_experts}")
        eos = self.eos_token_id
        self.eos_token_ids = tuple([eos] if isinstance(eos, int) else eos or self.eos_token_ids)

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, d: Mapping, **overrides) -> Qwen35MoeConfig:
        """Build from a text config dict or a multimodal config.json (text part under "text_config").

        Unknown keys are dropped; `overrides` (e.g. num_experts_per_tok=4) win over the file.
        """
        d = dict(d)
        text = dict(d.get("text_config") or d)
        for key in ("tie_word_embeddings", "eos_token_id"):  # multimodal files may keep these at the top
            if key not in text and key in d:
                text[key] = d[key]
        names = {f.name for f in dataclasses.fields(cls)} - {"eos_token_ids"}
        return cls(**{**{k: v for k, v in text.items() if k in names}, **overrides})


class DenseExperts:
    """Reference routed experts over full-precision tensors.

    experts: {(layer, e): (gate [I, H], up [I, H], down [H, I])}.
    """

    def __init__(self, experts: Mapping[tuple[int, int], tuple[Tensor, Tensor, Tensor]]):
        self.experts = experts

    @classmethod
    def from_hf(cls, weights: Mapping[str, Tensor], num_layers: int) -> DenseExperts:
        """Split transformers' fused `mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]."""
        experts = {}
        for i in range(num_layers):
            gate_up = _get(weights, f"model.layers.{i}.mlp.experts.gate_up_proj")
            down = _get(weights, f"model.layers.{i}.mlp.experts.down_proj")
            inter = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                experts[(i, e)] = (gate_up[e, :inter], gate_up[e, inter:], down[e])
        return cls(experts)

    def forward(self, layer: int, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """Sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]): x [T, H], ids/weights [T, K] -> [T, H]."""
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            if (layer, e) not in self.experts:
                raise KeyError(f"no weights for expert {e} of layer {layer}")
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y = swiglu(x[tok], *self.experts[(layer, e)])  # [n, H]
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out


@dataclass
class Qwen35MoeState:
    """Per-sequence state: KV caches of full-attention layers, conv and recurrent state of
    linear-attention layers, and the number of tokens consumed (the next position).

    forward updates every tensor in place (a captured CUDA graph replays into the same buffers),
    so a snapshot is a full copy."""

    pos: int
    kv: dict[int, KVCache]
    conv: dict[int, Tensor]  # [C, W-1] in the compute dtype
    recurrent: dict[int, Tensor]  # [Hv, Dk, Dv] fp32

    def clone(self) -> Qwen35MoeState:
        """Independent copy (prefix reuse): KV caches, conv and recurrent tensors are all copied."""
        kv = {i: c.clone() for i, c in self.kv.items()}
        conv = {i: t.clone() for i, t in self.conv.items()}
        rec = {i: t.clone() for i, t in self.recurrent.items()}
        return Qwen35MoeState(self.pos, kv, conv, rec)

    def advance(self, n: int) -> None:
        """Host bookkeeping after a static step (forward with `pos`): n more tokens consumed."""
        self.pos += n
        for cache in self.kv.values():
            cache.length += n

    def buffers(self) -> list[Tensor]:
        """Every tensor a step reads and writes in place (what a captured step is bound to)."""
        out = [t for c in self.kv.values() for t in (c.k, c.v)]
        return out + list(self.conv.values()) + list(self.recurrent.values())

    def set_buffers(self, bufs: list[Tensor]) -> None:
        """Use `bufs` (as buffers() lists them) as this state's tensors from now on, contents as they are."""
        it = iter(bufs)
        for c in self.kv.values():
            c.k, c.v = next(it), next(it)
        for d in (self.conv, self.recurrent):
            for i in d:
                d[i] = next(it)

    def move_to(self, bufs: list[Tensor]) -> None:
        """Copy this state into `bufs` (buffers()' order and shapes; KV buffers with room for at least the
        cached tokens) and use them from now on: the KV tail past the cached tokens is zeroed (KVCache's
        invariant), so a captured decode step bound to `bufs` runs this sequence (engine/cuda_graph.py)."""
        mine = self.buffers()
        if len(bufs) != len(mine):
            raise ValueError(f"move_to: {len(bufs)} buffers for a state of {len(mine)}")
        it = iter(bufs)
        for c in self.kv.values():
            for old in (c.k, c.v):
                new = next(it)
                if new.shape[0] != old.shape[0] or new.shape[2] != old.shape[2] or new.shape[1] < c.length:
                    raise ValueError(f"move_to: KV buffer {tuple(new.shape)} for {tuple(old.shape)}, {c.length} cached")
                new[:, : c.length].copy_(old[:, : c.length])
                new[:, c.length :].zero_()
        for d in (self.conv, self.recurrent):
            for t in d.values():
                new = next(it)
                if new.shape != t.shape:
                    raise ValueError(f"move_to: buffer {tuple(new.shape)} for {tuple(t.shape)}")
                new.copy_(t)
        self.set_buffers(bufs)


def _get(weights: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in weights:
        raise KeyError(f"missing tensor {name!r} in the Qwen3.5-MoE weights")
    return weights[name]


_NO_SECTION = contextlib.nullcontext()


def _no_section(name: str, layer: int):
    return _NO_SECTION


_LINEAR = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "conv1d", "norm"]
_LINEAR_PARAMS = ["A_log", "dt_bias"]
_FULL = ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"]
_MLP = [f"shared_expert.{p}_proj" for p in ("gate", "up", "down")] + ["gate", "shared_expert_gate"]
# fuse=True: matrices that read the same input, concatenated by rows into one product (name -> parts)
# (the first group that applies takes its parts: the router, its shared gate and the shared expert's gate and up
# read the same h, one product; the smaller groups below where the four do not stack)
_FUSE = {
    "mlp.router_shared.weight": ["mlp.gate.weight", "mlp.shared_expert_gate.weight",
                                 "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"],
    "linear_attn.in_proj_qkvzba.weight": [f"linear_attn.in_proj_{p}.weight" for p in ("qkv", "z", "b", "a")],
    "self_attn.qkv_proj.weight": [f"self_attn.{p}_proj.weight" for p in ("q", "k", "v")],
    "mlp.shared_expert.gate_up_proj.weight": [f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up")],
    "mlp.gate_and_shared_gate.weight": ["mlp.gate.weight", "mlp.shared_expert_gate.weight"],
}


def _cat_rows(ts: list) -> Tensor | QTensor | None:
    """Matrices stacked by rows: float ones of one dtype, or QTensors of one scheme; None otherwise."""
    if any(t is None for t in ts):
        return None
    if all(isinstance(t, Tensor) and t.dtype == ts[0].dtype for t in ts):
        return torch.cat(ts)
    q0 = ts[0]
    if all(isinstance(t, QTensor) and (t.bits, t.group_size, t.scales.dtype) == (q0.bits, q0.group_size,
                                                                                   q0.scales.dtype) for t in ts):
        return QTensor(*(torch.cat([getattr(t, f) for t in ts]) for f in ("weight", "scales", "biases")),
                       q0.bits, q0.group_size)
    return None


def _fuse_rows(w: dict[str, Tensor | QTensor], weights, prefix: str) -> None:
    """Replace each _FUSE group whose parts are all in `w` and stack (_cat_rows; no bias) by their
    concatenation; the parts leave `w` and, where it is a dict, `weights` (their memory can go)."""
    for name, parts in _FUSE.items():
        if any(p.replace(".weight", ".bias") in w for p in parts):
            continue
        ts = [w.get(p) for p in parts]
        fused = _cat_rows(ts)
        if fused is None:
            continue
        w[name] = fused
        w[name + ".split"] = [t.shape[0] for t in ts]
        for p in parts:
            del w[p]
            if isinstance(weights, dict):
                weights.pop(prefix + p, None)


@register("qwen3_5_moe", "qwen3_5_moe_text")
class Qwen35MoeModel:
    """Qwen3.5-MoE text model over resident weights with HF names; routed experts via `experts`.

    Weight matrices are float tensors or QTensors (layers.linear runs either). Computes in `dtype`
    (default: the embedding's dtype, bf16 for a quantized embedding) on the embedding's device.
    fuse=True concatenates the float matrices that read the same input (linear attention's four
    input projections; q, k, v; the router, the shared expert's gate logit and its gate and up
    projections, whose product the profiler counts as routing), one product instead of two to four,
    and takes the parts out of `weights` (the runtime does this on CUDA, where a decode step's cost
    is mostly launches).
    """

    config_class = Qwen35MoeConfig

    def __init__(self, config: Qwen35MoeConfig, weights: Mapping[str, Tensor | QTensor], experts,
                 dtype: torch.dtype | None = None, fuse: bool = False):
        self.config, self.experts = config, experts
        c = config
        self.embed = _get(weights, "model.embed_tokens.weight")  # [V, H]
        if isinstance(self.embed, QTensor):
            self.dtype, self.device = dtype or torch.bfloat16, self.embed.weight.device
        else:
            self.dtype, self.device = dtype or self.embed.dtype, self.embed.device
        if "lm_head.weight" in weights or not c.tie_word_embeddings:
            self.lm_head = _get(weights, "lm_head.weight")
        else:
            self.lm_head = self.embed
        self.final_norm = _get(weights, "model.norm.weight")
        self.layers: list[dict[str, Tensor]] = []  # per layer: HF name below "model.layers.{i}." -> tensor
        for i, kind in enumerate(c.layer_types):
            names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
            names += [f"mlp.{m}.weight" for m in _MLP]
            if kind == "linear_attention":
                names += [f"linear_attn.{m}.weight" for m in _LINEAR]
                names += [f"linear_attn.{p}" for p in _LINEAR_PARAMS]
            else:
                names += [f"self_attn.{m}.weight" for m in _FULL]
                if c.attention_bias:
                    names += [f"self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
            self.layers.append({n: _get(weights, f"model.layers.{i}.{n}") for n in names})
            if fuse:
                _fuse_rows(self.layers[-1], weights, f"model.layers.{i}.")
        self.inv_freq = rope_inv_freq(c.rotary_dim, c.rope_theta).to(self.device)

    def new_state(self) -> Qwen35MoeState:
        """Empty state for a new sequence."""
        c, dt, dev = self.config, self.dtype, self.device
        kv, conv, rec = {}, {}, {}
        key_dim = c.linear_num_key_heads * c.linear_key_head_dim
        conv_dim = 2 * key_dim + c.linear_num_value_heads * c.linear_value_head_dim  # q, k, v channels
        for i, kind in enumerate(c.layer_types):
            if kind == "full_attention":
                kv[i] = KVCache(c.num_key_value_heads, c.head_dim, dt, dev)
            else:
                conv[i] = torch.zeros(conv_dim, c.linear_conv_kernel_dim - 1, dtype=dt, device=dev)
                rec[i] = torch.zeros(c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                                     dtype=torch.float32, device=dev)
        return Qwen35MoeState(0, kv, conv, rec)

    @torch.no_grad()
    def forward(self, ids: Tensor, state: Qwen35MoeState, profiler=None, last_only: bool = False,
                pos: Tensor | None = None) -> Tensor:
        """Append tokens ids [T] to `state` (prefill, continued prefill or T=1 decode) and
        return float32 logits [T, vocab]. `profiler.section(name, layer)` times the parts;
        layer -1 is the embedding and the head.

        `pos`: the static decode step that a CUDA graph can capture (engine/cuda_graph.py): a device
        tensor [1] holding state.pos, T = 1, KV caches with room for the token (KVCache.reserve).
        Nothing on the host changes and nothing syncs; the caller then calls state.advance(1)."""
        c = self.config
        section = profiler.section if profiler is not None else _no_section
        ids = ids.to(self.device)
        if pos is not None and ids.shape[0] != 1:
            raise ValueError(f"a static step (pos given) takes one token, got {ids.shape[0]}")
        with section("other", -1):
            x = embedding(ids, self.embed, self.dtype)  # [T, H]
            positions = pos if pos is not None else torch.arange(state.pos, state.pos + ids.shape[0],
                                                                 device=self.device)
            cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)  # [T, rotary_dim]
        h = None  # the layer's normed input, where the previous layer's last launch computed it
        for i, (kind, w) in enumerate(zip(c.layer_types, self.layers)):
            if h is None:
                with section("other", i):
                    h = rms_norm(x, w["input_layernorm.weight"], c.rms_norm_eps)  # [T, H]
            if kind == "linear_attention":
                with section("linear_attn", i):
                    h = self._linear_attn(i, w, h, state)
            else:
                with section("full_attn", i):
                    h = self._full_attn(i, w, h, cos, sin, state, pos)
            with section("other", i):
                x, h = add_rms_norm(x, h, w["post_attention_layernorm.weight"], c.rms_norm_eps)  # [T, H] each
            gate_up = None  # the shared expert's gate and up products, where the router's product holds them
            with section("routing", i):
                if "mlp.router_shared.weight" in w:
                    logits, shared_gate, *gate_up = linear(h, w["mlp.router_shared.weight"]).split(
                        w["mlp.router_shared.weight.split"], dim=-1)
                elif "mlp.gate_and_shared_gate.weight" in w:
                    logits, shared_gate = linear(h, w["mlp.gate_and_shared_gate.weight"]).split(
                        w["mlp.gate_and_shared_gate.weight.split"], dim=-1)
                else:
                    logits, shared_gate = linear(h, w["mlp.gate.weight"]), None
                top_ids, top_p = route(logits, c.num_experts_per_tok)  # [T, K]
            with section("experts", i):
                routed = self.experts.forward(i, h, top_ids, top_p)  # [T, H]
            with section("other", i):
                down = w["mlp.shared_expert.down_proj.weight"]
                if gate_up is not None:
                    shared = silu_down(*gate_up, down)
                elif "mlp.shared_expert.gate_up_proj.weight" in w:
                    shared = swiglu_fused(h, w["mlp.shared_expert.gate_up_proj.weight"], down)
                else:
                    shared = swiglu(h, w["mlp.shared_expert.gate_proj.weight"], w["mlp.shared_expert.up_proj.weight"],
                                    down)
                if shared_gate is None:
                    shared_gate = linear(h, w["mlp.shared_expert_gate.weight"])
                # the residual sum, and the next layer's input norm of it (after the last layer: the final norm)
                nxt = self.layers[i + 1]["input_layernorm.weight"] if i + 1 < len(self.layers) else self.final_norm
                x, h = add_moe_rms_norm(x, routed, shared, shared_gate, nxt, c.rms_norm_eps)
        if pos is None:
            state.pos += ids.shape[0]
        with section("other", -1):
            if h is None:  # (no layers)
                h = rms_norm(x, self.final_norm, c.rms_norm_eps)
            if last_only:  # generation needs one row: skip T-1 rows of the [T, vocab] head
                h = h[-1:]
            return linear(h, self.lm_head, out_dtype=torch.float32)  # [T, V] (or [1, V])

    def _linear_attn(self, i: int, w: dict[str, Tensor], x: Tensor, state: Qwen35MoeState) -> Tensor:
        """Gated DeltaNet: short causal conv over q/k/v, then the gated delta rule, gated norm, out proj."""
        c, t = self.config, x.shape[0]
        hk, hv = c.linear_num_key_heads, c.linear_num_value_heads
        dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
        if "linear_attn.in_proj_qkvzba.weight" in w:
            qkv, z, b, a = linear(x, w["linear_attn.in_proj_qkvzba.weight"]).split(
                w["linear_attn.in_proj_qkvzba.weight.split"], dim=-1)
            qkv = qkv.contiguous()  # [T, 2*hk*dk + hv*dv]; the others are read in place
        else:
            qkv = linear(x, w["linear_attn.in_proj_qkv.weight"])
            z = linear(x, w["linear_attn.in_proj_z.weight"])  # output gate
            b = linear(x, w["linear_attn.in_proj_b.weight"])  # [T, hv]
            a = linear(x, w["linear_attn.in_proj_a.weight"])  # [T, hv]
        z = z.reshape(t, hv, dv)
        qkv = conv_silu_(qkv, w["linear_attn.conv1d.weight"].squeeze(1), state.conv[i])
        q, k, v = qkv.split([hk * dk, hk * dk, hv * dv], dim=-1)
        core = gated_delta_step_(q.view(t, hk, dk), k.view(t, hk, dk), v.view(t, hv, dv), a, b,
                                 w["linear_attn.A_log"], w["linear_attn.dt_bias"], state.recurrent[i])  # fp32
        core = gated_rms_norm(core, z, w["linear_attn.norm.weight"], c.rms_norm_eps, x.dtype)
        return linear(core.reshape(t, hv * dv), w["linear_attn.out_proj.weight"])  # [T, H]

    def _full_attn(self, i: int, w: dict[str, Tensor], x: Tensor, cos: Tensor, sin: Tensor,
                   state: Qwen35MoeState, pos: Tensor | None = None) -> Tensor:
        """Gated GQA: per-head q/k RMSNorm, partial RoPE, causal attention, sigmoid output gate."""
        c, t, d = self.config, x.shape[0], self.config.head_dim
        hq, hkv = c.num_attention_heads, c.num_key_value_heads

        def proj(name: str, inp: Tensor) -> Tensor:
            return linear(inp, w[f"self_attn.{name}.weight"], w.get(f"self_attn.{name}.bias"))

        if "self_attn.qkv_proj.weight" in w:
            qg, k, v = linear(x, w["self_attn.qkv_proj.weight"]).split(w["self_attn.qkv_proj.weight.split"], dim=-1)
        else:
            qg, k, v = proj("q_proj", x), proj("k_proj", x), proj("v_proj", x)
        # q_proj packs per head [query D | gate D]: [T, hq, D] each
        q, gate = qg.reshape(t, hq, 2 * d).chunk(2, dim=-1)
        q = rms_norm_rope(q, w["self_attn.q_norm.weight"], c.rms_norm_eps, cos, sin)
        k = rms_norm_rope(k.reshape(t, hkv, d), w["self_attn.k_norm.weight"], c.rms_norm_eps, cos, sin)
        v = v.reshape(t, hkv, d)
        cache = state.kv[i]
        if pos is None:
            past = cache.length
            keys, values = cache.append(k.transpose(0, 1), v.transpose(0, 1))  # [hkv, S, D]
            o = attention(q.transpose(0, 1), keys, values, past)  # [hq, T, D]
            o = o.transpose(0, 1).reshape(t, hq * d) * torch.sigmoid(gate.reshape(t, hq * d))
        else:  # static step: write at pos, attend over the whole buffer with positions > pos masked
            o = static_attention(q, k, v, cache, pos, gate)  # [1, hq * D]
        return proj("o_proj", o)  # [T, H]
