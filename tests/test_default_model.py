import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flashmoe_pack import default_model
from flashmoe_pack.default_model import default_model_dir, make_source
from flashmoe_pack.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("default-source"))


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_make_source_is_byte_identical(source, tmp_path):
    again = _files(make_source(tmp_path / "again"))
    assert again == _files(source)
    # Another process with another hash seed: nothing may depend on set/dict hashing or global RNG state.
    code = "import sys; from flashmoe_pack.default_model import make_source; make_source(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "proc")], check=True, env=env, cwd=ROOT)
    assert _files(tmp_path / "proc") == _files(source)


def test_config_layout(source):
    cfg = json.loads((source / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_moe"
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    t = cfg["text_config"]
    assert t["model_type"] == "qwen3_5_moe_text"
    assert t["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    heads = (t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"])
    assert (t["hidden_size"], *heads) == (128, 4, 2, 32)
    assert (t["num_experts"], t["num_experts_per_tok"], t["moe_intermediate_size"]) == (16, 4, 128)
    assert t["moe_intermediate_size"] % 64 == 0 and t["hidden_size"] % 64 == 0  # whole quantization groups
    rope = t["rope_parameters"]
    assert sum(rope["mrope_section"]) * 2 == t["head_dim"] * rope["partial_rotary_factor"]
    tok = Tokenizer.from_dir(source)
    assert t["vocab_size"] == tok.vocab_size
    assert tok.eos_ids == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in names)
    assert "model.language_model.layers.3.mlp.experts.15.down_proj.weight" in names
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in names
    assert "model.language_model.layers.0.linear_attn.A_log" in names


def test_transformers_loads_every_text_weight(source):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
        str(source), output_loading_info=True, dtype=torch.float32)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert [k for k in info["missing_keys"] if not k.startswith("model.visual.")] == []
    # transformers fuses the per-expert tensors; check the fusion saw them in the order we meant.
    sd = model.state_dict()
    L = "model.language_model.layers.2.mlp.experts."
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        gate, up, down = (f.get_tensor(f"{L}5.{p}_proj.weight").float() for p in ("gate", "up", "down"))
        a_log = f.get_tensor("model.language_model.layers.0.linear_attn.A_log").float()
    assert torch.equal(sd[L + "gate_up_proj"][5], torch.cat([gate, up]))
    assert torch.equal(sd[L + "down_proj"][5], down)
    assert 0 <= a_log.min() and a_log.max() <= torch.log(torch.tensor(16.0)) + 0.05
    tok = Tokenizer.from_dir(source)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the weather like?"}]))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]  # [T, V]
    assert torch.isfinite(logits).all()
    # The router is scaled to be decisive: the 4 chosen experts carry most of the softmax mass.
    router = sd["model.language_model.layers.0.mlp.gate.weight"]
    x = torch.nn.functional.normalize(torch.randn(64, 128), dim=-1) * 128**0.5
    probs = torch.softmax(x @ router.T, dim=-1)
    assert probs.topk(4).values.sum(-1).mean() > 0.6


def test_transformers_tokenizer_agrees(source):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(source))
    ours = Tokenizer.from_dir(source)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? 🙂"}]
    for kw in ({}, {"enable_thinking": False}):
        text = ours.apply_chat_template(messages, **kw)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)


def _fake_pack(monkeypatch, quantize):
    """Replace flashmoe_pack.pack (imported inside default_model_dir) by a stub with this quantize."""
    monkeypatch.setitem(sys.modules, "flashmoe_pack.pack", types.SimpleNamespace(quantize=quantize))


def test_default_model_dir_builds_once_under_a_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_PACK_CACHE", str(tmp_path))
    calls = []

    def quantize(src, out, bits, group_size):
        calls.append((bits, group_size))
        assert (Path(src) / "model.safetensors").is_file()
        time.sleep(0.3)  # long enough for the second thread to reach the lock
        Path(out).mkdir()
        (Path(out) / "index.json").write_text("{}")

    _fake_pack(monkeypatch, quantize)
    (tmp_path / f".{default_model.VERSION}.tmp-stale").mkdir()  # a killed build's leftovers
    results = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [(4, 64)]
    assert results == [tmp_path / default_model.VERSION] * 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [default_model.VERSION, f"{default_model.VERSION}.lock"]


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_PACK_CACHE", str(tmp_path))

    def quantize(src, out, bits, group_size):
        Path(out).mkdir()
        (Path(out) / "half-written").write_text("x")
        raise RuntimeError("disk full")

    _fake_pack(monkeypatch, quantize)
    with pytest.raises(RuntimeError, match="disk full"):
        default_model_dir()
    assert [p.name for p in tmp_path.iterdir()] == [f"{default_model.VERSION}.lock"]


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHMOE_PACK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.cache_root() == tmp_path / "flashmoe-pack"
    monkeypatch.setenv("FLASHMOE_PACK_CACHE", str(tmp_path / "x"))
    assert default_model.cache_root() == tmp_path / "x"


def test_default_model_dir_real_pack(tmp_path, monkeypatch):
    pytest.importorskip("flashmoe_pack.pack")
    monkeypatch.setenv("FLASHMOE_PACK_CACHE", str(tmp_path))
    d = default_model_dir()
    assert d == tmp_path / default_model.VERSION and (d / "index.json").is_file()
    tok = Tokenizer.from_dir(d)  # the tokenizer and chat template travel with the packed model
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert default_model_dir() == d
