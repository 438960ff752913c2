"""Resident (non-expert) weights: read once at load, checked against the index's xxhash64."""

from __future__ import annotations

import torch
import xxhash
from safetensors import safe_open

from ..pack import format as fmt
from ..pack.index import PackedIndex
from ..quant import QTensor, dequantize


def load_resident(index: PackedIndex, device: torch.device, dtype: torch.dtype | None,
                  verify: bool = True) -> dict[str, torch.Tensor]:
    """All non-expert tensors, checked against their xxhash64, cast and moved once."""
    out = {}
    by_file: dict[str, list[str]] = {}
    for name, meta in index.raw["resident"]["tensors"].items():
        by_file.setdefault(meta["file"], []).append(name)
    for rel, names in by_file.items():
        path = index.path / rel
        if not path.is_file():
            raise fmt.FormatError(f"{path}: resident file missing")
        try:
            f = safe_open(path, "pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise fmt.FormatError(f"{path}: unreadable safetensors file ({e})") from None
        for name in names:
            meta = index.raw["resident"]["tensors"][name]
            t = f.get_tensor(name)
            if verify and xxhash.xxh64(fmt.tensor_bytes(t)).hexdigest() != meta["xxh64"]:
                raise fmt.FormatError(f"{path}: resident tensor {name}: checksum mismatch")
            out[name] = t
    tensors = index.raw["resident"]["tensors"]
    for name, meta in tensors.items():
        if "quant" in meta:  # 8-bit resident matrix: dequantize once at load
            q = QTensor(out.pop(name), out.pop(name + ".scales"), out.pop(name + ".biases"),
                        meta["quant"]["bits"], meta["quant"]["group_size"])
            out[name] = dequantize(q, dtype or torch.bfloat16)
    for name, t in out.items():
        if dtype is not None and t.dtype.is_floating_point and t.dim() >= 2:
            t = t.to(dtype)
        out[name] = t.to(device)
    return out
