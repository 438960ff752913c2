"""The expert store: expert ids -> decoded expert weights, through a byte-budgeted cache and the SSD.

Two I/O modes:
  "os"      plain positional reads; the OS page cache does the caching ("trust the OS").
  "direct"  O_DIRECT (Linux) / F_NOCACHE (macOS) reads that bypass the page cache, so the
            runtime's own cache (the `cache_bytes` budget) is the only copy in RAM.
A layer's missing experts are read in parallel by a thread pool (os.preadv releases the GIL)
into page-aligned buffers; every record read from disk is checked against its xxhash64 unless
`verify_reads=False`, so a corrupt file fails loudly instead of producing garbage tokens.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..pack import format as fmt
from ..pack.index import PackedIndex
from ..pack.reader import ExpertWeights, check_record, decode_record

PAGE = 4096


@dataclass
class StoreStats:
    """Counters of the expert store (cumulative; `snapshot()` to diff)."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    reads: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def snapshot(self) -> "StoreStats":
        return StoreStats(self.hits, self.misses, self.bytes_read, self.read_seconds, self.reads)


def _open(path: str, direct: bool) -> tuple[int, bool]:
    """Open for reading; with direct=True try to bypass the page cache, falling back if the
    filesystem refuses (tmpfs has no O_DIRECT). Returns (fd, direct actually in effect)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    if direct and sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, 48, 1)  # F_NOCACHE
        return fd, True
    return fd, False


@dataclass
class _Entry:
    weights: ExpertWeights
    buf: object = field(repr=False)  # keeps the mmap alive while tensors view it


class ExpertStore:
    """Reads and caches expert records of one packed model."""

    def __init__(self, index: PackedIndex, cache_bytes: int = 1 << 30, io: str = "os", threads: int = 8,
                 verify_reads: bool = True, device: str | torch.device = "cpu"):
        if io not in ("os", "direct"):
            raise ValueError(f"io mode must be 'os' or 'direct', got {io!r}")
        self.index, self.cache_bytes, self.verify_reads = index, int(cache_bytes), verify_reads
        self.device = torch.device(device)
        self.record_bytes = index.layout.record_bytes
        self.read_bytes = fmt.align_up(self.record_bytes, PAGE)  # O_DIRECT needs whole pages
        self.stats = StoreStats()
        self._cache: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fmp-io")
        self._fds: dict[int, tuple[int, str]] = {}
        self.direct = False
        for entry in index.layers:
            path = str(index.path / entry["file"])
            if not os.path.isfile(path):
                raise fmt.FormatError(f"{path}: layer {entry['layer']}: expert file missing")
            size = os.path.getsize(path)
            if size != entry["file_bytes"]:
                raise fmt.FormatError(f"{path}: layer {entry['layer']}: {size} bytes, index says "
                                      f"{entry['file_bytes']} (truncated or wrong file)")
            fd, self.direct = _open(path, io == "direct")
            with open(path, "rb") as f:
                fmt.check_header(f.read(fmt.HEADER_BYTES), path, entry["layer"], index.num_experts, index.layout)
            self._fds[entry["layer"]] = (fd, path)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cache.clear()

    def _read(self, layer: int, expert: int) -> _Entry:
        fd, path = self._fds[layer]
        buf = mmap.mmap(-1, self.read_bytes)  # anonymous mmap: page-aligned, as O_DIRECT requires
        off = fmt.expert_offset(expert, self.index.layout.stride)
        t0 = time.perf_counter()
        n = os.preadv(fd, [buf], off)
        dt = time.perf_counter() - t0
        view = memoryview(buf)[:n]
        try:
            if self.verify_reads or n < self.record_bytes:
                check_record(view, self.index, layer, expert)
        finally:
            view.release()
        with self._lock:
            self.stats.bytes_read += n
            self.stats.read_seconds += dt
            self.stats.reads += 1
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        if self.device.type != "cpu":
            raw = raw.to(self.device, non_blocking=False)
        return _Entry(decode_record(raw, self.index), buf)

    def get(self, layer: int, experts: list[int]) -> dict[int, ExpertWeights]:
        """Decoded weights of `experts` of `layer`; misses are read in parallel."""
        if layer not in self._fds:
            raise KeyError(f"layer {layer} has no expert file in {self.index.path}")
        out: dict[int, ExpertWeights] = {}
        missing = []
        with self._lock:
            for e in experts:
                if not 0 <= e < self.index.num_experts:
                    raise IndexError(f"expert {e} out of range (layer {layer} has {self.index.num_experts})")
                hit = self._cache.get((layer, e))
                if hit is not None:
                    self._cache.move_to_end((layer, e))
                    out[e] = hit.weights
                    self.stats.hits += 1
                else:
                    missing.append(e)
                    self.stats.misses += 1
        futures = [(e, self._pool.submit(self._read, layer, e)) for e in missing]
        for e, fut in futures:
            entry = fut.result()  # re-raises FormatError from the reader thread
            out[e] = entry.weights
            self._insert((layer, e), entry)
        return out

    def _insert(self, key: tuple[int, int], entry: _Entry) -> None:
        size = entry.weights.nbytes
        if size > self.cache_bytes:
            return
        with self._lock:
            while self._cached_bytes + size > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)  # LRU eviction
                self._cached_bytes -= old.weights.nbytes
            self._cache[key] = entry
            self._cached_bytes += size

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes
