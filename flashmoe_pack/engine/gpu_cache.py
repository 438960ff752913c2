"""The VRAM tier of the expert store: expert records in a slot pool on the GPU, over the host tier.

    cache = GpuExpertCache(index, budget="8GiB", host_budget="24GiB", device="cuda", policy="lfu")
    slots = cache.slots(layer, [3, 17, 40])      # resident now; misses fetched from the tiers below
    table = cache.table(slots)                    # what the Triton kernels take

Three tiers: this VRAM slot pool; the host-RAM tier, an engine.store.ExpertStore (LRU under a
byte budget, reads with io "direct" (O_DIRECT: the store's cache is the only RAM copy) or "os"
(page cache too), xxhash64 check of every record read); the SSD. One uint8 pool
[n_slots, slot_bytes] holds whole records (slot_bytes = record_bytes rounded to 256), so an
expert is one host-to-device copy and its components are fixed offsets in its slot. A VRAM miss
is taken from the store as soon as it is there (host hits first, then disk reads in the order
they complete, reads running in the store's thread pool), copied into one of `staging` pinned
buffers and from there to its slot on a side stream; the main stream waits on the side stream
after the batch, and the side stream first waits for the main stream, so a slot is never
overwritten while an earlier kernel still reads it. A staging buffer is reused only after its
previous copy's event. Replacement in VRAM: "lru", or "lfu" (frequency-aware: sampled
least-frequently-used with aging, recency breaking ties).

Page-locked host tier (CUDA, the default; FLASHMOE_CUDA_PINNED_HOST=0 off): the store's buffers are
registered with the driver as they are made (cudaHostRegister, in place), so a record read from disk or
held in host RAM goes up to its slot straight from its buffer, and a record moving down lands in a
host-tier buffer, with no host copy and no staging buffer; a buffer is reused only after the event of
the last copy using it (store.guard), and an upload from a buffer whose copy down is still in flight
waits for it on the side stream. Where the driver refuses a buffer, it goes through staging as below.
Why: on the H200 (12 layers, K=10) the host copies of 90 records per token moved down took 0.21 s of a
0.6 s token, and every upload paid one more copy into staging.

Exclusive tiers (the default; `exclusive=False` or FLASHMOE_CUDA_EXCLUSIVE=0 for the old inclusive
pair): a record promoted to VRAM leaves the host tier (its buffer goes back to the store's free list,
uncopied) and a record read from disk for VRAM is not kept in host RAM; a record evicted from VRAM
moves down into the host tier (store.put, LRU under its budget). The host copy is made by a
device-to-host copy of the slot, not kept from the upload: keeping the uploaded copy would hold a host
buffer per VRAM slot, the duplicate this mode removes. A victim moves down just before its slot is
overwritten, after the batch's host-tier lookups (so it never pushes out a record the batch takes). On
CUDA the copy runs on its own stream (after the slot's upload, beside kernels that read the slot) into
a pinned staging buffer with an event, which only the slot's next upload waits for (on the side
stream); the host finishes the move (wait for the event, copy into a store buffer, xxhash64 check when
verify_demotions: FLASHMOE_VERIFY_DEMOTIONS=1, the tests) as copies complete while reads are in flight,
when the staging buffer is needed again, or at the end of the batch (none is pending between batches). A
staging buffer is never reused while a copy into or out of it is pending. Host cost per 7.5 MiB record
moved down (2-core box, busy): 0.4 ms copy + 0.6 ms check; on the H200 box, 12 layers streaming at K=10,
2.3 ms per record with the check, 90 records and 0.21 s of a 0.6 s token (why the check is off by
default). Why exclusive (scripts/sim_cache.py, synthetic decode routing, 397B ratios, VRAM
and host 1/5 of the experts each): combined hit rate 39-40% vs 21% (LRU) / 32-34% (LFU) inclusive on
uniform routing, 67-94% vs 50-93% on skewed routing; never lower; the H200 benchmark's case: 55% vs
35% (measured there: 36% inclusive). LFU in VRAM beats LRU by 0.1-4 points exclusive on skewed
routing, ties on uniform. Budgets "auto": VRAM = free device memory
(after the resident weights) less max(2 GiB, 10% of the card); host = engine/store.py's
auto_cache_budget with no resident weights to subtract (they live in VRAM), at most the experts VRAM
does not hold. On a CPU device the same code runs without streams (tests drive the logic, with the
kernels under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..pack import format as fmt
from ..pack.index import PackedIndex
from ..pack.reader import ExpertWeights, decode_record
from ..quant import QTensor
from . import store as _store
from .store import ExpertStore, StoreStats

SLOT_ALIGN = 256


@dataclass
class TierCounters:
    """Lookups of the VRAM tier (cumulative)."""

    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass
class TierStats:
    """VRAM-tier transfer counters (cumulative); hits/misses in `vram`, the tiers below in `host.stats`."""

    evictions: int = 0
    h2d_bytes: int = 0
    demotions: int = 0  # exclusive: evicted records moved down into the host tier
    down_bytes: int = 0  # bytes copied out of VRAM slots for them
    demote_seconds: float = 0.0  # host time finishing them: event waits, copy into the store, checks
    direct_uploads: int = 0  # uploads straight from a page-locked host-tier buffer (no staging copy)
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


def simulate_tiers(policy: str, trace: list[list], n_slots: int, host_slots: int, exclusive: bool = True,
                   warmup: int = 0, scan_batch: int | None = None) -> dict:
    """Counters of the VRAM tier (`policy`, n_slots) over the host tier (LRU, host_slots records) on a
    trace of batches (lists of keys used together), in GpuExpertCache's order of operations: VRAM hits
    are touched in request order; for the misses, victims are chosen (never a key of the batch), the
    host tier is looked up (exclusive: hits are taken out; inclusive: marked recently used); the misses
    enter VRAM host hits first, then reads, in request order (the cache with one reader thread does the
    same), and as each slot is filled (exclusive) its victim moves down into the host tier, or
    (inclusive) the record read from disk is inserted there. Batches before `warmup` are not counted.
    scan_batch: batches of more keys are scans, as in GpuExpertCache (None: no batch is).
    Returns lookups, vram_hits, host_hits, disk_reads, demotions and the hit rates (combined: either tier)."""
    pol, where, host, free = POLICIES[policy](), set(), OrderedDict(), n_slots
    transient: OrderedDict = OrderedDict()
    n = {"lookups": 0, "vram_hits": 0, "host_hits": 0, "disk_reads": 0, "demotions": 0}

    def host_insert(key, evict: bool = True) -> bool:
        if host_slots <= 0 or (not evict and len(host) >= host_slots):
            return False
        host[key] = None
        host.move_to_end(key)
        while len(host) > host_slots:
            host.popitem(last=False)
        return True

    for i, batch in enumerate(trace):
        batch = list(dict.fromkeys(batch))
        count = i >= warmup
        scan = scan_batch is not None and len(batch) > scan_batch
        miss = []
        for key in batch:
            if key in where:
                pol.touch(key)
                n["vram_hits"] += count
                if not scan:
                    transient.pop(key, None)
            else:
                miss.append(key)
        n["lookups"] += count * len(batch)
        if not miss:
            continue
        if len(miss) > n_slots:
            raise ValueError(f"{len(miss)} misses in one batch, the VRAM tier holds {n_slots}")
        victims, protected, scan_down = {}, set(batch), set()  # miss -> the key evicted from the slot it gets
        for key in miss:
            if free:
                free -= 1
            else:
                old = next((k for k in reversed(transient) if k not in protected), None)
                if old is None:
                    old = pol.victim(protected)
                else:
                    del transient[old]
                    scan_down.add(old)
                pol.remove(old)
                where.discard(old)
                victims[key] = old
        up, read = [], []
        for key in miss:
            if key in host:
                if exclusive:
                    del host[key]
                else:
                    host.move_to_end(key)
                up.append(key)
            else:
                read.append(key)
        for key in [victims[k] for k in up + read if k in victims] if exclusive else read:
            # exclusive: a victim moves down as its slot is filled (a transient one only into free room);
            # inclusive: a read is kept in host RAM (a scan's only into free room, as ExpertStore does)
            kept = host_insert(key, evict=key not in scan_down if exclusive else not scan)
            n["demotions"] += count * (exclusive and kept)
        n["host_hits"] += count * len(up)
        n["disk_reads"] += count * len(read)
        for key in up + read:
            where.add(key)
            pol.touch(key)
            if scan:
                transient[key] = None
    looked = max(1, n["lookups"])
    n["vram_hit_rate"] = n["vram_hits"] / looked
    n["host_hit_rate"] = n["host_hits"] / max(1, n["lookups"] - n["vram_hits"])
    n["combined_hit_rate"] = (n["vram_hits"] + n["host_hits"]) / looked
    return n


def serial_default() -> bool:
    """FLASHMOE_CUDA_SERIAL=1: no overlap inside a batch (the A/B of what overlap buys, for benchmarks)."""
    return os.environ.get("FLASHMOE_CUDA_SERIAL", "0") == "1"


SERIAL_GROUP = 64  # serial mode: records read (and held) before their copies start


def pinned_default() -> bool:
    """FLASHMOE_CUDA_PINNED_HOST=0: the host tier's buffers stay pageable (copies go through staging)."""
    return os.environ.get("FLASHMOE_CUDA_PINNED_HOST", "1") != "0"


