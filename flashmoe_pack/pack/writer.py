"""Write a packed model, crash-safe and resumable, one source shard at a time.

Every expert component has a fixed place in its layer file (SPEC.md), so components are written
in place (pwrite) in whatever order the source holds them. Progress lives in
OUT/.flashmoe-build/state.json, saved after each shard once its bytes are fsync'ed; a rerun skips
finished shards and redoes a half-done one (rewriting identical bytes). index.json is written last,
atomically: until then nothing loads as a model.

With an EncodePool, expert matrices are quantized in worker processes while this process reads the
source and writes results in the order it read them (so the bytes, the state and the progress are
those of a serial run); a shard's state is saved only once all its pieces are written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save_file

from ..quant import QTensor, dequantize, quantize
from ..sources.checkpoint import Checkpoint, ExpertPiece, Resident, Skipped
from . import format as fmt


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Encoded:
    """An expert piece's payload once encoded: its record components, ready to write."""

    components: dict[str, torch.Tensor]


def encode_expert(p: torch.Tensor | QTensor, params: dict) -> dict[str, torch.Tensor]:
    """The record components (weight, and scales/biases when quantized) of one expert matrix."""
    bits, group_size = params["bits"], params["group_size"]
    if bits == 16:
        w = dequantize(p) if isinstance(p, QTensor) else p
        return {"weight": w.to(fmt.DTYPES[params["float_dtype"]])}
    if isinstance(p, QTensor) and (p.bits, p.group_size) != (bits, group_size):
        p = dequantize(p)  # an MLX source at another width: requantize from its values
    sd = fmt.DTYPES[params["scale_dtype"]]
    if not isinstance(p, QTensor):
        p = quantize(p, bits, group_size, sd, params["method"])
    return {"weight": p.weight.view(torch.int32), "scales": p.scales.to(sd), "biases": p.biases.to(sd)}


def _needs_work(p, params: dict) -> bool:
    """Whether encoding p means quantizing (worth a worker) rather than copying or casting."""
    return params["bits"] != 16 and not (isinstance(p, QTensor) and (p.bits, p.group_size) ==
                                         (params["bits"], params["group_size"]))


def _compact(p: torch.Tensor | QTensor) -> torch.Tensor | QTensor:
    """A copy holding only p's own values: a slice of a stacked [E, ...] source tensor would otherwise
    be pickled to a worker together with the whole stack."""
    if isinstance(p, QTensor):
        return QTensor(p.weight.clone(), p.scales.clone(), p.biases.clone(), p.bits, p.group_size)
    return p.clone(memory_format=torch.contiguous_format)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def default_workers() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class EncodePool:
    """Worker processes that quantize expert matrices; each runs torch with `threads` threads, so
    workers x threads stays within the cores. At most `inflight` pieces (2 per worker: one being
    quantized, one queued) are held at a time, sources and results together."""

    def __init__(self, workers: int, threads: int | None = None):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.threads = threads or max(1, default_workers() // workers)
        self.inflight = 2 * workers
        # spawn, not fork: the streaming path has a download thread running, and torch's thread pool
        # does not survive a fork
        self._ex = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                       initargs=(self.threads,))

    def submit(self, payload, params: dict):
        return self._ex.submit(encode_expert, _compact(payload), params)

    def close(self, cancel: bool = False) -> None:
        self._ex.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(cancel=exc_type is not None)


