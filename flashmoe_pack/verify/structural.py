"""Structural verification: the index against the schema, every file, size, header and checksum."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import xxhash
from safetensors import safe_open

from ..pack import format as fmt
from ..pack.index import PackedIndex, load_index


@dataclass
class Problem:
    file: str
    message: str
    layer: int | None = None
    expert: int | None = None

    def __str__(self) -> str:
        where = "".join(f" {k} {v}" for k, v in (("layer", self.layer), ("expert", self.expert)) if v is not None)
        return f"{self.file}:{where}: {self.message}" if where else f"{self.file}: {self.message}"


@dataclass
class StructuralReport:
    problems: list[Problem]
    records_checked: int = 0
    records_total: int = 0
    resident_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_structure(path: str | Path, fast: int | None = None, seed: int = 0) -> StructuralReport:
    """Check a packed directory. fast=N checks the hashes of N sampled records per layer
    (plus the first and last); None checks every record."""
    path = Path(path)
    try:
        index = load_index(path)
    except fmt.FormatError as e:
        msg = str(e).removeprefix(f"{path / fmt.INDEX_NAME}: ")
        return StructuralReport([Problem(str(path / fmt.INDEX_NAME), msg)])
    report = StructuralReport([])
    _check_layers(index, report, fast, random.Random(seed))
    _check_resident(index, report)
    for name in index.raw["files"]:
        if not (path / name).is_file():
            report.problems.append(Problem(str(path / name), "carried file listed in the index is missing"))
    return report


def _check_layers(index: PackedIndex, report: StructuralReport, fast: int | None, rng: random.Random) -> None:
    n_layers = index.raw["config"]["num_hidden_layers"]
    present = {e["layer"] for e in index.layers}
    for layer in range(n_layers):
        if layer not in present:
            report.problems.append(Problem(str(index.path / fmt.expert_file_name(layer)),
                                           "MoE layer missing from the index", layer))
    E, lay = index.num_experts, index.layout
    for entry in index.layers:
        layer, path = entry["layer"], index.path / entry["file"]
        if len(entry["xxh64"]) != E:
            report.problems.append(Problem(str(path), f"{len(entry['xxh64'])} checksums, expected {E}", layer))
            continue
        if not path.is_file():
            report.problems.append(Problem(str(path), "expert file missing", layer))
            continue
        size = path.stat().st_size
        if size != entry["file_bytes"] or size != fmt.expert_file_bytes(E, lay):
            report.problems.append(Problem(str(path), f"size {size} bytes, expected {entry['file_bytes']}"
                                           " (truncated or overwritten)", layer))
        with open(path, "rb") as f:
            try:
                fmt.check_header(f.read(fmt.HEADER_BYTES), str(path), layer, E, lay)
            except fmt.FormatError as e:
                report.problems.append(Problem(str(path), str(e).split(": ", 2)[-1], layer))
            experts = range(E)
            if fast is not None and fast < E:
                experts = sorted({0, E - 1, *rng.sample(range(E), fast)})
            for e in experts:
                off = fmt.expert_offset(e, lay.stride)
                raw = os.pread(f.fileno(), lay.record_bytes, off)
                report.records_total += 1
                if len(raw) < lay.record_bytes:
                    report.problems.append(Problem(str(path), f"truncated record ({len(raw)} of "
                                                   f"{lay.record_bytes} bytes)", layer, e))
                elif xxhash.xxh64(raw).hexdigest() != entry["xxh64"][e]:
                    report.problems.append(Problem(str(path), "checksum mismatch", layer, e))
                report.records_checked += 1


def _check_resident(index: PackedIndex, report: StructuralReport) -> None:
    by_file: dict[str, list[str]] = {}
    for name, meta in index.raw["resident"]["tensors"].items():
        by_file.setdefault(meta["file"], []).append(name)
    for rel, names in sorted(by_file.items()):
        path = index.path / rel
        if not path.is_file():
            report.problems.append(Problem(str(path), f"resident file missing ({len(names)} tensors)"))
            continue
        try:
            with safe_open(path, "pt") as f:
                keys = set(f.keys())
                for name in names:
                    meta = index.raw["resident"]["tensors"][name]
                    if name not in keys:
                        report.problems.append(Problem(str(path), f"resident tensor {name} missing"))
                        continue
                    t = f.get_tensor(name)
                    if list(t.shape) != meta["shape"] or fmt.DTYPE_NAMES.get(t.dtype) != meta["dtype"]:
                        report.problems.append(Problem(str(path), f"resident tensor {name}: {t.dtype} "
                                                       f"{list(t.shape)}, index says {meta['dtype']} {meta['shape']}"))
                    elif xxhash.xxh64(fmt.tensor_bytes(t)).hexdigest() != meta["xxh64"]:
                        report.problems.append(Problem(str(path), f"resident tensor {name}: checksum mismatch"))
                    report.resident_checked += 1
        except Exception as e:  # a damaged safetensors header: report, never crash
            report.problems.append(Problem(str(path), f"unreadable safetensors file ({e})"))
