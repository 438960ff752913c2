"""The VRAM tier of the expert store: expert records in a slot pool on the GPU.

    cache = GpuExpertCache(index, budget="8GiB", device="cuda", policy="lfu")
    slots = cache.slots(layer, [3, 17, 40])      # resident now; misses read and copied
    table = cache.table(slots)                    # what the Triton kernels take

One uint8 pool [n_slots, slot_bytes] holds whole records (slot_bytes = record_bytes rounded to
256), so an expert is one H2D copy and its components are fixed offsets in its slot. A miss is
read from its layer file (one positional read, O_DIRECT with io="direct") straight into a pinned
staging buffer, checked against its xxhash64, and copied to its slot on a side stream; the main
stream waits on an event recorded after the batch's copies, and the side stream first waits for
the main stream, so a slot is never overwritten while an earlier kernel still reads it. Misses
of a batch are read in parallel (os.preadv releases the GIL). Replacement: "lru", or "lfu"
(frequency-aware: sampled least-frequently-used with aging, recency breaking ties). The RAM tier
on this path is the OS page cache (io="os"). On a CPU device the same code runs without
streams (tests drive the logic, with the kernels under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from queue import Queue

import torch

from ..pack import format as fmt
from ..pack.index import PackedIndex
from ..pack.reader import ExpertWeights, check_record, decode_record
from .store import StoreStats

PAGE = 4096
SLOT_ALIGN = 256


@dataclass
class TierStats:
    """VRAM-tier counters (cumulative). `store` (StoreStats) has hits/misses/disk bytes for the runtime."""

    evictions: int = 0
    h2d_bytes: int = 0
    fetch_seconds: float = 0.0  # wall time of miss batches: reads, checks, copies enqueued
    stage_wait_seconds: float = 0.0  # waiting for a staging buffer's previous copy


# -------------------------------------------------------------------------------------- policies


class LRUPolicy:
    """Least recently used."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict = OrderedDict()

    def touch(self, key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key) -> None:
        del self._order[key]

    def victim(self, protected: set):
        for key in self._order:
            if key not in protected:
                return key
        raise RuntimeError("every cached expert is in use by this batch")


class LFUPolicy:
    """Frequency-aware: evict the least used of `sample` random cached keys (recency breaks ties).
    Use counts persist after eviction (a returning popular expert is kept) and are halved every
    `decay_every` accesses, so popularity can shift. O(sample) per eviction, like Redis' LFU."""

    name = "lfu"

    def __init__(self, sample: int = 16, decay_every: int = 50_000, seed: int = 0):
        self.sample, self.decay_every = sample, decay_every
        self.counts: dict = {}
        self.last: dict = {}
        self._keys: list = []
        self._pos: dict = {}
        self._tick = 0
        self._rng = random.Random(seed)

    def touch(self, key) -> None:
        self._tick += 1
        self.counts[key] = self.counts.get(key, 0.0) + 1.0
        self.last[key] = self._tick
        if key not in self._pos:
            self._pos[key] = len(self._keys)
            self._keys.append(key)
        if self._tick % self.decay_every == 0:
            self.counts = {k: c / 2 for k, c in self.counts.items() if c >= 0.5 or k in self._pos}

    def remove(self, key) -> None:
        i = self._pos.pop(key)
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._pos[last] = i

    def victim(self, protected: set):
        n = len(self._keys)
        pool = (
            self._keys
            if n <= self.sample
            else [self._keys[self._rng.randrange(n)] for _ in range(self.sample)]
        )
        cands = [k for k in pool if k not in protected] or [k for k in self._keys if k not in protected]
        if not cands:
            raise RuntimeError("every cached expert is in use by this batch")
        return min(cands, key=lambda k: (self.counts.get(k, 0.0), self.last[k]))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def simulate(policy: str, trace: list[list], n_slots: int) -> float:
    """Hit rate of `policy` with n_slots on a trace of batches (lists of keys used together)."""
    pol, cached, hits, total = POLICIES[policy](), set(), 0, 0
    for batch in trace:
        batch = list(dict.fromkeys(batch))
        for key in batch:
            total += 1
            if key in cached:
                hits += 1
            elif len(cached) >= n_slots:
                old = pol.victim(set(batch))
                pol.remove(old)
                cached.discard(old)
            cached.add(key)
            pol.touch(key)
    return hits / total if total else 0.0


# ----------------------------------------------------------------------------------------- cache


def _open(path: str, direct: bool) -> tuple[int, bool]:
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass  # e.g. tmpfs: no O_DIRECT
    return os.open(path, os.O_RDONLY), False