class PackWriter:
    """Packs one checkpoint into `out`; see module docstring for the crash-safety contract."""

    def __init__(self, ckpt: Checkpoint, out: Path, params: dict, source_info: dict | None = None,
                 pool: EncodePool | None = None):
        self.ckpt, self.out, self.params, self.pool = ckpt, Path(out), params, pool
        tc = ckpt.text_config
        self.hidden, self.inter = int(tc["hidden_size"]), int(tc["moe_intermediate_size"])
        self.num_layers, self.num_experts = int(tc["num_hidden_layers"]), int(tc["num_experts"])
        self.bits, self.group_size = params["bits"], params["group_size"]
        self.layout = fmt.record_layout(self.hidden, self.inter, self.bits, self.group_size,
                                        params["scale_dtype"], params["float_dtype"])
        self.source_info = source_info or {"path": str(ckpt.path)}
        self.build = self.out / fmt.BUILD_DIR
        self.state_path = self.build / "state.json"
        self._fds: dict[int, int] = {}
        self._load_state()

    # -- state ----------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        if (self.out / fmt.INDEX_NAME).exists():
            raise FileExistsError(f"{self.out}: already holds a complete packed model; remove it to repack")
        if self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text())
            if self.state["params"] != self.params:
                raise ValueError(f"{self.out}: holds an unfinished pack with other settings "
                                 f"{self.state['params']}; delete the folder or rerun with those settings")
        else:
            (self.build / "resident").mkdir(parents=True, exist_ok=True)
            self.state = {"params": self.params, "shards_done": [], "parts": {}, "hashes": {},
                          "resident": {}, "skipped": 0}
            self._save_state()

    def _save_state(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state))

    def shard_done(self, shard: str) -> bool:
        return shard in self.state["shards_done"]

    # -- expert files -------------------------------------------------------------------------------
    def _fd(self, layer: int) -> int:
        if layer not in self._fds:
            path = self.out / fmt.expert_file_name(layer)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            size = fmt.expert_file_bytes(self.num_experts, self.layout)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            os.pwrite(fd, fmt.pack_header(layer, self.num_experts, self.layout), 0)
            self._fds[layer] = fd
        return self._fds[layer]

    def _encode(self, piece: ExpertPiece) -> dict[str, torch.Tensor]:
        """The record components of one projection, ready to write."""
        if isinstance(piece.payload, Encoded):
            return piece.payload.components
        return encode_expert(piece.payload, self.params)

    def write_piece(self, piece: ExpertPiece) -> None:
        if not (0 <= piece.layer < self.num_layers and 0 <= piece.expert < self.num_experts):
            raise ValueError(f"expert tensor for layer {piece.layer} expert {piece.expert} is outside the "
                             f"config ({self.num_layers} layers, {self.num_experts} experts)")
        fd = self._fd(piece.layer)
        base = fmt.expert_offset(piece.expert, self.layout.stride)
        for suffix, t in self._encode(piece).items():
            comp = self.layout.component(f"{piece.proj}.{suffix}")
            if tuple(t.shape) != comp.shape:
                raise ValueError(f"layer {piece.layer} expert {piece.expert} {piece.proj}.{suffix}: shape "
                                 f"{tuple(t.shape)}, expected {comp.shape}")
            os.pwrite(fd, fmt.tensor_bytes(t), base + comp.offset)
        key, e = str(piece.layer), str(piece.expert)
        done = self.state["parts"].setdefault(key, {}).setdefault(e, [])
        if piece.proj not in done:
            done.append(piece.proj)
        if len(done) == len(fmt.PROJS):  # record complete: hash what a reader will read
            rec = os.pread(fd, self.layout.record_bytes, base)
            self.state["hashes"].setdefault(key, {})[e] = xxhash.xxh64(rec).hexdigest()

    # -- shards -------------------------------------------------------------------------------------
    def process_shard(self, shard: str, on_piece=None) -> None:
        resident: dict[str, torch.Tensor] = {}
        skipped = 0
        pending: deque = deque()  # (piece, future) quantizing in the pool, oldest first

        def write_done(keep: int) -> None:  # write the oldest results until at most `keep` are pending
            while len(pending) > keep:
                piece, fut = pending.popleft()
                piece.payload = Encoded(fut.result())
                self.write_piece(piece)
                if on_piece:
                    on_piece(piece)

        for item in self.ckpt.iter_shard(shard):
            if isinstance(item, ExpertPiece):
                if self.pool is not None and _needs_work(item.payload, self.params):
                    pending.append((item, self.pool.submit(item.payload, self.params)))
                    write_done(self.pool.inflight - 1)
                    continue
                self.write_piece(item)
            elif isinstance(item, Resident):
                resident.update(self._resident_tensors(item.name, item.tensor))
            elif isinstance(item, Skipped):
                skipped += 1
            if on_piece:
                on_piece(item)
        write_done(0)
        for fd in self._fds.values():
            os.fsync(fd)
        if resident:
            part = f"part-{len(self.state['shards_done']):05d}.safetensors"
            tmp = self.build / "resident" / (part + ".tmp")
            save_file(resident, str(tmp))
            os.replace(tmp, self.build / "resident" / part)
            self.state["resident"][part] = sorted(resident)
        self.state["skipped"] += skipped
        self.state["shards_done"].append(shard)
        self._save_state()

    def _resident_tensors(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored form of one resident tensor: float, or with resident_dtype "q8" an 8-bit
        group-wise matrix as three tensors (name = int32 words, name.scales, name.biases)."""
        if t.dim() <= 1:
            return {name: t.float().contiguous()}  # norms, A_log, dt_bias: tiny, keep full precision
        rd = self.params["resident_dtype"]
        if rd == "q8":
            if t.dim() == 2 and t.shape[1] % fmt.RESIDENT_Q8_GROUP == 0:
                q = quantize(t, 8, fmt.RESIDENT_Q8_GROUP, torch.bfloat16, "minmax")
                self.state.setdefault("resident_q8", []).append(name)
                return {name: q.weight, name + ".scales": q.scales, name + ".biases": q.biases}
            rd = "bfloat16"  # conv kernels and odd widths stay float
        return {name: t.to(fmt.DTYPES[rd]).contiguous()}

    # -- finish -------------------------------------------------------------------------------------
    def missing_records(self) -> list[tuple[int, int, list[str]]]:
        miss = []
        for layer in self.moe_layers():
            parts = self.state["parts"].get(str(layer), {})
            for e in range(self.num_experts):
                have = parts.get(str(e), [])
                if len(have) < len(fmt.PROJS):
                    miss.append((layer, e, [p for p in fmt.PROJS if p not in have]))
        return miss

    def moe_layers(self) -> list[int]:
        return list(range(self.num_layers))  # Qwen3.5: every layer is an MoE layer

    def finalize(self, extra_index: dict | None = None) -> Path:
        miss = self.missing_records()
        if miss:
            l0, e0, p0 = miss[0]
            raise ValueError(f"{len(miss)} expert records incomplete, e.g. layer {l0} expert {e0} lacks {p0}: "
                             "the source checkpoint does not hold every expert")
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        from .index import build_index  # local: index imports the writer's helpers

        res_dir = self.out / fmt.RESIDENT_DIR
        res_dir.mkdir(exist_ok=True)
        index = build_index(self, [self.build / "resident", res_dir], extra_index or {})
        for part in self.state["resident"]:  # idempotent: a crash here is resumed by a rerun
            if (self.build / "resident" / part).exists():
                os.replace(self.build / "resident" / part, res_dir / part)
        for name in fmt.CARRIED_FILES:
            src = self.ckpt.path / name
            if src.is_file():
                shutil.copyfile(src, self.out / name)
        atomic_write_text(self.out / fmt.INDEX_NAME, json.dumps(index, indent=1))
        shutil.rmtree(self.build)
        return self.out
