"""Packing: layout, crash safety and resume, and structural verification of every corruption."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flashmoe_pack.pack import FormatError, load_index, quantize
from flashmoe_pack.pack import format as fmt
from flashmoe_pack.pack.writer import PackWriter
from flashmoe_pack.verify import verify_structure


def test_layout_alignment_and_index(packed4):
    ix = load_index(packed4)
    assert ix.layout.stride % fmt.ALIGN == 0 and ix.layout.stride >= ix.layout.record_bytes
    assert all(c.offset % fmt.COMPONENT_ALIGN == 0 for c in ix.layout.components)
    for entry in ix.layers:
        path = packed4 / entry["file"]
        assert path.stat().st_size == fmt.HEADER_BYTES + ix.num_experts * ix.layout.stride
        assert len(entry["xxh64"]) == ix.num_experts
    assert ix.raw["quantization"]["bits"] == 4 and ix.raw["quantization"]["group_size"] == 32
    assert "config.json" in ix.raw["files"] and (packed4 / "config.json").is_file()
    assert not (packed4 / fmt.BUILD_DIR).exists()
    assert verify_structure(packed4).ok


class Crash(Exception):
    pass


def test_interrupted_quantize_resumes(tiny_hub_src, tmp_path, monkeypatch):
    """A crash mid-shard leaves no index (nothing loads); a rerun skips finished shards and gives
    byte-identical output to an uninterrupted run."""
    clean = quantize(tiny_hub_src, tmp_path / "clean", bits=4, group_size=32, progress=False)
    out = tmp_path / "crashy"
    from flashmoe_pack.sources import Checkpoint, ExpertPiece

    ck = Checkpoint(tiny_hub_src)
    first = sum(isinstance(i, ExpertPiece) for i in ck.iter_shard(ck.shards[0]))
    assert 0 < first < 4 * 8 * 3
    real = PackWriter.write_piece
    calls = {"n": 0}

    def flaky(self, piece):
        calls["n"] += 1
        if calls["n"] == first + 5:  # a few pieces into the second shard
            raise Crash()
        return real(self, piece)

    monkeypatch.setattr(PackWriter, "write_piece", flaky)
    with pytest.raises(Crash):
        quantize(tiny_hub_src, out, bits=4, group_size=32, progress=False)
    assert not (out / fmt.INDEX_NAME).exists()
    with pytest.raises(FormatError, match="unfinished quantize"):
        load_index(out)
    state = json.loads((out / fmt.BUILD_DIR / "state.json").read_text())
    assert len(state["shards_done"]) == 1
    monkeypatch.setattr(PackWriter, "write_piece", real)
    with pytest.raises(ValueError, match="other settings"):
        quantize(tiny_hub_src, out, bits=2, group_size=32, progress=False)
    seen = []
    monkeypatch.setattr(PackWriter, "process_shard", lambda self, s, cb=None, _r=PackWriter.process_shard:
                        (seen.append(s), _r(self, s, cb))[1])
    quantize(tiny_hub_src, out, bits=4, group_size=32, progress=False)
    assert seen == [state_shard for state_shard in sorted(set(json.loads(
        (tiny_hub_src / "model.safetensors.index.json").read_text())["weight_map"].values()))][1:]
    for entry in load_index(clean).layers:
        assert (out / entry["file"]).read_bytes() == (clean / entry["file"]).read_bytes()
    a, b = json.loads((clean / fmt.INDEX_NAME).read_text()), json.loads((out / fmt.INDEX_NAME).read_text())
    a["source"].pop("path"), b["source"].pop("path")
    assert a == b
    with pytest.raises(FileExistsError):
        quantize(tiny_hub_src, out, bits=4, group_size=32, progress=False)


def _all_bytes(d):
    """Every file of a packed model, the index without the source path."""
    files = {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}
    index = json.loads(files.pop(fmt.INDEX_NAME))
    index["source"].pop("path")
    return files, index


@pytest.mark.parametrize("bits", [4, 2])
def test_workers_give_the_same_bytes(tiny_hub_src, tmp_path, bits):
    """A pool of worker processes (fused [E, 2I, H] experts sliced per expert, two shards) writes
    exactly what one process writes."""
    one = quantize(tiny_hub_src, tmp_path / "one", bits=bits, group_size=32, progress=False, workers=1)
    three = quantize(tiny_hub_src, tmp_path / "three", bits=bits, group_size=32, progress=False, workers=3)
    assert _all_bytes(one) == _all_bytes(three)


def test_workers_progress_and_bound(tiny_hub_src, tmp_path, monkeypatch):
    """The progress bar counts every matrix once, when it is written; never more than 2 x workers
    pieces are in flight."""
    from flashmoe_pack.pack import writer as writer_mod

    counts, live, peak = [], set(), [0]
    real_submit, real_write = writer_mod.EncodePool.submit, PackWriter.write_piece

    def submit(self, payload, params):
        fut = real_submit(self, payload, params)
        live.add(fut)
        peak[0] = max(peak[0], len(live))
        return fut

    def write(self, piece):
        live.difference_update([f for f in live if f.done()])
        return real_write(self, piece)

    class Bar:
        def __init__(self, *a, total, initial, **k):
            counts.append([total, initial])

        def update(self, n):
            counts[-1][1] += n

        def close(self):
            pass

    monkeypatch.setattr(writer_mod.EncodePool, "submit", submit)
    monkeypatch.setattr(PackWriter, "write_piece", write)
    monkeypatch.setattr("flashmoe_pack.pack.tqdm", Bar)
    quantize(tiny_hub_src, tmp_path / "o", bits=4, group_size=32, workers=2)
    assert counts == [[4 * 8 * 3, 4 * 8 * 3]]  # layers x experts x projections, all counted once
    assert 2 <= peak[0] <= 4


def test_interrupted_quantize_with_workers_resumes(tiny_hub_src, tmp_path, monkeypatch):
    """A crash with pieces still in the pool: no index, the finished shard recorded, the pool shut
    down; the rerun (again with workers) gives the bytes of an uninterrupted single-process run."""
    clean = quantize(tiny_hub_src, tmp_path / "clean", bits=4, group_size=32, progress=False)
    out = tmp_path / "crashy"
    from flashmoe_pack.sources import Checkpoint, ExpertPiece

    ck = Checkpoint(tiny_hub_src)
    first = sum(isinstance(i, ExpertPiece) for i in ck.iter_shard(ck.shards[0]))
    real, calls = PackWriter.write_piece, {"n": 0}

    def flaky(self, piece):
        calls["n"] += 1
        if calls["n"] == first + 5:
            raise Crash()
        return real(self, piece)

    monkeypatch.setattr(PackWriter, "write_piece", flaky)
    with pytest.raises(Crash):
        quantize(tiny_hub_src, out, bits=4, group_size=32, progress=False, workers=2)
    assert not (out / fmt.INDEX_NAME).exists()
    assert len(json.loads((out / fmt.BUILD_DIR / "state.json").read_text())["shards_done"]) == 1
    monkeypatch.setattr(PackWriter, "write_piece", real)
    quantize(tiny_hub_src, out, bits=4, group_size=32, progress=False, workers=2)
    assert _all_bytes(out) == _all_bytes(clean)


def test_workers_option_checked(tiny_src, tmp_path):
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        quantize(tiny_src, tmp_path / "o", workers=0)
    from typer.testing import CliRunner

    from flashmoe_pack.cli import app

    r = CliRunner().invoke(app, ["quantize", str(tiny_src), str(tmp_path / "o"), "--workers", "0"])
    assert r.exit_code == 2 and "--workers must be at least 1" in r.output


@pytest.fixture()
def damaged(packed4, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(packed4, d)
    return d


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_verify_flipped_byte(damaged):
    ix = load_index(damaged)
    _flip(damaged / fmt.expert_file_name(3), fmt.expert_offset(5, ix.layout.stride) + 7)
    rep = verify_structure(damaged)
    assert [(p.layer, p.expert, p.message) for p in rep.problems] == [(3, 5, "checksum mismatch")]
    assert "layer_003.bin: layer 3 expert 5: checksum mismatch" in str(rep.problems[0])


def test_verify_fast_samples(damaged):
    rep = verify_structure(damaged, fast=2)
    assert rep.ok and rep.records_checked < rep.records_total * 8 // 4 + 1
    assert rep.records_checked <= 4 * 4  # first, last and 2 sampled per layer


def test_verify_truncated_file(damaged):
    path = damaged / fmt.expert_file_name(1)
    ix = load_index(damaged)
    path.write_bytes(path.read_bytes()[: fmt.expert_offset(6, ix.layout.stride) + 100])
    rep = verify_structure(damaged)
    msgs = [str(p) for p in rep.problems]
    assert any("layer 1: size" in m for m in msgs)
    assert any("layer 1 expert 6: truncated record" in m for m in msgs)
    assert any("layer 1 expert 7: truncated record" in m for m in msgs)


def test_verify_missing_layer_file(damaged):
    (damaged / fmt.expert_file_name(2)).unlink()
    rep = verify_structure(damaged)
    assert [(p.layer, p.message) for p in rep.problems] == [(2, "expert file missing")]


def test_verify_layer_missing_from_index(damaged):
    raw = json.loads((damaged / fmt.INDEX_NAME).read_text())
    raw["experts"]["layers"] = [e for e in raw["experts"]["layers"] if e["layer"] != 0]
    (damaged / fmt.INDEX_NAME).write_text(json.dumps(raw))
    rep = verify_structure(damaged)
    assert [(p.layer, p.message) for p in rep.problems] == [(0, "MoE layer missing from the index")]


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(version=2), "format version 2"),
    (lambda r: r.update(format="gguf"), "not a flashmoe-pack index"),
    (lambda r: r["experts"].update(stride=1000), "stride"),
    (lambda r: r["quantization"].update(bits=3), "quantization/bits"),
    (lambda r: r["experts"]["components"][0].update(offset=64), "disagree with the layout"),
])
def test_verify_bad_index(damaged, edit, match):
    raw = json.loads((damaged / fmt.INDEX_NAME).read_text())
    edit(raw)
    (damaged / fmt.INDEX_NAME).write_text(json.dumps(raw))
    rep = verify_structure(damaged)
    assert not rep.ok and match in str(rep.problems[0])


def test_verify_bad_header_and_resident(damaged):
    _flip(damaged / fmt.expert_file_name(0), 0)  # the magic
    part = next((damaged / fmt.RESIDENT_DIR).glob("*.safetensors"))
    data = bytearray(part.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    part.write_bytes(bytes(data))
    msgs = [str(p) for p in verify_structure(damaged).problems]
    assert any("layer 0" in m and "bad magic" in m for m in msgs)
    assert any("resident tensor" in m and "checksum mismatch" in m for m in msgs)


def test_verify_garbage_index(damaged):
    (damaged / fmt.INDEX_NAME).write_bytes(b"\xff\xfe{not json")
    rep = verify_structure(damaged)
    assert not rep.ok and "not valid JSON" in str(rep.problems[0])


def test_unsupported_model_type(tiny_src, tmp_path):
    src = tmp_path / "llama"
    shutil.copytree(tiny_src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported: .*qwen3_5_moe"):
        quantize(src, tmp_path / "out", bits=4, progress=False)
    assert not (tmp_path / "out" / fmt.INDEX_NAME).exists()


def test_bits16_keeps_source_dtype(tiny_src, tmp_path):
    from flashmoe_pack.pack.reader import decode_record, read_record

    ix = load_index(quantize(tiny_src, tmp_path / "m", bits=16, progress=False))
    assert ix.raw["quantization"]["weight_dtype"] == "float32"
    ew = decode_record(read_record(ix, 0, 0), ix)
    assert ew.gate.dtype == torch.float32


def test_resident_q8(tiny_src, packed16, tmp_path):
    """8-bit resident matrices: half the bytes of bf16, verify passes, logits stay close."""
    import flashmoe_pack
    from flashmoe_pack.verify import compare_logits

    out = quantize(tiny_src, tmp_path / "q8r", bits=16, resident_dtype="q8", progress=False)
    ix = load_index(out)
    t = ix.raw["resident"]["tensors"]
    assert t["lm_head.weight"]["quant"] == {"bits": 8, "group_size": 64} and t["lm_head.weight"]["dtype"] == "int32"
    assert "model.norm.weight" in t and "quant" not in t["model.norm.weight"]
    assert verify_structure(out).ok
    ids = list(range(5, 40))
    r = compare_logits(flashmoe_pack.load(packed16).logits(ids), flashmoe_pack.load(out, dtype="float32").logits(ids))
    assert r.kl < 0.01 and r.top1 > 0.9, r
