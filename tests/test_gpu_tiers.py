"""Exclusive VRAM / host-RAM expert tiers (engine/gpu_cache.py): disjoint tiers, records moved down are the
checked bytes from disk, counters that add up and equal the two-tier simulator's, the same tokens as the
inclusive pair. On a machine without CUDA the cache runs on CPU tensors and the Triton kernels in the
interpreter (TRITON_INTERPRET=1), as in test_cuda_backend.py."""

from __future__ import annotations

import os
import random

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flashmoe_pack  # noqa: E402
from flashmoe_pack.backends.cuda import CudaExperts  # noqa: E402
from flashmoe_pack.engine.gpu_cache import GpuExpertCache, simulate_tiers  # noqa: E402
from flashmoe_pack.pack import FormatError, load_index  # noqa: E402
from flashmoe_pack.pack import format as fmt  # noqa: E402
from flashmoe_pack.pack.reader import read_record  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
PROMPT = [7, 1, 200, 45, 9, 9, 31, 100, 2, 255, 17]


def cache(ix, slots: int, host: int, **kw) -> GpuExpertCache:
    """`slots` VRAM slots over a host tier of `host` records; one reader thread, so records arrive in
    request order and the VRAM tier's recency order is the simulator's."""
    return GpuExpertCache(ix, slots * fmt.align_up(ix.layout.record_bytes, 256), device=DEV, threads=1,
                          host_budget=host * fmt.align_up(ix.layout.record_bytes, 4096), **kw)


def trace(ix, n: int, seed: int) -> list[tuple[int, list[int]]]:
    """Batches of 1-3 distinct experts of one layer, skewed to the low expert ids (they come back)."""
    rng = random.Random(seed)
    layers = [e["layer"] for e in ix.layers]
    out = []
    for _ in range(n):
        k = rng.randint(1, 3)
        experts = list(dict.fromkeys(min(int(rng.expovariate(0.35)), ix.num_experts - 1) for _ in range(k)))
        out.append((rng.choice(layers), experts))
    return out


def host_record(c: GpuExpertCache, key) -> torch.Tensor:
    w = c.host._cache[key].weights
    return w.gate.weight.untyped_storage()  # the store buffer behind the decoded views


@pytest.mark.parametrize("policy,exclusive,serial", [("lru", True, False), ("lru", False, False), ("lfu", True, False),
                                                     ("lfu", False, False), ("lfu", True, True), ("lru", False, True)])
def test_tiers_follow_the_simulator(packed4, policy, exclusive, serial):
    """A random sequence of fetches and evictions: (i) exclusive: no expert in both tiers after any call;
    (iii) every counter adds up and equals simulate_tiers on the same trace (both modes, both policies, and
    serial: every read of a batch done before its first copy); every VRAM slot and host record holds the
    bytes on disk."""
    ix = load_index(packed4)
    c = cache(ix, slots=5, host=6, policy=policy, exclusive=exclusive, serial=serial)
    t = trace(ix, 150, seed=1)
    for layer, experts in t:
        c.slots(layer, experts)
        both = set(c._where) & set(c.host._cache)
        if exclusive:
            assert not both, both
        assert len(c._where) <= 5 and c.host.cached_bytes <= c.host.cache_bytes
    sim = simulate_tiers(policy, [[(layer, e) for e in experts] for layer, experts in t], 5, 6, exclusive)
    s = c.tier_stats()
    v, h, d = s["vram"], s["host"], s["disk"]
    lookups = sum(len(x) for _, x in t)
    assert v["hits"] + v["misses"] == lookups == sim["lookups"]
    assert (v["hits"], h["hits"], d["reads"]) == (sim["vram_hits"], sim["host_hits"], sim["disk_reads"])
    assert h["hits"] + h["misses"] == v["misses"]  # the host tier is looked up on VRAM misses only
    assert d["reads"] == h["misses"] and d["bytes"] == d["reads"] * c.host.read_bytes
    assert v["h2d_bytes"] == v["misses"] * c.record_bytes
    assert v["evictions"] == v["misses"] - 5  # every miss after the first five takes a slot
    assert v["demotions"] == (v["evictions"] if exclusive else 0) == sim["demotions"]
    assert v["down_bytes"] == v["demotions"] * c.record_bytes
    assert s["combined_hit_rate"] == pytest.approx(sim["combined_hit_rate"])
    if exclusive:  # a full host tier: 6 of the demoted records, the most recent
        assert len(c.host._cache) == 6
    for (layer, e), slot in c._where.items():
        assert torch.equal(c.pool[slot, : c.record_bytes].cpu(), read_record(ix, layer, e))
    for layer, e in c.host._cache:
        raw = torch.empty(0, dtype=torch.uint8).set_(host_record(c, (layer, e)), 0, (c.record_bytes,))
        assert torch.equal(raw, read_record(ix, layer, e))
    c.close()


