"""Repeated prefills on the CPU runtime through an expert cache smaller than the model: records read and time
per prompt, with the store's scan handling on (the default) and off (LRU for every batch).

    python scripts/make_synthetic.py /tmp/m2 --geometry qwen35-397b --layers 2 --jobs 2
    python scripts/bench_prefill_cache.py /tmp/m2 --cache 3GiB --prompt 512 --prompts 3

A prefill asks each layer for nearly every expert: a cyclic scan through more records than the cache holds.
Under LRU each prompt replaces the cache before reuse and reads the whole model again; with scans cached
only into free room, every prompt after the first reads what the cache does not hold.
"""

from __future__ import annotations

import argparse
import random
import time


def run(model: str, cache: str, prompt: int, prompts: int, scans: bool) -> list[tuple[int, float, float]]:
    import flashmoe_pack

    m = flashmoe_pack.load(model, expert_cache=cache, io="direct", threads=8)
    if not scans:
        m.store.scan_batch = 1 << 30  # no batch is a scan
    rng = random.Random(0)
    out = []
    for _ in range(prompts):
        ids = [rng.randrange(m.config.vocab_size) for _ in range(prompt)]
        r0, b0, t0 = m.store.stats.reads, m.store.stats.bytes_read, time.perf_counter()
        for _ in m.generate_ids(ids, max_tokens=1, stop_ids=()):
            pass
        out.append((m.store.stats.reads - r0, (m.store.stats.bytes_read - b0) / 1e9, time.perf_counter() - t0))
    m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--cache", default="3GiB")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=3)
    a = ap.parse_args()
    print("| scans | prompt | records read | GB read | seconds (prefill + first token) |")
    print("|---|---|---|---|---|")
    for scans in (True, False):
        for i, (r, gb, s) in enumerate(run(a.model, a.cache, a.prompt, a.prompts, scans)):
            print(f"| {'on' if scans else 'off'} | {i + 1} | {r} | {gb:.2f} | {s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
