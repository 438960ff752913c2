"""fmk_xxh64 (runtime/cpu/fmk_xxh64.c) against python-xxhash, and the store's use of it: the I/O mode
probe, memory figures from /proc and cgroups (fake trees), the "auto" cache budget arithmetic."""

from __future__ import annotations

import logging
import random
import threading

import pytest
import xxhash

from flashmoe_pack.backends import cpu as cpu_backend
from flashmoe_pack.engine import store as st
from flashmoe_pack.pack import FormatError, load_index
from flashmoe_pack.pack import format as fmt

needs_c = pytest.mark.skipif(not cpu_backend.available(), reason="C library not built")
GiB = 1 << 30


@needs_c
def test_c_digest_equals_python_xxhash_on_random_lengths_offsets_and_seeds():
    """Lengths 0..100 kB (every length up to 100 bytes: each tail case of the 32/8/4/1-byte steps),
    start offsets 0..7 (unaligned words), seeds 0, 1, 2^64-1 and random."""
    rng = random.Random(7)
    lengths = list(range(0, 101)) + [rng.randrange(101, 100_001) for _ in range(150)] + [100_000, 65_536, 65_537]
    block = rng.randbytes(100_008)
    fails = []
    for i, n in enumerate(lengths):
        off = i % 8
        data = bytearray(block[off:off + n])  # writable: hashed in place through its address
        for seed in (0, 1, (1 << 64) - 1, rng.getrandbits(64)):
            want = xxhash.xxh64(bytes(data), seed=seed).intdigest()
            got = st.xxh64(data, seed)
            got_bytes = st.xxh64(bytes(data), seed)
            mv = memoryview(block)[off:off + n]  # read-only view: the python fallback inside xxh64()
            if not (got == got_bytes == st.xxh64(mv, seed) == want):
                fails.append((n, off, seed))
    assert not fails, fails[:5]


@needs_c
def test_c_digest_of_unaligned_address_and_errors():
    import ctypes

    buf = ctypes.create_string_buffer(bytes(range(256)) * 40)
    for off in range(8):
        got = st.xxh64_at(ctypes.addressof(buf) + off, 9_999, 5)
        assert got == xxhash.xxh64(buf.raw[off:off + 9_999], seed=5).intdigest()
    out = ctypes.c_uint64()
    fn = st._c_xxh64()
    assert fn(None, 10, 0, ctypes.byref(out)) == -1  # null data with a length
    assert fn(ctypes.addressof(buf), -1, 0, ctypes.byref(out)) == -1
    assert fn(None, 0, 0, ctypes.byref(out)) == 0 and out.value == xxhash.xxh64(b"").intdigest()


@needs_c
def test_c_hash_runs_without_the_gil():
    """While a thread hashes 64 MiB in C, the main thread keeps running Python (a call that held the
    GIL would freeze it for the whole digest)."""
    data = bytearray(64 << 20)
    done = threading.Event()
    ticks = 0

    def work():
        for _ in range(4):
            st.xxh64(data)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks += 1
    t.join()
    assert ticks > 1000


def _make_synthetic():
    from scriptload import load_script  # tests/ is on sys.path under pytest

    return load_script("make_synthetic")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    ms = _make_synthetic()
    cfg = ms.text_config("tiny")
    cfg["num_experts"] = 8
    return ms.write(tmp_path_factory.mktemp("xxh") / "m", cfg, seed=4, progress=False)


@pytest.mark.parametrize("hasher", ["c", "python"])
def test_store_checks_records_with_either_hasher(small, tmp_path, monkeypatch, hasher):
    import shutil

    if hasher == "python":
        monkeypatch.setattr(st, "_c_hash", [None])
    elif not cpu_backend.available():
        pytest.skip("C library not built")
    d = shutil.copytree(small, tmp_path / "bad")
    ix = load_index(d)
    with open(d / fmt.expert_file_name(0), "r+b") as f:
        f.seek(fmt.expert_offset(5, ix.layout.stride) + ix.layout.record_bytes - 1)  # the last byte
        f.write(b"\x5a")
    s = st.ExpertStore(ix, cache_bytes=0, threads=2)
    assert len(list(s.stream(1, list(range(8))))) == 8 and s.stats.verify_seconds > 0
    with pytest.raises(FormatError, match=r"layer_000\.bin: layer 0 expert 5: checksum mismatch"):
        list(s.stream(0, [5]))
    assert ("xxh64 in C" in s.describe()) == (hasher == "c")
    s.close()


