"""flashmoe-pack on CUDA against llama.cpp CUDA (llama-bench), same weights, same budgets, one table.

    python scripts/make_synthetic.py /data/m --geometry qwen35-397b --layers 5 --gguf /data/m.gguf --jobs 6
    python scripts/bench_cuda.py /data/m /data/m.gguf --llama-bench llama.cpp/build/bin/llama-bench --out OUT

One format at a time, where both do not fit the disk (12 layers: GGUF 47 GB + pack 56 GB on a 64 GB disk):
each run does what the files present allow (llama.cpp needs the GGUF, flashmoe-pack the pack) and --merge
keeps the earlier results in OUT/bench_cuda.json (scripts/h200_session.sh does this):

    python scripts/make_synthetic.py --gguf /data/m.gguf --layers 12 --jobs 6
    python scripts/bench_cuda.py /data/m /data/m.gguf --llama-bench ... --out OUT --merge --skip resident
    rm /data/m.gguf; python scripts/make_synthetic.py /data/m --layers 12 --jobs 6
    python scripts/bench_cuda.py /data/m /data/m.gguf --llama-bench ... --out OUT --merge --skip resident

The issue's consumer scenario is a 14-layer Qwen3.5-397B-geometry model (~50 GB) with 12 GB of VRAM for
experts and 24 GB of host RAM. With L layers the budgets keep its fractions: the experts of
round(3 L / 14) layers in VRAM (llama.cpp: `--n-cpu-moe L - that`, the setting the issue's own
llama.cpp run used, 3 of 14 layers; flashmoe-pack: the same number of experts as VRAM slots) and a
host memory limit of 24 GB x (GGUF bytes / 54.9 GB), a cgroup v2 memory.max that both engines run
under (it also caps their page cache).

Every engine run is a fresh process in that cgroup, after the page cache was dropped:
- flashmoe: `load(device="cuda", gpu_expert_cache=<slots>, expert_cache="auto" (host tier: what the
  cgroup leaves), io="direct")`; a warm-up (Triton compiles) on a separate state, then fresh caches; a
  warm-up prompt of the same length (as llama-bench's warm-up run, which fills its page cache; --cold-ttft
  skips it), then a random 512-token prompt (TTFT: prefill + first token), then `--tokens` greedy decode
  steps (--ttft-first-k-only: the prompt at the first K only, later Ks after 16 tokens, both engines).
  Counters per tier from the cache itself; disk bytes from O_DIRECT reads, PCIe bytes from the copies it
  issued.
- llama.cpp: `llama-bench -ngl 99 -ncmoe N -p 512 -n T -r 1 -t 16 -o json` (-p 0 for --ttft-first-k-only's
  later Ks; defaults otherwise: mmap, and a warm-up run of each test before the timed one);
  K is changed by rewriting `qwen35moe.expert_used_count` in the GGUF in place (restored after).
  Its disk bytes are /proc/diskstats deltas over the decode window (llama-bench runs the prompt test
  first, the decode test last); PCIe from `nvidia-smi dmon -s t` over the same window.
- fully resident: every expert in VRAM for both (flashmoe: slots for all, preloaded; llama.cpp:
  `-ncmoe 0`), no memory limit.
Floors, measured in the same run: random O_DIRECT reads of whole expert records (16 threads; with the
GGUF alone, its per-projection expert slices) and pinned host-to-device copies. A token must move
K x L x record x (1 - f) over the disk, f the share of experts VRAM + host memory can hold, and
K x L x record x (1 - f_vram) over PCIe: floor tok/s = 1 / max(disk bytes / disk GB/s, PCIe bytes / H2D
GB/s) (llama.cpp's with its Q4_0 expert size).
Routing of random weights is near uniform: harsher on every cache than a real model.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import statistics
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ISSUE_LAYERS, ISSUE_GPU_LAYERS, ISSUE_GGUF_BYTES, ISSUE_HOST = 14, 3, 54.9e9, 24e9
SHORT_PROMPT = 16  # streaming runs after the first K: decode only, after this prompt
# --ab: name -> (environment variable, value that turns the feature off, what the table calls the feature)
AB = {"overlap": ("FLASHMOE_CUDA_SERIAL", "1", "overlap"),
      "pinned": ("FLASHMOE_CUDA_PINNED_HOST", "0", "page-locked host tier"),
      "exclusive": ("FLASHMOE_CUDA_EXCLUSIVE", "0", "exclusive tiers")}
CG = Path("/sys/fs/cgroup/fmp-bench")
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ floors


def h2d_gbs(nbytes=1 << 30, reps=5) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times[1:]) / 1e9


def expert_chunks(geo: dict, model: Path | None, gguf: Path | None) -> list[tuple[str, int, int]]:
    """(path, offset, bytes) of every expert read an engine makes, 4 KiB-aligned for O_DIRECT: whole records
    of the pack when it is there, else the GGUF's per-projection Q4_0 slices (three reads per expert)."""
    from flashmoe_pack.pack import format as fmt

    if model is not None and (model / fmt.INDEX_NAME).exists():
        from flashmoe_pack.pack import load_index

        ix = load_index(model)
        rb = fmt.align_up(ix.layout.record_bytes, 4096)
        return [(str(ix.path / e["file"]), fmt.expert_offset(x, ix.layout.stride), rb)
                for e in ix.layers for x in range(ix.num_experts)]
    import gguf as gg

    out = []
    for t in gg.GGUFReader(gguf).tensors:
        if re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight", t.name):
            per = int(t.n_bytes) // geo["experts"]
            for x in range(geo["experts"]):
                a = (int(t.data_offset) + x * per) // 4096 * 4096
                out.append((str(gguf), a, fmt.align_up(int(t.data_offset) + (x + 1) * per - a, 4096)))
    return out


