"""CPU benchmark: flashmoe-pack against llama.cpp (llama-cpp-python) on one synthetic model.

    python scripts/make_synthetic.py /data/m --geometry qwen35-397b --layers 8 --gguf /data/m.gguf
    python scripts/bench_cpu.py /data/m /data/m.gguf --k 10 4 --runs 3 [--mem-limit 8GiB] [--json out.json]

Every run is a fresh process (inside a memory cgroup with --mem-limit) that loads one engine, then
generates twice from different random 512-token prompts: "cold" right after the OS page cache was
dropped, "warm" with whatever both caches kept. Prompts are token ids (the synthetic models have no
tokenizer); decoding is greedy. Disk traffic is the process's /proc/self/io read_bytes (what really
came from the disk, readahead included); the floor is the disk bandwidth measured in the same run
(O_DIRECT reads of expert records) divided by the bytes each token must read: K x layers x expert
bytes, less the share that fits in RAM next to the resident weights (uniform routing hits a cache
of fraction f of the experts f of the time). scripts/README.md explains the table.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

GiB = 1 << 30


# -- the machine -----------------------------------------------------------------------------------
def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def cpu_busy() -> tuple[float, float]:
    """(seconds of CPU busy on the whole machine, seconds used by this process), for contention."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (sum(f) - f[3] - f[4]) / tick, t.user + t.system


def mem_total() -> int:
    return int(Path("/proc/meminfo").read_text().split()[1]) * 1024


