"""The expert store's I/O engine: streaming order, overlap, bounded buffers, the cache budget,
error paths, and peak memory of a whole generation measured in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from flashmoe_pack.engine.moe import StreamedExperts
from flashmoe_pack.engine.store import ExpertStore
from flashmoe_pack.pack import FormatError, load_index
from flashmoe_pack.pack import format as fmt
from flashmoe_pack.quant import dequantize


def _load_make_synthetic():
    from scriptload import load_script  # tests/ is on sys.path under pytest

    return load_script("make_synthetic")


ms = _load_make_synthetic()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Tiny geometry with 16 experts per layer (4-bit, fp16 scales)."""
    cfg = ms.text_config("tiny")
    cfg["num_experts"] = 16
    return ms.write(tmp_path_factory.mktemp("store") / "m", cfg, seed=3, progress=False)


class SlowStore(ExpertStore):
    """Reads take delays[e] seconds and are logged; counts buffers and concurrent reads."""

    def __init__(self, *a, delays=None, **kw):
        super().__init__(*a, **kw)
        self.delays, self.log, self.allocated, self.active, self.max_active = delays or {}, [], 0, 0, 0
        self._count = threading.Lock()

    def _acquire(self):
        with self._lock:
            fresh = not self._free
        if fresh:
            self.allocated += 1
        return super()._acquire()

    def _read(self, layer, expert, buf):
        with self._count:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delays.get(expert, 0.0))
        try:
            return super()._read(layer, expert, buf)
        finally:
            with self._count:
                self.active -= 1
            self.log.append(("done", expert, time.perf_counter()))


def _ref(ix, layer, e):
    from flashmoe_pack.pack.reader import decode_record, read_record

    return dequantize(decode_record(read_record(ix, layer, e), ix).down)


def test_stream_hits_first_then_completion_order(small):
    ix = load_index(small)
    st = SlowStore(ix, cache_bytes=1 << 30, threads=4, delays={5: 0.3, 6: 0.0, 7: 0.1})
    st.get(0, [1, 2])
    order = [e for e, _ in st.stream(0, [5, 6, 7, 1, 2])]
    assert order[:2] == [1, 2] and order[2:] == [6, 7, 5]
    st.close()


def test_scan_keeps_what_the_cache_holds(small):
    """A prefill streams (nearly) every expert of each layer in turn: a cyclic scan through more records than
    the cache holds. Scans cache reads only into free room, so the next scan hits what the cache held; LRU
    would have replaced it all before reuse."""
    ix = load_index(small)
    layers, n = [e["layer"] for e in ix.layers], ix.num_experts
    rb = fmt.align_up(ix.layout.record_bytes, 4096)
    for scan_batch, want in ((n + 1, [len(layers) * n] * 3), (n - 1, [len(layers) * n] + [len(layers) * n - 12] * 2)):
        st = ExpertStore(ix, cache_bytes=12 * rb, threads=1, scan_batch=scan_batch)
        reads = []
        for _ in range(3):
            r0 = st.stats.reads
            for layer in layers:
                got = dict(st.stream(layer, list(range(n))))
                assert torch.equal(dequantize(got[n - 1].down), _ref(ix, layer, n - 1))
            reads.append(st.stats.reads - r0)
        assert reads == want and st.cached_bytes == 12 * rb, (scan_batch, reads)
        dict(st.stream(layers[-1], [0]))  # not a scan: LRU as before (evicts the oldest, inserts the read)
        assert (layers[-1], 0) in st._cache and st.cached_bytes == 12 * rb
        st.close()


def test_compute_starts_before_all_reads_finish(small):
    ix = load_index(small)
    st = SlowStore(ix, cache_bytes=0, threads=4, delays={0: 0.0, 1: 0.5, 2: 0.5})
    t_first = None
    for e, w in st.stream(0, [0, 1, 2]):
        if t_first is None:
            t_first = time.perf_counter()
            assert torch.equal(dequantize(w.down), _ref(ix, 0, e))
    slow_done = min(t for what, e, t in st.log if e in (1, 2))
    assert t_first < slow_done
    st.close()