class GpuExpertCache:
    """Expert records of one packed model in VRAM slots (see module docstring)."""

    def __init__(
        self,
        index: PackedIndex,
        budget: int | str = "auto",
        io: str = "os",
        threads: int = 8,
        verify_reads: bool = True,
        device: str | torch.device = "cuda",
        policy: str = "lru",
        staging: int = 16,
    ):
        from .runtime import parse_size

        if io not in ("os", "direct"):
            raise ValueError(f"io mode must be 'os' or 'direct', got {io!r}")
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {sorted(POLICIES)}, got {policy!r}")
        self.index, self.device, self.verify_reads = index, torch.device(device), verify_reads
        self.record_bytes = index.layout.record_bytes
        self.slot_bytes = fmt.align_up(self.record_bytes, SLOT_ALIGN)
        self.read_bytes = fmt.align_up(self.record_bytes, PAGE)
        self.budget = budget if budget == "auto" else parse_size(budget)
        self.policy = POLICIES[policy]()
        self.stats, self.tier = StoreStats(), TierStats()
        self.pool: torch.Tensor | None = None  # allocated on first use ("auto" sizes from free memory then)
        self.n_slots = 0
        self._where: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot
        self._free_slots: list[int] = []
        self._fds: dict[int, int] = {}
        self.direct = False
        for entry in index.layers:
            path = str(index.path / entry["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != entry["file_bytes"]:
                raise fmt.FormatError(
                    f"{path}: layer {entry['layer']}: expert file missing or of the wrong size"
                )
            with open(path, "rb") as f:
                fmt.check_header(
                    f.read(fmt.HEADER_BYTES), path, entry["layer"], index.num_experts, index.layout
                )
            self._fds[entry["layer"]], self.direct = _open(path, io == "direct")
        self._paths = {e["layer"]: str(index.path / e["file"]) for e in index.layers}
        self._pool_io = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fmp-gpu-io")
        self._lock = threading.Lock()
        cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if cuda else None
        raw = torch.empty(staging * self.read_bytes + PAGE, dtype=torch.uint8, pin_memory=cuda)
        start = (-raw.data_ptr()) % PAGE  # O_DIRECT wants page-aligned buffers
        self._staging = [
            raw[start + i * self.read_bytes : start + (i + 1) * self.read_bytes] for i in range(staging)
        ]
        self._views = [memoryview(b.numpy()) for b in self._staging]
        self._stage_events: list = [None] * staging
        self._free_stage: Queue = Queue()
        for i in range(staging):
            self._free_stage.put(i)

    # -- pool -----------------------------------------------------------------------------------
    def _alloc(self) -> None:
        total = len(self.index.layers) * self.index.num_experts
        want = self.budget
        if want == "auto":
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 1 << 30
            want = int(0.9 * free) - (2 << 30)
        self.n_slots = max(1, min(total, int(want) // self.slot_bytes))  # at least one slot to stage through
        self.pool = torch.empty(self.n_slots, self.slot_bytes, dtype=torch.uint8, device=self.device)
        self._free_slots = list(range(self.n_slots - 1, -1, -1))

    @property
    def capacity(self) -> int:
        """Experts the pool holds at once (the most one batch may ask for)."""
        if self.pool is None:
            self._alloc()
        return self.n_slots

    @property
    def cache_bytes(self) -> int:
        return self.capacity * self.slot_bytes

    @property
    def cached_bytes(self) -> int:
        return len(self._where) * self.slot_bytes

    def close(self) -> None:
        self._pool_io.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._where.clear()
        self.pool = None

    # -- lookups ----------------------------------------------------------------------------------
    def slots(self, layer: int, experts: list[int]) -> list[int]:
        """Make `experts` of `layer` resident and return their slots (in order). Work queued after
        this on the current stream sees the data. At most `capacity` distinct experts per call."""
        if layer not in self._fds:
            raise KeyError(f"layer {layer} has no expert file in {self.index.path}")
        experts = list(dict.fromkeys(experts))
        if len(experts) > self.capacity:
            raise ValueError(f"{len(experts)} experts in one batch, the VRAM cache holds {self.n_slots}")
        batch = {(layer, e) for e in experts}
        missing = []
        for e in experts:
            if not 0 <= e < self.index.num_experts:
                raise IndexError(f"expert {e} out of range (layer {layer} has {self.index.num_experts})")
            if (layer, e) in self._where:
                self.stats.hits += 1
                self.policy.touch((layer, e))
            else:
                self.stats.misses += 1
                missing.append(e)
        if missing:
            self._fetch(layer, missing, batch)
        return [self._where[(layer, e)] for e in experts]

    def _take_slot(self, protected: set) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        old = self.policy.victim(protected)
        self.policy.remove(old)
        self.tier.evictions += 1
        return self._where.pop(old)

    def _fetch(self, layer: int, experts: list[int], batch: set) -> None:
        t0 = time.perf_counter()
        if (
            self.side is not None
        ):  # copies start after every kernel already queued (it may read an evicted slot)
            self.side.wait_stream(torch.cuda.current_stream(self.device))
        jobs = []
        for e in experts:
            slot = self._take_slot(batch)
            jobs.append(((layer, e), slot, self._pool_io.submit(self._read_copy, layer, e, slot)))
        wait([fut for _, _, fut in jobs])
        errors = [fut.exception() for _, _, fut in jobs if fut.exception() is not None]
        if errors:  # nothing of this batch is cached
            self._free_slots += [slot for _, slot, _ in jobs]
            raise errors[0]  # e.g. FormatError naming file, layer and expert
        for key, slot, _ in jobs:
            self._where[key] = slot
            self.policy.touch(key)
        if self.side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        self.tier.fetch_seconds += time.perf_counter() - t0

    def _read_copy(self, layer: int, expert: int, slot: int) -> None:
        """Worker: disk -> pinned staging buffer -> (side stream) slot."""
        b = self._free_stage.get()
        try:
            ev = self._stage_events[b]
            if ev is not None:  # its previous copy must be done before the buffer is overwritten
                w0 = time.perf_counter()
                ev.synchronize()
                with self._lock:
                    self.tier.stage_wait_seconds += time.perf_counter() - w0
            off = fmt.expert_offset(expert, self.index.layout.stride)
            t0 = time.perf_counter()
            n = os.preadv(self._fds[layer], [self._views[b]], off)
            dt = time.perf_counter() - t0
            if self.verify_reads or n < self.record_bytes:
                check_record(self._views[b][:n], self.index, layer, expert)
            src = self._staging[b][: self.record_bytes]
            if self.side is not None:
                with torch.cuda.stream(self.side):
                    self.pool[slot, : self.record_bytes].copy_(src, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self.side)
                self._stage_events[b] = ev
            else:
                self.pool[slot, : self.record_bytes].copy_(src)
            with self._lock:
                self.stats.bytes_read += n
                self.stats.read_seconds += dt
                self.stats.reads += 1
                self.tier.h2d_bytes += self.record_bytes
        finally:
            self._free_stage.put(b)

    def preload(self, layers: list[int] | None = None) -> None:
        """Read every expert of `layers` (default: all) into the pool; raises if it does not fit."""
        layers = [e["layer"] for e in self.index.layers] if layers is None else layers
        need = len(layers) * self.index.num_experts
        if need > self.capacity:
            raise ValueError(f"{need} experts do not fit in {self.n_slots} VRAM slots")
        for layer in layers:
            self.slots(layer, list(range(self.index.num_experts)))

    # -- views ------------------------------------------------------------------------------------
    def get(self, layer: int, experts: list[int]) -> dict[int, ExpertWeights]:
        """Store-compatible: decoded weights (views into VRAM slots) of `experts`. They stay valid
        only until the next call that may evict (the kernels use `table` instead)."""
        return {e: self.view(s) for e, s in zip(experts, self.slots(layer, experts), strict=True)}

    def view(self, slot: int) -> ExpertWeights:
        """Decoded weights of the record in `slot` (views into VRAM)."""
        return decode_record(self.pool[slot], self.index)

    def table(self, slots: list[int]):
        """ExpertTable over `slots` for the Triton kernels (quantized packs only)."""

        ix = self.index
        return slot_table(
            self.pool,
            ix.layout,
            slots,
            ix.bits,
            ix.group_size,
            ix.raw["experts"]["hidden_size"],
            ix.raw["experts"]["intermediate_size"],
        )


def slot_table(
    pool: torch.Tensor,
    layout: fmt.RecordLayout,
    slots: list[int],
    bits: int,
    group_size: int,
    hidden: int,
    inter: int,
):
    """ExpertTable over records in rows `slots` of pool [n_slots, slot_bytes] (uint8)."""
    from ..backends.triton_kernels import OFFS, ExpertTable

    slot_bytes = pool.shape[1]
    sdt = fmt.DTYPES[layout.component("gate.scales").dtype]
    ssize = torch.empty(0, dtype=sdt).element_size()
    comp = [layout.component(n).offset // (4 if n.endswith("weight") else ssize) for n in OFFS]
    per = [slot_bytes // 4] * 3 + [slot_bytes // ssize] * 6
    rows = [[s * p + c for p, c in zip(per, comp, strict=True)] for s in slots]
    pin = pool.device.type == "cuda"
    offs = torch.tensor(rows, dtype=torch.int64, pin_memory=pin).to(pool.device, non_blocking=True)
    return ExpertTable(pool.view(torch.int32), pool.view(sdt), offs, bits, group_size, hidden, inter)
