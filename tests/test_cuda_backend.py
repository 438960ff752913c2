"""The CUDA expert path: VRAM cache (slots, policies, stats, errors) and CudaExperts in the model.

On a machine without CUDA the same code runs on CPU tensors: no streams, the Triton kernels in
the interpreter (TRITON_INTERPRET=1, set before triton is imported). On the GPU box
scripts/gpu_check.py runs this file on CUDA, where `load(device="cuda")` builds the same objects.
"""

from __future__ import annotations

import os
import random
import shutil

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flashmoe_pack  # noqa: E402
from flashmoe_pack.backends.cuda import CudaExperts, CudaKernel  # noqa: E402
from flashmoe_pack.engine import store  # noqa: E402
from flashmoe_pack.engine.gpu_cache import POLICIES, GpuExpertCache, simulate  # noqa: E402
from flashmoe_pack.pack import FormatError, load_index  # noqa: E402
from flashmoe_pack.pack import format as fmt  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
PROMPTS = [[7, 1, 200, 45, 9, 9, 31, 100, 2, 255, 17], [5]]


def load(path, slots: int | None = None, policy: str = "lru", **kw):
    """The model with CudaExperts on DEV; `slots` VRAM slots (None: room for every expert)."""
    ix = load_index(path)
    budget = (slots or len(ix.layers) * ix.num_experts) * fmt.align_up(ix.layout.record_bytes, 256)
    if CUDA:
        m = flashmoe_pack.load(path, device="cuda", gpu_expert_cache=budget, **kw)
        m.store.policy = POLICIES[policy]()
        return m
    m = flashmoe_pack.load(path, device="cpu", **kw)
    m.store.close()
    m.store = GpuExpertCache(m.index, budget, device="cpu", policy=policy)
    m.experts = m.model.experts = CudaExperts(m.store)
    return m


def rel_err(a, b):
    return ((a.float().cpu() - b.float().cpu()).abs().max() / b.float().cpu().abs().max()).item()


def test_slots_hits_misses_eviction(packed4):
    ix = load_index(packed4)
    c = GpuExpertCache(ix, 3 * fmt.align_up(ix.layout.record_bytes, 256), device=DEV)
    assert c.capacity == 3
    s = c.slots(0, [1, 2])
    assert (c.stats.hits, c.stats.misses, c.stats.reads) == (0, 2, 2)
    assert c.slots(0, [2, 1]) == s[::-1] and c.stats.hits == 2
    c.slots(1, [5])  # fills the third slot
    c.slots(1, [6])  # evicts the least recently used: layer 0 expert 2 (touched before 1 above)
    assert c.tier.evictions == 1 and (0, 2) not in c._where and (0, 1) in c._where
    assert c.stats.bytes_read == 4 * c.host.read_bytes and c.cached_bytes == 3 * c.slot_bytes
    with pytest.raises(ValueError, match="holds 3"):
        c.slots(0, [0, 1, 2, 3])
    # slot contents are the records on disk
    from flashmoe_pack.pack.reader import read_record

    for (layer, e), slot in c._where.items():
        assert torch.equal(c.pool[slot, : c.record_bytes].cpu(), read_record(ix, layer, e))
    c.close()


def test_policies_on_traces():
    """LRU exactly on a small trace; on a skewed stationary trace the frequency-aware policy wins."""
    assert simulate("lru", [[1, 2], [3], [1], [2]], n_slots=2) == 0.0  # 1 and 2 evicted just before reuse
    rng = random.Random(0)
    hot = list(range(8))
    trace = [
        [rng.choice(hot) if rng.random() < 0.7 else rng.randrange(8, 400) for _ in range(4)]
        for _ in range(3000)
    ]
    lru, lfu = simulate("lru", trace, 16), simulate("lfu", trace, 16)
    assert lfu > lru + 0.05, (lru, lfu)


