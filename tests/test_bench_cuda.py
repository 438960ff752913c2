"""scripts/bench_cuda.py pieces that need no GPU: the GGUF K rewrite, the floor arithmetic, the table,
and the flashmoe engine run itself on CPU tensors (Triton interpreter)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from scriptload import load_script  # noqa: E402  (tests/ is on sys.path under pytest)

bc = load_script("bench_cuda")
ms = load_script("make_synthetic")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    pytest.importorskip("gguf")
    d = tmp_path_factory.mktemp("bench")
    out = ms.write(d / "m", ms.text_config("tiny"), seed=5, gguf_path=d / "m.gguf", progress=False)
    return out, d / "m.gguf"


def test_gguf_k_rewrite_round_trip(synth):
    import gguf

    _, gg = synth
    before = gg.read_bytes()
    assert bc.set_gguf_k(gg, 1) == 2  # tiny geometry: K = 2
    field = gguf.GGUFReader(gg).fields["qwen35moe.expert_used_count"]
    assert int(field.parts[field.data[0]][0]) == 1
    assert bc.set_gguf_k(gg, 2) == 1 and gg.read_bytes() == before
    with pytest.raises(KeyError, match="no metadata key"):
        bc.gguf_u32_offset(gg, "qwen35moe.no_such_key")
    with pytest.raises(ValueError, match="expected uint32"):
        bc.gguf_u32_offset(gg, "general.name")


def test_floors():
    geo = {"layers": 5, "experts": 512, "record_bytes": 7864320, "gguf_expert_bytes": 7077888}
    fl = bc.floors(SimpleNamespace(k=[10]), geo, gpu_layers=1, host_bytes=7864320 * 512, h2d=50.0, disk=1.0)
    f = fl["flashmoe"][10]
    assert f["f"] == pytest.approx(0.4)  # 1 layer in VRAM + 1 layer's worth in host memory, of 5
    assert f["disk_bytes"] == pytest.approx(10 * 5 * 7864320 * 0.6)
    assert f["pcie_bytes"] == pytest.approx(10 * 5 * 7864320 * 0.8)
    assert f["tok_s"] == pytest.approx(1e9 / f["disk_bytes"])  # disk-bound at 1 GB/s
    assert fl["llama.cpp"][10]["pcie_bytes"] == 0.0


def test_geometry_and_expert_reads_from_either_format(synth):
    """With only the GGUF on disk (one format at a time) the benchmark sees the same geometry and sizes as
    with the pack, and its disk floor reads the GGUF's expert slices."""
    out, gg = synth
    a, b = bc.geometry(out, gg), bc.geometry(None, gg)
    cfg = ms.text_config("tiny")
    assert a == b and not a["gguf_bytes_estimated"]
    assert (a["layers"], a["experts"]) == (cfg["num_hidden_layers"], cfg["num_experts"])
    est = bc.geometry(out, gg.with_name("absent.gguf"))
    assert est["gguf_bytes_estimated"] and 0.8 < est["gguf_bytes"] / a["gguf_bytes"] < 1.25
    for chunks, n_per_expert in ((bc.expert_chunks(a, out, gg), 1), (bc.expert_chunks(b, None, gg), 3)):
        assert len(chunks) == a["layers"] * a["experts"] * n_per_expert
        assert all(off % 4096 == 0 and size % 4096 == 0 for _, off, size in chunks)
        total = sum(size for _, _, size in chunks)
        need = a["layers"] * a["experts"] * (a["record_bytes"] if n_per_expert == 1 else a["gguf_expert_bytes"])
        assert need <= total
        r = bc.read_gbs(chunks, n=16, threads=2)
        assert r["GB_s"] > 0 and r["bytes"] >= 16 * 4096


