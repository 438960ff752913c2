"""transformers + accelerate offload: the naive baseline of the CUDA benchmark, on our engine's weights.

    python scripts/bench_transformers.py export PACK HF_DIR [--layers N] [--dtype bfloat16] [--jobs 16]
    python scripts/bench_transformers.py run HF_DIR --k 10 4 [--prompt 512] [--tokens 8] [--time-cap 120] \
        [--device cuda|cpu] [--max-gpu BYTES | --vram-experts BYTES] [--max-cpu BYTES|auto] \
        [--mem-limit BYTES] [--drop-caches] [--fresh-process] [--json OUT.json]

`export` writes a transformers checkpoint (config.json for Qwen3_5MoeForCausalLM, safetensors shards, an
index) from a flashmoe-pack model: every expert dequantized with flashmoe_pack.quant.dequantize (so the
weights are our engine's, rounded once to --dtype) into transformers' fused layout
`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I];
resident tensors as the pack holds them (bf16 matrices, fp32 vectors; 8-bit residents dequantized).
These are the names of the model's own parameters, so accelerate's disk offload reads them where they lie
(no second copy in the offload folder). It streams: one expert per worker in memory, written in place at
its offset (a shard's header is written first). Shards hold at most --shard-size bytes, except a tensor
larger than that, which gets a shard of its own (as save_pretrained does): a 397B-geometry gate_up_proj
is 8.6 GB. `--layers N` keeps the first N layers: bf16 experts are 3.2x the 4-bit records (397B geometry: 12.9 GB
of experts per layer + 4.1 GB of embedding and head + ~0.27 GB of other weights per layer).

`run` loads the checkpoint with transformers (dtype bf16, device_map="auto", max_memory {0: --max-gpu,
"cpu": --max-cpu}, offload_folder for the rest: accelerate fills the GPU, then the CPU, then the disk, in
module order and never back, keeping room for the largest decoder layer on the GPU and on the CPU; it
computes on the GPU when any module was placed there, else on the CPU: the JSON's "compute") once per
K (num_experts_per_tok overridden at load), then decodes greedily with the model's cache (use_cache=True;
the forward in a loop, as generate does: decode_loop says why not generate itself) from a random prompt
of --prompt ids: TTFT = prompt in to the first new token, decode tok/s over the tokens after it. No new
decode step starts after --tokens steps or once --time-cap s have passed since the prompt went in (on
the GPU an offloaded layer is copied whole from RAM or disk for every token: slow by design; the JSON
says how many tokens were timed and whether the cap cut them). One JSON object on the last stdout line.
--mem-limit (a cgroup v2 memory.max that also caps the page cache), --drop-caches and --fresh-process run
each K in a fresh process, as bench_cuda.py runs every engine. `--device cpu` runs the same on the CPU
(max_memory {"cpu": ...} and disk), as the tests do.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from flashmoe_pack.pack import format as fmt  # noqa: E402
from flashmoe_pack.pack import load_index  # noqa: E402
from flashmoe_pack.pack.reader import decode_record, read_record  # noqa: E402
from flashmoe_pack.quant import QTensor, dequantize  # noqa: E402

ENGINE = "transformers+accelerate"
CLASS_NAME = "Qwen3_5MoeForCausalLM"
OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def model_class():
    """transformers' Qwen3.5-MoE causal LM class, or SystemExit naming what is missing."""
    try:
        import transformers
    except ImportError:
        sys.exit("bench_transformers: transformers is not installed (pip install 'transformers>=5' accelerate)")
    cls = getattr(transformers, CLASS_NAME, None)
    if cls is None:
        sys.exit(f"bench_transformers: transformers {transformers.__version__} has no {CLASS_NAME} "
                 "(Qwen3.5-MoE): it needs a transformers 5.x release that ships models/qwen3_5_moe")
    return cls


# ------------------------------------------------------------------------------------------- export


