"""The CLI through Typer's test runner: every command, the streaming mode, and user errors."""

from __future__ import annotations

import json

import pytest
from fakehub import fake_hub  # noqa: F401 - pytest fixture
from typer.testing import CliRunner

from flashmoe_pack.cli import app
from flashmoe_pack.pack import format as fmt
from flashmoe_pack.pack import load_index

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_quantize_verify_inspect_run(tiny_src, tmp_path):
    out = tmp_path / "q8"
    r = invoke("quantize", tiny_src, out, "--bits", 8, "--group-size", 32)
    assert r.exit_code == 0, r.output
    r = invoke("verify", out, "--reference", tiny_src, "--prompts", 2)
    assert r.exit_code == 0, r.output
    assert "verify: OK" in r.output and "mean rel" in r.output and "KL" in r.output
    r = invoke("inspect", out)
    assert r.exit_code == 0 and json.loads(r.output)["quantization"]["bits"] == 8
    r = invoke("run", out, "--tokens", 3, "--timing")  # no tokenizer in this checkpoint
    assert r.exit_code == 1 and "no tokenizer.json" in r.output


def test_verify_fails_on_corruption_with_nonzero_exit(packed4, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(packed4, d)
    ix = load_index(d)
    with open(d / fmt.expert_file_name(1), "r+b") as f:
        f.seek(fmt.expert_offset(2, ix.layout.stride) + 1)
        f.write(b"\x00\x01\x02")
    r = invoke("verify", d)
    assert r.exit_code == 1
    assert "layer_001.bin: layer 1 expert 2: checksum mismatch" in r.output


def test_verify_2bit_end_to_end_fails_bounds(tiny_src, tmp_path):
    """2-bit experts on the chaotic random model exceed the end-to-end KL bound: exit 1, not a crash."""
    out = tmp_path / "q2"
    assert invoke("quantize", tiny_src, out, "--bits", 2, "--group-size", 32).exit_code == 0
    r = invoke("verify", out, "--reference", tiny_src, "--prompts", 2)
    assert r.exit_code == 1 and "FAIL end-to-end" in r.output


def test_run_default_model_with_timing():
    """The README's command: no model argument uses the built-in tiny model."""
    r = invoke("run", "--prompt", "Hello", "--tokens", 8, "--timing")
    assert r.exit_code == 0, r.output
    for needle in ("linear_attn", "full_attn", "expert_io", "time to first token", "hit rate", "per token"):
        assert needle in r.output


@pytest.mark.parametrize("args,msg", [
    (("quantize", "/nonexistent/src", "/tmp/x"), "not a folder"),
    (("run", "/nonexistent/model"), "index.json: missing"),
    (("run", "--tokens", 0), "--tokens must be at least 1"),
    (("run", "--expert-cache", "lots"), "cannot read size"),
    (("run", "--device", "cuda"), "cuda"),
    (("verify", "/tmp", "--prompts", 2), "/tmp is not a complete packed model"),
])
def test_user_errors_are_one_line(args, msg, tmp_path):
    r = invoke(*args)
    assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output


def test_quantize_unsupported_model(tiny_src, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (src / "config.json").write_text(json.dumps(cfg))
    r = invoke("quantize", src, tmp_path / "o")
    assert r.exit_code == 1 and "unsupported model_type 'mixtral'" in r.output and "qwen3_5_moe" in r.output


def test_streaming_download_quantize(fake_hub, tiny_hub_src, tmp_path):  # noqa: F811
    """download --quantize: shards are fetched, packed and deleted one at a time; the result is
    the same as packing the local checkpoint, and an interrupted stream resumes."""
    fake_hub.add_repo("org/tiny", tiny_hub_src)
    local = tmp_path / "local"
    assert invoke("quantize", tiny_hub_src, local, "--bits", 4, "--group-size", 32).exit_code == 0
    out, scratch = tmp_path / "streamed", tmp_path / "scratch"
    fake_hub.cut("model-00002-of-00002.safetensors", 1000, times=50)  # the second shard keeps failing
    r = invoke("download", "org/tiny", "--quantize", "--out", out, "--bits", 4, "--group-size", 32,
               "--dir", scratch)
    assert r.exit_code != 0
    assert not (out / fmt.INDEX_NAME).exists()
    state = json.loads((out / fmt.BUILD_DIR / "state.json").read_text())
    assert state["shards_done"] == ["model-00001-of-00002.safetensors"]
    fake_hub.cut("model-00002-of-00002.safetensors", 0, times=0)
    fake_hub.reset_counters()
    r = invoke("quantize", "org/tiny", out, "--from-hub", "--bits", 4, "--group-size", 32, "--scratch", scratch)
    assert r.exit_code == 0, r.output
    assert fake_hub.served["model-00001-of-00002.safetensors"] == 0  # done shards are not fetched again
    assert not scratch.exists()
    a, b = load_index(local), load_index(out)
    assert b.raw["source"]["repo"] == "org/tiny" and len(b.raw["source"]["revision"]) == 40
    for ea, eb in zip(a.layers, b.layers):
        assert ea["xxh64"] == eb["xxh64"]
    assert a.raw["resident"]["tensors"] == b.raw["resident"]["tensors"]


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
def test_resident_option_reaches_load(command, packed4):
    """run, chat and serve all take --resident and pass it to load(): a bad value fails there, naming it."""
    r = invoke(command, packed4, "--resident", "q3")
    assert r.exit_code != 0
    assert "resident='q3'" in r.output and "q4-head" in r.output


def test_cpu_dot_option(packed4, monkeypatch):
    """--cpu-dot: auto picks int8 where the CPU has it (else f32), f32/int8 are taken as asked, an explicit
    FLASHMOE_CPU_DOT is left alone by auto, and bad or unsupported values fail naming the option."""
    from flashmoe_pack.backends import cpu

    if not cpu.available():
        pytest.skip(f"C kernels unavailable: {cpu.unavailable_reason()}")
    monkeypatch.delenv("FLASHMOE_CPU_DOT", raising=False)

    def loaded(r):  # got past the options and loaded the model (this checkpoint has no tokenizer)
        return r.exit_code == 1 and "no tokenizer.json" in r.output

    try:
        assert loaded(invoke("run", packed4, "--tokens", 2, "--cpu-dot", "f32"))
        assert cpu.active_dot() == "f32"
        assert loaded(invoke("run", packed4, "--tokens", 2))
        assert cpu.active_dot() == ("int8" if "int8" in cpu.supported_dots() else "f32")
        r = invoke("run", packed4, "--tokens", 2, "--cpu-dot", "int4")
        assert r.exit_code == 2 and "--cpu-dot 'int4'" in r.output
        r = invoke("run", packed4, "--tokens", 2, "--cpu-dot", "int8")
        if "int8" in cpu.supported_dots():
            assert loaded(r) and cpu.active_dot() == "int8"
        else:
            assert r.exit_code == 2 and "VNNI" in r.output
        cpu.set_dot(None)
        monkeypatch.setenv("FLASHMOE_CPU_DOT", "f32")
        assert loaded(invoke("run", packed4, "--tokens", 2))
        assert cpu.active_dot() == "f32"
    finally:
        cpu.set_dot(None)