class CudaPin:
    """Registers host buffers with the CUDA driver in place (cudaHostRegister: page-locked), so uploads run
    from the host tier's own buffers and records moving down from VRAM land in them, with no host copy.
    A refused registration (a memory lock limit, say) leaves the buffer pageable, and the runtime's error it
    leaves behind is cleared: else the next kernel launch of the thread reports it as its own."""

    def __init__(self):
        try:
            self.rt = torch.cuda.cudart()
        except Exception:  # noqa: BLE001 (then every buffer goes through staging)
            self.rt = None

    def __call__(self, addr: int, nbytes: int) -> bool:
        try:
            ok = self.rt is not None and str(self.rt.cudaHostRegister(addr, nbytes, 0)) in ("0", "cudaError.success")
        except Exception:  # noqa: BLE001 (no such call in this torch build, or a driver refusal)
            ok = False
        if not ok and self.rt is not None:
            clear_cuda_error()
        return ok

    def unpin(self, addr: int) -> None:
        try:
            if str(self.rt.cudaHostUnregister(addr)) not in ("0", "cudaError.success"):
                clear_cuda_error()
        except Exception:  # noqa: BLE001
            pass


@functools.cache
def _cudart_lib():
    """The CUDA runtime library this process has loaded (found in /proc/self/maps), for cudaGetLastError,
    which torch.cuda.cudart() does not offer; None where there is none to find (a static runtime)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line}
        return ctypes.CDLL(sorted(paths)[0]) if paths else None
    except (OSError, IndexError):
        return None


def clear_cuda_error() -> None:
    """Resets the calling thread's last CUDA runtime error (cudaGetLastError), where the library is found."""
    lib = _cudart_lib()
    if lib is not None:
        lib.cudaGetLastError()


