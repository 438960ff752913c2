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

Defaults (`io="auto"`, `cache_bytes="auto"`), chosen by measurement on the 2-core box (scripts/README.md):
on Linux, O_DIRECT reads into the runtime's own cache beat page-cache reads (2.09 vs 1.77 tok/s, 397B
geometry), so "auto" is "direct" when the model's filesystem accepts an O_DIRECT read (probed once;
else "os", with a one-line note), and "os" elsewhere. The "auto" cache budget (`auto_cache_budget`) is
what memory leaves: available memory (MemAvailable, or the memory cgroup's headroom when lower) minus
the resident weights minus a reserve of max(2 GiB, 15% of memory) for everything else (activations,
logits, libraries, other processes), never negative, never more than all the model's experts; with
io="os" (the page cache keeps what was read) at most 1 GiB.

Record checks: xxhash64 in C (runtime/cpu/fmk_xxh64.c, through ctypes, which releases the GIL), so
reader threads hash in parallel with each other and with compute; python-xxhash when the C library is
not built. Measured on the 2-core box (EPYC, 7.5 MiB records): 23 GB/s on one thread, 46 GB/s on two,
the same as python-xxhash 4.1, which also releases the GIL (it has since 3.0): the C path removes a
dependence on the package's build and GIL policy, not a bottleneck (decode tok/s equal, A/B in the
8 GiB cgroup and on the whole machine).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import queue
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from ..pack import format as fmt
from ..pack.index import PackedIndex
from ..pack.reader import ExpertWeights, check_record, decode_record

PAGE = 4096
GiB = 1 << 30
log = logging.getLogger(__name__)


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


# -- record hashing ---------------------------------------------------------------------------------
_c_hash: list = []  # [fmk_xxh64 ctypes function or None], resolved once


def _c_xxh64():
    """fmk_xxh64 of the C library (ctypes releases the GIL while it runs), or None without it."""
    if not _c_hash:
        fn = None
        if os.environ.get("FLASHMOE_XXH64") != "python":  # A/B runs: force python-xxhash
            from ..backends.cpu import library

            lib = library()[0]
            fn = getattr(lib, "fmk_xxh64", None) if lib is not None else None
            if fn is not None:
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)]
                fn.restype = ctypes.c_int
        _c_hash.append(fn)
    return _c_hash[0]


def hasher_name() -> str:
    return "C" if _c_xxh64() is not None else "python-xxhash"


def xxh64_at(addr: int, nbytes: int, seed: int = 0) -> int:
    """XXH64 of `nbytes` bytes at address `addr` with the C library (which must be available)."""
    out = ctypes.c_uint64()
    rc = _c_xxh64()(addr, nbytes, seed, ctypes.byref(out))
    if rc:
        raise ValueError(f"fmk_xxh64: invalid argument (address {addr:#x}, {nbytes} bytes)")
    return out.value


def xxh64(data, seed: int = 0) -> int:
    """XXH64 digest (an int, as xxhash.xxh64(data, seed).intdigest()) of a bytes-like object:
    in C when the library is built and `data` is bytes or a writable buffer, else python-xxhash."""
    if _c_xxh64() is not None:
        if isinstance(data, bytes):
            return xxh64_at(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0, len(data), seed)
        mv = memoryview(data)
        if not mv.readonly and mv.contiguous:
            mv = mv.cast("B")
            if mv.nbytes == 0:
                return xxh64(b"", seed)
            holder = (ctypes.c_char * mv.nbytes).from_buffer(mv)
            try:
                return xxh64_at(ctypes.addressof(holder), mv.nbytes, seed)
            finally:
                del holder
    return xxhash.xxh64(data, seed=seed).intdigest()


# -- I/O mode ---------------------------------------------------------------------------------------
def probe_direct(path: str | Path) -> str | None:
    """None when an O_DIRECT read of `path` works on its filesystem, else why not (Linux)."""
    if not hasattr(os, "O_DIRECT"):
        return "this OS has no O_DIRECT"
    buf = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE)  # page-aligned, as O_DIRECT requires
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
    except OSError as e:
        return f"{path}: O_DIRECT read refused ({e.strerror or e})"
    finally:
        buf.close()
    return None


