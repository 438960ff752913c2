"""The `run --timing` report: per-layer breakdown and totals of the last generation."""

from __future__ import annotations

from .profiler import Profiler

_COLS = ("linear_attn", "full_attn", "routing", "expert_io", "expert_compute", "rest")


def timing_report(model, prof: Profiler) -> str:
    st = model.last_stats
    per_layer = prof.by_layer()
    steps = max(st.generated_tokens, 1)
    lines = ["", f"per-layer time, ms summed over prefill + {st.generated_tokens} steps:",
             f"{'layer':>5} " + " ".join(f"{c:>14}" for c in _COLS)]
    totals = dict.fromkeys(_COLS, 0.0)
    for layer, t in per_layer.items():
        row = dict(t)
        experts = row.pop("experts", 0.0)  # contains expert_io + expert_compute; the remainder is glue
        row["rest"] = row.pop("other", 0.0) + max(experts - row.get("expert_io", 0) - row.get("expert_compute", 0), 0)
        for c in _COLS:
            totals[c] += row.get(c, 0.0)
        name = "head" if layer < 0 else str(layer)
        lines.append(f"{name:>5} " + " ".join(f"{row.get(c, 0.0) * 1e3:>14.2f}" for c in _COLS))
    lines.append(f"{'total':>5} " + " ".join(f"{totals[c] * 1e3:>14.2f}" for c in _COLS))
    n_dec = max(st.generated_tokens - 1, 0)
    lines += [
        f"prompt tokens {st.prompt_tokens}, generated {st.generated_tokens}",
        f"time to first token {st.ttft_s * 1e3:.1f} ms, decode {st.decode_tok_s:.2f} tok/s ({n_dec} tokens)",
        f"expert cache hit rate {st.hit_rate * 100:.1f}%, read from disk {st.bytes_read / 1e6:.2f} MB "
        f"({st.bytes_read / steps / 1e6:.3f} MB per token)",
    ]
    return "\n".join(lines)