def verify_demotions_default() -> bool:
    """FLASHMOE_VERIFY_DEMOTIONS=1: xxhash64 check of every record moved down from VRAM (the tests set it)."""
    return os.environ.get("FLASHMOE_VERIFY_DEMOTIONS", "0") == "1"


def exclusive_default() -> bool:
    """The tiers' mode when GpuExpertCache is not told: exclusive unless FLASHMOE_CUDA_EXCLUSIVE=0."""
    return os.environ.get("FLASHMOE_CUDA_EXCLUSIVE", "1") != "0"


# ----------------------------------------------------------------------------------------- cache


def _record(w: ExpertWeights, nbytes: int) -> torch.Tensor:
    """The whole record (uint8 [nbytes]) behind weights decoded from one store buffer."""
    p = w.gate.weight if isinstance(w.gate, QTensor) else w.gate
    st = p.untyped_storage()
    if st.nbytes() < nbytes:
        raise RuntimeError(f"expert buffer of {st.nbytes()} bytes, the record has {nbytes}")
    return torch.empty(0, dtype=torch.uint8).set_(st, 0, (nbytes,))


def vram_auto_budget(device: torch.device) -> int:
    """The VRAM tier's "auto" budget: free device memory (after the resident weights) less a
    reserve of max(2 GiB, 10% of the card) for activations, KV cache and the allocator."""
    if device.type != "cuda":
        return 1 << 30
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(2 << 30, total // 10))


class GpuExpertCache:
    """Expert records of one packed model in VRAM slots, over a host-RAM ExpertStore (see module docstring)."""

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
        host_budget: int | str = "auto",
        exclusive: bool | None = None,
        serial: bool | None = None,
        verify_demotions: bool | None = None,
        scan_batch: int | None = None,
    ):
        from .runtime import parse_size

        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {sorted(POLICIES)}, got {policy!r}")
        self.index, self.device, self.verify_reads = index, torch.device(device), verify_reads
        self.record_bytes = index.layout.record_bytes
        self.slot_bytes = fmt.align_up(self.record_bytes, SLOT_ALIGN)
        self.budget = budget if budget == "auto" else parse_size(budget)
        self.host_budget = host_budget if host_budget == "auto" else parse_size(host_budget)
        self.policy = POLICIES[policy]()
        self.exclusive = exclusive_default() if exclusive is None else bool(exclusive)
        # serial: a batch's reads all complete before its first copy, and its copies before anything else
        # (the A/B of what overlapping reads with copies and kernels buys; FLASHMOE_CUDA_SERIAL=1)
        self.serial = serial_default() if serial is None else bool(serial)
        # a record moving down was checked when it was read from disk; checking it again on the way down
        # catches a slot-bookkeeping bug (tests turn it on), at ~0.6-0.8 ms of host time per 7.5 MiB record
        self.verify_demotions = verify_reads and (verify_demotions_default() if verify_demotions is None
                                                  else bool(verify_demotions))
        # the host tier and the SSD: checks files, reads (O_DIRECT with io="direct"), verifies, caches
        # page-locked host tier (CUDA; FLASHMOE_CUDA_PINNED_HOST=0: pageable buffers through the staging ring)
        pin = CudaPin() if self.device.type == "cuda" and pinned_default() else None
        self.host = ExpertStore(index, 0, io=io, threads=threads, verify_reads=verify_reads, device="cpu", pin=pin)
        self.host_note = ""
        self.vram = TierCounters()
        self.tier = TierStats()
        self.pool: torch.Tensor | None = None  # allocated on first use ("auto" sizes from free memory then)
        self.n_slots = 0
        self._where: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot
        self._free_slots: list[int] = []
        self._rows = {e["layer"]: i for i, e in enumerate(index.layers)}  # layer -> row of the slot map
        self._total = len(index.layers) * index.num_experts
        self._resident = None  # (slot map, table over every slot) once every expert is in VRAM
        # scans: a batch of more than scan_batch experts (a prefill's layer: nearly all of them) brings its
        # misses in as transient records, evicted before any other and moved down only into free host room
        self.scan_batch = max(16, index.num_experts // 4) if scan_batch is None else int(scan_batch)
        self._transient: OrderedDict = OrderedDict()  # (layer, expert) -> None, oldest first
        self._scan_down: set = set()  # transient records moving down now
        cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if cuda else None  # host -> VRAM copies
        self.down = torch.cuda.Stream(self.device) if cuda else None  # VRAM -> host copies (exclusive)
        self._staging = [torch.empty(self.record_bytes, dtype=torch.uint8, pin_memory=cuda)
                         for _ in range(max(1, staging))]
        self._stage_events: list = [None] * len(self._staging)  # the last copy into or out of each buffer
        self._stage_down: list = [None] * len(self._staging)  # key of a record moving down through it
        self._next_stage = 0

    @property
    def direct(self) -> bool:
        return self.host.direct

    @property
    def stats(self) -> StoreStats:
        """The runtime's view: hits/misses of the VRAM tier, disk reads of the host tier below it."""
        h = self.host.stats
        return StoreStats(self.vram.hits, self.vram.misses, h.bytes_read, h.read_seconds, h.reads,
                          h.verify_seconds, h.wait_seconds)

    def tier_stats(self) -> dict:
        """Cumulative counters per tier: vram (hits, misses, evictions, h2d bytes, records and bytes moved
        down), host (hits, misses: records read from disk; it is looked up on VRAM misses only), disk
        (bytes, reads, read seconds); combined_hit_rate = lookups served by VRAM or host RAM."""
        h = self.host.stats
        lookups = self.vram.hits + self.vram.misses
        return {
            "mode": "exclusive" if self.exclusive else "inclusive",
            "combined_hit_rate": (self.vram.hits + h.hits) / lookups if lookups else 0.0,
            "vram": {"hits": self.vram.hits, "misses": self.vram.misses, "hit_rate": self.vram.hit_rate,
                     "slots": self.n_slots, "slot_bytes": self.slot_bytes, "evictions": self.tier.evictions,
                     "h2d_bytes": self.tier.h2d_bytes, "direct_uploads": self.tier.direct_uploads,
                     "demotions": self.tier.demotions,
                     "down_bytes": self.tier.down_bytes, "demote_seconds": self.tier.demote_seconds,
                     "fetch_seconds": self.tier.fetch_seconds, "stage_wait_seconds": self.tier.stage_wait_seconds},
            "host": {"hits": h.hits, "misses": h.misses, "hit_rate": h.hit_rate,
                     "budget_bytes": self.host.cache_bytes, "cached_bytes": self.host.cached_bytes,
                     "pinned_buffers": len(self.host._pinned)},
            "disk": {"bytes": h.bytes_read, "reads": h.reads, "read_seconds": h.read_seconds,
                     "verify_seconds": h.verify_seconds, "wait_seconds": h.wait_seconds, "direct": self.host.direct},
        }

    def tier_report(self) -> str:
        t = self.tier_stats()
        v, h, d = t["vram"], t["host"], t["disk"]
        return (f"VRAM tier: {v['hits']} hits, {v['misses']} misses ({v['hit_rate'] * 100:.1f}% hit), "
                f"{v['slots']} slots ({v['slots'] * v['slot_bytes'] / 2**30:.2f} GiB), {v['evictions']} evictions, "
                f"{v['h2d_bytes'] / 1e9:.3f} GB host->device; {t['mode']} tiers, {v['demotions']} records moved "
                f"down ({v['down_bytes'] / 1e9:.3f} GB); VRAM + host {t['combined_hit_rate'] * 100:.1f}% hit\n"
                f"host tier: {h['hits']} hits, {h['misses']} misses ({h['hit_rate'] * 100:.1f}% hit), "
                f"{h['cached_bytes'] / 2**30:.2f} of {h['budget_bytes'] / 2**30:.2f} GiB used ({self.host_note})\n"
                f"disk: {d['bytes'] / 1e9:.3f} GB in {d['reads']} reads "
                f"({'O_DIRECT' if d['direct'] else 'page cache'})")

    # -- pool -----------------------------------------------------------------------------------
    def _alloc(self) -> None:
        total = len(self.index.layers) * self.index.num_experts
        want = vram_auto_budget(self.device) if self.budget == "auto" else self.budget
        self.n_slots = max(1, min(total, int(want) // self.slot_bytes))  # at least one slot to stage through
        self.pool = torch.empty(self.n_slots, self.slot_bytes, dtype=torch.uint8, device=self.device)
        self._free_slots = list(range(self.n_slots - 1, -1, -1))
        host, self.host_note = self.host_budget, "set"
        if host == "auto":  # what VRAM holds needs no host copy; more than the rest is of no use
            rest = max(0, total - self.n_slots) * self.host.read_bytes
            mode = getattr(self.host, "io_mode", "direct" if self.host.direct else "os")
            host, self.host_note = _store.auto_cache_budget(0, rest, mode)  # resident weights live in VRAM
        self.host.cache_bytes = int(host)

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
        if self.side is not None:
            self.side.synchronize()
            self.down.synchronize()
        self.host.close()
        self._where.clear()
        self._transient.clear()
        self._resident = None
        self.pool = None

    # -- lookups ----------------------------------------------------------------------------------
    def slots(self, layer: int, experts: list[int]) -> list[int]:
        """Make `experts` of `layer` resident and return their slots (in order). Work queued after
        this on the current stream sees the data. At most `capacity` distinct experts per call."""
        if layer not in self.host._fds:
            raise KeyError(f"layer {layer} has no expert file in {self.index.path}")
        experts = list(dict.fromkeys(experts))
        if len(experts) > self.capacity:
            raise ValueError(f"{len(experts)} experts in one batch, the VRAM cache holds {self.n_slots}")
        batch = {(layer, e) for e in experts}
        scan = len(experts) > self.scan_batch
        missing = []
        for e in experts:
            if not 0 <= e < self.index.num_experts:
                raise IndexError(f"expert {e} out of range (layer {layer} has {self.index.num_experts})")
            if (layer, e) in self._where:
                self.vram.hits += 1
                self.policy.touch((layer, e))
                if not scan:  # used outside a scan: an ordinary record from now on
                    self._transient.pop((layer, e), None)
            else:
                self.vram.misses += 1
                missing.append(e)
        if missing:
            self._fetch(layer, missing, batch, scan)
        return [self._where[(layer, e)] for e in experts]

    def resident_map(self):
        """(slot_map int32 [layers, experts] on the device, ExpertTable over every slot) when every
        expert of the model is in VRAM, else None. Nothing is evicted then, so a decode step can map
        router ids to slots on the device (`slot_map[row(layer)][ids]`) with no host sync."""
        if len(self._where) != self._total or self.pool is None:
            return None
        if self._resident is None:
            smap = torch.full((len(self._rows), self.index.num_experts), -1, dtype=torch.int32)
            for (layer, e), s in self._where.items():
                smap[self._rows[layer], e] = s
            self._resident = (smap.to(self.device), self.table(list(range(self.n_slots))))
        return self._resident

    def row(self, layer: int) -> int:
        return self._rows[layer]

    def _take_slot(self, protected: set) -> tuple[int, tuple[int, int] | None]:
        """A free slot, or the newest transient record's (one a scan brought in and nothing used since,
        most recent first: a cyclic scan keeps a fixed set), or the policy's victim's: (slot, evicted key
        or None)."""
        if self._free_slots:
            return self._free_slots.pop(), None
        old = next((k for k in reversed(self._transient) if k not in protected), None)
        if old is None:
            old = self.policy.victim(protected)
        else:
            del self._transient[old]
            self._scan_down.add(old)  # moves down (exclusive) only into free host room
        self.policy.remove(old)
        self.tier.evictions += 1
        return self._where.pop(old), old

    def _fetch(self, layer: int, experts: list[int], batch: set, scan: bool = False) -> None:
        """VRAM misses from the host tier (hits first, then disk reads as they complete): each
        record is copied into a pinned staging buffer and from there to its slot on the side stream.
        scan: the records come in as transient (see __init__): a scan through more experts than the tiers
        hold then keeps what they held (a cyclic scan under LRU would replace everything and hit nothing).
        Exclusive: the records leave the host tier, and each victim moves down into it just before its
        slot is overwritten (after the host-tier lookups, so a victim never pushes out a record this
        batch takes; interleaved with the reads, so the host work of moving down overlaps them)."""
        t0 = time.perf_counter()
        if self.side is not None:
            if self.exclusive:  # copies out of a slot start after its upload, not after queued kernels
                self.down.wait_stream(self.side)
            # copies in start after every kernel already queued (it may read an evicted slot)
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            if self.serial:  # no kernel runs beside this batch's reads and copies
                torch.cuda.current_stream(self.device).synchronize()
        slots, victims = {}, {}  # victims: slot -> the key evicted from it
        for e in experts:
            slots[e], old = self._take_slot(batch)
            if old is not None:
                victims[slots[e]] = old
        if not (self.exclusive and self.host.cache_bytes >= self.host.read_bytes):
            victims = {}  # inclusive, or no host tier: evicted records are dropped
        done = []
        # serial holds every record of a group in host RAM until the group's reads are done: groups of at
        # most SERIAL_GROUP records (a prefill's 512 at once ran a 5.2 GB cgroup out of memory on the H200)
        step = SERIAL_GROUP if self.serial else len(experts)
        records = None
        try:
            for g in range(0, len(experts), step):
                group = experts[g : g + step]
                # raises FormatError naming the record
                records = self.host.stream(layer, group, keep=not self.exclusive, hold=self.serial, scan=scan)
                first = next(records)  # the host tier's lookups are done (exclusive: hits taken), reads started
                if self.serial:  # every read done first; the generator stays open, so held buffers stay valid
                    rest = [next(records) for _ in range(len(group) - 1)]
                else:
                    rest = records
                for e, w in itertools.chain([first], rest):
                    s = slots[e]
                    old = victims.pop(s, None)
                    self._copy(_record(w, self.record_bytes), s, after=None if old is None else self._demote(old, s))
                    done.append(e)
                    if old is not None:  # moves whose copy is done, while the next reads are in flight
                        self._finish_demotions(ready_only=True)
                self._finish_demotions()  # none pending after a group: a key is never in both tiers
                records.close()
        except BaseException:
            self._free_slots += [slots[e] for e in experts]  # nothing of a failed batch is cached
            self._stage_down = [None] * len(self._staging)  # nor moved down (the events still guard the buffers)
            raise
        finally:
            if records is not None:
                records.close()
            self._scan_down.clear()  # every move down of the batch is done (or abandoned with it)
        self._resident = None
        for e in done:
            self._where[(layer, e)] = slots[e]
            self.policy.touch((layer, e))
            if scan:
                self._transient[(layer, e)] = None
        if self.side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            if self.serial:
                self.side.synchronize()
        self.tier.fetch_seconds += time.perf_counter() - t0

    def _stage(self) -> int:
        """The next pinned staging buffer, once the last copy into or out of it is done and a record
        moving down through it has reached the host tier."""
        b = self._next_stage
        self._next_stage = (b + 1) % len(self._staging)
        ev = self._stage_events[b]
        if ev is not None:
            w0 = time.perf_counter()
            ev.synchronize()
            self.tier.stage_wait_seconds += time.perf_counter() - w0
            self._stage_events[b] = None
        if self._stage_down[b] is not None:
            key, self._stage_down[b] = self._stage_down[b], None
            self._put_down(key, self._staging[b])
        return b

    def _copy(self, src: torch.Tensor, slot: int, after=None) -> None:
        """Host record (store buffer) -> pinned staging -> (side stream, after event `after`: the copy
        out of the slot) VRAM slot."""
        addr = src.data_ptr()
        if self.side is None:
            self.pool[slot, : self.record_bytes].copy_(src)
        elif self.host.is_pinned(addr):  # straight from the host tier's page-locked buffer
            busy = self.host.busy(addr)
            if busy is not None:  # a copy down from VRAM into it is still in flight
                self.side.wait_event(busy)
            if after is not None:
                self.side.wait_event(after)
            with torch.cuda.stream(self.side):
                self.pool[slot, : self.record_bytes].copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.side)
            self.host.guard(addr, ev)  # the buffer is not reused before the upload is done
            self.tier.direct_uploads += 1
        else:
            b = self._stage()
            stage = self._staging[b]
            stage.copy_(src)
            if after is not None:  # the slot's previous record is being copied out: overwrite it after that
                self.side.wait_event(after)
            with torch.cuda.stream(self.side):
                self.pool[slot, : self.record_bytes].copy_(stage, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.side)
            self._stage_events[b] = ev
        self.tier.h2d_bytes += self.record_bytes

    def _demote(self, key: tuple[int, int], slot: int):
        """Exclusive: the record `key` evicted from `slot` moves down into the host tier before the slot is
        overwritten. CPU: at once. CUDA: slot -> pinned staging on the down stream; returns the copy's
        event, which the upload into the slot waits for on the side stream (nothing else does); the host
        tier gets the record in _stage / _finish_demotions."""
        if self.side is None:
            self._put_down(key, self.pool[slot, : self.record_bytes])
            return None
        if self.host.pinning:  # page-locked host tier: slot -> a host-tier buffer directly, no host copy
            t0 = time.perf_counter()
            evict = key not in self._scan_down
            self._scan_down.discard(key)
            buf = self.host.take_buffer(evict)
            if buf is None:  # no room (a transient record) or no host tier: dropped
                return None
            dst = torch.frombuffer(buf, dtype=torch.uint8)
            if self.host.is_pinned(dst.data_ptr()):
                with torch.cuda.stream(self.down):
                    dst[: self.record_bytes].copy_(self.pool[slot, : self.record_bytes], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self.down)
                del dst
                self._moved_down(self.host.adopt(key[0], key[1], buf, verify=self.verify_demotions, event=ev), t0)
                return ev
            del dst  # the driver refused to register it: through staging, the buffer back
            self.host._free_buf(buf)
            if not evict:
                self._scan_down.add(key)
        b = self._stage()
        with torch.cuda.stream(self.down):
            self._staging[b].copy_(self.pool[slot, : self.record_bytes], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.down)
        self._stage_events[b], self._stage_down[b] = ev, key
        return ev

    def _finish_demotions(self, ready_only: bool = False) -> None:
        """Records moving down reach the host tier, oldest first (the host LRU order is the eviction order;
        the ring hands buffers out in that order): all of them, or (ready_only) those whose copy is done."""
        n = len(self._staging)
        for i in range(n):
            b = (self._next_stage + i) % n
            if self._stage_down[b] is not None:
                if ready_only and not self._stage_events[b].query():
                    return
                w0 = time.perf_counter()
                self._stage_events[b].synchronize()
                self.tier.stage_wait_seconds += time.perf_counter() - w0
                self._stage_events[b] = None
                key, self._stage_down[b] = self._stage_down[b], None
                self._put_down(key, self._staging[b])

    def _put_down(self, key: tuple[int, int], record: torch.Tensor) -> None:
        """A record evicted from VRAM (its bytes on the host now) into the host tier: copied into a store
        buffer and, with verify_demotions, checked against the index's xxhash64 again (a wrong slot or a
        copy still in flight would fail loudly here, not as garbage tokens later)."""
        t0 = time.perf_counter()
        evict = key not in self._scan_down
        self._scan_down.discard(key)
        self._moved_down(self.host.put(key[0], key[1], record, verify=self.verify_demotions, evict=evict), t0)

    def _moved_down(self, kept: bool, t0: float) -> None:
        """Counters of one move down (kept: the host tier took the record), host time since t0."""
        if kept:
            self.tier.demotions += 1
            self.tier.down_bytes += self.record_bytes
        self.tier.demote_seconds += time.perf_counter() - t0

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
    aligned = pool.data_ptr() % 16 == 0 and (slot_bytes // 4) % 4 == 0 and all(c % 4 == 0 for c in comp[:3])
    return ExpertTable(pool.view(torch.int32), pool.view(sdt), offs, bits, group_size, hidden, inter, aligned)
