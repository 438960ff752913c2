"""scripts/make_synthetic.py: a tiny geometry through the generator. The flashmoe-pack model
verifies and runs; the GGUF's Q4_0 experts dequantize to exactly the packed experts' values.
That llama.cpp computes nearly the same logits from the GGUF is checked by
scripts/check_llama_cpp.py (it needs llama-cpp-python, which CI does not build)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scriptload import load_script  # tests/ is on sys.path under pytest

import flashmoe_pack
from flashmoe_pack.pack import load_index
from flashmoe_pack.pack.reader import decode_record, read_record
from flashmoe_pack.quant import dequantize
from flashmoe_pack.verify import verify_structure

ms = load_script("make_synthetic")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("synth")
    out = ms.write(d / "m", ms.text_config("tiny"), seed=7, gguf_path=d / "m.gguf", progress=False)
    return out, d / "m.gguf"


def test_q4_0_block_layout():
    """Element j of a 32-block: MLX byte j//2 (low nibble when j is even); Q4_0 byte j (j < 16)
    low nibble, else byte j-16 high nibble; d = the fp16 scale."""
    vals = np.array([(7 * j + 3) % 16 for j in range(32)], np.uint8)
    mlx = (vals[0::2] | (vals[1::2] << 4)).reshape(1, 16)
    scale = np.array([[0.25]], np.float16)
    blk = ms.mlx_to_q4_0(mlx, scale).reshape(18)
    assert blk[:2].view(np.float16)[0] == np.float16(0.25)
    qs = blk[2:]
    assert [int(qs[j] & 15) for j in range(16)] + [int(qs[j] >> 4) for j in range(16)] == vals.tolist()


def test_structure_verifies_and_index_says_fp16_scales(synth):
    out, _ = synth
    rep = verify_structure(out)
    assert rep.ok, [str(p) for p in rep.problems]
    q = load_index(out).raw["quantization"]
    assert (q["bits"], q["group_size"], q["scale_dtype"]) == (4, 32, "float16")


def test_loads_and_runs(synth):
    out, _ = synth
    m = flashmoe_pack.load(out, expert_cache=0)
    logits = m.logits(list(range(1, 20)))
    assert logits.shape == (19, 256) and torch.isfinite(logits).all()
    gen = list(m.generate_ids([5, 6, 7], max_tokens=6, stop_ids=()))
    assert len(gen) == 6 and gen == list(m.generate_ids([5, 6, 7], max_tokens=6, stop_ids=()))
    m.close()


def test_random_sign_scales_spread_routing(synth):
    """Scales take both signs about equally, and routing over a prompt uses every expert."""
    out, _ = synth
    ix = load_index(out)
    w = decode_record(read_record(ix, 0, 3), ix)
    neg = (w.gate.scales < 0).float().mean().item()
    assert 0.4 < neg < 0.6
    assert torch.equal(w.gate.biases, w.gate.scales * -8)
    m = flashmoe_pack.load(out, expert_cache="1GiB")
    m.logits(list(range(0, 256, 3)))
    assert len(m.store._cache) == 4 * 8  # 86 tokens x K=2: all 8 experts of all 4 layers read


def test_same_seed_same_bytes(synth, tmp_path):
    out, _ = synth
    again = ms.write(tmp_path / "again", ms.text_config("tiny"), seed=7, progress=False)
    assert json.loads((again / "index.json").read_text())["experts"] == load_index(out).raw["experts"]


def test_gguf_experts_dequantize_identically(synth):
    import gguf

    out, gpath = synth
    ix = load_index(out)
    tensors = {t.name: t for t in gguf.GGUFReader(gpath).tensors}
    for layer in range(4):
        for proj in ("gate", "up", "down"):
            t = tensors[f"blk.{layer}.ffn_{proj}_exps.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # [E, out, in]
            for e in range(8):
                ref = dequantize(getattr(decode_record(read_record(ix, layer, e), ix), proj)).numpy()
                np.testing.assert_array_equal(deq[e], ref)


def test_gguf_resident_conversions(synth):
    """Same bf16 bits for matrices; norms stored as 1 + w; A stored as -exp(A_log)."""
    import gguf
    from safetensors.torch import load_file

    out, gpath = synth
    t = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(gpath).tensors}
    res = {}
    for f in sorted((out / "resident").glob("*.safetensors")):
        res.update(load_file(f))
    emb = res["model.embed_tokens.weight"].view(torch.int16).numpy()
    assert np.array_equal(t["token_embd.weight"].view(np.int16).reshape(emb.shape), emb)
    norm = res["model.layers.0.input_layernorm.weight"]
    np.testing.assert_array_equal(t["blk.0.attn_norm.weight"], norm + 1)
    a = -res["model.layers.0.linear_attn.A_log"].exp()  # hk=2, hv=4: V heads reordered to tiled order
    np.testing.assert_allclose(t["blk.0.ssm_a"], a.reshape(2, 2).T.reshape(-1), rtol=1e-6)


def test_parallel_writer_gives_the_same_bytes(synth, tmp_path):
    """--jobs: layers written by worker processes at fixed offsets: every file byte-identical."""
    out, gg = synth
    out2 = ms.write(tmp_path / "m", ms.text_config("tiny"), seed=7, gguf_path=tmp_path / "m.gguf",
                    progress=False, jobs=3)
    assert (tmp_path / "m.gguf").read_bytes() == gg.read_bytes()
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    for f in files:
        a, b = (out / f).read_bytes(), (out2 / f).read_bytes()
        if f.name == "index.json":
            a, b = json.loads(a), json.loads(b)
            a["synthetic"].pop("gguf"), b["synthetic"].pop("gguf")
        assert a == b, f


def test_old_gguf_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import gguf

    ms.check_gguf_writer()  # the installed gguf can write the header
    monkeypatch.delattr(gguf.GGUFWriter, "add_ssm_group_count")
    with pytest.raises(SystemExit) as e:
        ms.main([str(tmp_path / "m"), "--geometry", "tiny", "--gguf", str(tmp_path / "m.gguf")])
    assert "add_ssm_group_count" in str(e.value)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.gguf").exists()


def test_gguf_alone_equals_gguf_written_with_the_pack(synth, tmp_path):
    """One format at a time (a small disk): the GGUF written alone is byte for byte the one written
    beside the pack, and no pack is written."""
    _, gpath = synth
    alone = tmp_path / "alone.gguf"
    ms.main(["--geometry", "tiny", "--gguf", str(alone), "--seed", "7", "--jobs", "2"])
    assert alone.read_bytes() == gpath.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.gguf"]
    with pytest.raises(SystemExit):
        ms.main(["--geometry", "tiny"])  # nothing to write