def test_corrupt_record_names_layer_and_expert(packed4, tmp_path):
    d = shutil.copytree(packed4, tmp_path / "bad")
    ix = load_index(d)
    with open(d / fmt.expert_file_name(1), "r+b") as f:
        f.seek(fmt.expert_offset(3, ix.layout.stride) + 10)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    c = GpuExpertCache(ix, "1MiB", device=DEV)
    with pytest.raises(FormatError, match=r"layer 1 expert 3: checksum mismatch"):
        c.slots(1, [2, 3])
    assert (1, 2) not in c._where and (1, 3) not in c._where  # a failed batch caches nothing
    c.slots(1, [2])
    c.close()


def test_single_expert_kernel(packed4):
    """CudaKernel.expert_mlp on one decoded record equals the torch kernel (float32 x)."""
    from flashmoe_pack.backends.torch_ref import TorchKernel

    ix = load_index(packed4)
    c = GpuExpertCache(ix, "1MiB", device=DEV)
    w = c.get(2, [5])[5]
    for t in (1, 9):
        x = torch.randn(t, ix.raw["experts"]["hidden_size"], device=DEV)
        ref = TorchKernel().expert_mlp(x, w)
        assert rel_err(CudaKernel().expert_mlp(x, w), ref) < 1e-5
    c.close()


@pytest.mark.parametrize("slots", [None, 2])
def test_quantized_model_matches_torch_path(packed4, slots):
    """4-bit experts through the VRAM cache and Triton kernels give the CPU torch path's logits
    (float32 activations): with every expert resident, and with 2 slots (K=2: a prompt's layer
    needs up to 8 experts, so it runs in chunks and evicts constantly)."""
    ref = flashmoe_pack.load(packed4, dtype=torch.float32)
    m = load(packed4, slots=slots, dtype=torch.float32)
    for ids in PROMPTS:
        assert rel_err(m.logits(ids), ref.logits(ids)) < 1e-4
    assert m.store.stats.misses > 0 and (slots is None or m.store.tier.evictions > 0)
    gen = list(m.generate_ids(PROMPTS[0], max_tokens=5, stop_ids=()))  # decode kernels, T = 1
    assert gen == list(ref.generate_ids(PROMPTS[0], max_tokens=5, stop_ids=()))


def test_unquantized_model_matches_transformers(packed16, hf_reference):
    """bits 16 (fp32 experts) run the torch kernel on VRAM slot views; 3 slots < 8 experts of a layer."""
    m = load(packed16, slots=3)
    for ids in PROMPTS:
        assert rel_err(m.logits(ids), hf_reference(ids)) < 1e-4


def test_three_tiers_accounting(packed4):
    """VRAM misses come from the host-RAM tier (an ExpertStore) and only its misses from disk;
    counters per tier; a host hit copies the same bytes as a disk read."""
    from flashmoe_pack.pack.reader import read_record

    ix = load_index(packed4)
    slot = fmt.align_up(ix.layout.record_bytes, 256)
    c = GpuExpertCache(ix, 2 * slot, device=DEV, host_budget=3 * fmt.align_up(ix.layout.record_bytes, 4096))
    assert c.capacity == 2 and c.host.cache_bytes == 3 * c.host.read_bytes
    c.slots(0, [1])  # VRAM miss, host miss, disk (one expert per call: the LRU order within a batch
    c.slots(0, [2])  # is the order its reads complete in)
    c.slots(0, [3])  # evicts (0, 1) from VRAM; the host tier keeps 1, 2, 3
    c.slots(0, [1])  # VRAM miss (evicts 2), host hit: no disk read
    c.slots(0, [1])  # VRAM hit
    t = c.tier_stats()
    assert (t["vram"]["hits"], t["vram"]["misses"], t["vram"]["evictions"]) == (1, 4, 2)
    assert (t["host"]["hits"], t["host"]["misses"]) == (1, 3)
    assert t["disk"]["reads"] == 3 and t["disk"]["bytes"] == 3 * c.host.read_bytes
    assert t["vram"]["h2d_bytes"] == 4 * ix.layout.record_bytes
    assert (c.stats.hits, c.stats.misses, c.stats.bytes_read) == (1, 4, 3 * c.host.read_bytes)
    assert "host tier: 1 hits, 3 misses" in c.tier_report()
    for (layer, e), s in c._where.items():
        assert torch.equal(c.pool[s, : c.record_bytes].cpu(), read_record(ix, layer, e))
    c.close()


