"""The expert store: expert ids -> decoded expert weights, through a byte-budgeted cache and the SSD.

Two I/O modes:
  "os"      plain positional reads; the OS page cache does the caching ("trust the OS").
  "direct"  O_DIRECT (Linux) / F_NOCACHE (macOS) reads that bypass the page cache, so the
            runtime's own cache (the `cache_bytes` budget) is the only copy in RAM.
A layer's missing experts are read by a thread pool (os.preadv releases the GIL) into page-aligned
buffers; `stream()` hands each expert over as soon as its read completes, so the caller computes
on one expert while the next ones are still being read. Every record read from disk is checked
against its xxhash64 unless `verify_reads=False`, so a corrupt file fails loudly instead of
producing garbage tokens.

Memory: expert bytes in RAM never exceed `cache_bytes` (the LRU cache, counted in whole read
buffers) plus `inflight` read buffers per concurrent `stream()` (reads in progress, the expert the
caller is computing on, and recycled free buffers together). Buffers are reused: a fresh anonymous
mapping per read costs page faults and zeroing (5-11 ms per 7.5 MiB record on the 2-core box against
0.5 ms for the read itself from the page cache), so buffers go back to a free list once the caller
is done with them, unless `get()` handed them out (those stay valid for as long as they are held).
"""

from __future__ import annotations

import mmap
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
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
    read_seconds: float = 0.0  # summed over reader threads (in parallel: more than wall time)
    reads: int = 0
    verify_seconds: float = 0.0  # xxhash64 of records read (summed over reader threads)
    wait_seconds: float = 0.0  # time callers of stream() waited for a read: I/O not hidden by compute

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def snapshot(self) -> StoreStats:
        return StoreStats(self.hits, self.misses, self.bytes_read, self.read_seconds, self.reads,
                          self.verify_seconds, self.wait_seconds)


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


@dataclass(eq=False)
class _Entry:
    weights: ExpertWeights
    buf: mmap.mmap | None = field(repr=False)  # the read buffer the CPU tensors view (None: copied off)
    cached: bool = False  # in the LRU cache now
    leases: int = 0  # stream() callers computing on it right now
    pinned: bool = False  # handed out by get(): its buffer is never recycled


