"""The packed format's constants and layout arithmetic (SPEC.md is the prose version).

A packed model directory holds:
  index.json                  written last: its presence means the model is complete
  experts/layer_NNN.bin       one per MoE layer: a 16 KiB header, then expert e at HEADER + e * stride
  resident/part-NNNNN.safetensors   non-expert tensors
  tokenizer / chat template / config files carried along
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

FORMAT_NAME = "flashmoe-pack"
FORMAT_VERSION = 1
ALIGN = 16384  # Apple Silicon page size; a multiple of every O_DIRECT block size
COMPONENT_ALIGN = 64  # each component starts on a cache line inside its record
INDEX_NAME = "index.json"
EXPERT_DIR = "experts"
RESIDENT_DIR = "resident"
BUILD_DIR = ".flashmoe-build"
PROJS = ("gate", "up", "down")
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                 "chat_template.jinja", "chat_template.json")

RESIDENT_Q8_GROUP = 64  # group size of 8-bit resident matrices (resident_dtype "q8")

# Expert file header: magic, version, layer, num_experts, header_bytes, stride, record_bytes.
HEADER_MAGIC = b"FMOEXPRT"
HEADER_STRUCT = struct.Struct("<8sIIIIQQ")
HEADER_BYTES = ALIGN

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class FormatError(Exception):
    """A packed model that does not match the format: names the file, layer and expert."""


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, as stored on disk."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Component:
    """One tensor inside an expert record."""

    name: str  # e.g. "gate.weight", "gate.scales", "down.biases"
    offset: int  # bytes from the record start
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=DTYPES[self.dtype]).element_size()
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict:
        return {"name": self.name, "offset": self.offset, "dtype": self.dtype, "shape": list(self.shape),
                "nbytes": self.nbytes}


@dataclass(frozen=True)
class RecordLayout:
    """Where each component of one expert record lives; the same for every expert of a model."""

    components: tuple[Component, ...]
    record_bytes: int  # bytes actually used
    stride: int  # record_bytes rounded up to ALIGN

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


def record_layout(hidden: int, inter: int, bits: int, group_size: int, scale_dtype: str,
                  float_dtype: str = "bfloat16") -> RecordLayout:
    """Layout of an expert record: gate [I,H], up [I,H], down [H,I], each weight (+ scales, biases)."""
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    comps, off = [], 0
    for proj in PROJS:
        out, inp = shapes[proj]
        if bits == 16:
            parts = [("weight", float_dtype, (out, inp))]
        else:
            if inp % group_size or (inp * bits) % 32:
                raise FormatError(f"{proj}: input width {inp} is not a multiple of group size {group_size}")
            g = inp // group_size
            parts = [("weight", "int32", (out, inp * bits // 32)), ("scales", scale_dtype, (out, g)),
                     ("biases", scale_dtype, (out, g))]
        for suffix, dtype, shape in parts:
            c = Component(f"{proj}.{suffix}", off, dtype, shape)
            comps.append(c)
            off = align_up(off + c.nbytes, COMPONENT_ALIGN)
    return RecordLayout(tuple(comps), off, align_up(off))


def expert_file_name(layer: int) -> str:
    return f"{EXPERT_DIR}/layer_{layer:03d}.bin"


def expert_offset(expert: int, stride: int) -> int:
    return HEADER_BYTES + expert * stride


def pack_header(layer: int, num_experts: int, layout: RecordLayout) -> bytes:
    head = HEADER_STRUCT.pack(HEADER_MAGIC, FORMAT_VERSION, layer, num_experts, HEADER_BYTES,
                              layout.stride, layout.record_bytes)
    return head + bytes(HEADER_BYTES - len(head))


def check_header(raw: bytes, path: str, layer: int, num_experts: int, layout: RecordLayout) -> None:
    """Raise FormatError unless raw (the first HEADER_BYTES of an expert file) matches the index."""
    if len(raw) < HEADER_STRUCT.size:
        raise FormatError(f"{path}: layer {layer}: file shorter than its header")
    magic, version, h_layer, h_experts, h_bytes, stride, rec = HEADER_STRUCT.unpack_from(raw)
    if magic != HEADER_MAGIC:
        raise FormatError(f"{path}: layer {layer}: bad magic {magic!r}, not a flashmoe-pack expert file")
    if version != FORMAT_VERSION:
        raise FormatError(f"{path}: layer {layer}: format version {version}, this reader knows {FORMAT_VERSION}")
    want = (layer, num_experts, HEADER_BYTES, layout.stride, layout.record_bytes)
    got = (h_layer, h_experts, h_bytes, stride, rec)
    if got != want:
        raise FormatError(f"{path}: layer {layer}: header (layer, experts, header, stride, record) = {got}, "
                          f"index says {want}")


def expert_file_bytes(num_experts: int, layout: RecordLayout) -> int:
    return HEADER_BYTES + num_experts * layout.stride