class Planned:
    """One tensor of the exported checkpoint: where its bytes come from and where they go.
    (A plain class: tests load this script through tests/scriptload.py, outside sys.modules, where
    dataclasses cannot resolve string annotations.)"""

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], source: tuple):
        self.name, self.dtype, self.shape = name, dtype, tuple(shape)
        self.source = source  # ("resident", name) or ("experts", layer, "gate_up" | "down")
        self.file = ""
        self.offset = 0  # absolute file offset of the data once the shard's header is written
        self.nbytes = dtype.itemsize
        for d in self.shape:
            self.nbytes *= d


def export_config(index, layers: int, dtype: torch.dtype) -> dict:
    """config.json of the text model (transformers' Qwen3_5MoeTextConfig) for the first `layers` layers."""
    cfg = json.loads(json.dumps(index.raw["config"]))
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int) or not 1 <= layers <= n:
        raise ValueError(f"{index.path / fmt.INDEX_NAME}: --layers {layers} not in 1..{n} (config.num_hidden_layers)")
    cfg["num_hidden_layers"] = layers
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    cfg.update(model_type="qwen3_5_moe_text", architectures=[CLASS_NAME], dtype=fmt.DTYPE_NAMES[dtype])
    return cfg


def plan_tensors(index, layers: int, dtype: torch.dtype) -> list[Planned]:
    """Every tensor of the export, residents first (in the pack's order), then each layer's experts."""
    res = index.raw["resident"]["tensors"]
    quant = {n for n, m in res.items() if "quant" in m}
    aux = {f"{n}.{s}" for n in quant for s in ("scales", "biases")}
    out = []
    for name, meta in res.items():
        if name in aux:
            continue
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= layers:
            continue
        stored = fmt.DTYPES.get(meta["dtype"])
        if name in quant:
            rows, words = meta["shape"]
            shape = (rows, words * 32 // meta["quant"]["bits"])
        else:
            shape = tuple(meta["shape"])
        if stored is None or not stored.is_floating_point and name not in quant:
            raise ValueError(f"{index.path / meta['file']}: resident tensor {name}: dtype {meta['dtype']} "
                             "is not a float dtype this export handles")
        # vectors (norms, A_log, dt_bias) keep fp32 where the pack has it; matrices go to --dtype
        keep = stored == torch.float32 and len(shape) == 1 and dtype != torch.float16
        out.append(Planned(name, torch.float32 if keep else dtype, shape, ("resident", name)))
    h, i, e = (index.raw["experts"][k] for k in ("hidden_size", "intermediate_size", "num_experts"))
    have = {x["layer"] for x in index.layers}
    for layer in range(layers):
        if layer not in have:
            raise ValueError(f"{index.path / fmt.INDEX_NAME}: no expert file for layer {layer}")
        p = f"model.layers.{layer}.mlp.experts"
        out.append(Planned(f"{p}.gate_up_proj", dtype, (e, 2 * i, h), ("experts", layer, "gate_up")))
        out.append(Planned(f"{p}.down_proj", dtype, (e, h, i), ("experts", layer, "down")))
    return out


def check_against_model(cfg: dict, plan: list[Planned]) -> None:
    """Every parameter transformers' model expects is planned with its shape, and nothing else is."""
    cls = model_class()
    from transformers import AutoConfig

    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = cls(config)
    want = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        want.pop("lm_head.weight", None)
    got = {p.name: p.shape for p in plan}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = sorted(n for n in set(want) & set(got) if want[n] != got[n])
    if missing or extra or bad:
        raise ValueError("the pack does not map onto transformers' Qwen3_5MoeForCausalLM: "
                         + "; ".join(s for s in (
                             f"missing {missing[:5]}" if missing else "",
                             f"unexpected {extra[:5]}" if extra else "",
                             "shape " + ", ".join(f"{n} pack {got[n]} vs model {want[n]}" for n in bad[:5])
                             if bad else "") if s))


def assign_shards(plan: list[Planned], shard_bytes: int) -> list[list[Planned]]:
    """Consecutive tensors into shards of at most shard_bytes; a larger tensor alone in its own shard."""
    shards: list[list[Planned]] = []
    size = 0
    for p in plan:
        if not shards or size + p.nbytes > shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    n = len(shards)
    for k, shard in enumerate(shards):
        for p in shard:
            p.file = f"model-{k + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
    return shards


def write_header(path: Path, shard: list[Planned]) -> int:
    """Create `path` with its safetensors header and its final size; set each tensor's data offset."""
    meta: dict = {"__metadata__": {"format": "pt", "source": "flashmoe-pack export"}}
    pos = 0
    for p in shard:
        meta[p.name] = {"dtype": ST_DTYPES[p.dtype], "shape": list(p.shape), "data_offsets": [pos, pos + p.nbytes]}
        p.offset = pos  # relative until the header length is known
        pos += p.nbytes
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    start = 8 + len(head)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(start + pos)
    for p in shard:
        p.offset += start
    return start + pos


def _pwrite(fd: int, t: torch.Tensor, offset: int) -> None:
    data = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _resident(index, name: str, handles: dict) -> torch.Tensor:
    meta = index.raw["resident"]["tensors"][name]
    path = index.path / meta["file"]
    if path not in handles:
        if not path.is_file():
            raise fmt.FormatError(f"{path}: resident file missing")
        handles[path] = safe_open(path, "pt")
    f = handles[path]
    if "quant" in meta:
        q = meta["quant"]
        return dequantize(QTensor(f.get_tensor(name), f.get_tensor(name + ".scales"), f.get_tensor(name + ".biases"),
                                  q["bits"], q["group_size"]), torch.float32)
    return f.get_tensor(name)


def expert_matrices(index, layer: int, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) of one expert in `dtype`, checked against its xxhash64:
    flashmoe_pack.quant.dequantize (float32, rounded once to dtype) or the stored floats at 16 bits."""
    w = decode_record(read_record(index, layer, e), index)
    gate, up, down = (dequantize(p, dtype) if isinstance(p, QTensor) else p.to(dtype) for p in (w.gate, w.up, w.down))
    return torch.cat([gate, up]), down


def export(pack: Path, out: Path, layers: int | None = None, dtype: str = "bfloat16", shard_size: float = 4e9,
           jobs: int = 4, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the transformers checkpoint of `pack` (first `layers` layers) to `out`; returns out."""
    if dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    dt = OUT_DTYPES[dtype]
    index = load_index(pack)
    layers = layers or index.raw["config"]["num_hidden_layers"]
    cfg = export_config(index, layers, dt)
    plan = plan_tensors(index, layers, dt)
    check_against_model(cfg, plan)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (--overwrite to replace its checkpoint)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # first: a directory with config.json is a finished export
    for old in out.glob("*.safetensors"):
        old.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    total = sum(p.nbytes for p in plan)
    free = shutil.disk_usage(out).free
    if total + (1 << 30) > free:
        raise OSError(f"{out}: the export needs {total / 1e9:.1f} GB + 1 GiB margin, {free / 1e9:.1f} GB free "
                      f"(--layers fewer than {layers}?)")
    shards = assign_shards(plan, int(shard_size))
    fds = {}
    for shard in shards:
        write_header(out / shard[0].file, shard)
        fds[shard[0].file] = os.open(out / shard[0].file, os.O_WRONLY)
    e = index.num_experts
    threads = torch.get_num_threads()
    if jobs > 1:
        torch.set_num_threads(1)  # the parallelism is the workers; intra-op threads on top oversubscribe
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"export {dtype}", disable=not progress)
    handles: dict = {}
    try:
        for p in plan:
            if p.source[0] == "resident":
                t = _resident(index, p.name, handles).to(p.dtype)
                if tuple(t.shape) != p.shape:
                    raise fmt.FormatError(f"{index.path}: resident tensor {p.name}: shape {tuple(t.shape)}, "
                                          f"index says {p.shape}")
                _pwrite(fds[p.file], t, p.offset)
                bar.update(p.nbytes)
        handles.clear()
        by_layer = {(p.source[1], p.source[2]): p for p in plan if p.source[0] == "experts"}
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            for layer in range(layers):
                gu, dn = by_layer[(layer, "gate_up")], by_layer[(layer, "down")]

                def one(x, layer=layer, gu=gu, dn=dn):
                    a, b = expert_matrices(index, layer, x, dt)  # torch and the reads release the GIL
                    _pwrite(fds[gu.file], a, gu.offset + x * a.numel() * dt.itemsize)
                    _pwrite(fds[dn.file], b, dn.offset + x * b.numel() * dt.itemsize)
                    return a.numel() * dt.itemsize + b.numel() * dt.itemsize

                for n in pool.map(one, range(e)):  # a worker holds one expert: its writes are in the task
                    bar.update(n)
    finally:
        torch.set_num_threads(threads)
        bar.close()
        for fd in fds.values():
            os.close(fd)
    weight_map = {p.name: p.file for p in plan}
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))  # last: a checkpoint is complete with it
    return out