def read_gbs(chunks: list[tuple[str, int, int]], n: int = 512, threads: int = 16, seed: int = 1) -> dict:
    """n random expert reads from `chunks` with O_DIRECT, `threads` workers each keeping one read in flight."""
    fds, direct = {}, True
    for path in {c[0] for c in chunks}:
        try:
            fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fds[path], direct = os.open(path, os.O_RDONLY), False
    rng = random.Random(seed)
    jobs = [rng.choice(chunks) for _ in range(n)]

    def worker(w: int) -> int:
        got, bufs = 0, {}
        for path, off, nbytes in jobs[w::threads]:
            buf = bufs.get(nbytes) or bufs.setdefault(nbytes, mmap.mmap(-1, nbytes))
            got += os.preadv(fds[path], [buf], off)
        return got

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        total = sum(pool.map(worker, range(threads)))
        dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return {"GB_s": total / dt / 1e9, "direct": direct, "threads": threads, "bytes": total,
            "file": chunks[0][0]}


def geometry(model: Path | None, gguf: Path | None) -> dict:
    """Layers, experts, widths, the pack's record bytes, a GGUF Q4_0 expert's bytes and the GGUF's size: from
    the pack when it is there, else from the GGUF (the synthetic pack's layout: 4 bits, group 32, fp16
    scales). Without the GGUF its size is estimated as its experts plus the pack's resident files."""
    from flashmoe_pack.pack import format as fmt

    if model is not None and (model / fmt.INDEX_NAME).exists():
        from flashmoe_pack.pack import load_index

        ix = load_index(model)
        c = ix.raw["experts"]
        cfg = ix.raw["config"].get("text_config") or ix.raw["config"]
        L, E, h, inter = len(ix.layers), ix.num_experts, c["hidden_size"], c["intermediate_size"]
        rec = ix.layout.record_bytes
        resident = sum(f.stat().st_size for f in (model / fmt.RESIDENT_DIR).glob("*.safetensors"))
    else:
        import gguf as gg

        r = gg.GGUFReader(gguf)

        def u(key):
            f = r.fields[f"qwen35moe.{key}"]
            return int(f.parts[f.data[0]][0])

        L, E, h, inter = u("block_count"), u("expert_count"), u("embedding_length"), u("expert_feed_forward_length")
        cfg = {"hidden_size": h, "moe_intermediate_size": inter}
        rec = fmt.record_layout(h, inter, 4, 32, "float16").record_bytes
        resident = None
    gexp = 3 * h * inter // 32 * 18
    if gguf is not None and gguf.exists():
        gsize, estimated = gguf.stat().st_size, False
    else:
        gsize, estimated = L * E * gexp + resident, True
    return {"geometry": f"hidden {cfg.get('hidden_size')}, {E} experts of {cfg.get('moe_intermediate_size')}",
            "layers": L, "experts": E, "record_bytes": rec, "gguf_expert_bytes": gexp, "gguf_bytes": gsize,
            "gguf_bytes_estimated": estimated}


# ------------------------------------------------------------------------------- machine plumbing


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def setup_cgroup(limit: int) -> str | None:
    """cgroup v2 child group with memory.max = limit (swap 0); None when that is not possible."""
    try:
        ctl = Path("/sys/fs/cgroup/cgroup.subtree_control")
        if "memory" not in ctl.read_text().split():
            ctl.write_text("+memory\n")
        CG.mkdir(exist_ok=True)
        (CG / "memory.max").write_text(f"{limit}\n")
        if (CG / "memory.swap.max").exists():
            (CG / "memory.swap.max").write_text("0\n")
        return None
    except OSError as e:
        return f"cgroup v2 memory limit unavailable: {e}"


def in_cgroup(cmd: list[str], limited: bool) -> list[str]:
    if not limited:
        return cmd
    return ["sh", "-c", f'echo $$ > {CG}/cgroup.procs && exec "$@"', "sh", *cmd]


def cgroup_peak() -> int | None:
    for name in ("memory.peak",):
        try:
            return int((CG / name).read_text())
        except (OSError, ValueError):
            pass
    return None


def disk_read_bytes() -> int:
    """Bytes read from whole disks since boot (/proc/diskstats, partitions and virtual devices skipped)."""
    total = 0
    for ln in open("/proc/diskstats"):
        f = ln.split()
        name = f[2]
        if re.fullmatch(r"(vd[a-z]+|sd[a-z]+|xvd[a-z]+|nvme\d+n\d+)", name):
            total += int(f[5]) * 512
    return total