def test_inflight_reads_and_buffers_are_bounded(small):
    """16 misses through a window of 3: never more than 3 reads at once, 3 buffers allocated,
    and later streams reuse them (no new allocation)."""
    ix = load_index(small)
    st = SlowStore(ix, cache_bytes=0, threads=8, inflight=3, delays={e: 0.01 for e in range(16)})
    for e, w in st.stream(1, list(range(16))):
        assert torch.equal(dequantize(w.down), _ref(ix, 1, e))
    assert st.max_active <= 3 and st.allocated <= 3
    assert len(list(st.stream(2, list(range(16))))) == 16
    assert st.allocated <= 3 and st.stats.misses == 32
    st.close()


def test_cache_budget_is_enforced_and_evicted_buffers_reused(small):
    ix = load_index(small)
    budget = 5 * fmt.align_up(ix.layout.record_bytes, 4096)
    st = SlowStore(ix, cache_bytes=budget, threads=2, inflight=2)
    for layer in range(4):
        for _ in st.stream(layer, list(range(16))):
            assert st.cached_bytes <= budget
    assert len(st._cache) == 5 and st.allocated <= 5 + 2
    before = st.stats.hits
    list(st.stream(3, [15, 14, 13]))  # the last five of layer 3 are cached
    assert st.stats.hits - before == 3
    st.close()


def test_get_results_stay_valid_while_held(small):
    """get() hands out weights the store never overwrites, even when they are evicted."""
    ix = load_index(small)
    st = ExpertStore(ix, cache_bytes=2 * fmt.align_up(ix.layout.record_bytes, 4096), threads=2, inflight=2)
    held = st.get(0, [3, 4])
    for layer in range(4):
        list(st.stream(layer, list(range(16))))
    assert torch.equal(dequantize(held[3].down), _ref(ix, 0, 3))
    assert torch.equal(dequantize(held[4].down), _ref(ix, 0, 4))
    st.close()


def test_abandoned_stream_and_corrupt_record(small, tmp_path):
    import shutil

    d = shutil.copytree(small, tmp_path / "bad")
    ix = load_index(d)
    with open(d / fmt.expert_file_name(1), "r+b") as f:
        f.seek(fmt.expert_offset(9, ix.layout.stride) + 10)
        f.write(b"\xff\xff")
    st = ExpertStore(ix, cache_bytes=1 << 20, threads=2, inflight=3)
    it = st.stream(0, list(range(16)))
    next(it)
    it.close()  # reads in flight finish, buffers come back
    assert all(e.leases == 0 for e in st._cache.values())
    with pytest.raises(FormatError, match=r"layer_001\.bin: layer 1 expert 9: checksum mismatch"):
        list(st.stream(1, list(range(16))))
    assert len(list(st.stream(2, list(range(16))))) == 16  # still usable
    st.close()


def test_sum_order_does_not_depend_on_read_order(small):
    """Expert outputs are summed in expert-id order whatever order reads complete in."""
    from flashmoe_pack.backends import get_kernel

    ix = load_index(small)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 9], [3, 9], [12, 0], [7, 3], [9, 12]])
    w = torch.rand(5, 2).to(torch.bfloat16)
    outs = []
    for delays, overlap in (({0: 0.2, 3: 0.1}, True), ({9: 0.2, 12: 0.1, 7: 0.05}, True), ({}, False)):
        st = SlowStore(ix, cache_bytes=0, threads=6, inflight=2, delays=delays)
        outs.append(StreamedExperts(st, get_kernel("cpu"), overlap=overlap).forward(0, x, ids, w))
        st.close()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


_PEAK = """
import json, sys, torch
import flashmoe_pack
def status(k):
    for line in open("/proc/self/status"):
        if line.startswith(k + ":"):
            return int(line.split()[1]) * 1024
path, cache, io = sys.argv[1], sys.argv[2], sys.argv[3]
estimate = 0
if cache.startswith("auto:"):  # pretend only resident (as stored) + reserve + N bytes are available
    from flashmoe_pack.engine import store
    from flashmoe_pack.pack import load_index
    extra = int(cache[5:])
    estimate = store.estimate_resident_bytes(load_index(path))
    avail = estimate + 2 * 2**30 + extra
    store.memory_info = lambda: store.MemoryInfo(total=avail, available=avail, source="test")
    cache = "auto"
m = flashmoe_pack.load(path, expert_cache=cache if cache == "auto" else int(cache), io=io, threads=2)
m.logits([1, 2, 3])  # first call: allocator and kernel set-up
loaded = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
ids = torch.randint(0, 256, (192,), generator=torch.Generator().manual_seed(0)).tolist()
m.logits(ids)  # prefill: nearly every expert of every layer
list(m.generate_ids(ids[:8], max_tokens=8, stop_ids=()))
print(json.dumps({"loaded": loaded, "peak": status("VmHWM"), "inflight": m.store.inflight,
                  "read_bytes": m.store.read_bytes, "misses": m.store.stats.misses,
                  "cache": m.store.cache_bytes, "io_mode": m.store.io_mode, "estimate": estimate,
                  "resident": m.store.resident_bytes}))
"""