# ---------------------------------------------------------------------------------------------- run


def parse_bytes(v: str | float | None) -> float | None:
    """'4.1e9', '12GiB', '512MB' or 'auto' (None) -> bytes."""
    if v is None or v == "auto":
        return None
    if isinstance(v, (int, float)):
        return float(v)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(v))
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte count: {v!r} (e.g. 4.1e9, 12GiB, auto)")
    unit = (m.group(2) or "B").rstrip("B") or ""
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30,
            "Ti": 2 ** 40}[unit]
    return float(m.group(1)) * mult


def auto_cpu_budget() -> tuple[int, str]:
    """Host RAM accelerate may fill with weights: what this process may use (memory cgroup aware) less
    max(2 GiB, 15% of memory): the rule of flashmoe-pack's own host tier (engine/store.py)."""
    from flashmoe_pack.engine.store import memory_info

    mem = memory_info()
    reserve = max(2 << 30, int(0.15 * mem.total))
    b = max(0, mem.available - reserve)
    return b, f"auto: available {mem.available / 2**30:.2f} GiB ({mem.source}) - reserve {reserve / 2**30:.2f} GiB"


def read_bytes() -> int | None:
    """Bytes this process caused to be read from storage (/proc/self/io; page faults on the mapped
    safetensors included), None where that file does not exist."""
    try:
        for ln in Path("/proc/self/io").read_text().splitlines():
            if ln.startswith("read_bytes:"):
                return int(ln.split()[1])
    except OSError:
        pass
    return None


