"""Resident (non-expert) weights: read once at load, checked against the index's xxhash64, and kept
in the form the model multiplies them in (models/layers.linear).

Modes (`load(..., resident=...)`, `run --resident`):
    "bf16"     every matrix in float, the compute dtype (bf16 unless load's dtype says otherwise);
               8-bit resident matrices of a pack are dequantized once (what all devices did before).
    "stored"   as the pack holds them: 8-bit matrices stay 8-bit (QTensor, C kernels), float stays float.
    "q8"       every weight matrix 8-bit: float ones quantized at load (group 64, min/max, bf16 scales).
    "q4-head"  as "q8", with the output head (lm_head) at 4 bits.
    "auto"     "q8" on the CPU with the C kernels and a half-precision compute dtype, else "bf16":
               a decode token reads about half the bytes at the same top-1 on the test models
               (README has the numbers); float32 compute (dtype="float32", e.g. verify) stays exact.
               On CUDA: "bf16" when the float weights take at most 70% of free VRAM, else "q8".
Quantized matrices are kept on the CPU (C kernels) and on CUDA (Triton for decode, dequantized in row
chunks for prefill; quantized at load by the C kernels, then moved); other devices take "bf16".
The embedding stays a lookup: kept 8-bit only if the pack stores it so (its T rows are dequantized per
step) or if it is also the head (tied), in float otherwise.
"""

from __future__ import annotations

import logging

import torch
import xxhash
from safetensors import safe_open

from ..pack import format as fmt
from ..pack.index import PackedIndex
from ..quant import QTensor, dequantize

log = logging.getLogger(__name__)

MODES = ("auto", "bf16", "stored", "q8", "q4-head")
GROUP = 64  # group size of matrices quantized at load
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
_CHUNK_ELEMENTS = 1 << 24  # requantizing a stored 8-bit matrix goes through float32 in row chunks of this size


def tensor_xxh64(t: torch.Tensor) -> str:
    """xxHash64 (hex) of a CPU tensor's raw bytes, hashed in place: the same digest as
    xxh64(fmt.tensor_bytes(t)) without the copy (2 GB for a 397B head)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return xxhash.xxh64(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _c_kernels():
    from ..models.layers import _c_kernels

    return _c_kernels()


def compute_dtype(index: PackedIndex, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the model computes in: load's dtype, else the residents' stored float dtype (bf16 for q8)."""
    return dtype or fmt.DTYPES.get(index.raw["resident"].get("dtype"), torch.bfloat16)


def _quantized_ok(device: torch.device) -> str | None:
    """None when quantized matrices can be kept for `device`, else why not."""
    if _c_kernels() is None:  # they quantize at load, and run the products on the CPU
        return "the C kernels are unavailable"
    if device.type == "cuda":
        from ..backends import triton_kernels

        return None if triton_kernels.HAVE_TRITON else "triton is not installed"
    return None if device.type == "cpu" else f"device {device.type} has no quantized kernels"


def resolve_mode(mode: str, device: torch.device, dtype: torch.dtype, fits: bool = True) -> str:
    """The mode actually used for compute dtype `dtype`: "auto" resolved (on CUDA: "bf16" if the float
    weights fit, `fits`, else "q8"); a quantized mode where no kernel runs it is refused."""
    if mode not in MODES:
        raise ValueError(f"resident={mode!r}: use one of {', '.join(MODES)}")
    why = _quantized_ok(device)
    if mode == "auto":
        half = dtype in (torch.bfloat16, torch.float16)
        if device.type == "cuda":
            return "q8" if not fits and half and why is None else "bf16"
        return "q8" if device.type == "cpu" and why is None and half else "bf16"
    if mode != "bf16" and why is not None:
        raise ValueError(f"resident={mode!r} keeps quantized matrices, but {why}: use resident='bf16' (or 'auto')")
    return mode


def float_bytes(index: PackedIndex, dtype: torch.dtype) -> int:
    """Bytes of the resident tensors as "bf16" holds them: matrices in `dtype`, vectors as stored."""
    tensors = index.raw["resident"]["tensors"]
    n = 0
    for name, meta in tensors.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] in tensors:
            continue  # the scales and biases of a stored 8-bit matrix, counted with it
        numel = 1
        for d in meta["shape"]:
            numel *= d
        stored = fmt.DTYPES[meta["dtype"]]
        if "quant" in meta:  # packed words: the float matrix has 32 / bits values per word
            n += numel * 32 // meta["quant"]["bits"] * dtype.itemsize
        else:
            n += numel * (dtype.itemsize if len(meta["shape"]) >= 2 and stored.is_floating_point else stored.itemsize)
    return n


