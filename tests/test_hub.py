"""flashmoe_pack.hub against a local fake Hub (tests/fakehub.py) serving a tiny Qwen3.5-MoE checkpoint."""
from __future__ import annotations

import json
import shutil
import threading
import types
from pathlib import Path

import pytest
from fakehub import fake_hub  # noqa: F401 - pytest fixture
from huggingface_hub import constants, file_download

from flashmoe_pack import hub
from flashmoe_pack.hub import HubError

REPO = "tiny-org/tiny-qwen3.5-moe"
WANTED_SMALL = ["model.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
UNWANTED = ["README.md", "pytorch_model.bin", "original/consolidated.safetensors"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen3.5-MoE checkpoint in several shards, plus files that must not be fetched."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    cfg = Qwen3_5MoeTextConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    Qwen3_5MoeForCausalLM(cfg).save_pretrained(d, max_shard_size="100KB")
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (d / "tokenizer_config.json").write_text("{}")
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (d / "README.md").write_text("# not needed\n")
    (d / "pytorch_model.bin").write_bytes(b"\0" * 5000)
    (d / "original").mkdir()
    (d / "original/consolidated.safetensors").write_bytes(b"\0" * 5000)
    assert len(list(d.glob("*.safetensors"))) >= 4
    return d


@pytest.fixture
def served(fake_hub, checkpoint, tmp_path):  # noqa: F811
    """The checkpoint copied (so tests may alter it) and served as REPO; returns (hub, repo dir, commit)."""
    src = tmp_path / "served"
    shutil.copytree(checkpoint, src)
    return fake_hub, src, fake_hub.add_repo(REPO, src)


@pytest.fixture
def no_retry_sleep(monkeypatch):
    """huggingface_hub sleeps 1 s before resuming a dropped transfer; not in tests."""
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda s: None))


