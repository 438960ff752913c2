"""scripts/bench_transformers.py: the exported transformers checkpoint holds our engine's weights, loads in
transformers with the same logits as our engine, and the accelerate-offload run works on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from scriptload import load_script

import flashmoe_pack
from flashmoe_pack.pack import load_index
from flashmoe_pack.pack.reader import decode_record, read_record
from flashmoe_pack.quant import dequantize
from flashmoe_pack.verify import compare_logits

bt = load_script("bench_transformers")
PROMPTS = [list(range(3, 9)), [7, 1, 200, 45, 9, 9, 31, 100, 2, 255, 17], list(range(20, 100))]


@pytest.fixture(scope="module")
def hf_bf16(packed4, tmp_path_factory):
    """The tiny 4-bit pack exported in bf16, in shards of at most 100 kB (so a 128 kB gate_up_proj is alone)."""
    return bt.export(packed4, tmp_path_factory.mktemp("hf") / "bf16", shard_size=100e3, jobs=2, progress=False)


def _tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({n: st.get_tensor(n) for n in st.keys()})
    return out


def test_export_round_trips_the_pack(packed4, hf_bf16):
    """Experts equal flashmoe_pack's dequantize of the pack rounded to bf16, bit for bit; residents are the
    pack's own tensors; shards respect the size limit except for a tensor larger than it."""
    ix = load_index(packed4)
    got = _tensors(hf_bf16)
    files = sorted(hf_bf16.glob("*.safetensors"))
    assert len(files) > 2
    for f in files:
        with safe_open(f, "pt") as st:
            names = list(st.keys())
        size = sum(got[n].numel() * got[n].element_size() for n in names)
        assert size <= 100e3 or len(names) == 1
    wm = json.loads((hf_bf16 / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(wm) == set(got) and all((hf_bf16 / f).is_file() for f in wm.values())
    cfg = json.loads((hf_bf16 / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_moe_text" and cfg["num_hidden_layers"] == 4
    inter = ix.raw["experts"]["intermediate_size"]
    for layer in range(4):
        gu = got[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        dn = got[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gu.dtype == dn.dtype == torch.bfloat16 and gu.shape[0] == ix.num_experts
        for e in range(ix.num_experts):
            w = decode_record(read_record(ix, layer, e), ix)
            assert torch.equal(gu[e, :inter], dequantize(w.gate, torch.bfloat16))
            assert torch.equal(gu[e, inter:], dequantize(w.up, torch.bfloat16))
            assert torch.equal(dn[e], dequantize(w.down, torch.bfloat16))
    res = ix.raw["resident"]["tensors"]
    with safe_open(packed4 / res["lm_head.weight"]["file"], "pt") as st:
        for name in st.keys():
            assert torch.equal(got[name], st.get_tensor(name)), name
    assert got["model.layers.0.linear_attn.A_log"].dtype == torch.float32  # vectors keep the pack's fp32


def test_logits_agree_with_engine(packed4, hf_bf16, tmp_path):
    """fp32 export in transformers fp32 vs our engine in fp32 on the same pack: the same numbers up to
    summation order (measured 6e-7). bf16 export in transformers bf16 vs our engine in bf16: each bf16
    engine alone is up to KL 0.004 / top-1 0.96 away from the fp32 result on these prompts, and the two
    differ by KL <= 0.0046, top-1 >= 0.975 (max |diff| up to 13% of max |logit| on the 80-token prompt,
    so max error is no test here); an export with gate and up swapped gives KL 1.6, top-1 <= 0.36."""
    from transformers import AutoModelForCausalLM

    hf32_dir = bt.export(packed4, tmp_path / "fp32", dtype="float32", progress=False)
    hf32 = AutoModelForCausalLM.from_pretrained(hf32_dir, dtype=torch.float32).eval()
    ours32 = flashmoe_pack.load(packed4, resident="bf16", dtype="float32", expert_cache=0)
    hf16 = AutoModelForCausalLM.from_pretrained(hf_bf16, dtype=torch.bfloat16).eval()
    ours16 = flashmoe_pack.load(packed4, resident="bf16", expert_cache=0)
    kls, top1 = [], []
    for ids in PROMPTS:
        with torch.no_grad():
            a32 = hf32(torch.tensor([ids])).logits[0].float()
            a16 = hf16(torch.tensor([ids])).logits[0].float()
        b32 = ours32.logits(ids)
        assert ((a32 - b32).abs().max() / b32.abs().max()).item() < 1e-5
        r = compare_logits(ours16.logits(ids).float(), a16)
        kls.append(r.kl)
        top1.append(r.top1)
    assert max(kls) < 0.02 and min(top1) >= 0.9, (kls, top1)
    # the script's decode loop (forward + cache) gives generate's greedy tokens
    ids = torch.tensor([PROMPTS[1]])
    _, mine = bt.decode_loop(hf16, ids, 6, float("inf"), lambda: None)
    assert mine == hf16.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    ours32.close()
    ours16.close()


def test_run_on_cpu_with_disk_offload(packed4, hf_bf16, tmp_path, capsys):
    """`run` through the CLI: JSON on the last stdout line with the keys bench_cuda reads; with a RAM
    budget smaller than the model most weights go to disk, read where the export put them (the offload
    folder stays empty), and the greedy tokens equal those of the same K held wholly in RAM."""
    pytest.importorskip("accelerate")  # device_map offload needs it: a test dependency of this script
    two = bt.export(packed4, tmp_path / "two", layers=2, progress=False)  # --layers: a valid 2-layer model
    assert json.loads((two / "config.json").read_text())["layer_types"] == ["linear_attention"] * 2
    bt.main(["run", str(two), "--device", "cpu", "--k", "2", "1", "--prompt", "12", "--tokens", "3",
             "--max-cpu", "300KB", "--json", str(tmp_path / "r.json")])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / "r.json").read_text())
    assert res["engine"] == "transformers+accelerate" and res["layers"] == 2 and res["max_memory"] == {"cpu": 300000}
    assert [r["K"] for r in res["runs"]] == [2, 1]
    for r in res["runs"]:
        assert {"engine", "K", "ttft_s", "decode_tok_s", "prompt", "tokens", "load_s"} <= set(r)
        assert r["prompt"] == 12 and r["tokens"] == 3 and not r["time_capped"] and len(r["generated"]) == 4
        assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["load_s"] > 0
        assert r["compute"] == "cpu" and r["offload_folder_bytes"] == 0
        assert r["bytes_gpu"] == 0 and r["bytes_disk"] > r["bytes_cpu"] > 0
    whole = bt.run(two, [1], prompt=12, tokens=3, device="cpu", max_cpu=1e9)["runs"][0]
    assert whole["bytes_disk"] == 0 and whole["bytes_cpu"] == res["runs"][1]["bytes_cpu"] + res["runs"][1]["bytes_disk"]
    assert whole["generated"] == res["runs"][1]["generated"]
    experts = 2 * 8 * 3 * 64 * 64 * 2  # 2 layers x 8 experts x (gate, up, down) of 64 x 64 in bf16
    assert bt.non_expert_bytes(two) + experts == whole["bytes_cpu"]  # --vram-experts adds this to the GPU budget
    bt.main(["run", str(two), "--device", "cpu", "--k", "1", "--prompt", "12", "--tokens", "3", "--max-cpu", "1e9",
             "--fresh-process"])  # the path --mem-limit / --drop-caches take: a child process per K
    child = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert len(child) == 1 and child[0]["generated"] == whole["generated"] and child[0]["max_rss_kb"] > 0
    capped = bt.run(two, [2], prompt=12, tokens=50, device="cpu", max_cpu=1e9, cap_s=0.0)["runs"][0]
    assert capped["time_capped"] and capped["tokens"] == 0 and len(capped["generated"]) == 1  # first token only


def test_bad_input(packed4, hf_bf16, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"index\.json: --layers 9 not in 1\.\.4"):
        bt.export(packed4, tmp_path / "x", layers=9, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        bt.export(packed4, hf_bf16, progress=False)
    with pytest.raises(SystemExit, match="config.json missing"):
        bt.run(tmp_path, [2], device="cpu", max_cpu=1e9)
    monkeypatch.setattr(bt, "CLASS_NAME", "Qwen9MoeForCausalLM")  # a transformers without the class
    with pytest.raises(SystemExit, match=r"transformers 5\.\d+\.\d+\S* has no Qwen9MoeForCausalLM"):
        bt.run(hf_bf16, [2], device="cpu", max_cpu=1e9)
    assert bt.parse_bytes("12GiB") == 12 * 2**30 and bt.parse_bytes("4.1e9") == 4.1e9 and bt.parse_bytes("auto") is None
