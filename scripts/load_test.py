"""Load test for `flashmoe-pack serve`: N concurrent streaming clients for T seconds.

    flashmoe-pack serve &                        # the built-in tiny model on 127.0.0.1:8000
    python scripts/load_test.py --clients 4 --duration 20

Each client sends chat requests with its own prompt and seed, streams the reply and records the
latency, the time to first token and the usage. Then a sample of the requests is replayed one by one
and each reply is compared with the one received under load: the same prompt and seed must give the
same text, which shows that no reply went to the wrong request (or was corrupted by another request's
state) while they were queued together. Reports requests/s, tokens/s, latency p50/p90/p99, errors.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter

import httpx


def chat(client: httpx.Client, url: str, prompt: str, seed: int, max_tokens: int) -> dict:
    """One streamed chat request: text, usage, latency, ttft; raises on an HTTP error."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "seed": seed,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise httpx.HTTPStatusError(f"{r.status_code}: {r.text[:200]}", request=r.request, response=r)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            usage = ev.get("usage") or usage
            for c in ev.get("choices", []):
                piece = (c["delta"].get("reasoning_content") or "") + (c["delta"].get("content") or "")
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    return {"text": "".join(text), "usage": usage, "latency": time.perf_counter() - t0, "ttft": ttft}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def run(url: str, clients: int, duration: float, max_tokens: int) -> tuple[list[dict], Counter, float]:
    results, errors, lock = [], Counter(), threading.Lock()
    stop_at = time.perf_counter() + duration

    def client_loop(k: int):
        with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
            i = 0
            while time.perf_counter() < stop_at:
                prompt, seed = (
                    f"Request {i} of client {k}: tell me something about the number {k * 1000 + i}.",
                    k * 100003 + i,
                )
                try:
                    res = chat(client, url, prompt, seed, max_tokens)
                    with lock:
                        results.append({"prompt": prompt, "seed": seed, **res})
                except httpx.HTTPStatusError as e:
                    with lock:
                        errors[f"HTTP {e.response.status_code}"] += 1
                    time.sleep(float(e.response.headers.get("retry-after", 0.5)))
                except Exception as e:  # connection errors, bad streams: count them and go on
                    with lock:
                        errors[type(e).__name__] += 1
                i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per reply (EOS ignored)")
    ap.add_argument("--replay", type=int, default=24, help="requests replayed one by one to check replies")
    args = ap.parse_args()

    results, errors, wall = run(args.url, args.clients, args.duration, args.max_tokens)
    n = len(results)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    comp = sum(r["usage"]["completion_tokens"] for r in results if r["usage"])
    prompt = sum(r["usage"]["prompt_tokens"] for r in results if r["usage"])
    print(f"{args.clients} clients, {wall:.1f} s, {args.max_tokens} tokens per reply")
    print(f"requests     {n} ok, {sum(errors.values())} errors {dict(errors) or ''}")
    rates = f"{n / wall:.2f} req/s, {comp / wall:.1f} completion tok/s, {prompt / wall:.1f} prompt tok/s"
    print(f"throughput   {rates}")
    for name, values in (("latency", lat), ("first token", ttft)):
        p50, p90, p99 = (percentile(values, p) for p in (50, 90, 99))
        print(f"{name:<12} p50 {p50:.2f} s, p90 {p90:.2f} s, p99 {p99:.2f} s")

    step = max(1, n // max(args.replay, 1))
    sample = results[::step][: args.replay]
    bad = 0
    with httpx.Client(timeout=600.0) as client:
        for r in sample:
            again = chat(client, args.url, r["prompt"], r["seed"], args.max_tokens)
            bad += again["text"] != r["text"]
    print(f"replay       {len(sample)} requests replayed one by one, {bad} replies differ")
    raise SystemExit(1 if bad or errors else 0)


if __name__ == "__main__":
    main()