def placement(model) -> dict:
    """Bytes of parameters per device of the loaded model's hf_device_map (gpu / cpu / disk)."""
    dmap = getattr(model, "hf_device_map", None) or {"": "cpu"}
    keys = sorted(dmap, key=len, reverse=True)
    out = {"gpu": 0, "cpu": 0, "disk": 0}
    for name, p in model.named_parameters():
        dev = next((dmap[k] for k in keys if k == "" or name == k or name.startswith(k + ".")), "cpu")
        where = "disk" if dev == "disk" else "cpu" if dev == "cpu" else "gpu"
        out[where] += p.numel() * p.element_size()
    return out


@torch.inference_mode()
def decode_loop(model, ids: torch.Tensor, tokens: int, cap_s: float, sync, io: list | None = None
                ) -> tuple[list[float], list[int]]:
    """Greedy decoding through the model's forward and its cache (what generate does, minus its checks):
    returns the start time and one timestamp per new token, and the tokens. Stops after `tokens` decode
    steps, or at the first step that ends more than cap_s after the start. `io` (a list) receives
    read_bytes() at the start, after the first token and at the end.

    Not generate(): transformers builds a causal mask from the cache's length, which it cannot tell when
    no layer is full attention (a 397B-geometry export of fewer than 4 layers): get_seq_length raises.
    Such a model gets the precomputed mask mapping (no mask: one unpadded sequence) the forward accepts."""
    cfg = model.config
    mask = None if "full_attention" in (cfg.layer_types or []) else {"full_attention": None, "linear_attention": None}
    p = ids.shape[1]
    io = io if io is not None else []
    sync()
    io.append(read_bytes())
    stamps = [time.perf_counter()]
    out = model(ids, attention_mask=mask, position_ids=torch.arange(p, device=ids.device)[None], use_cache=True,
                logits_to_keep=1)
    gen = [int(out.logits[0, -1].argmax())]  # .item(): the device sync that ends each step
    stamps.append(time.perf_counter())
    io.append(read_bytes())
    # transformers 5.24 renamed forward's past_key_values to cache (the old name still works, with a warning)
    kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    for i in range(tokens):
        if stamps[-1] - stamps[0] > cap_s:
            break
        tok = torch.tensor([[gen[-1]]], device=ids.device)
        out = model(tok, attention_mask=mask, position_ids=torch.tensor([[p + i]], device=ids.device),
                    use_cache=True, **{kw: cache})
        gen.append(int(out.logits[0, -1].argmax()))
        sync()
        stamps.append(time.perf_counter())
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    io.append(read_bytes())
    return stamps, gen