@needs_c
def test_store_reports_a_c_hash_that_disagrees_with_python(small, monkeypatch):
    monkeypatch.setattr(st, "xxh64_at", lambda addr, n, seed=0: 12345)
    s = st.ExpertStore(load_index(small), cache_bytes=0, threads=1)
    with pytest.raises(FormatError, match="fmk_xxh64 disagrees with python-xxhash"):
        list(s.stream(0, [1]))
    s.close()


# -- the I/O mode ------------------------------------------------------------------------------------
def test_resolve_io(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(b"\0" * 8192)
    assert st.resolve_io("os", f) == ("os", None)
    with pytest.raises(ValueError, match="'auto', 'os' or 'direct'"):
        st.resolve_io("mmap", f)
    monkeypatch.setattr(st.sys, "platform", "linux")
    monkeypatch.setattr(st, "probe_direct", lambda p: None)
    assert st.resolve_io("auto", f) == ("direct", None)
    monkeypatch.setattr(st, "probe_direct", lambda p: f"{p}: O_DIRECT read refused (Invalid argument)")
    mode, note = st.resolve_io("auto", f)
    assert mode == "os" and "x.bin: O_DIRECT read refused" in note and "io=os" in note
    monkeypatch.setattr(st.sys, "platform", "darwin")
    assert st.resolve_io("auto", f) == ("os", None)  # macOS: the page cache unless asked
    assert st.resolve_io("direct", f) == ("direct", None)  # F_NOCACHE


@pytest.mark.skipif(not hasattr(__import__("os"), "O_DIRECT"), reason="no O_DIRECT")
def test_probe_direct_reads_a_real_file(small):
    assert st.probe_direct(small / fmt.expert_file_name(0)) is None
    assert "refused" in st.probe_direct(small / "no-such-file")


def test_store_io_auto_falls_back_with_one_note(small, monkeypatch, caplog):
    monkeypatch.setattr(st.sys, "platform", "linux")
    monkeypatch.setattr(st, "probe_direct", lambda p: f"{p}: O_DIRECT read refused (Invalid argument)")
    with caplog.at_level(logging.WARNING, logger=st.__name__):
        s = st.ExpertStore(load_index(small), cache_bytes="auto", io="auto", threads=1)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "O_DIRECT read refused" in notes[0]
    assert s.io_mode == "os" and not s.direct and "page cache" in s.describe()
    assert s.cache_bytes <= GiB  # io=os: auto keeps at most 1 GiB
    assert len(list(s.stream(0, [0, 1]))) == 2
    s.close()
    with pytest.raises(ValueError, match="cache_bytes must be a byte count or 'auto'"):
        st.ExpertStore(load_index(small), cache_bytes="lots")


# -- memory figures and the auto budget ----------------------------------------------------------------
def _fake_root(tmp_path, cgroup_lines, files):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\n"
                                           "MemAvailable:   20000000 kB\n")
    (tmp_path / "proc/self/cgroup").write_text("\n".join(cgroup_lines) + "\n")
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_memory_info_without_cgroup_limit(tmp_path):
    root = _fake_root(tmp_path, ["0::/"], {"sys/fs/cgroup/memory.max": "max\n"})
    m = st.memory_info(root)
    assert (m.total, m.available, m.source) == (24000000 * 1024, 20000000 * 1024, "MemAvailable")