class ExpertStore:
    """Reads and caches expert records of one packed model."""

    def __init__(self, index: PackedIndex, cache_bytes: int = 1 << 30, io: str = "os", threads: int = 8,
                 verify_reads: bool = True, device: str | torch.device = "cpu", inflight: int | None = None):
        if io not in ("os", "direct"):
            raise ValueError(f"io mode must be 'os' or 'direct', got {io!r}")
        self.index, self.cache_bytes, self.verify_reads = index, int(cache_bytes), verify_reads
        self.device = torch.device(device)
        self.record_bytes = index.layout.record_bytes
        self.read_bytes = fmt.align_up(self.record_bytes, PAGE)  # O_DIRECT needs whole pages
        self.threads = max(1, threads)
        self.inflight = max(1, inflight if inflight is not None else 2 * self.threads)
        self.stats = StoreStats()
        self._cache: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._free: list[mmap.mmap] = []  # recycled read buffers
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fmp-io")
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
                fmt.check_header(f.read(fmt.HEADER_BYTES), path, entry["layer"], index.num_experts,
                                 index.layout)
            self._fds[entry["layer"]] = (fd, path)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cache.clear()
        self._cached_bytes = 0
        self._free.clear()

    # -- buffers --------------------------------------------------------------------------------------
    def _acquire(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        # private anonymous mapping: page-aligned, as O_DIRECT requires
        return mmap.mmap(-1, self.read_bytes, flags=mmap.MAP_PRIVATE)

    def _recycle(self, entry: _Entry) -> None:
        """Give entry's buffer back once nothing can see it: not cached, not leased, not handed out."""
        with self._lock:
            if entry.buf is None or entry.cached or entry.leases or entry.pinned:
                return
            buf, entry.buf = entry.buf, None
            entry.weights = None  # the tensors view buf: nothing may use them any more
            if len(self._free) < self.inflight:
                self._free.append(buf)

    # -- reading --------------------------------------------------------------------------------------
    def _read(self, layer: int, expert: int, buf: mmap.mmap) -> _Entry:
        fd, path = self._fds[layer]
        off = fmt.expert_offset(expert, self.index.layout.stride)
        t0 = time.perf_counter()
        n = os.preadv(fd, [buf], off)
        t1 = time.perf_counter()
        view = memoryview(buf)[:n]
        try:
            if self.verify_reads or n < self.record_bytes:
                check_record(view, self.index, layer, expert)
        finally:
            view.release()
        t2 = time.perf_counter()
        with self._lock:
            self.stats.bytes_read += n
            self.stats.read_seconds += t1 - t0
            self.stats.verify_seconds += t2 - t1
            self.stats.reads += 1
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        if self.device.type != "cpu":  # the device holds a copy: the buffer is free again at once
            entry = _Entry(decode_record(raw.to(self.device), self.index), None)
            del raw
            with self._lock:
                if len(self._free) < self.inflight:
                    self._free.append(buf)
            return entry
        return _Entry(decode_record(raw, self.index), buf)

    def _lookup(self, layer: int, experts: list[int]) -> tuple[list[tuple[int, _Entry]], list[int]]:
        if layer not in self._fds:
            raise KeyError(f"layer {layer} has no expert file in {self.index.path}")
        hits, missing = [], []
        with self._lock:
            for e in dict.fromkeys(experts):
                if not 0 <= e < self.index.num_experts:
                    raise IndexError(f"expert {e} out of range (layer {layer} has {self.index.num_experts})")
                hit = self._cache.get((layer, e))
                if hit is not None:
                    self._cache.move_to_end((layer, e))
                    hit.leases += 1
                    hits.append((e, hit))
                    self.stats.hits += 1
                else:
                    missing.append(e)
                    self.stats.misses += 1
        return hits, missing

    def stream(self, layer: int, experts: list[int], pin: bool = False,
               hold: bool = False) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (expert, weights) for each of `experts`: cache hits first, then misses in the order
        their reads complete. Reads start at once, at most `inflight` at a time. The weights of one
        step may be reused for another read once the caller asks for the next step (pin=True: they
        stay valid while referenced; hold=True: until the iteration ends, with up to one buffer per
        expert instead of `inflight`). Raises FormatError (naming file, layer, expert) on a bad read."""
        hits, missing = self._lookup(layer, experts)
        held: list[_Entry] = []
        done: queue.SimpleQueue = queue.SimpleQueue()
        todo = iter(missing)
        running = 0

        def submit() -> None:
            nonlocal running
            e = next(todo, None)
            if e is not None:
                fut = self._pool.submit(self._read, layer, e, self._acquire())
                fut.add_done_callback(lambda f, e=e: done.put((e, f)))
                running += 1

        def release(entry: _Entry, now: bool = False) -> None:
            if hold and not now:
                held.append(entry)
                return
            with self._lock:
                entry.leases -= 1
                entry.pinned |= pin
            self._recycle(entry)

        try:
            for _ in range(self.inflight):
                submit()
            while hits:
                e, entry = hits[0]
                try:
                    yield e, entry.weights
                finally:
                    hits.pop(0)
                    release(entry)
            while running:
                t0 = time.perf_counter()
                e, fut = done.get()
                running -= 1
                self.stats.wait_seconds += time.perf_counter() - t0
                entry = fut.result()  # re-raises FormatError from the reader thread
                entry.leases = 1
                self._insert((layer, e), entry)
                try:
                    yield e, entry.weights
                finally:
                    release(entry)
                submit()
        finally:  # an error or an abandoned iteration: let reads in flight finish, release everything
            for _, entry in hits:
                release(entry)
            for entry in held:
                release(entry, now=True)
            while running:
                _, fut = done.get()
                running -= 1
                if fut.exception() is None:
                    self._recycle(fut.result())

    def get(self, layer: int, experts: list[int]) -> dict[int, ExpertWeights]:
        """Decoded weights of `experts` of `layer` (valid for as long as they are referenced)."""
        return dict(self.stream(layer, experts, pin=True))

    def _insert(self, key: tuple[int, int], entry: _Entry) -> None:
        size = self.read_bytes
        if size > self.cache_bytes:
            return
        evicted = []
        with self._lock:
            while self._cached_bytes + size > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)  # LRU eviction
                old.cached = False
                self._cached_bytes -= size
                evicted.append(old)
            self._cache[key] = entry
            entry.cached = True
            self._cached_bytes += size
        for old in evicted:
            self._recycle(old)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes
