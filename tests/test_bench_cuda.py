"""scripts/bench_cuda.py pieces that need no GPU: the GGUF K rewrite, the floor arithmetic, the table,
and the flashmoe engine run itself on CPU tensors (Triton interpreter)."""

from __future__ import annotations

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
    ix = SimpleNamespace(layers=[0] * 5, num_experts=512, layout=SimpleNamespace(record_bytes=7864320))
    fl = bc.floors(SimpleNamespace(k=[10]), ix, 7077888, gpu_layers=1, host_bytes=7864320 * 512, h2d=50.0,
                   disk=1.0)
    f = fl["flashmoe"][10]
    assert f["f"] == pytest.approx(0.4)  # 1 layer in VRAM + 1 layer's worth in host memory, of 5
    assert f["disk_bytes"] == pytest.approx(10 * 5 * 7864320 * 0.6)
    assert f["pcie_bytes"] == pytest.approx(10 * 5 * 7864320 * 0.8)
    assert f["tok_s"] == pytest.approx(1e9 / f["disk_bytes"])  # disk-bound at 1 GB/s
    assert fl["llama.cpp"][10]["pcie_bytes"] == 0.0


def test_engine_run_on_cpu(synth):
    """The flashmoe run of the benchmark (warm-up, fresh tiers per K, TTFT, decode, tier deltas)."""
    from flashmoe_pack.pack import format as fmt
    from flashmoe_pack.pack import load_index

    out, _ = synth
    slot = fmt.align_up(load_index(out).layout.record_bytes, 256)
    res = bc.engine_run({"model": str(out), "device": "cpu", "vram": 3 * slot, "host": 0, "threads": 2,
                         "prompt": 9, "ks": [2], "tokens": 3, "profile": 2})
    (r,) = res["runs"]
    assert r["graph"] == {"captures": 0, "capture_s": 0.0, "replays": 0}  # no CUDA graphs on a CPU
    prof = res["profile"]
    assert prof["ms_per_step_eager"] > 0 and prof["eager_ops_per_step"] > 10 and "aten::" in prof["eager_top"]
    assert r["K"] == 2 and r["decode_tokens"] == 3 and r["vram_slots"] == 3 and r["host_budget_bytes"] == 0
    assert r["host_hit"] == 0.0 and r["disk_bytes_per_tok"] > 0 and r["h2d_bytes_per_tok"] > 0
    assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0