def test_memory_info_cgroup_v2_parent_limit_counts_file_cache_as_free(tmp_path):
    """The tightest limit of the group and its ancestors; page cache in the group is reclaimable."""
    root = _fake_root(tmp_path, ["0::/a/b"], {
        "sys/fs/cgroup/a/b/memory.max": "max\n",
        "sys/fs/cgroup/a/memory.max": str(8 * GiB),
        "sys/fs/cgroup/a/memory.current": str(5 * GiB),
        "sys/fs/cgroup/a/memory.stat": f"anon {2 * GiB}\nfile {3 * GiB}\n",
    })
    m = st.memory_info(root)
    assert m.total == 8 * GiB and m.available == 6 * GiB and "a/memory.max" in m.source


def test_memory_info_cgroup_v1(tmp_path):
    root = _fake_root(tmp_path, ["4:memory:/grp", "3:cpuset:/"], {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
        "sys/fs/cgroup/memory/grp/memory.limit_in_bytes": str(4 * GiB),
        "sys/fs/cgroup/memory/grp/memory.usage_in_bytes": str(3 * GiB),
        "sys/fs/cgroup/memory/grp/memory.stat": f"cache {GiB}\ntotal_inactive_file {GiB // 2}\n"
                                                f"total_active_file {GiB // 4}\n",
    })
    m = st.memory_info(root)
    assert m.total == 4 * GiB and m.available == GiB + GiB * 3 // 4


def test_auto_cache_budget_arithmetic(monkeypatch):
    monkeypatch.setattr(st.sys, "platform", "linux")
    mem = st.MemoryInfo(total=24 * GiB, available=20 * GiB, source="MemAvailable")
    b, how = st.auto_cache_budget(6 * GiB, 100 * GiB, "direct", mem)
    reserve = int(0.15 * 24 * GiB)  # 3.6 GiB > 2 GiB
    assert b == 20 * GiB - 6 * GiB - reserve and "reserve 3.60 GiB" in how
    small_box = st.MemoryInfo(total=8 * GiB, available=7 * GiB, source="cgroup")
    assert st.auto_cache_budget(6 * GiB, 100 * GiB, "direct", small_box)[0] == 0  # never negative
    assert st.auto_cache_budget(1 * GiB, 100 * GiB, "direct", small_box)[0] == 4 * GiB  # 2 GiB reserve
    assert st.auto_cache_budget(0, 3 * GiB, "direct", mem)[0] == 3 * GiB  # no more than all experts
    assert st.auto_cache_budget(0, 100 * GiB, "os", mem)[0] == GiB  # the page cache does the rest
    monkeypatch.setattr(st.sys, "platform", "darwin")
    assert st.auto_cache_budget(0, 100 * GiB, "direct", mem)[0] == GiB


def test_estimate_resident_bytes(small):
    import torch

    from flashmoe_pack.engine.resident import load_resident

    ix = load_index(small)
    for dtype in (None, torch.float32):
        got = st.resident_nbytes(load_resident(ix, torch.device("cpu"), dtype, resident="stored"))
        assert st.estimate_resident_bytes(ix, dtype) == got


def test_auto_budget_counts_resident_weights_as_loaded(small, monkeypatch):
    """load() sizes an "auto" cache from the resident weights in the form they were loaded in (q8 on
    the CPU by default), with memory figures taken before they were loaded."""
    import torch

    import flashmoe_pack
    from flashmoe_pack.engine.resident import load_resident

    fake = st.MemoryInfo(total=3 * GiB, available=2 * GiB + (40 << 20), source="test")
    monkeypatch.setattr(st, "memory_info", lambda: fake)
    monkeypatch.setattr(st.sys, "platform", "linux")
    m = flashmoe_pack.load(small, expert_cache="auto", io="direct", threads=1)
    loaded = st.resident_nbytes(load_resident(load_index(small), torch.device("cpu"), None))
    assert m.store.resident_bytes == loaded
    all_experts = len(load_index(small).layers) * 8 * m.store.read_bytes
    assert m.store.cache_bytes == min(all_experts, max(0, fake.available - loaded - 2 * GiB))
    assert f"resident {st._size(loaded)}" in m.store.describe()
    m.close()
