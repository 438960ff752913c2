"""Seeded synthetic Qwen3.5-MoE models of real geometry, for benchmarks (never committed).

    python scripts/make_synthetic.py OUT --geometry qwen35-397b --layers 8 [--gguf OUT.gguf] [--seed 0] [--jobs 9]
    python scripts/make_synthetic.py --gguf OUT.gguf --geometry qwen35-397b --layers 12   # the GGUF alone

Writes OUT as a complete flashmoe-pack model straight in the packed format (SPEC.md; no quantize
step: expert records are written in place with a correct index and real xxhashes, resident tensors
in bf16) and, with --gguf, the same weights as a llama.cpp GGUF (architecture `qwen35moe`, the
tensor names and HF->GGUF conversions of llama.cpp's convert_hf_to_gguf.py) whose routed experts
are Q4_0 and whose other matrices are BF16. Either can be written alone (same values), so a disk too
small for both holds one at a time.

Experts are 4-bit affine groups of 32 with bias = -8 * scale and fp16 scales, which is exactly
GGUF's Q4_0 block (d = scale, same q): both files hold bit-identical expert values. MLX packing puts
element j of a row in byte j // 2 (low nibble if j is even); Q4_0 puts element j of a 32-block in
the low nibble of byte j (j < 16) or the high nibble of byte j - 16. Scales have random signs:
same-sign scales bias every weight one way and collapse routing onto a few experts (DESIGN.md).
Every tensor comes from its own seeded generator, so the output does not depend on write order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors.torch import save_file

from flashmoe_pack.pack import format as fmt

GROUP = 32  # Q4_0's block size
PROJS = fmt.PROJS  # gate, up, down
# Qwen3.5 text configs (config.json "text_config"); scripts/README.md says where they come from.
_COMMON = dict(model_type="qwen3_5_moe_text", vocab_size=248320, num_key_value_heads=2, head_dim=256,
               linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
               linear_num_key_heads=16, full_attention_interval=4, rms_norm_eps=1e-6, hidden_act="silu",
               max_position_embeddings=262144, tie_word_embeddings=False, attention_bias=False,
               rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
                                "mrope_interleaved": True})
GEOMETRIES = {
    "qwen35-397b": dict(_COMMON, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32,
                        linear_num_value_heads=64, moe_intermediate_size=1024,
                        shared_expert_intermediate_size=1024, num_experts=512, num_experts_per_tok=10),
    "qwen35-35b": dict(_COMMON, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
                       linear_num_value_heads=32, moe_intermediate_size=512,
                       shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8),
    "tiny": dict(_COMMON, vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                 linear_num_value_heads=4, moe_intermediate_size=64, shared_expert_intermediate_size=32,
                 num_experts=8, num_experts_per_tok=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
                                  "mrope_interleaved": True}),
}


def text_config(geometry: str, layers: int | None = None) -> dict:
    cfg = json.loads(json.dumps(GEOMETRIES[geometry]))
    n = cfg["num_hidden_layers"] = layers or cfg["num_hidden_layers"]
    every = cfg["full_attention_interval"]
    cfg["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    return cfg


def _rng(seed: int, *key) -> np.random.Generator:
    return np.random.default_rng([seed, *[xxhash.xxh32(str(k).encode()).intdigest() for k in key]])


# -- routed experts ---------------------------------------------------------------------------------
def expert_proj(seed: int, layer: int, proj: str, e: int, rows: int,
                cols: int) -> tuple[np.ndarray, np.ndarray]:
    """One projection of one expert: MLX-packed 4-bit bytes [rows, cols/2] (uint8) and fp16 scales
    [rows, cols/32] with random signs; |scale| puts the weights' std near 1/sqrt(cols)."""
    rng = _rng(seed, "expert", layer, proj, e)
    qs = np.frombuffer(rng.bytes(rows * cols // 2), np.uint8).reshape(rows, cols // 2)
    mag = rng.uniform(0.5, 1.5, size=(rows, cols // GROUP)).astype(np.float32) / (4.61 * cols ** 0.5)
    sign = rng.integers(0, 2, size=mag.shape, dtype=np.int8).astype(np.float32) * 2 - 1
    return qs, (mag * sign).astype(np.float16)


def mlx_to_q4_0(qs: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MLX-packed bytes [rows, cols/2] + fp16 scales [rows, G] -> Q4_0 blocks [rows, G, 18] (d, then qs)."""
    rows, g = scales.shape
    b = qs.reshape(rows, g, 16)
    elem = np.empty((rows, g, 32), np.uint8)  # element j of each 32-block
    elem[..., 0::2] = b & 15
    elem[..., 1::2] = b >> 4
    out = np.empty((rows, g, 18), np.uint8)
    out[..., :2] = scales.view(np.uint8).reshape(rows, g, 2)
    out[..., 2:] = elem[..., :16] | (elem[..., 16:] << 4)
    return out


def expert_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
    return {"gate": (i, h), "up": (i, h), "down": (h, i)}


# -- resident tensors (HF names and meaning) ----------------------------------------------------------
def resident(cfg: dict, layer: int | None, seed: int, meta: bool = False) -> dict[str, torch.Tensor]:
    """The non-expert tensors of one layer (layer None: embedding, final norm, lm_head) under
    transformers' names: matrices bf16, 1-D tensors fp32, as flashmoe-pack's writer stores them.
    meta=True gives shape-only tensors (to plan the GGUF header)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]

    def t(name, shape, kind="normal", std=None):
        if meta:
            dtype = torch.float32 if len(shape) == 1 else torch.bfloat16
            return torch.empty(shape, dtype=dtype, device="meta")
        rng = _rng(seed, "resident", name)
        if kind == "normal":
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std if std else shape[-1] ** -0.5)
        elif kind == "zeros":
            x = np.zeros(shape, np.float32)
        elif kind == "ones":
            x = np.ones(shape, np.float32)
        elif kind == "a_log":
            x = np.log(rng.uniform(1, 16, shape)).astype(np.float32)
        else:  # "uniform"
            x = rng.uniform(0, 1, shape).astype(np.float32)
        x = torch.from_numpy(x)
        return x if x.dim() == 1 else x.to(torch.bfloat16)

    if layer is None:
        return {"model.embed_tokens.weight": t("model.embed_tokens.weight", (v, h), std=0.02),
                "model.norm.weight": t("model.norm.weight", (h,), "zeros"),
                "lm_head.weight": t("lm_head.weight", (v, h))}
    p = f"model.layers.{layer}."
    spec = {"input_layernorm.weight": ((h,), "zeros"), "post_attention_layernorm.weight": ((h,), "zeros"),
            "mlp.gate.weight": ((cfg["num_experts"], h), "normal"),
            "mlp.shared_expert_gate.weight": ((1, h), "normal")}
    si = cfg["shared_expert_intermediate_size"]
    spec.update({"mlp.shared_expert.gate_proj.weight": ((si, h), "normal"),
                 "mlp.shared_expert.up_proj.weight": ((si, h), "normal"),
                 "mlp.shared_expert.down_proj.weight": ((h, si), "normal")})
    if cfg["layer_types"][layer] == "linear_attention":
        hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
        dk, dv, w = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], cfg["linear_conv_kernel_dim"]
        conv = 2 * hk * dk + hv * dv
        spec.update({"linear_attn.in_proj_qkv.weight": ((conv, h), "normal"),
                     "linear_attn.in_proj_z.weight": ((hv * dv, h), "normal"),
                     "linear_attn.in_proj_b.weight": ((hv, h), "normal"),
                     "linear_attn.in_proj_a.weight": ((hv, h), "normal"),
                     "linear_attn.conv1d.weight": ((conv, 1, w), "normal"),
                     "linear_attn.A_log": ((hv,), "a_log"), "linear_attn.dt_bias": ((hv,), "uniform"),
                     "linear_attn.norm.weight": ((dv,), "ones"),
                     "linear_attn.out_proj.weight": ((h, hv * dv), "normal")})
    else:
        hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        spec.update({"self_attn.q_proj.weight": ((2 * hq * d, h), "normal"),
                     "self_attn.k_proj.weight": ((hkv * d, h), "normal"),
                     "self_attn.v_proj.weight": ((hkv * d, h), "normal"),
                     "self_attn.o_proj.weight": ((h, hq * d), "normal"),
                     "self_attn.q_norm.weight": ((d,), "zeros"), "self_attn.k_norm.weight": ((d,), "zeros")})
    return {p + k: t(p + k, shape, kind) for k, (shape, kind) in spec.items()}


# -- HF -> GGUF (llama.cpp conversion/qwen.py: Qwen3_5MoeTextModel) -----------------------------------
def _tiled(x: torch.Tensor, dim: int, hk: int, per_k: int, hd: int) -> torch.Tensor:
    """V heads grouped by K head -> tiled order (llama.cpp's _reorder_v_heads)."""
    shape = list(x.shape)
    x = x.reshape(*shape[:dim], hk, per_k, hd, *shape[dim + 1:])
    return x.transpose(dim, dim + 1).reshape(shape)


_GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight":
               "post_attention_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
               "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
               "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
               "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
               "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
               "linear_attn.in_proj_qkv.weight": "attn_qkv.weight", "linear_attn.in_proj_z.weight":
               "attn_gate.weight", "linear_attn.in_proj_b.weight": "ssm_beta.weight",
               "linear_attn.in_proj_a.weight": "ssm_alpha.weight", "linear_attn.conv1d.weight":
               "ssm_conv1d.weight", "linear_attn.A_log": "ssm_a", "linear_attn.dt_bias": "ssm_dt.bias",
               "linear_attn.norm.weight": "ssm_norm.weight", "linear_attn.out_proj.weight": "ssm_out.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_norm.weight": "attn_q_norm.weight",
               "self_attn.k_norm.weight": "attn_k_norm.weight"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def to_gguf(cfg: dict, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """HF-named tensors -> (GGUF name, tensor): bf16 matrices stay bf16, the rest is fp32."""
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, per_k = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], hv // hk
    out = []
    for name, x in tensors.items():
        if name in _TOP:
            gname = _TOP[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_GGUF_NAMES[rest]}"
        if name.endswith("A_log"):
            x = -x.float().exp()
        if name.endswith("norm.weight") and "linear_attn" not in name:
            x = x.float() + 1  # Qwen3.5's RMSNorm scales by 1 + w; GGUF stores 1 + w
        if "conv1d" in name or "shared_expert_gate" in name:
            x = x.float().reshape(x.shape[0], -1).squeeze(0)  # conv [C, W] fp32; shexp gate [H] fp32
        if "linear_attn" in name and hk != hv:
            if "in_proj_qkv" in name or "conv1d" in name:
                x = torch.cat([x[: 2 * hk * dk], _tiled(x[2 * hk * dk:], 0, hk, per_k, dv)])
            elif "in_proj_z" in name:
                x = _tiled(x, 0, hk, per_k, dv)
            elif "in_proj_a" in name or "in_proj_b" in name or "A_log" in name or "dt_bias" in name:
                x = _tiled(x, 0, hk, per_k, 1)
            elif "out_proj" in name:
                x = _tiled(x, 1, hk, per_k, dv)
        out.append((gname, x.contiguous()))
    return out


def check_gguf_writer() -> None:
    """Fail before writing anything when the installed gguf package cannot write a qwen35moe header."""
    import re

    import gguf

    used = sorted(set(re.findall(r"\bw\.(add_\w+)\(", Path(__file__).read_text())))
    missing = [m for m in used if not hasattr(gguf.GGUFWriter, m)]
    if missing:
        ver = getattr(gguf, "__version__", None) or _dist_version("gguf")
        sys.exit(f"--gguf: the installed gguf package ({ver}) lacks GGUFWriter.{', .'.join(missing)}; "
                 "install gguf >= 0.18")


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown version"


def gguf_header(path: Path, cfg: dict, seed: int):
    """A GGUFWriter with every key and tensor info written; returns (writer, plan [(name, nbytes)])."""
    import gguf

    w = gguf.GGUFWriter(path, "qwen35moe")
    h, n, e = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts"]
    rope = cfg["rope_parameters"]
    w.add_name(f"flashmoe-pack synthetic seed {seed}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(n)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(int(cfg["head_dim"] * rope["partial_rotary_factor"]))
    w.add_rope_dimension_sections(list(rope["mrope_section"]) + [0])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(e)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    w.add_ssm_state_size(cfg["linear_key_head_dim"])
    w.add_ssm_group_count(cfg["linear_num_key_heads"])
    w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    w.add_full_attention_interval(cfg["full_attention_interval"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("none")  # token ids in, logits out: benchmarks need no tokenizer
    plan = []
    for layer in [None, *range(n)]:
        for name, x in to_gguf(cfg, resident(cfg, layer, seed, meta=True)):
            qt = (gguf.GGMLQuantizationType.BF16 if x.dtype == torch.bfloat16
                  else gguf.GGMLQuantizationType.F32)
            nbytes = x.numel() * x.element_size()
            w.add_tensor_info(name, list(x.shape), np.dtype(np.float32), nbytes, raw_dtype=qt)
            plan.append((name, nbytes))
        if layer is not None:
            for proj, (rows, cols) in expert_shapes(cfg).items():
                nbytes = e * rows * cols // GROUP * 18
                w.add_tensor_info(f"blk.{layer}.ffn_{proj}_exps.weight", [e, rows, cols],
                                  np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
                plan.append((f"blk.{layer}.ffn_{proj}_exps.weight", nbytes))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w, plan


def _bytes(x: torch.Tensor):
    return x.contiguous().view(torch.uint8).numpy()


def expected_bytes(cfg: dict) -> tuple[int, int]:
    """(flashmoe-pack bytes, GGUF bytes), roughly: for the disk-space check."""
    lay = fmt.record_layout(cfg["hidden_size"], cfg["moe_intermediate_size"], 4, GROUP, "float16")
    n, e = cfg["num_hidden_layers"], cfg["num_experts"]
    res = sum(x.numel() * x.element_size() for layer in [None, *range(n)]
              for x in resident(cfg, layer, 0, meta=True).values())
    q4 = n * e * sum(r * c for r, c in expert_shapes(cfg).values()) // GROUP * 18
    return res + n * fmt.expert_file_bytes(e, lay), res + q4


def _gguf_offsets(writer, plan) -> tuple[dict[str, int], int]:
    """Absolute file offset of every tensor's data in plan order (GGUF aligns each to the writer's
    data_alignment), and the file's final size."""
    f = writer.fout[0]
    f.flush()
    pad = writer.ggml_pad
    pos = pad(f.tell(), writer.data_alignment)
    offs = {}
    for name, nbytes in plan:
        offs[name] = pos
        pos += pad(nbytes, writer.data_alignment)
    return offs, pos


def _write_layer(out: Path | None, cfg: dict, seed: int, layer: int | None, gguf_path: Path | None,
                 gguf_offs: dict[str, int] | None) -> tuple[dict | None, dict | None]:
    """One layer (None: embedding, final norm, lm_head): its resident part file and its expert file (when
    `out` is set), and its tensors of the GGUF written in place at their offsets (when `gguf_path` is set).
    Returns (resident index entries, layer entry), None for what was not written."""
    h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    e = cfg["num_experts"]
    lay = fmt.record_layout(h, inter, 4, GROUP, "float16")
    gfd = os.open(gguf_path, os.O_WRONLY) if gguf_path else None
    fd = None
    try:
        tensors = resident(cfg, layer, seed)
        res_index = None
        if out is not None:
            part = f"part-{0 if layer is None else layer + 1:05d}.safetensors"
            save_file(tensors, str(out / fmt.RESIDENT_DIR / part))
            res_index = {name: {"file": f"{fmt.RESIDENT_DIR}/{part}", "dtype": fmt.DTYPE_NAMES[x.dtype],
                                "shape": list(x.shape), "xxh64": xxhash.xxh64(fmt.tensor_bytes(x)).hexdigest()}
                         for name, x in tensors.items()}
        if gfd is not None:
            for name, x in to_gguf(cfg, tensors):
                os.pwrite(gfd, _bytes(x), gguf_offs[name])
        del tensors
        if layer is None:
            return res_index, None
        if out is not None:
            fd = os.open(out / fmt.expert_file_name(layer), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, fmt.expert_file_bytes(e, lay))
            os.pwrite(fd, fmt.pack_header(layer, e, lay), 0)
        for proj, (rows, cols) in expert_shapes(cfg).items():
            gbase = gguf_offs[f"blk.{layer}.ffn_{proj}_exps.weight"] if gfd is not None else 0
            per = rows * cols // GROUP * 18  # one expert's Q4_0 bytes
            for x in range(e):
                qs, sc = expert_proj(seed, layer, proj, x, rows, cols)
                if fd is not None:
                    base = fmt.expert_offset(x, lay.stride)
                    for part_name, arr in (("weight", qs), ("scales", sc), ("biases", sc * np.float16(-8))):
                        os.pwrite(fd, arr.tobytes(), base + lay.component(f"{proj}.{part_name}").offset)
                if gfd is not None:
                    os.pwrite(gfd, mlx_to_q4_0(qs, sc).tobytes(), gbase + x * per)
        if fd is None:
            return None, None
        hashes = [xxhash.xxh64(os.pread(fd, lay.record_bytes, fmt.expert_offset(x, lay.stride))).hexdigest()
                  for x in range(e)]
        return res_index, {"layer": layer, "file": fmt.expert_file_name(layer),
                           "file_bytes": fmt.expert_file_bytes(e, lay), "xxh64": hashes}
    finally:
        for f in (fd, gfd):
            if f is not None:
                os.close(f)


def _forked(items: list, jobs: int, fn, done_cb=None) -> dict:
    """{item: fn(item)} with up to `jobs` forked children at a time (fn's result goes back as JSON)."""
    import tempfile

    results, running, left = {}, {}, list(items)
    with tempfile.TemporaryDirectory() as tmp:
        while left or running:
            while left and len(running) < jobs:
                item = left.pop(0)
                path = os.path.join(tmp, f"{len(results) + len(running)}.json")
                pid = os.fork()
                if pid == 0:  # child
                    code = 1
                    try:
                        with open(path, "w") as f:
                            json.dump(fn(item), f)
                        code = 0
                    except BaseException:  # noqa: BLE001 - reported by the parent through the exit code
                        import traceback

                        traceback.print_exc()
                    finally:
                        os._exit(code)
                running[pid] = (item, path)
            pid, status = os.wait()
            if pid not in running:
                continue
            item, path = running.pop(pid)
            if os.waitstatus_to_exitcode(status) != 0:
                for other in running:
                    os.kill(other, 9)
                raise RuntimeError(f"writing part {item} failed (see the traceback above)")
            with open(path) as f:
                results[item] = json.load(f)
            if done_cb:
                done_cb(item, len(results))
    return results


def write(out: Path | None, cfg: dict, seed: int = 0, gguf_path: Path | None = None, progress: bool = True,
          jobs: int = 1) -> Path:
    """Write the flashmoe-pack model at `out` and/or the GGUF at gguf_path (the same values either way, so
    on a small disk one can be written, benchmarked and deleted before the other); returns out, or
    gguf_path when `out` is None. `jobs` > 1 writes that many layers at once in worker processes (same
    bytes: every tensor has its own generator and every write goes to a fixed offset)."""
    if out is None and gguf_path is None:
        raise ValueError("nothing to write: neither a model folder nor a GGUF path")
    if out is not None:
        out = Path(out)
        if (out / fmt.INDEX_NAME).exists():
            raise FileExistsError(f"{out} already holds a model")
        (out / fmt.EXPERT_DIR).mkdir(parents=True, exist_ok=True)
        (out / fmt.RESIDENT_DIR).mkdir(exist_ok=True)
    h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    n, e = cfg["num_hidden_layers"], cfg["num_experts"]
    lay = fmt.record_layout(h, inter, 4, GROUP, "float16")
    offs = None
    if gguf_path:  # header and tensor infos now; every tensor's data later, in place
        gw, plan = gguf_header(gguf_path, cfg, seed)
        offs, size = _gguf_offsets(gw, plan)
        gw.fout[0].truncate(size)
        gw.close()
    todo = [None, *range(n)]
    results: dict = {}
    if jobs <= 1:
        for layer in todo:
            results[layer] = _write_layer(out, cfg, seed, layer, gguf_path, offs)
            if progress and layer is not None:
                print(f"layer {layer + 1}/{n} written", file=sys.stderr, flush=True)
    else:
        results = _forked(todo, jobs, lambda layer: _write_layer(out, cfg, seed, layer, gguf_path, offs),
                          (lambda layer, k: print(f"{k}/{len(todo)} parts written (layer {layer})", file=sys.stderr,
                                                  flush=True)) if progress else None)
    if out is None:
        return Path(gguf_path)
    res_index, layers = {}, []
    for layer in todo:
        part, entry = results[layer]
        res_index.update(part)
        if entry is not None:
            layers.append(entry)
    index = {
        "format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "model_type": cfg["model_type"],
        "config": cfg,
        "source": {"float_dtype": "bfloat16", "kind": "mlx", "path": f"synthetic:seed={seed}",
                   "skipped_tensors": 0},
        "quantization": {"bits": 4, "group_size": GROUP, "scale_dtype": "float16", "weight_dtype": "int32",
                         "method": "mlx-repack", "packing": "mlx-affine"},
        "experts": {"num_experts": e, "hidden_size": h, "intermediate_size": inter, "alignment": fmt.ALIGN,
                    "header_bytes": fmt.HEADER_BYTES, "record_bytes": lay.record_bytes, "stride": lay.stride,
                    "components": [c.to_json() for c in lay.components], "layers": layers},
        "resident": {"dtype": "bfloat16", "tensors": res_index},
        "files": [],
        "synthetic": {"seed": seed, "gguf": str(gguf_path) if gguf_path else None},
    }
    (out / fmt.INDEX_NAME).write_text(json.dumps(index, indent=1))  # last: present = complete
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", help="the flashmoe-pack model folder (leave out: GGUF only)")
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="qwen35-397b")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the model's own)")
    ap.add_argument("--gguf", type=Path, default=None, help="also (or, without OUT, only) write this GGUF")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="layers written at once (worker processes)")
    a = ap.parse_args(argv)
    if a.out is None and a.gguf is None:
        ap.error("give OUT (the flashmoe-pack model), --gguf PATH, or both")
    cfg = text_config(a.geometry, a.layers)
    fm, gg = expected_bytes(cfg)
    need = (fm if a.out else 0) + (gg if a.gguf else 0)
    if a.gguf:
        check_gguf_writer()
    where = a.out if a.out is not None else a.gguf.parent
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    sizes = ([f"flashmoe-pack {fm / 1e9:.1f} GB"] if a.out else []) + ([f"GGUF {gg / 1e9:.1f} GB"] if a.gguf else [])
    print(f"{a.geometry} x {cfg['num_hidden_layers']} layers: {', '.join(sizes)}; {free / 1e9:.1f} GB free",
          file=sys.stderr)
    if need > free - (2 << 30):
        sys.exit(f"not enough disk space: need {need / 1e9:.1f} GB + 2 GiB margin, {free / 1e9:.1f} GB free")
    write(a.out, cfg, a.seed, a.gguf, jobs=a.jobs)


if __name__ == "__main__":
    main()
