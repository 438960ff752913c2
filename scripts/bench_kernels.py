"""Benchmark the C CPU expert kernels (backends/cpu.py) against the torch twin, at real geometry.

    python scripts/bench_kernels.py [--hidden 4096 --inter 1024] [--bits 4 2 8] [--tokens 1 16]
                                    [--threads 1 2] [--isa avx512] [--dot f32 int8] [--reps 15]

One expert forward, down(silu(gate x) * up x), per call, at Qwen3.5-397B-A17B's expert geometry
(H=4096, I=1024) by default. Experts rotate through a pool larger than the last-level cache, so
weights come from DRAM, as they do in the runtime after a read. Reported per (bits, T, threads):
median ms per expert for each decode arithmetic (f32, and int8 where the CPU has it), GB/s of
weight bytes (packed words + scales + biases), that as a fraction of
the memory read bandwidth measured in the same run with the same threads (a C read loop,
fmk_read_bytes; numpy's single-thread sum is printed too), how busy the kernel's threads were
(CPU time / wall time: contention shows there), and the torch twin (TorchKernel: dequantize +
F.linear) with torch on the same number of threads. Medians: the machines are noisy.
A script, never a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

from flashmoe_pack.backends import cpu
from flashmoe_pack.backends.torch_ref import TorchKernel
from flashmoe_pack.pack.reader import ExpertWeights
from flashmoe_pack.quant import QTensor


def random_proj(out: int, n: int, bits: int, group: int, g: torch.Generator) -> QTensor:
    """Random words and random-sign bf16 scales: speed does not depend on the values."""
    words = torch.randint(-(2**31), 2**31 - 1, (out, n * bits // 32), dtype=torch.int32, generator=g)
    scales = (torch.randn(out, n // group, generator=g) * 0.01).to(torch.bfloat16)
    biases = (torch.randn(out, n // group, generator=g) * 0.01).to(torch.bfloat16)
    return QTensor(words, scales, biases, bits, group)


def expert_pool(hidden: int, inter: int, bits: int, group: int, pool_bytes: int):
    """([ExpertWeights] of at least pool_bytes, weight bytes of one expert)."""
    g = torch.Generator().manual_seed(bits)
    one = 3 * (inter * hidden * bits // 8 + 2 * 2 * inter * hidden // group)
    n = max(2, -(-pool_bytes // one))

    def proj(out, n_in):
        return random_proj(out, n_in, bits, group, g)

    return [ExpertWeights(proj(inter, hidden), proj(inter, hidden), proj(hidden, inter), nbytes=one)
            for _ in range(n)], one


def cycling(fn, pool: list, *args):
    """A no-argument call that runs fn(*args[:1], next expert of the pool, *args[1:]) each time."""
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(args[0], pool[state["i"] % len(pool)], *args[1:])

    return call


def median_time(fn, reps: int, calls: int = 1) -> float:
    return median_times(fn, reps, calls)[0]


def median_times(fn, reps: int, calls: int = 1) -> tuple[float, float]:
    """Median wall and process-CPU seconds per call over `reps` batches of `calls` calls (after a warm-up)."""
    fn()
    wall, cpu_s = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall.append((time.perf_counter() - t0) / calls)
        cpu_s.append((time.process_time() - c0) / calls)
    return statistics.median(wall), statistics.median(cpu_s)


def read_bandwidth(threads: int, reps: int, nbytes: int = 512 << 20) -> float:
    """Bytes/s reading a buffer far larger than the caches with `threads` threads (C loop)."""
    buf = torch.ones(nbytes, dtype=torch.uint8)
    return nbytes / median_time(lambda: cpu.read_bandwidth_probe(buf, threads), reps)


def numpy_bandwidth(reps: int, nbytes: int = 512 << 20) -> float:
    a = np.ones(nbytes // 4, dtype=np.float32)
    return nbytes / median_time(a.sum, reps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--isa", choices=cpu.ISAS, help="force an instruction set (default: the best)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--pool-mib", type=int, default=96, help="expert pool size (> last-level cache)")
    ap.add_argument("--dot", nargs="+", choices=cpu.DOTS, help="decode arithmetics (default: all supported)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch twin (slow at T=16)")
    args = ap.parse_args()
    if not cpu.available():
        print(f"C kernels unavailable: {cpu.unavailable_reason()}", file=sys.stderr)
        return 1
    if args.isa:
        cpu.set_isa(args.isa)
    H, inter = args.hidden, args.inter
    print(f"# CPU expert kernels: H={H} I={inter} group={args.group}, ISA {cpu.active_isa()} "
          f"(supported {cpu.supported_isas()}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"median of {args.reps}")
    bw = {t: read_bandwidth(t, args.reps) for t in args.threads}
    per_threads = ", ".join(f"{t} thread(s) {b / 1e9:.1f} GB/s" for t, b in bw.items())
    print(f"# memory read bandwidth (C loop): {per_threads}; "
          f"numpy sum 1 thread {numpy_bandwidth(args.reps) / 1e9:.1f} GB/s")
    dots = args.dot or cpu.supported_dots()
    head = (f"{'bits':>4} {'T':>3} {'thr':>3} {'dot':>4} | {'C ms':>8} {'GB/s':>6} {'% read BW':>9} "
            f"{'tok/s':>8} {'busy':>6} | {'torch ms':>8} {'C speedup':>9}")
    print(head)
    print("-" * len(head))
    torch_threads = torch.get_num_threads()
    for bits in args.bits:
        pool, nbytes = expert_pool(H, inter, bits, args.group, args.pool_mib << 20)
        for T in args.tokens:
            x = torch.randn(T, H)
            for threads in args.threads:
                tw = float("nan")
                if not args.no_torch:
                    torch.set_num_threads(threads)
                    tw = median_time(cycling(TorchKernel().expert_mlp, pool, x), max(3, args.reps // 3),
                                     calls=len(pool) if T == 1 else 2)
                    torch.set_num_threads(torch_threads)
                for dot in dots if T <= 3 else ["f32"]:  # int8 is a decode (T <= 3) arithmetic
                    cpu.set_dot(dot)
                    call = cycling(cpu.expert_forward, pool, x, threads)
                    c, c_cpu = median_times(call, args.reps, calls=len(pool))
                    cpu.set_dot(None)
                    gbs = nbytes / c
                    print(f"{bits:>4} {T:>3} {threads:>3} {dot:>4} | {c * 1e3:8.3f} {gbs / 1e9:6.1f} "
                          f"{100 * gbs / bw[threads]:8.0f}% {T / c:8.0f} {100 * c_cpu / (c * threads):5.0f}%"
                          " | "
                          f"{tw * 1e3:8.2f} {tw / c:8.1f}x")
    q4_bytes = 3 * (inter * H // 2 + 4 * inter * H // args.group)
    print(f"# weight bytes per expert: words + bf16 scales/biases (q4: {q4_bytes} B); GB/s: those bytes / C"
          " time; tok/s: T / C time; busy: process CPU time / (wall x threads), below 100% the kernel's"
          " threads waited or were descheduled (a shared machine); dot: f32 = float32 FMA form (default),"
          " int8 = opt-in int8 activations (FLASHMOE_CPU_DOT=int8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