class Sampler:
    """Background samples of (time, disk bytes read) every 0.25 s and `nvidia-smi dmon -s t` (PCIe MB/s)."""

    def __init__(self):
        self.disk: list[tuple[float, int]] = []
        self.pcie: list[tuple[float, float, float]] = []  # (time, rx MB/s to the GPU, tx MB/s)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        try:
            self._dmon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "t", "-d", "1"], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
            self._td = threading.Thread(target=self._read_dmon, daemon=True)
        except OSError:
            self._dmon = self._td = None

    def __enter__(self):
        self._t.start()
        if self._td:
            self._td.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        if self._dmon:
            self._dmon.terminate()
            self._dmon.wait()

    def _run(self):
        while not self._stop.is_set():
            self.disk.append((time.time(), disk_read_bytes()))
            self._stop.wait(0.25)
        self.disk.append((time.time(), disk_read_bytes()))

    def _read_dmon(self):
        for ln in self._dmon.stdout:
            f = ln.split()
            if f and not ln.startswith("#") and len(f) >= 3:
                try:
                    self.pcie.append((time.time(), float(f[1]), float(f[2])))
                except ValueError:
                    pass

    def window(self, t0: float, t1: float) -> dict:
        def at(t):
            best = min(self.disk, key=lambda s: abs(s[0] - t))
            return best[1]

        rx = [r for t, r, _ in self.pcie if t0 <= t <= t1 + 0.5]
        return {"disk_bytes": at(t1) - at(t0), "seconds": t1 - t0,
                "pcie_rx_MB_s_mean": statistics.mean(rx) if rx else None, "pcie_samples": len(rx)}


# --------------------------------------------------------------------------------- GGUF expert K