def test_one_format_at_a_time_merges(synth, tmp_path, monkeypatch):
    """The small-disk flow: the GGUF alone (llama.cpp runs), then the pack alone with --merge (flashmoe
    runs): one JSON and one table with both engines and each engine's own floor."""
    import json
    import shutil
    import sys

    out, gg = synth
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(gg, d / "m.gguf")
    lb = tmp_path / "llama-bench"
    lb.write_text("")
    monkeypatch.setattr(bc, "h2d_gbs", lambda: 50.0)
    monkeypatch.setattr(bc, "setup_cgroup", lambda limit: "no cgroup in tests")
    monkeypatch.setattr(bc, "drop_caches", lambda: False)
    ran = []

    def fake_llama(args, k, ncmoe, prompt, tokens, reps, limited, timeout):
        ran.append(("llama", k, prompt))
        return {"K": k, "decode_tok_s": 1.0, **({"ttft_s": 9.0} if prompt else {}), "disk_bytes_per_tok": 1e6,
                "disk_GB_s": 0.5, "pcie_rx_MB_s_dmon": None}

    def fake_flashmoe(args, spec, limited, timeout):
        env = spec.get("env", {})
        ab = "pinned" if env.get("FLASHMOE_CUDA_PINNED_HOST") == "0" else env.get("FLASHMOE_CUDA_SERIAL")
        ran.append(("flashmoe", spec["ks"][0], ab, spec["prompt"]))
        return {"runs": [{"K": spec["ks"][0], "prompt": spec["prompt"], "decode_tok_s": 3.0, "ttft_s": 8.0,
                          "vram_hit": 0.2, "host_hit": 0.3,
                          "combined_hit": 0.44, "disk_bytes_per_tok": 5e5, "disk_GB_s": 0.6, "pcie_GB_s": 1.0,
                          "host_budget_bytes": 1 << 20}]}

    monkeypatch.setattr(bc, "run_llama", fake_llama)
    monkeypatch.setattr(bc, "run_flashmoe", fake_flashmoe)
    argv = ["bench_cuda.py", str(d / "m"), str(d / "m.gguf"), "--llama-bench", str(lb), "--out", str(tmp_path / "o"),
            "--merge", "--skip", "resident", "--k", "2", "1", "--overlap-ab", "--ttft-first-k-only", "--ab", "pinned"]
    monkeypatch.setattr(sys, "argv", argv)
    bc.main()  # phase 1: the GGUF alone
    assert ran == [("llama", 2, 512), ("llama", 1, 0)]  # the prompt timed at the first K only
    (d / "m.gguf").unlink()
    shutil.copytree(out, d / "m")
    bc.main()  # phase 2: the pack alone, merged
    assert ran[2:] == [("flashmoe", 2, None, 512), ("flashmoe", 2, "1", 512), ("flashmoe", 2, "pinned", 512),
                       ("flashmoe", 1, None, bc.SHORT_PROMPT), ("flashmoe", 1, "1", bc.SHORT_PROMPT),
                       ("flashmoe", 1, "pinned", bc.SHORT_PROMPT)]
    res = json.loads((tmp_path / "o" / "bench_cuda.json").read_text())
    assert [ph["engines"] for ph in res["phases"]] == [["llama.cpp"], ["flashmoe"]]
    assert set(res["floors"]) == {"flashmoe", "llama.cpp"} and not res["gguf_bytes_estimated"]
    table = (tmp_path / "o" / "bench_cuda.md").read_text()
    assert table.count("| streaming | flashmoe |") == 2 and table.count("| streaming | llama.cpp |") == 2
    assert table.count("| streaming, no overlap | flashmoe |") == 2 and "overlap buys 1.00x decode" in table
    assert table.count("| streaming, no page-locked host tier | flashmoe |") == 2
    assert "llama.cpp: " in table and "flashmoe: " in table  # each phase's disk speed
    ttfts = [row.split(" | ")[4] for row in table.splitlines() if row.startswith("| streaming | ")]
    assert ttfts == ["8.0", "9.0", "-", "-"]  # K=2: flashmoe, llama.cpp; K=1 decoded after a short prompt


def test_engine_run_on_cpu(synth):
    """The flashmoe run of the benchmark (warm-up, fresh tiers per K, TTFT, decode, tier deltas)."""
    from flashmoe_pack.pack import format as fmt
    from flashmoe_pack.pack import load_index

    out, _ = synth
    slot = fmt.align_up(load_index(out).layout.record_bytes, 256)
    res = bc.engine_run({"model": str(out), "device": "cpu", "vram": 3 * slot, "host": 0, "threads": 2,
                         "prompt": 9, "ks": [2], "tokens": 3, "profile": 2})
    (r,) = res["runs"]
    assert r["graph"] == {"captures": 0, "capture_s": 0.0, "replays": 0, "adoptions": 0}  # no CUDA graphs on a CPU
    assert len(r["token_ms"]) == 3 and all(t > 0 for t in r["token_ms"]) and r["decode_tok_s_median"] > 0
    prof = res["profile"]
    assert prof["ms_per_step_eager"] > 0 and prof["eager_ops_per_step"] > 10 and "aten::" in prof["eager_top"]
    assert r["K"] == 2 and r["decode_tokens"] == 3 and r["vram_slots"] == 3 and r["host_budget_bytes"] == 0
    assert r["host_hit"] == 0.0 and r["disk_bytes_per_tok"] > 0 and r["h2d_bytes_per_tok"] > 0
    assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0
    assert r["prefill_warmup_s"] > 0  # a warm-up prompt before the timed one, as llama-bench does
    cold = bc.engine_run({"model": str(out), "device": "cpu", "vram": 3 * slot, "host": 10 * slot, "threads": 2,
                          "prompt": 9, "ks": [2], "tokens": 1, "prefill_warmup": False})["runs"][0]
    warm = bc.engine_run({"model": str(out), "device": "cpu", "vram": 3 * slot, "host": 10 * slot, "threads": 2,
                          "prompt": 9, "ks": [2], "tokens": 1})["runs"][0]
    assert "prefill_warmup_s" not in cold
    # the timed prompt's reads only: what the warm-up left in the tiers is not read again
    assert 0 < warm["prefill_disk_bytes"] < cold["prefill_disk_bytes"]