@pytest.mark.parametrize("io", ["os", "direct"])
def test_host_tier_off_reads_disk_each_miss(packed4, io):
    ix = load_index(packed4)
    c = GpuExpertCache(ix, fmt.align_up(ix.layout.record_bytes, 256), device=DEV, host_budget=0, io=io)
    for e in (4, 5, 4, 5):
        c.slots(2, [e])
    assert c.host.cache_bytes == 0 and c.host.stats.hits == 0 and c.host.stats.reads == 4
    from flashmoe_pack.pack.reader import read_record

    assert torch.equal(c.pool[c._where[(2, 5)], : c.record_bytes].cpu(), read_record(ix, 2, 5))
    c.close()


def test_auto_budgets(packed4):
    """host "auto": nothing when VRAM holds every expert; else at most the experts VRAM does not hold."""

    ix = load_index(packed4)
    slot = fmt.align_up(ix.layout.record_bytes, 256)
    total = len(ix.layers) * ix.num_experts
    c = GpuExpertCache(ix, total * slot, device=DEV)
    assert c.capacity == total and c.host.cache_bytes == 0
    c.close()
    c = GpuExpertCache(ix, 2 * slot, device=DEV)
    assert 0 <= c.capacity and c.host.cache_bytes <= (total - 2) * c.host.read_bytes
    c.close()
    gib = 1 << 30  # the host tier's auto budget is the store's, with nothing resident to subtract

    def host_auto_budget(avail):
        return store.auto_cache_budget(0, 1 << 50, "direct", store.MemoryInfo(avail, avail, "test"))[0]

    assert host_auto_budget(10 * gib) == 8 * gib  # reserve 2 GiB
    assert host_auto_budget(40 * gib) == 34 * gib  # reserve 15%
    assert host_auto_budget(gib) == 0
    assert 0 < store.memory_info().available


def test_cli_host_cache_default():
    from flashmoe_pack.cli import host_cache

    assert host_cache(None, "cuda") == "auto" and host_cache(None, "cuda:1") == "auto"
    assert host_cache("3GiB", "cuda") == "3GiB"


def test_resident_decode_maps_slots_on_device(packed4):
    """Every expert in VRAM: decode steps map router ids to slots on the device (no host sync) and
    give exactly the tokens and logits of the host-mapped path; partially resident: the host path."""
    m = load(packed4, dtype=torch.float32)
    ix = m.index
    assert m.store.resident_map() is None  # nothing loaded yet
    m.store.preload()
    smap, table = m.store.resident_map()
    assert smap.shape == (len(ix.layers), ix.num_experts) and int(smap.min()) >= 0
    assert table.offs.shape[0] == m.store.n_slots
    for (layer, e), s in m.store._where.items():
        assert int(smap[m.store.row(layer), e]) == s
    state_a, state_b = m.model.new_state(), m.model.new_state()
    m.model.forward(torch.tensor(PROMPTS[0]), state_a)
    m.model.forward(torch.tensor(PROMPTS[0]), state_b)
    for tok in (5, 77, 3):
        m.experts.device_map = True
        reads, hits = m.store.stats.reads, m.store.vram.hits
        a = m.model.forward(torch.tensor([tok]), state_a)
        assert m.store.stats.reads == reads and m.store.vram.hits > hits
        m.experts.device_map = False
        b = m.model.forward(torch.tensor([tok]), state_b)
        assert torch.equal(a, b)
    m.close()
    part = load(packed4, slots=4, dtype=torch.float32)  # cannot hold every expert: never the device map
    part.logits(PROMPTS[1])
    assert part.store.resident_map() is None