class MemCgroup:
    """A memory cgroup with a byte limit (page cache included) under this process's own: cgroup v2
    where the memory controller is delegated, else v1. Children join it through `procs`."""

    def __init__(self, limit: int):
        self.path = None
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, rel = line.split(":", 2)
            base = {"memory": "/sys/fs/cgroup/memory", "": "/sys/fs/cgroup"}.get(ctrl)
            if base is None or not Path(base + rel).is_dir():
                continue
            v2 = ctrl == ""
            if v2 and "memory" not in (Path(base + rel) / "cgroup.subtree_control").read_text():
                continue
            path = Path(base + rel) / f"fmp-bench-{os.getpid()}"
            try:
                path.mkdir()
                (path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
            except OSError:
                continue
            self.path, self.v2 = path, v2
            break
        if self.path is None:
            raise RuntimeError("cannot create a memory cgroup here (no writable v1 memory controller and no "
                               "delegated v2 one)")
        self.procs = str(self.path / "cgroup.procs")

    def peak(self) -> int:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else 0

    def reset_peak(self) -> None:
        if not self.v2:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def close(self) -> None:
        if not self.v2:
            (self.path / "memory.force_empty").write_text("0")
        self.path.rmdir()


def disk_bandwidth(files: list[Path], block: int, total: int = 3 * GiB, threads: int = 2) -> float:
    """GB/s of random O_DIRECT reads of `block` bytes (16 KiB aligned) across `files`."""
    block = (block + 4095) // 4096 * 4096
    fds = [os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for f in files]
    rng = random.Random(0)
    jobs = []
    for _ in range(max(1, total // block)):
        fd = rng.choice(fds)
        jobs.append((fd, rng.randrange(0, (os.fstat(fd).st_size - block) // 16384) * 16384))
    bufs = [mmap.mmap(-1, block) for _ in range(threads)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        n = sum(ex.map(lambda i: sum(os.preadv(fd, [bufs[i]], off) for fd, off in jobs[i::threads]),
                       range(threads)))
    dt = time.perf_counter() - t0
    for fd in fds:
        os.close(fd)
    return n / dt / 1e9


# -- engines (run inside a child process) ----------------------------------------------------------
class LlamaRunner:
    """llama.cpp through llama-cpp-python's low-level API. Default loading maps the file (and
    prefetches it); with `repack` (its default) the CPU backend copies Q4_0 tensors into an
    interleaved layout in RAM, so experts no longer stream from the mapping: for a model larger than
    RAM the load fails and `repack=False` (llama.cpp's --no-repack) is the mode that streams."""

    name = "llama.cpp"

    def __init__(self, gguf: str, k: int | None, threads: int, n_ctx: int, arch: str = "qwen35moe",
                 repack: bool = True):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = repack
        if k:
            self._kv = (L.llama_model_kv_override * 2)()
            self._kv[0].key = f"{arch}.expert_used_count".encode()
            self._kv[0].tag = L.LLAMA_KV_OVERRIDE_TYPE_INT
            self._kv[0].value.val_i64 = k
            self._kv[1].key = b""
            mp.kv_overrides = self._kv
        self.model = L.llama_model_load_from_file(gguf.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(512, 0, 1)
        self.kernel = "ggml-cpu"

    def _eval(self, ids: list[int], pos: int, all_logits: bool = False) -> np.ndarray:
        L, b = self.L, self.batch
        for start in range(0, len(ids), 512):
            chunk = ids[start: start + 512]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, pos + start + i, 1, 0
                b.logits[i] = all_logits or start + i == len(ids) - 1
            if L.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        rows = range(len(chunk)) if all_logits else [len(chunk) - 1]
        return np.array([np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                         for i in rows])

    def generate(self, ids: list[int], n: int, on_first=None) -> dict:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        tok = int(self._eval(ids, 0)[-1].argmax())
        t1 = time.perf_counter()
        if on_first:
            on_first()
        out = [tok]
        for i in range(n - 1):
            tok = int(self._eval([tok], len(ids) + i)[-1].argmax())
            out.append(tok)
        return {"ttft_s": t1 - t0, "decode_s": time.perf_counter() - t1, "tokens": out}


def llama_logits(gguf: str, ids: list[int], threads: int = 2) -> np.ndarray:
    """float32 logits [T, vocab] of llama.cpp on one prefill (tests compare them with flashmoe-pack)."""
    r = LlamaRunner(gguf, None, threads, n_ctx=max(64, len(ids)))
    return r._eval(list(ids), 0, all_logits=True)


class FlashRunner:
    """flashmoe-pack through flashmoe_pack.load (its kernel choice unless --kernel says otherwise)."""

    name = "flashmoe"

    def __init__(self, model: str, k: int | None, threads: int, io: str, cache: int, kernel: str,
                 overlap: bool = True, verify: bool = True, compute_threads: int | None = None):
        import torch

        import flashmoe_pack

        if compute_threads:
            torch.set_num_threads(compute_threads)  # torch ops and, by default, the C kernels

        self.m = flashmoe_pack.load(model, expert_cache=cache, io=io, threads=threads, experts_per_token=k,
                                    verify_reads=verify)
        self.m.experts.overlap = overlap
        if kernel != "auto":
            from flashmoe_pack.backends import cpu, torch_ref

            k = cpu.CpuKernel() if kernel == "cpu" else torch_ref.TorchKernel()
            self.m.kernel = self.m.experts.kernel = k
        self.kernel = getattr(self.m.kernel, "name", type(self.m.kernel).__name__)

    def generate(self, ids: list[int], n: int, on_first=None) -> dict:
        """Store counters are for the decode steps only (after the first token)."""
        out, st0 = [], None
        for i, tok in enumerate(self.m.generate_ids(ids, max_tokens=n, stop_ids=())):
            if i == 0:
                st0 = self.m.store.stats.snapshot()
                if on_first:
                    on_first()
            out.append(tok)
        s, st = self.m.last_stats, self.m.store.stats
        h, m = st.hits - st0.hits, st.misses - st0.misses
        return {"ttft_s": s.ttft_s, "decode_s": s.decode_s, "tokens": out, "hit_rate": h / max(h + m, 1),
                "requested_bytes": st.bytes_read - st0.bytes_read,
                "verify_s": st.verify_seconds - st0.verify_seconds,
                "io_wait_s": st.wait_seconds - st0.wait_seconds, "cache_bytes": self.m.store.cache_bytes,
                "io_mode": getattr(self.m.store, "io_mode", None)}


def child(spec: dict) -> None:
    """One run: load an engine, generate cold then warm; one JSON line per phase on stdout."""
    if spec.get("cgroup_procs"):
        Path(spec["cgroup_procs"]).write_text(str(os.getpid()))
    n_ctx = spec["prompt"] + spec["decode"] + 16
    t0 = time.perf_counter()
    if spec["engine"] == "llama.cpp":
        r = LlamaRunner(spec["gguf"], spec["k"], spec["threads"], n_ctx, repack=spec.get("repack", True))
    else:
        r = FlashRunner(spec["model"], spec["k"], spec["threads"], spec["io"], spec["cache"], spec["kernel"],
                        spec.get("overlap", True), spec.get("verify", True), spec["compute_threads"])
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(spec["seed"])
    for phase in ("cold", "warm"):
        ids = rng.integers(0, spec["vocab"], spec["prompt"]).tolist()
        io, cpu0, w0 = [disk_read_bytes()], cpu_busy(), time.perf_counter()
        res = r.generate(ids, spec["decode"], on_first=lambda io=io: io.append(disk_read_bytes()))
        io.append(disk_read_bytes())
        cpu1, wall = cpu_busy(), time.perf_counter() - w0
        others = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (wall * os.cpu_count())
        res.update(phase=phase, load_s=load_s, kernel=r.kernel, prefill_disk=io[1] - io[0],
                   decode_disk=io[2] - io[1], peak_rss=_status("VmHWM"), others_cpu=others)
        print("RESULT " + json.dumps(res), flush=True)


# -- the parent ------------------------------------------------------------------------------------
def spawn(spec: dict, cg: MemCgroup | None, timeout: float) -> list[dict]:
    if cg is not None:
        cg.reset_peak()
        spec = {**spec, "cgroup_procs": cg.procs}
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                       text=True, timeout=timeout)
    rows = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or len(rows) < 2:
        tail = (p.stderr or "")[-1500:]
        print(f"  run failed (exit {p.returncode}): {tail}", file=sys.stderr)
        rows.append({"phase": "failed", "error": f"exit {p.returncode}", "tokens": []})
    for r in rows:
        r["cgroup_peak"] = cg.peak() if cg is not None else None
    return rows


def _med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(cfg: dict, results: list[dict], bw: float) -> str:
    """One markdown table: medians over runs per (config, K, phase), with the floor."""
    lines = [f"disk read bandwidth (O_DIRECT, measured in this run): {bw:.2f} GB/s; memory "
             f"{cfg['mem'] / GiB:.1f} GiB ({cfg['mem_kind']}); resident weights "
             f"{cfg['resident'] / 1e9:.2f} GB; "
             f"compute threads {cfg['threads']}", "",
             "| engine | K | run | decode tok/s | TTFT s | expert cache hit | disk MB/token | disk GB/s "
             "| floor tok/s | share of floor | peak RSS GB | load s | others' CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["label"], r["k"], r["phase"]), []).append(r)
    for (label, k, phase), rows in groups.items():
        if phase == "failed":
            lines.append(f"| {label} | {k} | FAILED x{len(rows)} |" + " |" * 10)
            continue
        n = max(len(rows[0]["tokens"]) - 1, 1)
        tps = _med([(len(r["tokens"]) - 1) / r["decode_s"] for r in rows])
        disk_tok = _med([r["decode_disk"] / n for r in rows])
        gbs = _med([r["decode_disk"] / r["decode_s"] / 1e9 for r in rows])
        exp_bytes = cfg["expert_bytes"][rows[0]["engine"]]
        need = k * cfg["layers"] * exp_bytes
        all_experts = cfg["num_experts"] * cfg["layers"] * exp_bytes
        fits = max(0.0, min(1.0, (cfg["mem"] - cfg["resident"] - GiB) / all_experts))
        floor = bw * 1e9 / (need * (1 - fits)) if fits < 1 else float("inf")
        hit = _med([r.get("hit_rate") for r in rows]) if rows[0].get("own_cache") else None
        hit_s = f"{hit:.1%}" if hit is not None else f"{max(0.0, 1 - disk_tok / need):.0%} (page cache)"
        med = {key: _med([r[key] for r in rows]) for key in ("ttft_s", "peak_rss", "load_s", "others_cpu")}
        share = f"{tps / floor:.0%}" if floor != float("inf") else "-"
        cells = [label, k, f"{phase} x{len(rows)}", f"{tps:.2f}", f"{med['ttft_s']:.1f}", hit_s,
                 f"{disk_tok / 1e6:.0f}", f"{gbs:.2f}", f"{floor:.2f}", share, f"{med['peak_rss'] / 1e9:.1f}",
                 f"{med['load_s']:.0f}", f"{med['others_cpu']:.0%}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    kernels = sorted({f"{r['label']}: {r.get('kernel')}" for r in results if "kernel" in r})
    lines += ["", "kernels: " + ", ".join(kernels)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="flashmoe-pack vs llama.cpp on a synthetic model (CPU)")
    ap.add_argument("model", nargs="?", help="flashmoe-pack model directory (scripts/make_synthetic.py)")
    ap.add_argument("gguf", nargs="?", help="the GGUF written with it")
    ap.add_argument("--k", type=int, nargs="+", default=[10, 4], help="experts per token (default 10 4)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--io-threads", type=int, default=2, help="flashmoe-pack reader threads")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem-limit", default=None, help="run each engine in a memory cgroup this size (8GiB)")
    ap.add_argument("--engines", nargs="+", default=["flashmoe-direct", "flashmoe-os", "llama.cpp"],
                    help="flashmoe-direct (O_DIRECT + own cache), flashmoe-os (page cache, no own cache), "
                         "flashmoe-direct-serial (no I/O-compute overlap), flashmoe-direct-noverify (no "
                         "xxhash check of reads), llama.cpp (defaults: Q4_0 repacked into RAM), "
                         "llama.cpp-mmap (no repack: experts stay behind the mapping)")
    ap.add_argument("--cache", default="auto", help="flashmoe-direct cache budget (auto: what RAM leaves)")
    ap.add_argument("--kernel", default="auto", choices=["auto", "cpu", "torch"],
                    help="flashmoe expert kernel (auto: what flashmoe_pack.load picks)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path, default=None, help="also write every run here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(json.loads(a.child))
    from flashmoe_pack.engine.runtime import parse_size
    from flashmoe_pack.pack import load_index

    ix = load_index(a.model)
    c = ix.raw["config"]
    files = [ix.path / e["file"] for e in ix.layers]
    resident = sum(os.path.getsize(f) for f in (ix.path / "resident").glob("*.safetensors"))
    h, inter = c["hidden_size"], c["moe_intermediate_size"]
    cg = MemCgroup(parse_size(a.mem_limit)) if a.mem_limit else None
    mem = parse_size(a.mem_limit) if a.mem_limit else mem_total()
    cfg = {"mem": mem, "mem_kind": f"cgroup {'v2' if cg and cg.v2 else 'v1'}" if cg else "whole machine",
           "resident": resident, "threads": a.threads, "layers": len(files), "num_experts": ix.num_experts,
           "expert_bytes": {"flashmoe": (ix.layout.record_bytes + 4095) // 4096 * 4096,
                            "llama.cpp": 3 * h * inter // 32 * 18}}
    # the runtime's own cache: what memory leaves after the resident weights and max(2 GiB, 15%) for
    # everything else (prefill activations and logits, libraries, the page cache of other processes)
    cache = (max(0, mem - resident - max(2 * GiB, int(0.15 * mem))) if a.cache == "auto"
             else parse_size(a.cache))
    print(f"model {a.model}: {len(files)} layers, {ix.num_experts} experts, record "
          f"{ix.layout.record_bytes / 2**20:.2f} MiB; flashmoe-direct cache {cache / GiB:.2f} GiB; "
          f"page cache drop: {drop_caches()}", file=sys.stderr)
    bws = [disk_bandwidth(files, ix.layout.record_bytes)]
    base = {"model": a.model, "gguf": a.gguf, "threads": a.threads, "prompt": a.prompt, "decode": a.decode,
            "vocab": c["vocab_size"], "kernel": a.kernel}
    engines = {"flashmoe": {"engine": "flashmoe", "io": "auto", "cache": "auto"},  # the library's defaults
               "flashmoe-direct": {"engine": "flashmoe", "io": "direct", "cache": cache},
               "flashmoe-os": {"engine": "flashmoe", "io": "os", "cache": 0},
               "flashmoe-direct-serial": {"engine": "flashmoe", "io": "direct", "cache": cache,
                                          "overlap": False},
               "flashmoe-direct-noverify": {"engine": "flashmoe", "io": "direct", "cache": cache,
                                            "verify": False},
               "llama.cpp": {"engine": "llama.cpp"},
               "llama.cpp-mmap": {"engine": "llama.cpp", "repack": False}}
    results = []
    try:
        for run in range(a.runs):
            for k in a.k:
                for label in a.engines:
                    spec = {**base, **engines[label], "k": k, "seed": 1000 * run + k}
                    if label.startswith("flashmoe"):  # threads: readers; compute: torch and the C kernels
                        spec.update(threads=a.io_threads, compute_threads=a.threads)
                    drop_caches()
                    t0 = time.perf_counter()
                    rows = spawn(spec, cg, a.timeout)
                    for r in rows:
                        r.update(label=label, k=k, engine=engines[label]["engine"], run=run,
                                 own_cache=engines[label].get("cache", 0))
                    results += rows
                    done = ", ".join(f"{r['phase']} {(len(r['tokens']) - 1) / r['decode_s']:.2f} tok/s "
                                     f"ttft {r['ttft_s']:.1f} s" for r in rows if r["phase"] != "failed")
                    if rows and rows[0].get("cache_bytes") is not None:
                        done += f" (io {rows[0].get('io_mode')}, cache {rows[0]['cache_bytes'] / GiB:.2f} GiB)"
                    print(f"run {run} K={k} {label}: {time.perf_counter() - t0:.0f} s, {done}",
                          file=sys.stderr, flush=True)
        drop_caches()
        bws.append(disk_bandwidth(files, ix.layout.record_bytes))
    finally:
        if cg is not None:
            cg.close()
    bw = statistics.median(bws)
    print(summarize(cfg, results, bw))
    print(f"disk bandwidth samples: {', '.join(f'{b:.2f}' for b in bws)} GB/s")
    if a.json:
        a.json.write_text(json.dumps({"cfg": cfg, "bw": bws, "args": vars(a), "results": results}, indent=1,
                                     default=str))


if __name__ == "__main__":
    main()