class FakeEvent:
    """A CUDA event on CPU tensors, where copies are done when issued; query() says "not yet" every other
    time, so the cache's "finish what is ready" path runs both ways."""

    calls = 0
    never_ready = False  # the moves down are then all finished at the end of the batch

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        assert self.recorded

    def query(self):
        FakeEvent.calls += 1
        return FakeEvent.calls % 2 == 0 and not FakeEvent.never_ready


class FakeStream:
    def __init__(self):
        self.waited: list = []

    def wait_stream(self, other):
        pass

    def wait_event(self, ev):
        assert ev.recorded
        self.waited.append(ev)

    def synchronize(self):
        pass


@pytest.mark.skipif(CUDA, reason="the real streams run in the other tests on CUDA")
@pytest.mark.parametrize("staging,serial,pinned", [(1, False, False), (3, False, False), (3, True, False),
                                                   (3, False, True), (1, True, True)])
def test_stream_path_bookkeeping(packed4, monkeypatch, staging, serial, pinned):
    """The CUDA code path (staging ring shared by copies in and out, records moving down through pinned
    buffers, per-slot waits) with stand-in streams and events on CPU: a staging buffer reused before its
    record reached the host tier would hand over the wrong bytes and fail the check on the way down; the
    host tier's order must still be the simulator's; every upload into an evicted slot waits for its copy out.
    pinned: a page-locked host tier (registration stood in for), copies straight to and from its buffers."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    ix = load_index(packed4)
    c = cache(ix, slots=5, host=6, policy="lru", exclusive=True, staging=staging, serial=serial)
    c.side, c.down = FakeStream(), FakeStream()
    if pinned:
        c.host._pin = lambda addr, nbytes: True
    t = trace(ix, 120, seed=2) + [(layer, list(range(5))) for layer in (0, 1, 2)]  # 5 victims in one batch
    for layer, experts in t:
        c.slots(layer, experts)
        assert not set(c._where) & set(c.host._cache) and not any(c._stage_down)
    sim = simulate_tiers("lru", [[(layer, e) for e in experts] for layer, experts in t], 5, 6, True)
    v, h = c.tier_stats()["vram"], c.tier_stats()["host"]
    assert (v["hits"], h["hits"], v["demotions"]) == (sim["vram_hits"], sim["host_hits"], sim["demotions"])
    if pinned:  # also waits for copies down into a buffer that goes back up; no staging buffer used
        assert len(c.side.waited) >= v["demotions"] > 0 and c.tier.direct_uploads == v["misses"]
        assert not any(c._stage_events) and c.host._busy
    else:
        assert len(c.side.waited) == v["demotions"] > 0 and c.tier.direct_uploads == 0
    for (layer, e), slot in c._where.items():
        assert torch.equal(c.pool[slot, : c.record_bytes], read_record(ix, layer, e))
    for key in c.host._cache:
        raw = torch.empty(0, dtype=torch.uint8).set_(host_record(c, key), 0, (c.record_bytes,))
        assert torch.equal(raw, read_record(ix, *key))
    (vl, ve), new = next(iter(c.policy._order)), next(k for k in [(3, e) for e in range(8)] if k not in c._where)
    c.pool[c._where[(vl, ve)], 9] ^= 0xFF  # the LRU victim of the next batch: its move down fails
    monkeypatch.setattr(FakeEvent, "never_ready", True)
    with pytest.raises(FormatError, match=rf"layer {vl} expert {ve}: checksum mismatch"):
        c.slots(new[0], [new[1]])
    assert len(c._where) + len(c._free_slots) == 5 and not any(c._stage_down)  # no slot lost, nothing pending
    c.slots(new[0], [new[1]])
    c.close()


def test_demoted_record_is_the_checked_record(packed4):
    """(ii) A record evicted from VRAM moves down with the bytes read from disk, comes back up from host RAM
    without a disk read, and a slot whose bytes went wrong fails its check on the way down (naming it)."""
    ix = load_index(packed4)
    c = cache(ix, slots=2, host=4)
    c.slots(1, [3])
    c.slots(1, [4])
    c.slots(2, [5])  # evicts (1, 3): it moves down
    assert (1, 3) not in c._where and list(c.host._cache) == [(1, 3)]
    raw = torch.empty(0, dtype=torch.uint8).set_(host_record(c, (1, 3)), 0, (c.record_bytes,))
    assert torch.equal(raw, read_record(ix, 1, 3))
    reads = c.host.stats.reads
    s = c.slots(1, [3])[0]  # back up: a host hit, taken out of host RAM; (1, 4) moves down
    assert c.host.stats.reads == reads and c.host.stats.hits == 1 and list(c.host._cache) == [(1, 4)]
    assert torch.equal(c.pool[s, : c.record_bytes].cpu(), read_record(ix, 1, 3))
    c.pool[c._where[(2, 5)], 7] ^= 0xFF  # a slot corrupted while in VRAM (or a wrong slot moved down)
    if CUDA:  # the copy out waits for the slot's upload only, not for work on the current stream
        torch.cuda.synchronize()
    with pytest.raises(FormatError, match=r"layer 2 expert 5: checksum mismatch"):
        c.slots(0, [0])
    assert (2, 5) not in c.host._cache and len(c._where) + len(c._free_slots) == 2  # no slot lost
    c.slots(0, [0])
    c.close()
    for kw in ({"verify_reads": False}, {"verify_demotions": False}):  # no check asked: moved down as is
        c = cache(ix, slots=2, host=4, **kw)
        c.slots(0, [0, 1])
        c.pool[c._where[(0, 0)], 7] ^= 0xFF
        if CUDA:
            torch.cuda.synchronize()
        c.slots(0, [2])
        assert c.tier.demotions == 1 and (0, 0) in c.host._cache
        c.close()


def test_scans_keep_what_the_tiers_hold(packed4):
    """A prefill asks each layer for (nearly) every expert, in layer order: a cyclic scan through more records
    than VRAM + host hold. Under LRU it replaces everything before reuse and hits nothing; scan batches
    bring records in as transient ones (evicted newest first, moved down only into free host room), so the
    tiers keep most of what they held. Records used outside a scan become ordinary."""
    ix = load_index(packed4)
    layers, n = [e["layer"] for e in ix.layers], ix.num_experts
    assert len(layers) * n == 32  # 16 VRAM slots + 8 host records hold 24 of them

    def scans(c, times: int) -> list[int]:
        reads = []
        for _ in range(times):
            r0 = c.host.stats.reads
            for layer in layers:
                slots = c.slots(layer, list(range(n)))
                for e, s in zip(range(n), slots, strict=True):  # every record where the cache says
                    assert torch.equal(c.pool[s, : c.record_bytes].cpu(), read_record(ix, layer, e))
            reads.append(c.host.stats.reads - r0)
        return reads

    c = cache(ix, slots=16, host=8, scan_batch=n + 1)  # no batch is a scan: LRU in both tiers
    assert scans(c, 3)[1:] == [32, 32]
    c.close()
    c = cache(ix, slots=16, host=8, scan_batch=4)
    got = scans(c, 4)
    assert got[0] == 32 and sum(got[1:]) <= 3 * 16 and min(got[1:]) == 8, got  # 8: the least possible
    assert not set(c._where) & set(c.host._cache) and len(c._transient) == 16
    kept = next(iter(c._transient))
    c.slots(kept[0], [kept[1]])  # used by a decode step: ordinary now, never a transient victim
    assert kept not in c._transient and len(c._transient) == 15
    c.close()
    # scans between decode batches: every counter equals simulate_tiers' (LRU and LFU)
    t = [(layer, list(range(n))) for layer in layers] + trace(ix, 40, seed=5)
    t += [(layer, list(range(n))) for layer in layers] + trace(ix, 40, seed=6)
    for policy, exclusive in (("lru", True), ("lfu", True), ("lru", False)):
        c = cache(ix, slots=16, host=8, scan_batch=4, policy=policy, exclusive=exclusive)
        for layer, experts in t:
            c.slots(layer, experts)
        sim = simulate_tiers(policy, [[(layer, e) for e in ex] for layer, ex in t], 16, 8, exclusive, scan_batch=4)
        got = (c.vram.hits, c.host.stats.hits, c.host.stats.reads, c.tier.demotions)
        assert got == (sim["vram_hits"], sim["host_hits"], sim["disk_reads"], sim["demotions"]), (policy, got, sim)
        c.close()


def test_serial_reads_in_bounded_groups(packed4, monkeypatch):
    """Serial mode holds the records of a group until its reads are done: a big batch goes in groups of at
    most SERIAL_GROUP, each right where the cache says."""
    from flashmoe_pack.engine import gpu_cache

    monkeypatch.setattr(gpu_cache, "SERIAL_GROUP", 2)
    ix = load_index(packed4)
    c = cache(ix, slots=8, host=8, serial=True)
    sizes, stream = [], c.host.stream
    monkeypatch.setattr(c.host, "stream", lambda layer, ex, **kw: sizes.append(len(ex)) or stream(layer, ex, **kw))
    slots = c.slots(1, [0, 1, 2, 3, 4])
    assert sizes == [2, 2, 1]
    for e, s in zip(range(5), slots, strict=True):
        assert torch.equal(c.pool[s, : c.record_bytes].cpu(), read_record(ix, 1, e))
    c.close()


def test_no_host_budget_moves_nothing_down(packed4):
    ix = load_index(packed4)
    c = cache(ix, slots=1, host=0)
    for e in (0, 1, 0):
        c.slots(3, [e])
    assert c.tier.evictions == 2 and c.tier.demotions == 0 and c.tier.down_bytes == 0 and c.host.stats.reads == 3
    c.close()


def test_mode_from_environment(packed4, monkeypatch):
    ix = load_index(packed4)
    monkeypatch.setenv("FLASHMOE_CUDA_EXCLUSIVE", "0")
    assert not cache(ix, 1, 1).exclusive and cache(ix, 1, 1, exclusive=True).exclusive
    monkeypatch.delenv("FLASHMOE_CUDA_EXCLUSIVE")
    c = cache(ix, 1, 1)
    assert c.exclusive and "exclusive tiers" in c.tier_report()


def load(path, exclusive: bool, slots: int, host: int):
    """The tiny model with CudaExperts over `slots` VRAM slots and `host` host records."""
    if CUDA:
        m = flashmoe_pack.load(path, device="cuda", dtype=torch.float32)
    else:
        m = flashmoe_pack.load(path, device="cpu", dtype=torch.float32)
    m.store.close()
    m.store = cache(m.index, slots, host, exclusive=exclusive)
    m.experts = m.model.experts = CudaExperts(m.store)
    return m


def test_exclusive_decode_equals_inclusive(packed4):
    """(iv) The same logits and greedy tokens in both modes, with 4 slots (a prompt's layer needs up to all
    8 experts: chunks, constant eviction) over a host tier of 6 records."""
    a, b = load(packed4, True, 4, 6), load(packed4, False, 4, 6)
    assert torch.equal(a.logits(PROMPT), b.logits(PROMPT))
    ga = list(a.generate_ids(PROMPT, max_tokens=6, stop_ids=()))
    gb = list(b.generate_ids(PROMPT, max_tokens=6, stop_ids=()))
    assert ga == gb
    ta, tb = a.store.tier_stats(), b.store.tier_stats()
    assert ta["vram"]["demotions"] > 0 and tb["vram"]["demotions"] == 0
    assert ta["host"]["hits"] > 0  # records moved down came back up from host RAM
    assert ta["vram"]["hits"] + ta["vram"]["misses"] == tb["vram"]["hits"] + tb["vram"]["misses"]
    assert not set(a.store._where) & set(a.store.host._cache)
    a.close()
    b.close()


def test_simulator_uniform_routing():
    """Uniform routing: any policy keeps about capacity / experts; exclusive tiers add up their capacities
    (VRAM 1/5 + host 1/5 = 40%), inclusive ones mostly duplicate (well under that)."""
    rng = random.Random(0)
    n, k, layers = 100, 4, 3
    t = [[(layer, e) for e in rng.sample(range(n), k)] for _ in range(1500) for layer in range(layers)]
    slots = n * layers // 5
    ex = simulate_tiers("lru", t, slots, slots, True, warmup=300)
    inc = simulate_tiers("lru", t, slots, slots, False, warmup=300)
    assert ex["vram_hit_rate"] == pytest.approx(0.2, abs=0.02)
    assert ex["combined_hit_rate"] == pytest.approx(0.4, abs=0.02)
    assert inc["combined_hit_rate"] < ex["combined_hit_rate"] - 0.08
    with pytest.raises(ValueError, match="holds 2"):
        simulate_tiers("lru", [[1, 2, 3]], 2, 2)
