"""Numerical verification: packed experts against the source tensors, and on probe inputs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..pack import format as fmt
from ..pack.index import PackedIndex
from ..pack.reader import decode_record, read_record
from ..quant import error_stats
from ..sources.checkpoint import Checkpoint

# Relative Frobenius error allowed per bit width, for weights and for expert outputs on probes.
# Measured on Gaussian weights (tests/test_sources.py): 2-bit 0.32, 4-bit 0.083, 8-bit 0.0053;
# the limits leave room for heavier-tailed real weights. 16 bits must be exact.
WEIGHT_LIMITS = {2: 0.45, 4: 0.15, 8: 0.012, 16: 0.0}
OUTPUT_LIMITS = {2: 0.6, 4: 0.2, 8: 0.02, 16: 1e-6}


@dataclass
class LayerResult:
    layer: int
    experts: int = 0
    mean_rel: float = 0.0
    worst_rel: float = 0.0
    worst_expert: int = -1
    min_snr_db: float = float("inf")
    output_rel: float = 0.0  # worst expert-output relative error on the probes
    failures: list[str] = field(default_factory=list)


def verify_numerics(index: PackedIndex, ckpt: Checkpoint, sample: int | None = None, probes: int = 8,
                    seed: int = 0) -> list[LayerResult]:
    """Compare every (or `sample` per layer) packed expert with the source, per layer."""
    bits = index.bits
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    hidden = index.raw["experts"]["hidden_size"]
    x = torch.randn(probes, hidden, generator=gen)  # probe inputs [P, H]
    results = []
    for entry in index.layers:
        layer = entry["layer"]
        res = LayerResult(layer)
        experts = range(index.num_experts)
        if sample is not None and sample < index.num_experts:
            experts = sorted(rng.sample(range(index.num_experts), sample))
        rels = []
        for e in experts:
            packed = decode_record(read_record(index, layer, e), index).dense(torch.float32)
            ref = tuple(ckpt.expert_matrix(layer, e, p) for p in fmt.PROJS)
            if bits == 16:  # stored in the pack's float dtype (an FP8 or MLX source becomes bf16)
                wdt = fmt.DTYPES[index.raw["quantization"]["weight_dtype"]]
                ref = tuple(r.to(wdt).float() for r in ref)
            for proj, a, b in zip(fmt.PROJS, packed, ref):
                st = error_stats(b, a)
                rels.append(st["rel_err"])
                res.min_snr_db = min(res.min_snr_db, st["snr_db"])
                if st["rel_err"] > res.worst_rel:
                    res.worst_rel, res.worst_expert = st["rel_err"], e
                if st["rel_err"] > WEIGHT_LIMITS[bits]:
                    res.failures.append(f"expert {e} {proj}: relative error {st['rel_err']:.4f} > "
                                        f"{WEIGHT_LIMITS[bits]} for {bits}-bit")
            out_rel = error_stats(_mlp(x, ref), _mlp(x, packed))["rel_err"]
            res.output_rel = max(res.output_rel, out_rel)
            if out_rel > OUTPUT_LIMITS[bits]:
                res.failures.append(f"expert {e}: output relative error {out_rel:.4f} > {OUTPUT_LIMITS[bits]}")
            res.experts += 1
        res.mean_rel = sum(rels) / len(rels) if rels else 0.0
        results.append(res)
    return results


def _mlp(x: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    gate, up, down = w
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def format_table(results: list[LayerResult], bits: int) -> str:
    head = (f"{'layer':>5} {'experts':>7} {'mean rel':>9} {'worst rel':>9} {'worst e':>7} {'min SNR dB':>10} "
            f"{'out rel':>8}  status (limits: weight {WEIGHT_LIMITS[bits]}, output {OUTPUT_LIMITS[bits]})")
    rows = [head]
    for r in results:
        status = "ok" if not r.failures else f"FAIL ({len(r.failures)})"
        rows.append(f"{r.layer:>5} {r.experts:>7} {r.mean_rel:>9.4f} {r.worst_rel:>9.4f} {r.worst_expert:>7} "
                    f"{r.min_snr_db:>10.2f} {r.output_rel:>8.4f}  {status}")
    return "\n".join(rows)