@pytest.mark.parametrize("io,cache", [("os", 16 << 20), ("direct", 16 << 20), ("auto", "auto:100663296")])
def test_peak_rss_within_budget(tmp_path_factory, io, cache):
    """Peak RSS during a prefill that reads ~all 128 experts of 2 layers (1.9 MiB records, 480 MiB of
    experts) stays within: RSS after load + cache budget + `inflight` records + 64 MiB of documented
    overhead (activations, the kernel's dequantized expert, allocator slack). Reading a layer's
    misses all at once, as before the window, would need ~240 MiB more. With the defaults (io and
    cache "auto"), the child is told that only resident + reserve + 96 MiB of memory is available: the
    auto budget must come out as those 96 MiB (plus what loading the resident weights as q8 saved; of 480
    MiB of experts) and be kept like an explicit one."""
    d = tmp_path_factory.getbasetemp() / "peak_model"
    if not (d / "index.json").exists():
        cfg = ms.text_config("tiny", layers=2)
        cfg.update(hidden_size=1024, moe_intermediate_size=1024, num_experts=128, num_experts_per_tok=4)
        ms.write(d, cfg, seed=1, progress=False)
    r = subprocess.run([sys.executable, "-c", _PEAK, str(d), str(cache), io], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if io == "auto":
        # the budget counts the resident weights as loaded (q8 by default), not as stored
        assert got["cache"] == (96 << 20) + got["estimate"] - got["resident"] and got["io_mode"] in ("os", "direct")
    else:
        assert got["cache"] == cache
    grew = got["peak"] - got["loaded"]
    allowed = got["cache"] + got["inflight"] * got["read_bytes"] + (64 << 20)
    print(f"io={io}: peak - loaded = {grew / 2**20:.1f} MiB, allowed {allowed / 2**20:.1f} MiB")
    assert got["misses"] > 200
    assert grew <= allowed, (grew / 2**20, allowed / 2**20)


# -- take/put for an exclusive tier above the store (engine/gpu_cache.py) ---------------------------------
def _raw(ix, layer, e):
    from flashmoe_pack.pack.reader import read_record

    return read_record(ix, layer, e)


def test_stream_keep_false_takes_hits_and_caches_no_reads(small):
    """keep=False: a hit leaves the cache (its buffer back in the free list, no copy), a read is not
    inserted; the weights yielded are the records on disk; the default stream is unchanged."""
    ix = load_index(small)
    rb = fmt.align_up(ix.layout.record_bytes, 4096)
    st = SlowStore(ix, cache_bytes=4 * rb, threads=1, inflight=2)
    list(st.stream(0, [1, 2]))
    assert set(st._cache) == {(0, 1), (0, 2)} and st.cached_bytes == 2 * rb
    got = {e: dequantize(w.down).clone() for e, w in st.stream(0, [2, 3], keep=False)}
    assert set(st._cache) == {(0, 1)} and st.cached_bytes == rb  # 2 taken out, 3 never inserted
    for e in (2, 3):
        assert torch.equal(got[e], _ref(ix, 0, e))
    assert (st.stats.hits, st.stats.misses, st.stats.reads) == (1, 3, 3)
    allocated = st.allocated
    list(st.stream(0, [4, 5], keep=False))  # the recycled buffers serve the next reads
    assert st.allocated == allocated and set(st._cache) == {(0, 1)}
    list(st.stream(0, [1]))  # default: a hit stays
    assert set(st._cache) == {(0, 1)}
    st.close()


def test_put_inserts_checked_copy_under_budget(small):
    ix = load_index(small)
    rb = fmt.align_up(ix.layout.record_bytes, 4096)
    st = SlowStore(ix, cache_bytes=2 * rb, threads=1)
    for e in (3, 4, 5):  # LRU eviction at the budget: 3 goes
        src = _raw(ix, 1, e).clone()
        assert st.put(1, e, src)
        src.zero_()  # the store holds its own copy
    assert list(st._cache) == [(1, 4), (1, 5)] and st.cached_bytes == 2 * rb
    allocated = st.allocated
    for e in (6, 7, 4, 5):  # at the budget each put takes the evicted record's buffer: no new mapping
        assert st.put(1, e, _raw(ix, 1, e))
    assert st.allocated == allocated and list(st._cache) == [(1, 4), (1, 5)]
    got = dict(st.stream(1, [4, 5]))
    assert (st.stats.hits, st.stats.reads) == (2, 0)
    for e in (4, 5):
        assert torch.equal(dequantize(got[e].down), _ref(ix, 1, e))
    assert st.put(1, 4, _raw(ix, 1, 4)) and list(st._cache) == [(1, 5), (1, 4)]  # already there: touched
    bad = _raw(ix, 2, 6).clone()
    bad[100] ^= 0xFF
    with pytest.raises(FormatError, match=r"layer 2 expert 6: checksum mismatch"):
        st.put(2, 6, bad)
    assert (2, 6) not in st._cache
    assert st.put(2, 6, bad, verify=False)  # the caller vouches for it
    with pytest.raises(ValueError, match="layer 2 expert 7: record must be a CPU uint8"):
        st.put(2, 7, torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(IndexError, match="expert 99 out of range"):
        st.put(2, 99, bad)
    st.close()
    st = ExpertStore(ix, cache_bytes=0, threads=1)
    assert not st.put(0, 0, _raw(ix, 0, 0)) and st.cached_bytes == 0  # no budget: nothing kept
    st.close()


class FakePin:
    """Stands in for the driver's registration (gpu_cache.CudaPin): refuses an address already registered,
    as cudaHostRegister does, and records what is live."""

    def __init__(self):
        self.live: set[int] = set()

    def __call__(self, addr: int, nbytes: int) -> bool:
        if addr in self.live:
            return False
        self.live.add(addr)
        return True

    def unpin(self, addr: int) -> None:
        self.live.remove(addr)


def test_pinned_buffers_are_unregistered_by_close_or_when_the_store_is_dropped(small):
    """Every registered read buffer is unregistered before it can be unmapped: at close(), and where a store is
    dropped without close() (a mapping freed while registered makes the driver refuse the next one at that
    address)."""
    import gc

    ix = load_index(small)
    pin = FakePin()
    st = ExpertStore(ix, cache_bytes=0, threads=2, pin=pin)
    list(st.stream(0, [1, 2, 3]))
    assert pin.live and all(st.is_pinned(a) for a in pin.live)
    st.close()
    assert not pin.live
    st = ExpertStore(ix, cache_bytes=0, threads=2, pin=pin)
    list(st.stream(1, [4, 5]))
    assert pin.live
    st._pool.shutdown(wait=True)  # (its threads hold the store; close() would unregister here)
    del st
    gc.collect()
    assert not pin.live


def test_refused_registration_clears_the_runtime_error(monkeypatch):
    """CudaPin: a buffer the driver refuses stays pageable (False), and the runtime's last error that the refusal
    leaves is cleared (else the thread's next kernel launch reports it as its own); a registration that succeeds
    clears nothing."""
    from flashmoe_pack.engine import gpu_cache

    class Rt:
        def __init__(self, answer):
            self.answer = answer

        def cudaHostRegister(self, addr, nbytes, flags):
            return self.answer

        def cudaHostUnregister(self, addr):
            return self.answer

    cleared = []
    monkeypatch.setattr(gpu_cache, "clear_cuda_error", lambda: cleared.append(1))
    pin = gpu_cache.CudaPin()
    pin.rt = Rt("cudaError.cudaErrorHostMemoryAlreadyRegistered")
    assert pin(4096, 4096) is False and len(cleared) == 1
    pin.unpin(4096)
    assert len(cleared) == 2
    pin.rt = Rt("cudaError.success")
    assert pin(4096, 4096) is True and len(cleared) == 2
    pin.unpin(4096)
    assert len(cleared) == 2