def resolve_io(io: str, probe_path: str | Path) -> tuple[str, str | None]:
    """("os" | "direct", note) for an io option ("auto", "os" or "direct"): "auto" is "direct" on Linux
    when the filesystem of `probe_path` accepts O_DIRECT reads, else "os"; note says why it fell back."""
    if io not in ("auto", "os", "direct"):
        raise ValueError(f"io mode must be 'auto', 'os' or 'direct', got {io!r}")
    if io == "os" or (io == "auto" and not sys.platform.startswith("linux")):
        return "os", None
    if sys.platform == "darwin":  # io == "direct": F_NOCACHE
        return "direct", None
    why = probe_direct(probe_path)
    if why is None:
        return "direct", None
    return "os", f"io={io}: {why}; reading through the page cache (io=os)"


# -- the cache budget -------------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.0f} MiB"


@dataclass
class MemoryInfo:
    total: int  # bytes of memory this process may use: MemTotal, or the cgroup limit when lower
    available: int  # bytes it can still take: MemAvailable, or the cgroup's headroom when lower
    source: str  # where the figures come from (for the report)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_stat(path: Path, keys: tuple[str, ...]) -> int:
    try:
        stat = dict(line.split()[:2] for line in path.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return 0
    return sum(int(stat.get(k, 0)) for k in keys)


def _cgroup_limits(root: Path) -> list[tuple[int, int, str]]:
    """(limit, headroom, name) of every memory cgroup above this process that has a limit. Headroom is
    limit - (usage - file cache), since the kernel reclaims file cache before it kills for memory."""
    out = []
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrl, rel = parts
        if ctrl == "":  # v2
            base, files = root / "sys/fs/cgroup", ("memory.max", "memory.current", ("file",))
        elif "memory" in ctrl.split(","):  # v1
            base, files = root / "sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                          ("total_inactive_file", "total_active_file"))
        else:
            continue
        d = base / rel.lstrip("/")
        while True:  # this group and its ancestors: the tightest limit counts
            limit = _read_int(d / files[0])
            if limit is not None and limit < 1 << 60:  # v1 says "no limit" with a huge number
                usage = _read_int(d / files[1]) or 0
                used = max(0, usage - _cgroup_stat(d / "memory.stat", files[2]))
                out.append((limit, max(0, limit - used), f"cgroup {d / files[0]}"))
            if d == base or base not in d.parents:
                break
            d = d.parent
    return out


def memory_info(root: Path = Path("/")) -> MemoryInfo:
    """Memory this process may still use (Linux: /proc/meminfo and the memory cgroups; elsewhere the
    physical memory, taken as all available). `root` moves every path (tests)."""
    info = None
    try:
        mem = {k: int(v.split()[0]) * 1024 for k, v in
               (line.split(":", 1) for line in (root / "proc/meminfo").read_text().splitlines() if ":" in line)}
        info = MemoryInfo(mem["MemTotal"], mem.get("MemAvailable", mem.get("MemFree", 0)), "MemAvailable")
    except (OSError, KeyError, ValueError):
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            total = 8 * GiB  # unknown: assume a small machine
        info = MemoryInfo(total, total, "physical memory")
    for limit, headroom, name in _cgroup_limits(root):
        if headroom < info.available:
            info = MemoryInfo(min(info.total, limit), headroom, name)
        else:
            info.total = min(info.total, limit)
    return info


def estimate_resident_bytes(index: PackedIndex, dtype: torch.dtype | None = None) -> int:
    """Bytes the resident (non-expert) weights take once loaded in compute dtype `dtype` (None: as stored)."""
    total = 0
    for meta in index.raw.get("resident", {}).get("tensors", {}).values():
        n = 1
        for d in meta.get("shape", []):
            n *= int(d)
        size = fmt.DTYPES[meta["dtype"]].itemsize if meta.get("dtype") in fmt.DTYPES else 4
        if "quant" in meta:  # packed words, dequantized at load
            n, size = n * 32 // int(meta["quant"]["bits"]), (dtype or torch.bfloat16).itemsize
        elif dtype is not None and len(meta.get("shape", [])) >= 2 and meta.get("dtype", "").startswith(
                ("float", "bfloat")):
            size = dtype.itemsize
        total += n * size
    return total


def resident_nbytes(weights: dict) -> int:
    """Bytes held by loaded resident weights (tensors, and quantized ones with their scales and biases)."""
    total = 0
    for t in weights.values():
        parts = [t] if isinstance(t, torch.Tensor) else [getattr(t, k, None) for k in ("weight", "scales", "biases")]
        total += sum(x.numel() * x.element_size() for x in parts if isinstance(x, torch.Tensor))
    return total


def auto_cache_budget(resident_bytes: int, all_experts_bytes: int, io_mode: str,
                      mem: MemoryInfo | None = None) -> tuple[int, str]:
    """The "auto" byte budget of the expert cache and how it was derived (one line, for reports):
    available - resident - max(2 GiB, 15% of memory), clamped to [0, all experts]; with io_mode "os"
    (the page cache already keeps what was read) or off Linux, at most 1 GiB."""
    mem = mem or memory_info()
    reserve = max(2 * GiB, int(0.15 * mem.total))
    budget = max(0, mem.available - resident_bytes - reserve)
    how = (f"auto: available {_size(mem.available)} ({mem.source}) - resident {_size(resident_bytes)} "
           f"- reserve {_size(reserve)} = {_size(budget)}")
    if budget > all_experts_bytes:
        budget, how = all_experts_bytes, how + f", capped at all experts ({_size(all_experts_bytes)})"
    if (io_mode == "os" or not sys.platform.startswith("linux")) and budget > GiB:
        budget, how = GiB, how + ", capped at 1 GiB (io=os: the page cache keeps the rest)"
    return budget, how


@dataclass(eq=False)
class _Entry:
    weights: ExpertWeights
    buf: mmap.mmap | None = field(repr=False)  # the read buffer the CPU tensors view (None: copied off)
    cached: bool = False  # in the LRU cache now
    leases: int = 0  # stream() callers computing on it right now
    pinned: bool = False  # handed out by get(): its buffer is never recycled


def _unpin_all(pin, pinned: dict) -> None:
    """Unregisters every buffer in `pinned` (address -> buffer) with the driver, then lets them go."""
    unpin = getattr(pin, "unpin", None)
    if unpin is not None:
        for addr in pinned:
            unpin(addr)
    pinned.clear()


class ExpertStore:
    """Reads and caches expert records of one packed model."""

    def __init__(self, index: PackedIndex, cache_bytes: int | str = 1 << 30, io: str = "os", threads: int = 8,
                 verify_reads: bool = True, device: str | torch.device = "cpu", inflight: int | None = None,
                 resident_bytes: int = 0, pin=None, scan_batch: int | None = None):
        """cache_bytes: byte budget of the LRU cache, or "auto" (`auto_cache_budget`, which subtracts
        `resident_bytes`). io: "os", "direct" or "auto" (`resolve_io`); `io_mode` is what is in effect."""
        if io not in ("auto", "os", "direct"):
            raise ValueError(f"io mode must be 'auto', 'os' or 'direct', got {io!r}")
        self.index, self.verify_reads = index, verify_reads
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
        self._fds: dict[int, tuple[int, str]] = {}
        # pin(addr, nbytes) -> bool: registers a fresh buffer with the GPU driver (page-locked), so copies to and
        # from the device run from it directly (GpuExpertCache); pinned buffers are kept, never unmapped, and
        # reused oldest-freed first, after the event of the last asynchronous copy using them (`guard`)
        self._pin = pin
        # a stream() of more than scan_batch experts (a prefill's layer: nearly all of them) is a scan: its
        # reads are cached only into free room, so a scan through more records than the cache holds keeps
        # what it held instead of replacing everything before reuse (LRU on a cyclic scan hits nothing)
        self.scan_batch = max(16, index.num_experts // 4) if scan_batch is None else int(scan_batch)
        self._pinned: dict[int, mmap.mmap] = {}  # address -> buffer, registered
        # a store dropped without close() still unregisters its buffers before they are unmapped: a mapping freed
        # while registered leaves the driver a stale range, and the next buffer mapped over it is refused
        # ("already mapped", seen on the H200 2026-12-04 in a test that made several models in one process)
        self._unpin_at_exit = weakref.finalize(self, _unpin_all, pin, self._pinned)
        self._unpin_at_exit.atexit = False  # (at interpreter exit the process's mappings and CUDA go together)
        self._addr: dict[int, int] = {}  # id(buffer) -> address, pinned buffers
        self._busy: dict[int, object] = {}  # address -> event of an asynchronous copy still using the buffer
        self._want: dict[int, list[int] | None] = {}  # layer -> the index's digests as ints (None: unreadable)
        paths = []
        for entry in index.layers:
            path = str(index.path / entry["file"])
            if not os.path.isfile(path):
                raise fmt.FormatError(f"{path}: layer {entry['layer']}: expert file missing")
            size = os.path.getsize(path)
            if size != entry["file_bytes"]:
                raise fmt.FormatError(f"{path}: layer {entry['layer']}: {size} bytes, index says "
                                      f"{entry['file_bytes']} (truncated or wrong file)")
            with open(path, "rb") as f:
                fmt.check_header(f.read(fmt.HEADER_BYTES), path, entry["layer"], index.num_experts,
                                 index.layout)
            try:
                self._want[entry["layer"]] = [int(h, 16) for h in entry["xxh64"]]
            except (TypeError, ValueError):
                self._want[entry["layer"]] = None  # check_record reports the bad entry when it is read
            paths.append((entry["layer"], path))
        self.io = io
        self.io_mode, self.io_note = resolve_io(io, paths[0][1]) if paths else ("os", None)
        if self.io_note:
            log.warning(self.io_note)
        self.direct = False
        for layer, path in paths:
            fd, self.direct = _open(path, self.io_mode == "direct")
            self._fds[layer] = (fd, path)
        if self.io_mode == "direct" and paths and not self.direct:
            self.io_mode, self.io_note = "os", f"io={io}: O_DIRECT refused at open; reading through the page cache"
            log.warning(self.io_note)
        self.resident_bytes = resident_bytes
        self._auto: tuple[MemoryInfo, int] | None = None  # (memory before the resident load, all experts' bytes)
        if cache_bytes == "auto":
            self._auto = (memory_info(), len(paths) * index.num_experts * self.read_bytes)
            self.cache_bytes, self.cache_note = auto_cache_budget(resident_bytes, self._auto[1], self.io_mode,
                                                                  self._auto[0])
        elif isinstance(cache_bytes, str):
            raise ValueError(f"cache_bytes must be a byte count or 'auto', got {cache_bytes!r}")
        else:
            if cache_bytes < 0:
                raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
            self.cache_bytes, self.cache_note = int(cache_bytes), "set"
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fmp-io")

    def set_resident_bytes(self, resident_bytes: int) -> None:
        """The resident weights as loaded (their form is chosen at load, e.g. q8 from bf16): an "auto"
        budget is derived again from the memory figures taken before they were loaded."""
        self.resident_bytes = resident_bytes
        if self._auto is not None:
            self.cache_bytes, self.cache_note = auto_cache_budget(resident_bytes, self._auto[1], self.io_mode,
                                                                  self._auto[0])

    def describe(self) -> str:
        """One line: I/O mode, cache budget and how it was chosen, record checks (`run --timing`)."""
        how = {"direct": "O_DIRECT" if sys.platform != "darwin" else "F_NOCACHE", "os": "page cache"}[self.io_mode]
        checks = f"xxh64 in {hasher_name()}" if self.verify_reads else "off"
        note = f"; {self.io_note}" if self.io_note else ""
        return (f"expert store: io={self.io_mode} ({how}{note}), cache budget {_size(self.cache_bytes)} "
                f"({self.cache_note}), {self.threads} reader threads, record checks: {checks}")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for ev in self._busy.values():
            ev.synchronize()
        self._busy.clear()
        self._unpin_at_exit()  # (once: a finalizer runs at most once)
        self._addr.clear()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cache.clear()
        self._cached_bytes = 0
        self._free.clear()

    # -- buffers --------------------------------------------------------------------------------------
    def _acquire(self) -> mmap.mmap:
        buf = None
        with self._lock:
            if self._free:
                buf = self._free.pop(0 if self._pin else -1)  # pinned: the oldest freed, its copies long done
        if buf is not None:
            return self._ready(buf)
        # private anonymous mapping: page-aligned, as O_DIRECT requires
        buf = mmap.mmap(-1, self.read_bytes, flags=mmap.MAP_PRIVATE)
        if self._pin is not None:
            addr = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
            if self._pin(addr, self.read_bytes):
                with self._lock:
                    self._pinned[addr], self._addr[id(buf)] = buf, addr
        return buf

    def _ready(self, buf: mmap.mmap) -> mmap.mmap:
        """buf, once the last asynchronous copy using it (a pinned buffer's `guard` event) is done."""
        with self._lock:
            ev = self._busy.pop(self._addr.get(id(buf), -1), None)
        if ev is not None:
            ev.synchronize()
        return buf

    def _free_buf(self, buf: mmap.mmap) -> None:
        """Back to the free list (pinned buffers always; others while it holds fewer than `inflight`)."""
        with self._lock:
            if id(buf) in self._addr or len(self._free) < self.inflight:
                self._free.append(buf)

    @property
    def pinning(self) -> bool:
        """Buffers are registered with the GPU driver as they are made (see __init__'s `pin`)."""
        return self._pin is not None

    def is_pinned(self, addr: int) -> bool:
        """True when the buffer at `addr` (a record's first byte) is registered with the GPU driver."""
        return addr in self._pinned

    def guard(self, addr: int, event) -> None:
        """The pinned buffer at `addr` is in use by an asynchronous copy until `event`: not reused before."""
        self._busy[addr] = event

    def busy(self, addr: int):
        """The event of the last asynchronous copy using the buffer at `addr`, or None."""
        return self._busy.get(addr)

    def _recycle(self, entry: _Entry) -> None:
        """Give entry's buffer back once nothing can see it: not cached, not leased, not handed out."""
        with self._lock:
            if entry.buf is None or entry.cached or entry.leases or entry.pinned:
                return
            buf, entry.buf = entry.buf, None
            entry.weights = None  # the tensors view buf: nothing may use them any more
        self._free_buf(buf)

    # -- reading --------------------------------------------------------------------------------------
    def _read(self, layer: int, expert: int, buf: mmap.mmap) -> _Entry:
        fd, path = self._fds[layer]
        off = fmt.expert_offset(expert, self.index.layout.stride)
        t0 = time.perf_counter()
        n = os.preadv(fd, [buf], off)
        t1 = time.perf_counter()
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        if self.verify_reads or n < self.record_bytes:
            self._check(raw.data_ptr(), buf, n, layer, expert)
        t2 = time.perf_counter()
        with self._lock:
            self.stats.bytes_read += n
            self.stats.read_seconds += t1 - t0
            self.stats.verify_seconds += t2 - t1
            self.stats.reads += 1
        if self.device.type != "cpu":  # the device holds a copy: the buffer is free again at once
            entry = _Entry(decode_record(raw.to(self.device), self.index), None)
            del raw
            self._free_buf(buf)
            return entry
        return _Entry(decode_record(raw, self.index), buf)

    def _check(self, addr: int, buf: mmap.mmap, n: int, layer: int, expert: int) -> None:
        """Raise FormatError unless the n bytes read into buf (at addr) hold the whole record with the
        index's xxhash64. Hashes in C without the GIL where it can; reader.check_record words errors."""
        want = self._want.get(layer)
        if n >= self.record_bytes and want is not None and _c_xxh64() is not None:
            if xxh64_at(addr, self.record_bytes) == want[expert]:
                return
        view = memoryview(buf)[:n]
        try:
            check_record(view, self.index, layer, expert)  # python-xxhash: the fallback and the error path
        finally:
            view.release()
        if n >= self.record_bytes and want is not None and _c_xxh64() is not None:  # C and python disagree
            raise fmt.FormatError(f"{self._fds[layer][1]}: layer {layer} expert {expert}: fmk_xxh64 disagrees "
                                  "with python-xxhash (a broken build of runtime/cpu)")

    def _lookup(self, layer: int, experts: list[int], keep: bool = True) -> tuple[list[tuple[int, _Entry]], list[int]]:
        if layer not in self._fds:
            raise KeyError(f"layer {layer} has no expert file in {self.index.path}")
        hits, missing = [], []
        with self._lock:
            for e in dict.fromkeys(experts):
                if not 0 <= e < self.index.num_experts:
                    raise IndexError(f"expert {e} out of range (layer {layer} has {self.index.num_experts})")
                hit = self._cache.get((layer, e))
                if hit is not None:
                    if keep:
                        self._cache.move_to_end((layer, e))
                    else:  # taken out: its buffer is recycled once the caller is done with it
                        del self._cache[(layer, e)]
                        hit.cached = False
                        self._cached_bytes -= self.read_bytes
                    hit.leases += 1
                    hits.append((e, hit))
                    self.stats.hits += 1
                else:
                    missing.append(e)
                    self.stats.misses += 1
        return hits, missing

    def stream(self, layer: int, experts: list[int], pin: bool = False, hold: bool = False, keep: bool = True,
               scan: bool | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (expert, weights) for each of `experts`: cache hits first, then misses in the order
        their reads complete. Reads start at once, at most `inflight` at a time. The weights of one
        step may be reused for another read once the caller asks for the next step (pin=True: they
        stay valid while referenced; hold=True: until the iteration ends, with up to one buffer per
        expert instead of `inflight`). keep=False is for an exclusive tier above this one (the VRAM
        cache), which takes the records: hits leave the cache, reads are not inserted, and both buffers
        are recycled once the caller is done with them; the default (keep=True) is unchanged.
        scan: reads cached only into free room (None: when more than scan_batch experts are asked for).
        Raises FormatError (naming file, layer, expert) on a bad read."""
        hits, missing = self._lookup(layer, experts, keep)
        if scan is None:
            scan = len(hits) + len(missing) > self.scan_batch
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
                if keep:
                    self._insert((layer, e), entry, evict=not scan)
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

    def put(self, layer: int, expert: int, record: torch.Tensor, verify: bool = True, evict: bool = True) -> bool:
        """Insert a copy of `record` (uint8, at least record_bytes; e.g. a record moved down from VRAM)
        as expert `expert` of `layer`, under the budget with the cache's LRU eviction, into a recycled
        buffer. verify=True checks its xxhash64 against the index first (FormatError naming file, layer,
        expert), so what the cache holds is checked data. Returns False when a record does not fit the
        budget (nothing is kept), or, with evict=False, when the budget is full. A key already cached is only
        marked recently used. CPU stores only."""
        if self.device.type != "cpu":
            raise ValueError(f"ExpertStore.put: records are kept in host buffers, this store is on {self.device}")
        if layer not in self._fds:
            raise KeyError(f"layer {layer} has no expert file in {self.index.path}")
        if not 0 <= expert < self.index.num_experts:
            raise IndexError(f"expert {expert} out of range (layer {layer} has {self.index.num_experts})")
        src = record.reshape(-1)
        if src.dtype != torch.uint8 or src.device.type != "cpu" or src.numel() < self.record_bytes:
            raise ValueError(f"ExpertStore.put: layer {layer} expert {expert}: record must be a CPU uint8 tensor of "
                             f">= {self.record_bytes} bytes, got {src.dtype} [{src.numel()}] on {src.device}")
        if self.read_bytes > self.cache_bytes:
            return False
        with self._lock:
            if (layer, expert) in self._cache:
                self._cache.move_to_end((layer, expert))
                return True
        buf = self.take_buffer(evict)
        if buf is None:
            return False
        torch.frombuffer(buf, dtype=torch.uint8)[: self.record_bytes].copy_(src[: self.record_bytes])
        return self.adopt(layer, expert, buf, verify=verify)

    def take_buffer(self, evict: bool = True) -> mmap.mmap | None:
        """A buffer for one more record under the budget: a free one, or, when the budget is full, the LRU
        record's (evicted; a fresh mapping costs a page fault per 4 KiB on first touch, 2-18 ms per 7.5 MiB
        record measured, against 0.13 ms for the copy), or None (evict=False, or a budget below one record)."""
        if self.read_bytes > self.cache_bytes:
            return None
        buf, evicted = None, None
        with self._lock:
            if self._cached_bytes + self.read_bytes > self.cache_bytes:
                if not evict or not self._cache:
                    return None
                _, evicted = self._cache.popitem(last=False)
                evicted.cached = False
                self._cached_bytes -= self.read_bytes
                if evicted.buf is not None and not (evicted.leases or evicted.pinned):
                    buf, evicted.buf, evicted.weights = evicted.buf, None, None
                    evicted = None
        if evicted is not None:
            self._recycle(evicted)
        return self._acquire() if buf is None else self._ready(buf)

    def adopt(self, layer: int, expert: int, buf: mmap.mmap, verify: bool = True, event=None) -> bool:
        """Insert `buf` (from take_buffer, holding the record, or about to once `event` is done: an
        asynchronous device-to-host copy) as expert `expert` of `layer`. verify: its xxhash64 checked first
        (after the event): FormatError naming file, layer, expert, and the buffer is freed."""
        raw = torch.frombuffer(buf, dtype=torch.uint8)
        if event is not None:
            self.guard(raw.data_ptr(), event)
        if verify:
            if event is not None:
                event.synchronize()
            try:
                self._check(raw.data_ptr(), buf, self.record_bytes, layer, expert)
            except BaseException:
                del raw
                self._free_buf(buf)
                raise
        self._insert((layer, expert), _Entry(decode_record(raw, self.index), buf))
        return True

    def _insert(self, key: tuple[int, int], entry: _Entry, evict: bool = True) -> None:
        size = self.read_bytes
        if size > self.cache_bytes:
            return
        evicted = []
        with self._lock:
            if not evict and self._cached_bytes + size > self.cache_bytes:
                return  # a scan's read: only into free room
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
