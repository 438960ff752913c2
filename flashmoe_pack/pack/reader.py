"""Decode expert records (bytes -> tensors) and read whole records from layer files.

Decoding is zero-copy: every component is a view into the record buffer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import xxhash

from ..quant import QTensor, dequantize
from . import format as fmt
from .index import PackedIndex


@dataclass
class ExpertWeights:
    """One expert's three projections: QTensor (quantized) or float tensors (bits 16)."""

    gate: QTensor | torch.Tensor  # [I, H]
    up: QTensor | torch.Tensor  # [I, H]
    down: QTensor | torch.Tensor  # [H, I]
    nbytes: int  # bytes this expert holds in memory

    def dense(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """(gate, up, down) as float matrices: the reference every kernel is checked against."""
        return tuple(dequantize(p, dtype) if isinstance(p, QTensor) else p.to(dtype)
                     for p in (self.gate, self.up, self.down))


def decode_record(buf: torch.Tensor, index: PackedIndex) -> ExpertWeights:
    """buf: uint8 tensor holding at least record_bytes of one record."""
    lay = index.layout
    parts = {}
    for c in lay.components:
        parts[c.name] = buf[c.offset: c.offset + c.nbytes].view(fmt.DTYPES[c.dtype]).view(c.shape)
    projs = {}
    for p in fmt.PROJS:
        if index.bits == 16:
            projs[p] = parts[f"{p}.weight"]
        else:
            projs[p] = QTensor(parts[f"{p}.weight"], parts[f"{p}.scales"], parts[f"{p}.biases"],
                               index.bits, index.group_size)
    return ExpertWeights(**projs, nbytes=lay.record_bytes)


def read_record(index: PackedIndex, layer: int, expert: int, check: bool = True) -> torch.Tensor:
    """Read one record with a plain positional read (verification and tools; the runtime uses
    engine.store). Raises FormatError naming file, layer and expert on a short read or bad hash."""
    entry = index.layer_entry(layer)
    path = index.path / entry["file"]
    off = fmt.expert_offset(expert, index.layout.stride)
    with open(path, "rb") as f:
        raw = os.pread(f.fileno(), index.layout.record_bytes, off)
    if check:
        check_record(raw, index, layer, expert)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def check_record(raw, index: PackedIndex, layer: int, expert: int) -> None:
    """Raise FormatError unless raw holds the whole record with the hash the index lists."""
    entry = index.layer_entry(layer)
    if len(raw) < index.layout.record_bytes:
        raise fmt.FormatError(f"{index.path / entry['file']}: layer {layer} expert {expert}: truncated record "
                              f"({len(raw)} of {index.layout.record_bytes} bytes)")
    if xxhash.xxh64(raw[: index.layout.record_bytes]).hexdigest() != entry["xxh64"][expert]:
        raise fmt.FormatError(f"{index.path / entry['file']}: layer {layer} expert {expert}: checksum mismatch "
                              "(the record is corrupt; re-run quantize or restore the file)")