def _target_bits(name: str, t: torch.Tensor | QTensor, mode: str, head: str) -> int | None:
    """Bits to quantize a float matrix to at load (None: leave it)."""
    if mode not in ("q8", "q4-head") or name == EMBED and head != EMBED:
        return None
    if isinstance(t, torch.Tensor) and (t.dim() != 2 or not t.dtype.is_floating_point or t.shape[1] % GROUP):
        return None
    return 4 if mode == "q4-head" and name == head else 8


def _quantize(t: torch.Tensor | QTensor, bits: int) -> QTensor:
    cpu = _c_kernels()
    if isinstance(t, torch.Tensor):
        return cpu.quantize(t.contiguous(), bits, GROUP, torch.bfloat16)
    rows, cols = t.shape  # a stored 8-bit matrix to other bits: through float32, a row chunk at a time
    out = QTensor(torch.empty(rows, cols * bits // 32, dtype=torch.int32),
                  torch.empty(rows, cols // GROUP, dtype=torch.bfloat16),
                  torch.empty(rows, cols // GROUP, dtype=torch.bfloat16), bits, GROUP)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        q = cpu.quantize(cpu.dequantize_rows(t, r, min(rows, r + step)), bits, GROUP, torch.bfloat16)
        out.weight[r: r + step], out.scales[r: r + step], out.biases[r: r + step] = q.weight, q.scales, q.biases
    return out


def load_resident(index: PackedIndex, device: torch.device, dtype: torch.dtype | None,
                  verify: bool = True, resident: str = "auto") -> dict[str, torch.Tensor | QTensor]:
    """All non-expert tensors, checked against their xxhash64, in the form `resident` asks for
    (module docstring), cast and moved once."""
    device = torch.device(device)
    cdt = compute_dtype(index, dtype)
    fits = True
    if device.type == "cuda" and resident == "auto":  # float weights in at most 70% of free VRAM
        need, free = float_bytes(index, cdt), torch.cuda.mem_get_info(device)[0]
        fits = need <= 0.7 * free
        if not fits:
            log.info("resident weights in %s need %.1f GB of %.1f GB free VRAM: keeping them 8-bit", cdt,
                     need / 1e9, free / 1e9)
    mode = resolve_mode(resident, device, cdt, fits)
    tensors = index.raw["resident"]["tensors"]
    head = HEAD if HEAD in tensors else EMBED  # no lm_head: tied to the embedding
    out: dict[str, torch.Tensor | QTensor] = {}
    by_file: dict[str, list[str]] = {}
    for name, meta in tensors.items():
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
            t = f.get_tensor(name)
            if verify and tensor_xxh64(t) != tensors[name]["xxh64"]:
                raise fmt.FormatError(f"{path}: resident tensor {name}: checksum mismatch")
            bits = None if "quant" in tensors[name] else _target_bits(name, t, mode, head)
            if bits:  # quantized now, so the float tensor is dropped at once
                t = _quantize(t, bits)
            elif mode in ("q8", "q4-head"):
                # safetensors hands out views of a private mapping of the file: a kept view would keep
                # the whole mapping, with the pages of the quantized tensors read above, in memory
                # (measured on the 397B geometry: 8.1 GB RSS after load instead of 6.1 GB)
                t = t.clone()
            out[name] = t
    for name, meta in tensors.items():
        if "quant" not in meta:
            continue
        q = QTensor(out.pop(name), out.pop(name + ".scales"), out.pop(name + ".biases"),
                    meta["quant"]["bits"], meta["quant"]["group_size"])
        if mode == "bf16":  # dequantize once at load
            out[name] = dequantize(q, dtype or torch.bfloat16)
        else:
            bits = _target_bits(name, q, mode, head)
            out[name] = _quantize(q, bits) if bits and bits != q.bits else q
    for name, t in out.items():
        if isinstance(t, QTensor):
            out[name] = QTensor(t.weight.to(device), t.scales.to(device), t.biases.to(device), t.bits, t.group_size)
            continue
        if dtype is not None and t.dtype.is_floating_point and t.dim() >= 2:
            t = t.to(dtype)
        out[name] = t.to(device)
    return out

