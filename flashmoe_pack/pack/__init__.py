"""Packing: source checkpoint -> packed model directory (SPEC.md)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from ..sources.checkpoint import Checkpoint, ExpertPiece
from . import format as fmt
from .format import FormatError
from .index import PackedIndex, load_index
from .writer import EncodePool, PackWriter, default_workers

__all__ = ["quantize", "done_shards", "load_index", "PackedIndex", "FormatError", "PackWriter", "default_workers"]


def done_shards(out: str | Path) -> set[str]:
    """Source shards an unfinished pack in `out` has already written (empty if none)."""
    import json

    state = Path(out) / fmt.BUILD_DIR / "state.json"
    return set(json.loads(state.read_text())["shards_done"]) if state.is_file() else set()


def _check_supported(ckpt: Checkpoint) -> None:
    from ..models import get_model_class

    get_model_class(ckpt.model_type)  # raises ValueError listing the supported model types


def resolve_params(ckpt: Checkpoint, bits: int, group_size: int, scale_dtype: str, resident_dtype: str,
                   method: str) -> dict:
    """The settings a pack is made with (stored in the build state, so a resume must match them)."""
    if bits not in (2, 4, 8, 16):
        raise ValueError(f"--bits must be 2, 4, 8 or 16, got {bits}")
    float_dtype = fmt.DTYPE_NAMES[ckpt.float_dtype]
    if resident_dtype == "auto":
        resident_dtype = float_dtype if bits == 16 else "bfloat16"
    if resident_dtype not in ("float32", "float16", "bfloat16", "q8"):
        raise ValueError(f"--resident-dtype must be auto, bfloat16, float16, float32 or q8, got {resident_dtype!r}")
    if ckpt.mlx_quant and (ckpt.mlx_quant["bits"], ckpt.mlx_quant["group_size"]) == (bits, group_size):
        method = "mlx-repack"  # same bit layout: copy the MLX words, scales and biases as they are
        scale_dtype = fmt.DTYPE_NAMES[_mlx_scale_dtype(ckpt)]
    return {"bits": bits, "group_size": group_size if bits != 16 else 0, "scale_dtype": scale_dtype,
            "float_dtype": float_dtype, "resident_dtype": resident_dtype, "method": method if bits != 16 else "none"}


def _mlx_scale_dtype(ckpt: Checkpoint) -> torch.dtype:
    for name in ckpt.weight_map:
        if name.endswith(".scales") and ("switch_mlp" in name or ".experts." in name):
            if (ckpt.path / ckpt.weight_map[name]).is_file():
                return ckpt.raw(name).dtype
    return torch.bfloat16


def quantize(src: str | Path, out: str | Path, bits: int = 4, group_size: int = 64,
             scale_dtype: str = "bfloat16", resident_dtype: str = "auto", method: str = "mse",
             progress: bool = True, source_info: dict | None = None,
             shards: Iterable[tuple[str, Path]] | None = None, shard_names: list[str] | None = None,
             workers: int = 1) -> Path:
    """Pack the checkpoint at `src` into `out`; resumes an interrupted run with the same settings.

    `shards` (optional) yields (shard name, local path) pairs as they become available, for the
    streaming download mode; by default every shard of `src` is read from disk.
    `workers` > 1 quantizes expert matrices in that many processes (default_workers(): one per
    core); the output is byte-identical to workers=1.
    Returns the packed directory. Raises ValueError for unsupported models or bad settings.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    ckpt = Checkpoint(src, shard_names)
    _check_supported(ckpt)
    params = resolve_params(ckpt, bits, group_size, scale_dtype, resident_dtype, method)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    use_pool = workers > 1 and params["method"] not in ("none", "mlx-repack")  # else nothing to quantize
    with EncodePool(workers) if use_pool else nullcontext() as pool:  # workers start at the first piece
        writer = PackWriter(ckpt, out, params, source_info, pool)
        total = writer.num_layers * writer.num_experts * len(fmt.PROJS)
        done = sum(len(p) for layer in writer.state["parts"].values() for p in layer.values())
        bar = tqdm(total=total, initial=done, unit="matrix", desc=f"quantize {bits}-bit", disable=not progress)

        def tick(item):
            if isinstance(item, ExpertPiece):
                bar.update(1)

        pending = shards if shards is not None else ((s, ckpt.path / s) for s in ckpt.shards)
        for shard, _path in pending:
            if writer.shard_done(shard):
                continue
            writer.process_shard(shard, tick)
        bar.close()
    return writer.finalize()