def test_resident_run_preloads_once(synth):
    """The fully resident case: every expert read into VRAM once, then each K served from it alone."""
    from flashmoe_pack.pack import format as fmt
    from flashmoe_pack.pack import load_index

    out, _ = synth
    ix = load_index(out)
    slot = fmt.align_up(ix.layout.record_bytes, 256)
    res = bc.engine_run({"model": str(out), "device": "cpu", "vram": len(ix.layers) * ix.num_experts * slot,
                         "host": 0, "threads": 2, "prompt": 5, "ks": [2, 1], "tokens": 2, "preload": True})
    first, second = res["runs"]
    assert "preload_s" in first and "preload_s" not in second
    assert first["vram_hit"] == second["vram_hit"] == 1.0 and second["disk_bytes_per_tok"] == 0


def test_gpu_check_picks_the_fastest_matching_config_in_the_tuned_file_format(tmp_path, monkeypatch):
    """gpu_check's sweep result -> decode_configs.json: per bits/group the fastest K=10 graph time among configs
    whose output matched the reference's; failed or mismatching configs are never picked; the file it writes
    is what triton_kernels.decode_cfg reads."""
    from flashmoe_pack.backends import triton_kernels as tk

    gc = load_script("gpu_check")
    kb = {
        "decode_q4g64_K10|[8, 1024, 4]": {"graph_us": 74.0, "max_rel_vs_first": None},
        "decode_q4g64_K10|[16, 1024, 4]": {"graph_us": 40.0, "max_rel_vs_first": 1e-3},
        "decode_q4g64_K10|[8, 512, 2, 1]": {"graph_us": 20.0, "max_rel_vs_first": 0.9},  # wrong output
        "decode_q4g64_K10|[16, 512, 4, 1]": {"error": "compile failed"},
        "decode_q4g64_K4|[4, 1024, 2, 1]": {"graph_us": 1.0, "max_rel_vs_first": 0.0},  # K=4: not ranked
        "decode_q4g32_K10|[8, 1024, 4]": {"graph_us": 90.0, "max_rel_vs_first": None},
        "decode_q8g64_K10|[8, 512, 4]": {"graph_us": "graph failed: x", "max_rel_vs_first": None},
        # int8 activations: their rounding's error is allowed (up to 5e-2), nothing more, and they are taken only
        # where at least I8_MIN_GAIN faster than the float32 kernels
        "decode_q2g64_K10|[8, 2048, 4]": {"graph_us": 80.0, "max_rel_vs_first": None},
        "decode_q2g64_K10|[8, 2048, 4, 1, 1, 1, 1]": {"graph_us": 30.0, "max_rel_vs_first": 2e-2},
        "decode_q4g32_K10|[8, 512, 2, 1, 1, 1, 1]": {"graph_us": 30.0, "max_rel_vs_first": 0.2},
        "decode_q4g32_K10|[4, 4096, 1, 1, 1, 1, 2, 8]": {"graph_us": 50.0, "max_rel_vs_first": 3e-2},  # (i8 2)
        "decode_q4g64_K10|[8, 1024, 4, 1, 1, 1, 1]": {"graph_us": 38.0, "max_rel_vs_first": 1e-2},  # 5% only
    }
    best = gc.pick_best(kb)
    assert best == {"4/64": [16, 1024, 4], "4/32": [4, 4096, 1, 1, 1, 1, 2, 8], "2/64": [8, 2048, 4, 1, 1, 1, 1]}
    assert gc.pick_best(kb, exact=True) == {"4/64": [16, 1024, 4], "4/32": [8, 1024, 4], "2/64": [8, 2048, 4]}
    f = tmp_path / "decode_configs.json"
    f.write_text(json.dumps({"Fake GPU": best}))
    monkeypatch.setenv("FLASHMOE_DECODE_CONFIGS", str(f))
    monkeypatch.setattr(tk, "_gpu_name", lambda device: "Fake GPU")
    assert tk.decode_cfg(4, 64, torch.device("cuda")) == (16, 1024, 4, 0, 0, 0, 0, 0)


def test_gpu_check_decode_logits_feed_the_same_tokens_one_step_at_a_time(packed4):
    """gpu_check's decode comparison (the decode kernels' share of conformance): each model is fed the same
    tokens one decode step at a time after the prompt, so its rows are the logits a whole-sequence forward
    gives at those positions, and two models are compared on the same inputs."""
    import flashmoe_pack

    gc = load_script("gpu_check")
    m = flashmoe_pack.load(packed4)
    prompt, feed = [3, 9, 27, 81], [5, 7, 11]
    a, b = gc.decode_logits((m, m), prompt, feed)
    assert a.shape == (3, m.config.vocab_size) and torch.equal(a, b)
    full = m.logits(prompt + feed)[len(prompt):]  # (the prefill path: the same function, other roundings)
    from flashmoe_pack.verify import compare_logits

    r = compare_logits(full, a)
    assert r.kl < 1e-3 and r.top1 == 1.0, (r.kl, r.top1)
    assert not torch.allclose(a[0], a[1])  # a different input each step