def _shards(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.safetensors"))


def _same(a: Path, b: Path, names) -> None:
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_plan_lists_exactly_what_packing_needs(served):
    fh, src, commit = served
    p = hub.plan(REPO)
    assert p.commit == commit and p.revision == "main" and p.repo_id == REPO
    assert p.shards == _shards(src)
    assert sorted(p.small_files) == sorted(WANTED_SMALL)
    assert {n for n, _ in p.files} == set(WANTED_SMALL) | set(_shards(src))
    assert all(size == (src / n).stat().st_size for n, size in p.files)
    assert p.total_bytes == sum((src / n).stat().st_size for n, _ in p.files)
    assert hub.plan(REPO, revision=commit).files == p.files


@pytest.mark.parametrize("lfs_redirect", [True, False])
def test_download_is_byte_identical_and_rerun_fetches_nothing(served, tmp_path, capsys, lfs_redirect):
    fh, src, commit = served
    fh.lfs_redirect = lfs_redirect
    p = hub.plan(REPO)
    out = hub.download(REPO, local_dir=tmp_path / "out", progress=True)
    assert f"{len(p.files)} files" in capsys.readouterr().out
    _same(src, out, [n for n, _ in p.files])
    assert not any((out / n).exists() for n in UNWANTED)
    assert dict(fh.served) == {n: size for n, size in p.files}  # each file exactly once
    assert any(path.startswith("/cdn/") for _, path in fh.requests) == lfs_redirect
    fh.reset_counters()
    hub.download(REPO, local_dir=out, progress=False)
    assert not fh.gets and not fh.served  # complete files: no request at all


@pytest.mark.parametrize("lfs_redirect", [True, False])
def test_dropped_connection_resumes_with_range(served, tmp_path, monkeypatch, no_retry_sleep, lfs_redirect):
    fh, src, commit = served
    fh.lfs_redirect = lfs_redirect
    chunk = 8192  # huggingface_hub keeps what it wrote in units of DOWNLOAD_CHUNK_SIZE (10 MiB by default)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    shard = max(_shards(src), key=lambda n: (src / n).stat().st_size)
    size = (src / shard).stat().st_size
    cut = 5 * chunk
    assert size > cut + chunk
    fh.cut(shard, after_bytes=cut)
    out = hub.download(REPO, local_dir=tmp_path / "out", progress=False)
    _same(src, out, [shard])
    assert fh.gets[shard] == [None, f"bytes={cut}-"]
    assert fh.served[shard] == size  # cut bytes + only the remainder


def test_rerun_after_failed_download_skips_complete_files(served, tmp_path, no_retry_sleep):
    fh, src, commit = served
    p = hub.plan(REPO)
    victim = p.shards[2]
    fh.cut(victim, after_bytes=100, times=6)  # first try + huggingface_hub's 5 retries all cut
    with pytest.raises(HubError, match=victim) as ei:
        hub.download(REPO, local_dir=tmp_path / "out", progress=False, repo_plan=p)
    assert "network error" in str(ei.value) and REPO in str(ei.value)
    done = [n for n, _ in p.files][: [n for n, _ in p.files].index(victim)]
    assert not (tmp_path / "out" / victim).exists()
    fh.reset_counters()
    out = hub.download(REPO, local_dir=tmp_path / "out", progress=False, repo_plan=p)
    _same(src, out, [n for n, _ in p.files])
    assert not any(n in fh.gets for n in done)
    # huggingface_hub 2.x deletes a failed call's partial file: the rerun fetches the victim whole.
    assert fh.served[victim] <= p.size(victim)


def test_wrong_size_local_file_is_refetched(served, tmp_path):
    fh, src, commit = served
    out = hub.download(REPO, local_dir=tmp_path / "out", progress=False)
    shard = _shards(src)[0]
    (out / shard).write_bytes(b"truncated")
    fh.reset_counters()
    hub.download(REPO, local_dir=out, progress=False)
    _same(src, out, [shard])
    assert set(fh.gets) == {shard}


def test_errors_are_hub_errors_naming_repo_and_file(served, tmp_path):
    fh, src, commit = served
    with pytest.raises(HubError, match="repository nobody/nothing not found"):
        hub.plan("nobody/nothing")
    with pytest.raises(HubError, match="revision 'v9' not found in " + REPO):
        hub.download(REPO, revision="v9", local_dir=tmp_path / "x", progress=False)
    p = hub.plan(REPO)
    (src / p.shards[1]).unlink()  # listed, then gone
    with pytest.raises(HubError, match=f"{p.shards[1]} not found in {REPO}"):
        hub.download(REPO, local_dir=tmp_path / "out", progress=False, repo_plan=p)
    dead = fh.url  # a port nothing listens on once the server is stopped
    fh.stop()
    with pytest.raises(HubError, match="network error"):
        hub.plan(REPO, endpoint=dead)


def _on_disk(d: Path) -> int:
    """Shards present in scratch, finished or being written by huggingface_hub. The two globs are not one
    snapshot: a shard deleted and the next one started between them would count twice (seen once in CI,
    2026-12-03), so scan until two scans in a row agree."""

    def scan():
        return sorted(map(str, [*d.glob("*.safetensors"), *d.rglob("*.incomplete")]))

    a, b = scan(), scan()
    while a != b:
        a, b = b, scan()
    return len(a)


@pytest.mark.parametrize("prefetch", [True, False])
def test_stream_shards_holds_at_most_two(served, tmp_path, prefetch):
    fh, src, commit = served
    p = hub.plan(REPO)
    scratch = tmp_path / "scratch"
    seen, peak, stop = [], [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _on_disk(scratch) if scratch.exists() else 0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    it = hub.stream_shards(REPO, None, scratch, progress=False, prefetch=prefetch, skip={p.shards[0]})
    meta = next(it)
    assert sorted(x.name for x in meta.iterdir() if x.is_file()) == sorted(WANTED_SMALL)
    prev = None
    for path in it:
        assert prev is None or not prev.exists()  # the previous shard was deleted
        assert path.read_bytes() == (src / path.name).read_bytes()
        assert _on_disk(scratch) <= (2 if prefetch else 1)
        seen.append(path.name)
        prev = path
    stop.set()
    watcher.join()
    assert seen == p.shards[1:]
    assert p.shards[0] not in fh.gets  # skipped shards are never requested
    assert _on_disk(scratch) == 0 and (scratch / "config.json").exists()
    assert peak[0] <= (2 if prefetch else 1)


def test_stream_shards_early_stop_keeps_current_shard(served, tmp_path):
    fh, src, commit = served
    p = hub.plan(REPO)
    scratch = tmp_path / "scratch"
    it = hub.stream_shards(REPO, None, scratch, progress=False, repo_plan=p)
    next(it)
    first = next(it)
    it.close()  # e.g. the consumer crashed while quantizing `first`
    assert first.exists() and _on_disk(scratch) <= 2
    fh.reset_counters()
    again = hub.stream_shards(REPO, None, scratch, progress=False, repo_plan=p)
    next(again)
    assert next(again) == first and first.name not in fh.gets  # reused, not fetched again
    again.close()
