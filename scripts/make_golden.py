"""Regenerate formats/golden/: tiny packed models (4-bit and 2-bit) and their expected values.

    python scripts/make_golden.py [OUT]        (default OUT: formats/golden next to this script)

Writes OUT/q4/ and OUT/q2/ (complete packed models: index.json, experts/, resident/, config.json) and
OUT/<q>/expected.json: the dequantized values of a few expert records, decoded from the raw bytes
by `decode_expected` below, a second implementation of SPEC.md's record layout written with numpy
only. Deterministic: a fixed seed, a hand-written config and tensor list (no transformers, no
library init routines), and `source_info={"path": "golden"}` so nothing depends on where it ran.
tests/test_golden.py checks the committed files against flashmoe_pack's reader and regenerates
them into a temporary folder to catch writer drift.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SEED = 20260101
GROUP_SIZE = 32
BITS = (4, 2)
# (layer, expert) records whose values expected.json lists: the first VALUES values of row 0 and of
# the last row of each projection.
RECORDS = ((0, 1), (1, 3))
VALUES = 16
SOURCE_INFO = {"path": "golden"}

CONFIG = {
    "architectures": ["Qwen3_5MoeForCausalLM"],
    "model_type": "qwen3_5_moe_text",
    "dtype": "bfloat16",
    "vocab_size": 64,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["linear_attention", "full_attention"],
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "attention_bias": False,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 1,
    "linear_num_value_heads": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": 1,
    "pad_token_id": None,
}


def tensor_shapes(c: dict = CONFIG) -> dict[str, tuple[int, ...]]:
    """Every tensor of the text model, transformers' Qwen3_5MoeForCausalLM names (per-expert experts)."""
    h, v, e, i, s = (c["hidden_size"], c["vocab_size"], c["num_experts"], c["moe_intermediate_size"],
                     c["shared_expert_intermediate_size"])
    nk, nv, dk, dv = (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                      c["linear_value_head_dim"])
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    conv = 2 * nk * dk + nv * dv
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n, kind in enumerate(c["layer_types"]):
        p = f"model.layers.{n}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate.weight": (e, h), p + "mlp.shared_expert_gate.weight": (1, h),
                    p + "mlp.shared_expert.gate_proj.weight": (s, h),
                    p + "mlp.shared_expert.up_proj.weight": (s, h),
                    p + "mlp.shared_expert.down_proj.weight": (h, s)})
        for x in range(e):
            ex = f"{p}mlp.experts.{x}."
            out.update({ex + "gate_proj.weight": (i, h), ex + "up_proj.weight": (i, h),
                        ex + "down_proj.weight": (h, i)})
        if kind == "linear_attention":
            a = p + "linear_attn."
            out.update({a + "A_log": (nv,), a + "dt_bias": (nv,),
                        a + "conv1d.weight": (conv, 1, c["linear_conv_kernel_dim"]),
                        a + "in_proj_qkv.weight": (conv, h), a + "in_proj_z.weight": (nv * dv, h),
                        a + "in_proj_a.weight": (nv, h), a + "in_proj_b.weight": (nv, h),
                        a + "norm.weight": (dv,), a + "out_proj.weight": (h, nv * dv)})
        else:
            a = p + "self_attn."
            out.update({a + "q_proj.weight": (2 * heads * hd, h), a + "k_proj.weight": (kv * hd, h),
                        a + "v_proj.weight": (kv * hd, h), a + "o_proj.weight": (h, heads * hd),
                        a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
    return out


def make_source(d: Path) -> Path:
    """The tiny bf16 source checkpoint, from SEED alone (tensors drawn in sorted name order)."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name, shape in sorted(tensor_shapes().items()):
        if name.endswith("A_log"):
            t = torch.rand(shape, generator=g).mul(15).add(1).log()
        elif len(shape) == 1:  # zero-centred norms, dt_bias
            t = 0.1 * torch.randn(shape, generator=g)
        else:  # matrices: unit-variance outputs; random signs everywhere (no collapsed routing)
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        tensors[name] = t.to(torch.bfloat16)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(CONFIG, indent=1, sort_keys=True) + "\n")
    return d


# -- an independent decoder of SPEC.md's expert records (numpy only) ---------------------------------
_NP = {"int32": np.uint32, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def _component(rec: bytes, comp: dict) -> np.ndarray:
    a = np.frombuffer(rec, dtype=_NP[comp["dtype"]], count=int(np.prod(comp["shape"])), offset=comp["offset"])
    if comp["dtype"] == "bfloat16":  # bf16 is the top half of a float32
        a = (a.astype(np.uint32) << 16).view(np.float32)
    a = a.reshape(comp["shape"])
    return a if comp["dtype"] == "int32" else a.astype(np.float32)


def decode_expected(packed: Path, layer: int, expert: int) -> dict:
    """One record's raw fields and dequantized values, straight from the bytes the index points at."""
    index = json.loads((packed / "index.json").read_text())
    ex, q = index["experts"], index["quantization"]
    bits, gs = q["bits"], q["group_size"]
    entry = next(e for e in ex["layers"] if e["layer"] == layer)
    offset = ex["header_bytes"] + expert * ex["stride"]
    with open(packed / entry["file"], "rb") as f:
        f.seek(offset)
        rec = f.read(ex["record_bytes"])
    comps = {c["name"]: c for c in ex["components"]}
    per_word, mask = 32 // bits, (1 << bits) - 1
    rows, raw = {}, {}
    for proj in ("gate", "up", "down"):
        words = _component(rec, comps[f"{proj}.weight"])  # uint32 [out, in * bits / 32]
        scales, biases = _component(rec, comps[f"{proj}.scales"]), _component(rec, comps[f"{proj}.biases"])
        # element j of a row: bit offset bits * (j % per_word) of word j // per_word
        shifts = np.arange(per_word, dtype=np.uint32) * bits
        qv = ((words[..., None] >> shifts) & mask).reshape(words.shape[0], -1).astype(np.float32)
        g = np.arange(qv.shape[1]) // gs
        values = qv * scales[:, g] + biases[:, g]  # float32: q * scale, then + bias
        last = values.shape[0] - 1
        rows[proj] = {str(r): [float(x) for x in values[r, :VALUES]] for r in (0, last)}
        raw[proj] = {"weight_row0_words": [int(w) for w in words[0, :4]],
                     "scales_row0": [float(x) for x in scales[0]],
                     "biases_row0": [float(x) for x in biases[0]]}
    return {"layer": layer, "expert": expert, "file": entry["file"], "offset": offset,
            "record_bytes": ex["record_bytes"], "xxh64": entry["xxh64"][expert], "rows": rows, "raw": raw}


def make(out: Path) -> Path:
    """Write OUT/q4 and OUT/q2 (replacing them) with their expected.json."""
    from flashmoe_pack.pack import quantize

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(Path(tmp) / "source")
        for bits in BITS:
            packed = out / f"q{bits}"
            if packed.exists():
                shutil.rmtree(packed)
            quantize(src, packed, bits=bits, group_size=GROUP_SIZE, progress=False, source_info=SOURCE_INFO)
            expected = {
                "about": f"Dequantized values (float32, value = q * scale + bias) of {len(RECORDS)} "
                         f"expert records of this {bits}-bit pack: rows[proj][row] = the first {VALUES} "
                         "values of that row; raw = the first 4 weight words (uint32) and the "
                         "scales/biases of row 0.",
                "bits": bits, "group_size": GROUP_SIZE, "values_per_row": VALUES,
                "records": [decode_expected(packed, layer, e) for layer, e in RECORDS],
            }
            (packed / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return out


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "formats" / "golden"
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    print(f"wrote {make(target)}")