def run_one(hf_dir: Path, k: int, prompt: int, tokens: int, device: str, max_memory: dict, offload: Path,
            cap_s: float, seed: int = 0) -> dict:
    """Load with accelerate offload at K experts per token, then time greedy decoding (decode_loop)."""
    cls = model_class()
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = cls.from_pretrained(hf_dir, dtype=torch.bfloat16, device_map="auto", max_memory=max_memory,
                                offload_folder=str(offload), num_experts_per_tok=k).eval()
    sync()
    load_s = time.perf_counter() - t0
    loaded_k = {m.top_k for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")}
    if loaded_k != {k}:
        raise RuntimeError(f"{hf_dir}: routers use top_k {sorted(loaded_k)} after num_experts_per_tok={k}")
    place = placement(model)
    # accelerate runs every offloaded module on the first GPU of the map, or on the CPU when the map holds no
    # GPU (with a GPU budget below the largest layer everything goes to disk, and the GPU sits idle)
    on_gpu = any(d not in ("cpu", "disk") for d in (getattr(model, "hf_device_map", None) or {}).values())
    if cuda and not on_gpu:
        print("bench_transformers: nothing fits the GPU budget next to accelerate's reserve for the largest layer; "
              "accelerate computes on the CPU", file=sys.stderr)
    g = torch.Generator().manual_seed(seed + k)
    dev = "cuda:0" if on_gpu else "cpu"  # accelerate's hooks move activations between devices
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=g).to(dev)
    io: list = []
    stamps, gen = decode_loop(model, ids, tokens, cap_s, sync, io)
    n = len(stamps) - 2  # decode tokens: after the first
    t_start = stamps[0]
    st = stamps[1:]
    r = {
        "engine": ENGINE, "K": k, "ttft_s": st[0] - t_start,
        "decode_tok_s": n / (st[-1] - st[0]) if n > 0 and st[-1] > st[0] else None,
        "prompt": prompt, "tokens": n, "tokens_requested": tokens, "time_cap_s": cap_s,
        "time_capped": n < tokens, "load_s": load_s, "generate_s": st[-1] - t_start,
        "compute": "cuda:0" if on_gpu else "cpu",
        "bytes_gpu": place["gpu"], "bytes_cpu": place["cpu"], "bytes_disk": place["disk"],
        "max_memory": {str(d): v for d, v in max_memory.items()},
        "device_map": _summary(model.hf_device_map) if getattr(model, "hf_device_map", None) else None,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "generated": gen,
        "prefill_disk_bytes": io[1] - io[0] if None not in io else None,
        "disk_bytes_per_tok": (io[2] - io[1]) / n if None not in io and n > 0 else None,
        "disk_GB_s": (io[2] - io[1]) / (st[-1] - st[0]) / 1e9 if None not in io and n > 0 and st[-1] > st[0] else None,
        "offload_folder_bytes": sum(f.stat().st_size for f in offload.rglob("*") if f.is_file()),
    }
    if cuda:
        r["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    del model
    gc.collect()
    return r


def _summary(dmap: dict) -> dict:
    """hf_device_map folded to {device: [module prefixes]}."""
    out: dict[str, list[str]] = {}
    for name, dev in dmap.items():
        out.setdefault(str(dev), []).append(name)
    return out


def non_expert_bytes(hf_dir: Path) -> int:
    """Bytes of every tensor but the routed experts, in bf16 (what the model holds them in): flashmoe-pack's
    resident weights, which it keeps in VRAM next to its expert slots."""
    total = 0
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if ".mlp.experts." not in name:
                    n = 2
                    for d in st.get_slice(name).get_shape():
                        n *= d
                    total += n
    return total


def run(hf_dir: Path, ks: list[int], prompt: int = 512, tokens: int = 8, device: str = "cuda",
        max_gpu: float | None = None, max_cpu: float | None = None, offload: Path | None = None,
        cap_s: float = 120.0, seed: int = 0, vram_experts: float | None = None) -> dict:
    """run_one for each K; the result (one JSON-able dict) has the versions, budgets and every run.
    vram_experts (instead of max_gpu): flashmoe-pack's VRAM expert budget; GPU 0 then gets that plus the
    non-expert weights, the VRAM flashmoe-pack's weights take under the same budget."""
    import transformers

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        sys.exit(f"bench_transformers: {hf_dir / 'config.json'} missing: not an exported checkpoint "
                 "(run the export command first)")
    model_class()
    try:
        import accelerate
    except ImportError:
        sys.exit("bench_transformers: accelerate is not installed (device_map offload needs it): pip install "
                 "accelerate")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_transformers: --device cuda but torch.cuda.is_available() is False")
    cpu_how = "given"
    if max_cpu is None:
        max_cpu, cpu_how = auto_cpu_budget()
    max_memory: dict = {"cpu": int(max_cpu)}
    gpu_how = "given"
    if device == "cuda":
        if vram_experts is not None:
            if max_gpu is not None:
                sys.exit("bench_transformers: give --max-gpu or --vram-experts, not both")
            resident = non_expert_bytes(hf_dir)
            max_gpu = resident + vram_experts
            gpu_how = f"--vram-experts {vram_experts:.4g} + non-expert weights {resident:.4g}"
        if max_gpu is None:
            gpu_how = "free VRAM - 2 GiB"
            free, _ = torch.cuda.mem_get_info()
            max_gpu = free - (2 << 30)
        max_memory = {0: int(max_gpu), "cpu": int(max_cpu)}
        torch.ones(8, 8, device="cuda").matmul(torch.ones(8, 8, device="cuda"))  # CUDA context + cuBLAS, untimed
    offload = Path(offload) if offload else hf_dir / "_offload"
    offload.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    res = {"engine": ENGINE, "model": str(hf_dir), "layers": cfg.get("num_hidden_layers"), "device": device,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "torch": torch.__version__, "max_memory": {str(d): v for d, v in max_memory.items()},
           "max_cpu_how": cpu_how, "max_gpu_how": gpu_how if device == "cuda" else None,
           "checkpoint_bytes": sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")),
           "runs": []}
    for k in ks:
        r = run_one(hf_dir, k, prompt, tokens, device, max_memory, offload, cap_s, seed)
        res["runs"].append(r)
        print(json.dumps({x: v for x, v in r.items() if x != "device_map"}), file=sys.stderr, flush=True)
    res["max_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return res


def _bench_cuda():
    """scripts/bench_cuda.py as a module, for its cgroup v2 and page-cache helpers (one copy of them)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fmp_bench_cuda", Path(__file__).with_name("bench_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_children(a) -> dict:
    """One fresh process per K (as bench_cuda runs every engine): optionally after dropping the page cache
    (--drop-caches) and inside a cgroup v2 group whose memory.max (--mem-limit) also caps the page cache."""
    bc = _bench_cuda()
    limited = False
    if a.mem_limit:
        err = bc.setup_cgroup(int(a.mem_limit))
        if err:
            sys.exit(f"bench_transformers: --mem-limit: {err}")
        limited = True
    res: dict = {}
    runs = []
    for k in a.k:
        cmd = [sys.executable, str(Path(__file__).resolve()), "run", str(a.model), "--k", str(k), "--prompt",
               str(a.prompt), "--tokens", str(a.tokens), "--time-cap", str(a.time_cap), "--device", a.device,
               "--seed", str(a.seed)]
        for flag, v in (("--max-gpu", a.max_gpu), ("--max-cpu", a.max_cpu), ("--offload-folder", a.offload_folder),
                        ("--vram-experts", a.vram_experts)):
            if v is not None:
                cmd += [flag, str(v)]
        dropped = bc.drop_caches() if a.drop_caches else False
        t0 = time.perf_counter()
        p = subprocess.run(bc.in_cgroup(cmd, limited), capture_output=True, text=True, timeout=a.timeout)
        extra = {"caches_dropped": dropped, "mem_limit": int(a.mem_limit) if a.mem_limit else None,
                 "process_s": time.perf_counter() - t0}
        if limited:
            extra["cgroup_peak_bytes"] = bc.cgroup_peak()  # memory.peak: since the group was made
            try:
                extra["cgroup_events"] = dict(ln.split() for ln in (bc.CG / "memory.events").read_text().splitlines())
            except OSError:
                pass
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            runs.append({"engine": ENGINE, "K": k, "error": f"rc {p.returncode}" + (
                " (killed: out of memory under --mem-limit?)" if p.returncode in (-9, 137) else ""),
                "stderr": p.stderr[-1500:], **extra})
            continue
        child = json.loads(p.stdout.strip().splitlines()[-1])
        res = res or {x: v for x, v in child.items() if x not in ("runs", "max_rss_kb")}
        runs.append({**child["runs"][0], "max_rss_kb": child["max_rss_kb"], **extra})
    return {"engine": ENGINE, "model": str(a.model), **res, "runs": runs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a transformers checkpoint from a flashmoe-pack model")
    ex.add_argument("pack", type=Path)
    ex.add_argument("out", type=Path)
    ex.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    ex.add_argument("--dtype", default="bfloat16", choices=sorted(OUT_DTYPES))
    ex.add_argument("--shard-size", type=parse_bytes, default=4e9, help="bytes per shard (default 4e9)")
    ex.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="experts dequantized at once")
    ex.add_argument("--overwrite", action="store_true")
    rn = sub.add_parser("run", help="time transformers + accelerate offload on an exported checkpoint")
    rn.add_argument("model", type=Path)
    rn.add_argument("--k", type=int, nargs="+", default=[10, 4])
    rn.add_argument("--prompt", type=int, default=512)
    rn.add_argument("--tokens", type=int, default=8, help="decode tokens at most (after the first)")
    rn.add_argument("--time-cap", type=float, default=120.0,
                    help="no new decode step once this many s have passed since the prompt went in")
    rn.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    rn.add_argument("--max-gpu", type=parse_bytes, default=None,
                    help="bytes of weights on GPU 0 (default: free - 2 GiB)")
    rn.add_argument("--vram-experts", type=parse_bytes, default=None,
                    help="instead of --max-gpu: flashmoe-pack's VRAM expert budget; GPU 0 gets it + the non-expert "
                    "weights")
    rn.add_argument("--max-cpu", type=parse_bytes, default=None, help="bytes of weights in RAM (default auto)")
    rn.add_argument("--offload-folder", type=Path, default=None)
    rn.add_argument("--seed", type=int, default=0)
    rn.add_argument("--json", type=Path, default=None, help="also write the result here")
    rn.add_argument("--mem-limit", type=parse_bytes, default=None,
                    help="run each K in a cgroup v2 group with this memory.max (page cache included; root)")
    rn.add_argument("--drop-caches", action="store_true", help="drop the page cache before each K (root)")
    rn.add_argument("--fresh-process", action="store_true",
                    help="one process per K (implied by --mem-limit and --drop-caches)")
    rn.add_argument("--timeout", type=int, default=600, help="seconds per K process")
    a = ap.parse_args(argv)
    if a.cmd == "export":
        out = export(a.pack, a.out, a.layers, a.dtype, a.shard_size, a.jobs, a.overwrite)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(json.dumps({"export": str(out), "bytes": size, "layers": a.layers, "dtype": a.dtype}))
        return
    if a.mem_limit or a.drop_caches or a.fresh_process:
        res = run_children(a)
    else:
        res = run(a.model, a.k, a.prompt, a.tokens, a.device, a.max_gpu, a.max_cpu, a.offload_folder, a.time_cap,
                  a.seed, a.vram_experts)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