def gguf_u32_offset(path: Path, key: str) -> int:
    """File offset of the uint32 value of metadata `key` in a GGUF (v2/v3)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        data = f.read(1 << 24)
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos = 24

    def string(p):
        n = struct.unpack_from("<Q", data, p)[0]
        return data[p + 8 : p + 8 + n].decode("utf-8", "replace"), p + 8 + n

    def skip(p, t):
        if t in sizes:
            return p + sizes[t]
        if t == 8:
            return string(p)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, p)
            p += 12
            for _ in range(n):
                p = skip(p, et)
            return p
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    for _ in range(n_kv):
        name, pos = string(pos)
        t = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if name == key:
            if t != 4:
                raise ValueError(f"{path}: {key} has GGUF type {t}, expected uint32")
            return pos
        pos = skip(pos, t)
    raise KeyError(f"{path}: no metadata key {key}")


def set_gguf_k(path: Path, k: int) -> int:
    off = gguf_u32_offset(path, "qwen35moe.expert_used_count")
    with open(path, "r+b") as f:
        f.seek(off)
        old = struct.unpack("<I", f.read(4))[0]
        f.seek(off)
        f.write(struct.pack("<I", k))
    return old


# ------------------------------------------------------------------------------ flashmoe child run


def engine_run(spec: dict) -> dict:
    """One flashmoe-pack process: load, warm up, fresh caches, TTFT + decode for each K in spec."""
    import torch

    import flashmoe_pack
    from flashmoe_pack.backends.cuda import cuda_experts

    dev = spec.get("device", "cuda")  # "cpu": a dry run of this logic (tests, TRITON_INTERPRET=1)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    m = flashmoe_pack.load(spec["model"], device=dev, expert_cache=spec["host"], gpu_expert_cache=spec["vram"],
                           io="direct", threads=spec["threads"])
    out = {"load_s": time.perf_counter() - t0, "runs": []}
    rng = random.Random(0)
    vocab = m.config.vocab_size
    # warm-up: Triton compiles for prefill and decode (on its own state), then fresh tiers
    for _ in m.generate_ids([rng.randrange(vocab) for _ in range(16)], max_tokens=3, stop_ids=()):
        pass
    preloaded = False
    for k in spec["ks"]:
        r = {"K": k}
        if not preloaded:  # fresh tiers for each K, except a fully resident pool: it holds every expert anyway
            m.store.close()
            if dev == "cuda":
                torch.cuda.empty_cache()
            m.store, m.experts = cuda_experts(m.index, spec["vram"], io="direct", threads=spec["threads"],
                                              device=m.device, host_budget=spec["host"])
            m.model.experts = m.experts
            if spec.get("preload"):
                t = time.perf_counter()
                m.store.preload()
                sync()
                r["preload_s"], preloaded = time.perf_counter() - t, True
        m.model.config.num_experts_per_tok = k
        s0 = m.store.tier_stats()
        if spec.get("prefill_warmup", True):  # as llama-bench: a whole warm-up prompt before the timed one
            t = time.perf_counter()
            # fully resident, as many decode steps as the timed run, as llama-bench's warm-up run decodes: the
            # CUDA graph is captured there (the timed sequence moves onto its tensors, engine/cuda_graph.py), and
            # the GPU has been busy for a while. (2026-12-02c: the first timed K after the preload decoded at
            # 3.9 ms per step where the same step took 2.9 in the profile afterwards, and the next K ran at the
            # profile's speed; a GPU still clocking up after the copy-only preload would do that, not verified.)
            n_warm = spec["tokens"] + 1 if spec.get("preload") else 1
            for _ in m.generate_ids([rng.randrange(vocab) for _ in range(spec["prompt"])], max_tokens=n_warm,
                                    stop_ids=()):
                pass
            sync()
            r["prefill_warmup_s"] = time.perf_counter() - t
            s0 = m.store.tier_stats()
        prompt = [rng.randrange(vocab) for _ in range(spec["prompt"])]
        snaps = []
        wall = []
        stamps = []  # when each token arrived (perf_counter)
        g0 = graph_counts(m)
        for i, _tok in enumerate(m.generate_ids(prompt, max_tokens=spec["tokens"] + 1, stop_ids=())):
            stamps.append(time.perf_counter())
            if i == 0:
                snaps.append(m.store.tier_stats())
                wall.append(time.time())
        snaps.append(m.store.tier_stats())
        wall.append(time.time())
        st = m.last_stats
        a, b = snaps
        n = st.generated_tokens - 1

        def d(tier, key, a=a, b=b):
            return b[tier][key] - a[tier][key]

        vh, vm = d("vram", "hits"), d("vram", "misses")
        hh, hm = d("host", "hits"), d("host", "misses")
        r.update({
            "prompt": spec["prompt"], "ttft_s": st.ttft_s, "decode_tok_s": st.decode_tok_s, "decode_tokens": n,
            "vram_slots": b["vram"]["slots"], "host_budget_bytes": b["host"]["budget_bytes"],
            "host_note": m.store.host_note,
            "vram_hit": vh / (vh + vm) if vh + vm else 0.0,
            "host_hit": hh / (hh + hm) if hh + hm else 0.0,
            "disk_bytes_per_tok": d("disk", "bytes") / max(n, 1),
            "h2d_bytes_per_tok": d("vram", "h2d_bytes") / max(n, 1),
            "disk_GB_s": d("disk", "bytes") / st.decode_s / 1e9 if st.decode_s else 0.0,
            "pcie_GB_s": d("vram", "h2d_bytes") / st.decode_s / 1e9 if st.decode_s else 0.0,
            "prefill_disk_bytes": a["disk"]["bytes"] - s0["disk"]["bytes"], "decode_window": [wall[0], wall[1]],
            "direct": b["disk"]["direct"],
            "graph": {key: v - g0[key] for key, v in graph_counts(m).items()},
            "tiers": b.get("mode"), "policy": m.store.policy.name,
            "combined_hit": (vh + hh) / (vh + vm) if vh + vm else 0.0,
            "demotions_per_tok": d("vram", "demotions") / max(n, 1),
            "direct_uploads_per_tok": d("vram", "direct_uploads") / max(n, 1),
            # where a decode token's host time goes: the whole fetch (lookups, reads, copies, moves down), the
            # part spent waiting for reads, and waiting for staging buffers
            "fetch_s_per_tok": d("vram", "fetch_seconds") / max(n, 1),
            "read_wait_s_per_tok": d("disk", "wait_seconds") / max(n, 1),
            "stage_wait_s_per_tok": d("vram", "stage_wait_seconds") / max(n, 1),
            "pinned_buffers": b["host"]["pinned_buffers"],
            "demote_s_per_tok": d("vram", "demote_seconds") / max(n, 1),
        })
        # each decode step's time; the median of all but the first (which captures a graph where one applies)
        # is the steady rate, robust to one-off stalls
        r["token_ms"] = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
        if len(r["token_ms"]) > 2:
            r["decode_tok_s_median"] = 1e3 / statistics.median(r["token_ms"][1:])
        if r["graph"]["captures"] and st.decode_s > r["graph"]["capture_s"]:  # captures happen inside decode
            r["decode_tok_s_excl_capture"] = n / (st.decode_s - r["graph"]["capture_s"])
        out["runs"].append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    if spec.get("profile"):  # at each K, the first (the model's own) first: out["profile"] is that one's
        for i, k in enumerate(spec["ks"]):
            m.model.config.num_experts_per_tok = k
            out["profile" if i == 0 else f"profile_K{k}"] = profile_decode(m, spec["profile"], sync) | {"K": k}
    import resource

    out["max_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def graph_counts(m) -> dict:
    g = m.graphed
    return {"captures": g.captures if g else 0, "capture_s": g.capture_s if g else 0.0,
            "replays": g.replays if g else 0, "adoptions": g.adoptions if g else 0}


def profile_decode(m, steps: int, sync) -> dict:
    """Decode step time: CUDA graph or eager (FLASHMOE_CUDA_GRAPH), with or without the fused layer
    kernels (FLASHMOE_CUDA_LAYER_KERNELS), and torch.profiler's top ops of `steps` eager steps."""
    import torch

    out = {}
    state = m.model.new_state()
    logits = m.model.forward(torch.arange(32), state, last_only=True)[-1]
    tok = int(logits.argmax())
    # graph_exact: the decode kernels without int8 activations where the tuned configs have them
    for name, graph, kern, i8 in (("graph", "1", "1", "1"), ("graph_exact", "1", "1", "0"),
                                  ("graph_no_layer_kernels", "1", "0", "1"), ("eager", "0", "1", "1"),
                                  ("eager_no_layer_kernels", "0", "0", "1")):
        os.environ["FLASHMOE_CUDA_GRAPH"], os.environ["FLASHMOE_CUDA_LAYER_KERNELS"] = graph, kern
        os.environ["FLASHMOE_DECODE_I8"] = i8
        t = time.perf_counter()
        tok = int(m.decode_step(tok, state).argmax())  # captures here
        out[f"first_step_s_{name}"] = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            tok = int(m.decode_step(tok, state).argmax())
        sync()
        out[f"ms_per_step_{name}"] = (time.perf_counter() - t) * 1e3 / steps
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        # the graphed step's kernels: how many, and their summed time against the step's wall time (the rest
        # is gaps between kernels)
        os.environ["FLASHMOE_CUDA_GRAPH"], os.environ["FLASHMOE_CUDA_LAYER_KERNELS"] = "1", "1"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tok = int(m.decode_step(tok, state).argmax())
            sync()
        kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["graph_kernels_per_step"] = len(kern) / steps
        out["graph_kernel_ms_per_step"] = sum(e.device_time_total for e in kern) / 1e3 / steps
        out["graph_top"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    os.environ["FLASHMOE_CUDA_GRAPH"], os.environ["FLASHMOE_CUDA_LAYER_KERNELS"] = "0", "1"  # profile: eager
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            tok = int(m.decode_step(tok, state).argmax())
        sync()
    ka = prof.key_averages()
    out["eager_ops_per_step"] = sum(e.count for e in ka if e.key.startswith("aten::")) / steps
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    out["eager_top"] = ka.table(sort_by=sort, row_limit=20)
    out["eager_top_cpu"] = ka.table(sort_by="self_cpu_time_total", row_limit=20)
    os.environ["FLASHMOE_CUDA_GRAPH"] = "1"
    print(out["eager_top"], out["eager_top_cpu"], file=sys.stderr, flush=True)
    return out


def run_flashmoe(args, spec: dict, limited: bool, timeout: int) -> dict:
    drop_caches()
    cmd = in_cgroup([sys.executable, __file__, "--engine-run", json.dumps(spec)], limited)
    env = {**os.environ, **spec.get("env", {})}
    with Sampler() as smp:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    (args.out / "engine.log").open("a").write(p.stderr)
    if p.returncode != 0:
        return {"error": f"rc {p.returncode}: {p.stderr[-1500:]}", "peak": cgroup_peak() if limited else None}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for r in res["runs"]:
        w = smp.window(*r["decode_window"])
        r["pcie_rx_MB_s_dmon"] = w["pcie_rx_MB_s_mean"]
        r["disk_bytes_per_tok_diskstats"] = w["disk_bytes"] / max(r["decode_tokens"], 1)
    res["cgroup_peak"] = cgroup_peak() if limited else None
    return res


# ---------------------------------------------------------------------------------- llama.cpp run


def run_llama(args, k: int, ncmoe: int, prompt: int, tokens: int, reps: int, limited: bool, timeout: int) -> dict:
    old = set_gguf_k(args.gguf, k)
    drop_caches()
    cmd = [str(args.llama_bench), "-m", str(args.gguf), "-ngl", "99", "-ncmoe", str(ncmoe), "-p", str(prompt),
           "-n", str(tokens), "-r", str(reps), "-t", str(args.cpu_threads), "-o", "json"]
    try:
        with Sampler() as smp:
            t_start = time.time()
            p = subprocess.run(in_cgroup(cmd, limited), capture_output=True, text=True, timeout=timeout)
            t_end = time.time()
    except subprocess.TimeoutExpired as e:
        return {"error": f"timeout after {timeout}s", "cmd": " ".join(cmd), "stderr": str(e.stderr)[-800:]}
    finally:
        set_gguf_k(args.gguf, old)
    (args.out / "llama.log").open("a").write(" ".join(cmd) + "\n" + p.stderr[-6000:] + "\n")
    if p.returncode != 0:
        return {"error": f"rc {p.returncode}", "cmd": " ".join(cmd), "stderr": p.stderr[-1500:],
                "peak": cgroup_peak() if limited else None}
    rows = json.loads(p.stdout)
    out = {"K": k, "ncmoe": ncmoe, "cmd": " ".join(cmd), "wall_s": t_end - t_start,
           "cgroup_peak": cgroup_peak() if limited else None}
    for r in rows:
        if r.get("n_gen", 0) > 0:
            out["decode_tok_s"] = r["avg_ts"]
            out["decode_tok_s_sd"] = r.get("stddev_ts")
            dec_s = r["avg_ns"] / 1e9  # one repetition of the decode test, the last thing llama-bench did
            w = smp.window(t_end - dec_s * reps, t_end)
            out["disk_bytes_per_tok"] = w["disk_bytes"] / (tokens * reps)
            out["disk_GB_s"] = w["disk_bytes"] / w["seconds"] / 1e9 if w["seconds"] else 0.0
            out["pcie_rx_MB_s_dmon"] = w["pcie_rx_MB_s_mean"]
        elif r.get("n_prompt", 0) > 0:
            out["prefill_tok_s"] = r["avg_ts"]
            out["ttft_s"] = r["n_prompt"] / r["avg_ts"]  # prompt processing time (no sampling)
    return out


# ---------------------------------------------------------------------------------------- driver


def floor_disk_gbs(res: dict) -> float:
    """The disk speed the floors assume: the fastest measured in the run, by the probes (before / after each
    phase) or by an engine's own reads averaged over its decode. On the H200 box (2026-12-02) flashmoe-pack's
    decode read 1.20 GB/s where the probes gave 0.90: the probe's figure is a floor under the disk, not a
    ceiling, and a share of floor above 100% would only say the probe was low."""
    seen = [ph[x]["GB_s"] for ph in res.get("phases", []) for x in ("disk_before", "disk_after") if x in ph]
    seen += [res[x]["GB_s"] for x in ("disk_before", "disk_after") if x in res]
    for key, v in res.items():
        if key.startswith("flashmoe_stream_K"):
            seen += [r["disk_GB_s"] for r in v.get("runs", []) if r.get("disk_GB_s")]
        elif key.startswith("llama_stream_K") and isinstance(v, dict) and v.get("disk_GB_s"):
            seen.append(v["disk_GB_s"])
    return max(seen)


def floors(args, geo: dict, gpu_layers: int, host_bytes: float, h2d: float, disk: float) -> dict:
    L, E, rec, gguf_expert = geo["layers"], geo["experts"], geo["record_bytes"], geo["gguf_expert_bytes"]
    out = {}
    for name, size, host_experts in (("flashmoe", rec, host_bytes / rec), ("llama.cpp", gguf_expert,
                                                                          host_bytes / gguf_expert)):
        f_v = gpu_layers / L
        f = min(1.0, f_v + host_experts / (L * E))
        row = {}
        for k in args.k:
            disk_b = k * L * size * (1 - f)
            pcie_b = k * L * size * (1 - f_v) if name == "flashmoe" else 0.0  # llama.cpp computes CPU experts on CPU
            t = max(disk_b / (disk * 1e9), pcie_b / (h2d * 1e9))
            row[k] = {"disk_bytes": disk_b, "pcie_bytes": pcie_b, "tok_s": 1 / t if t else float("inf"), "f": f,
                      "disk_GB_s": disk, "host_bytes": host_bytes}
        out[name] = row
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?",
                    help="the flashmoe-pack model (flashmoe runs are skipped while it is absent)")
    ap.add_argument("gguf", type=Path, nargs="?",
                    help="the same weights as GGUF (llama.cpp runs are skipped while it is absent)")
    ap.add_argument("--llama-bench", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    ap.add_argument("--merge", action="store_true",
                    help="keep the results already in OUT/bench_cuda.json (one format at a time on a small disk)")
    ap.add_argument("--k", type=int, nargs="+", default=[10, 4])
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens, streaming runs")
    ap.add_argument("--resident-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gpu-layers", type=int, default=None, help="layers' worth of experts in VRAM")
    ap.add_argument("--mem-limit", type=float, default=None, help="host memory limit, bytes")
    ap.add_argument("--threads", type=int, default=16, help="flashmoe reader threads")
    ap.add_argument("--cpu-threads", type=int, default=16, help="llama.cpp threads")
    ap.add_argument("--skip", nargs="*", default=[], help="flashmoe llama resident stream")
    ap.add_argument("--ttft-first-k-only", action="store_true",
                    help="streaming: time the prompt at the first K only; later Ks decode after a 16-token prompt, "
                         "with caches barely warm (shorter; default: the prompt at every K)")
    ap.add_argument("--cold-ttft", action="store_true",
                    help="flashmoe: time the prompt from empty tiers (default: after a warm-up prompt of the same "
                    "length, as llama-bench times its prompt after a warm-up run)")
    ap.add_argument("--ab", nargs="+", default=[], choices=list(AB),
                    help="also run flashmoe streaming with one switch off each: " +
                         "; ".join(f"{k}: {v[0]}=1" if v[1] == "1" else f"{k}: {v[0]}={v[1]}" for k, v in AB.items()))
    ap.add_argument("--overlap-ab", action="store_true", help="the same as --ab overlap")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of the whole script on CPU tensors (Triton's interpreter), for tiny models")
    ap.add_argument("--engine-run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.overlap_ab and "overlap" not in args.ab:
        args.ab.insert(0, "overlap")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.engine_run:
        print(json.dumps(engine_run(json.loads(args.engine_run))))
        return
    from flashmoe_pack.pack import format as fmt

    if args.model is None or args.gguf is None:
        ap.error("MODEL and GGUF are required (either may be absent on disk)")
    have_pack = (args.model / fmt.INDEX_NAME).exists()
    have_gguf = args.gguf.exists()
    if not have_pack and not have_gguf:
        sys.exit(f"neither {args.model / fmt.INDEX_NAME} nor {args.gguf} exists")
    if not have_pack:
        args.skip.append("flashmoe")
    if not have_gguf or args.llama_bench is None or not args.llama_bench.exists():
        if have_gguf:
            log(f"no llama-bench at {args.llama_bench}: llama.cpp runs skipped")
        args.skip.append("llama")
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "bench_cuda.json"
    prev = json.loads(res_path.read_text()) if args.merge and res_path.exists() else {}
    if "floors" in prev:  # JSON made the K keys strings
        prev["floors"] = {e: {int(k): v for k, v in rows.items()} for e, rows in prev["floors"].items()}
    geo = geometry(args.model if have_pack else None, args.gguf)
    L, E = geo["layers"], geo["experts"]
    if prev and (prev["layers"], prev["experts"], prev["gguf_expert_bytes"]) != (L, E, geo["gguf_expert_bytes"]):
        sys.exit(f"--merge: {res_path} holds another geometry ({prev['geometry']}, {prev['layers']} layers)")
    if prev and geo["gguf_bytes_estimated"] and not prev.get("gguf_bytes_estimated", True):
        geo["gguf_bytes"], geo["gguf_bytes_estimated"] = prev["gguf_bytes"], False  # the GGUF of an earlier phase
    gpu_layers = args.gpu_layers if args.gpu_layers is not None else max(1, round(ISSUE_GPU_LAYERS * L / ISSUE_LAYERS))
    limit = int(args.mem_limit or ISSUE_HOST * geo["gguf_bytes"] / ISSUE_GGUF_BYTES)
    slot = fmt.align_up(geo["record_bytes"], 256)
    res = dict(prev)
    res.update({**geo, "gpu_layers": gpu_layers, "ncmoe": L - gpu_layers, "mem_limit": limit,
                "vram_expert_bytes": gpu_layers * E * slot, "args": {k: str(v) for k, v in vars(args).items()}})
    engines = [e for e, name in (("flashmoe", "flashmoe"), ("llama.cpp", "llama")) if name not in args.skip]
    res.setdefault("phases", []).append({"engines": engines, "pack": have_pack, "gguf": have_gguf})
    res["cgroup_error"] = setup_cgroup(limit)
    limited = res["cgroup_error"] is None
    res["drop_caches"] = drop_caches()
    log("setup", json.dumps(res)[:2000])
    chunks = expert_chunks(geo, args.model if have_pack else None, args.gguf)
    res["h2d_GB_s"] = h2d_gbs() if args.device == "cuda" else 1e3  # dry run: PCIe never the floor
    res["disk_before"] = read_gbs(chunks)
    log("floors", res["h2d_GB_s"], res["disk_before"])

    def save():
        res_path.write_text(json.dumps(res, indent=1, default=str))

    save()
    budget = {"vram": gpu_layers * E * slot, "host": "auto", "threads": args.threads, "prompt": args.prompt,
              "model": str(args.model), "prefill_warmup": not args.cold_ttft, "device": args.device}
    def stream_prompt(i: int) -> dict:
        """--ttft-first-k-only: later Ks decode after a short prompt (the 2026-12-02 H200 run did: flashmoe's
        tiers were then still cold at K=4, llama.cpp's page cache gained nothing either way)."""
        if i == 0 or not args.ttft_first_k_only:
            return {}
        return {"prompt": SHORT_PROMPT, "prefill_warmup": False}

    if "flashmoe" not in args.skip and "stream" not in args.skip:
        for i, k in enumerate(args.k):
            log("flashmoe stream K", k)
            spec = {**budget, "ks": [k], "tokens": args.tokens, **stream_prompt(i)}
            res[f"flashmoe_stream_K{k}"] = run_flashmoe(args, spec, limited, 600)
            log(json.dumps(res[f"flashmoe_stream_K{k}"])[:600])
            save()
            for name in args.ab:
                var, val = AB[name][:2]
                log(f"flashmoe stream, {var}={val}, K", k)
                res[f"flashmoe_ab_{name}_K{k}"] = run_flashmoe(args, {**spec, "env": {var: val}}, limited, 600)
                save()
    if "llama" not in args.skip and "stream" not in args.skip:
        for i, k in enumerate(args.k):
            log("llama.cpp stream K", k)
            # 14 layers in the issue's run: 4.4 tok/s prefill, twice (warm-up + timed), 0.36 tok/s decode
            prompt = 0 if stream_prompt(i) else args.prompt  # llama-bench: -p 0 runs no prompt test
            res[f"llama_stream_K{k}"] = run_llama(args, k, L - gpu_layers, prompt, args.tokens, 1, limited, 900)
            log(json.dumps(res[f"llama_stream_K{k}"])[:600])
            save()
    if "resident" not in args.skip:
        if "flashmoe" not in args.skip:
            log("flashmoe resident")
            spec = {**budget, "vram": L * E * slot, "host": 0, "ks": args.k, "tokens": args.resident_tokens,
                    "preload": True, "profile": 32}
            res["flashmoe_resident"] = run_flashmoe(args, spec, False, 600)
            log(json.dumps(res["flashmoe_resident"])[:600])
            save()
        if "llama" not in args.skip:
            for k in args.k:
                log("llama.cpp resident K", k)
                res[f"llama_resident_K{k}"] = run_llama(args, k, 0, args.prompt, args.resident_tokens, 3, False, 600)
                log(json.dumps(res[f"llama_resident_K{k}"])[:600])
                save()
    res["disk_after"] = read_gbs(chunks, seed=2)
    res["phases"][-1].update({"disk_before": res["disk_before"], "disk_after": res["disk_after"]})
    host_bytes, estimated = None, False
    for k in args.k:
        r = res.get(f"flashmoe_stream_K{k}", {})
        if r.get("runs"):
            host_bytes = r["runs"][0]["host_budget_bytes"]
    if host_bytes is None:  # no flashmoe run (yet): what its `auto` host tier leaves of the limit, about
        host_bytes, estimated = max(0, limit - (2 << 30)), True
    res["floor_host_bytes"], res["floor_host_bytes_estimated"] = host_bytes, estimated
    # both engines' floors at one disk speed, the fastest of the whole run (floor_disk_gbs), recomputed each phase
    res["floor_disk_GB_s"] = floor_disk_gbs(res)
    res["floors"] = floors(args, geo, gpu_layers, host_bytes, res["h2d_GB_s"], res["floor_disk_GB_s"])
    res["table"] = table(res, args)
    save()
    (args.out / "bench_cuda.md").write_text(res["table"])
    print(res["table"])


def ttft(r: dict, args):
    """A run's TTFT where it prefilled the full --prompt (later streaming Ks prefill a short one)."""
    return r["ttft_s"] if r.get("prompt", args.prompt) == args.prompt else None


def _f(v, fmt_="{:.2f}"):
    return "-" if v is None else fmt_.format(v)


def table(res: dict, args) -> str:
    L = res["layers"]
    rows = [f"| case | engine | K | decode tok/s | TTFT {args.prompt} s | VRAM hit | host hit | disk MB/tok "
            "| disk GB/s | PCIe GB/s | floor tok/s | share of floor |", "|---" * 12 + "|"]
    for k in args.k:
        fl = res["floors"]
        r = (res.get(f"flashmoe_stream_K{k}", {}).get("runs") or [None])[0]
        if r:
            f = fl["flashmoe"][k]["tok_s"]
            rows.append(f"| streaming | flashmoe | {k} | {_f(r['decode_tok_s'])} | {_f(ttft(r, args), '{:.1f}')} | "
                        f"{r['vram_hit'] * 100:.0f}% | {r['host_hit'] * 100:.0f}% "
                        f"({r.get('combined_hit', 0) * 100:.0f}% with VRAM) | "
                        f"{r['disk_bytes_per_tok'] / 1e6:.0f} | {_f(r['disk_GB_s'])} | {_f(r['pcie_GB_s'])} | "
                        f"{_f(f)} | {r['decode_tok_s'] / f * 100:.0f}% |")
        elif f"flashmoe_stream_K{k}" in res:
            rows.append(f"| streaming | flashmoe | {k} | failed: {str(res[f'flashmoe_stream_K{k}'])[:200]} |")
        for name, (_, _, what) in AB.items():
            r0 = (res.get(f"flashmoe_ab_{name}_K{k}", res.get(f"flashmoe_serial_K{k}", {}) if name == "overlap"
                          else {}).get("runs") or [None])[0]
            if r and r0:
                rows.append(f"| streaming, no {what} | flashmoe | {k} | {_f(r0['decode_tok_s'])} | "
                            f"{_f(ttft(r0, args), '{:.1f}')} | {r0['vram_hit'] * 100:.0f}% | "
                            f"{r0['host_hit'] * 100:.0f}% | {r0['disk_bytes_per_tok'] / 1e6:.0f} | "
                            f"{_f(r0['disk_GB_s'])} | {_f(r0['pcie_GB_s'])} | - | {what} buys "
                            f"{r['decode_tok_s'] / r0['decode_tok_s']:.2f}x decode, "
                            f"{r0['ttft_s'] / r['ttft_s']:.2f}x TTFT |")
        q = res.get(f"llama_stream_K{k}")
        if q and "decode_tok_s" in q:
            f = fl["llama.cpp"][k]["tok_s"]
            ph = 1 - q["disk_bytes_per_tok"] / max(k * (L - res["gpu_layers"]) * res["gguf_expert_bytes"], 1)
            pcie = q["pcie_rx_MB_s_dmon"] / 1e3 if q.get("pcie_rx_MB_s_dmon") is not None else None
            rows.append(f"| streaming | llama.cpp | {k} | {_f(q['decode_tok_s'])} | {_f(q.get('ttft_s'), '{:.1f}')} | "
                        f"{res['gpu_layers'] / L * 100:.0f}% (fixed) | {max(ph, 0) * 100:.0f}% (page cache) | "
                        f"{q['disk_bytes_per_tok'] / 1e6:.0f} | {_f(q['disk_GB_s'])} | {_f(pcie)} (dmon) | "
                        f"{_f(f)} | {q['decode_tok_s'] / f * 100:.0f}% |")
        elif q:
            rows.append(f"| streaming | llama.cpp | {k} | failed: {q.get('error')} |")
    fr = res.get("flashmoe_resident", {}).get("runs", [])
    for r in fr:
        steady, med = r.get("decode_tok_s_excl_capture"), r.get("decode_tok_s_median")
        extra = ([f"{_f(steady)} after capture"] if steady else []) + ([f"median step {_f(med)}"] if med else [])
        tok_s = _f(r["decode_tok_s"]) + (f" ({'; '.join(extra)})" if extra else "")
        rows.append(f"| resident | flashmoe | {r['K']} | {tok_s} | {_f(r['ttft_s'], '{:.2f}')} | "
                    f"{r['vram_hit'] * 100:.0f}% | - | 0 | - | - | - | - |")
    for k in args.k:
        q = res.get(f"llama_resident_K{k}")
        if q and "decode_tok_s" in q:
            rows.append(f"| resident | llama.cpp | {k} | {_f(q['decode_tok_s'])} | {_f(q.get('ttft_s'), '{:.2f}')} | "
                        "100% | - | 0 | - | - | - | - |")
        elif q:
            rows.append(f"| resident | llama.cpp | {k} | failed: {q.get('error')} |")
    phases = [ph for ph in res.get("phases", []) if "disk_before" in ph] or [
        {"engines": ["flashmoe", "llama.cpp"], "disk_before": res["disk_before"], "disk_after": res["disk_after"]}]
    disks = "; ".join(f"{'+'.join(ph['engines']) or 'none'}: {ph['disk_before']['GB_s']:.2f} / "
                      f"{ph['disk_after']['GB_s']:.2f}" for ph in phases)
    head = (f"{res.get('geometry', 'Qwen3.5-397B geometry')}, {L} layers "
            f"(flashmoe-pack record {res['record_bytes'] / 2**20:.2f} MiB, "
            f"GGUF Q4_0 expert {res['gguf_expert_bytes'] / 2**20:.2f} MiB, GGUF {res['gguf_bytes'] / 1e9:.1f} GB); "
            f"VRAM for experts: {res['gpu_layers']} of {L} layers ({res['vram_expert_bytes'] / 1e9:.2f} GB; "
            f"llama.cpp -ncmoe {res['ncmoe']}); host memory limit {res['mem_limit'] / 1e9:.2f} GB "
            f"({'cgroup v2 memory.max' if not res.get('cgroup_error') else res['cgroup_error']}); "
            f"disk {disks} GB/s (O_DIRECT expert reads, 16 threads, before / after; the floors take "
            f"{res.get('floor_disk_GB_s', 0):.2f} GB/s, the fastest read in the run, probes and engines), "
            f"H2D {res['h2d_GB_s']:.1f} GB/s (pinned)\n\n")
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
