"""Per-layer timing for `run --timing`: wall time by section, summed over steps."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class Profiler:
    """Accumulates seconds per (section, layer). Sections nest: "experts" contains
    "expert_io" and "expert_compute", so the report subtracts them to get routing overheads."""

    def __init__(self, sync=None):
        self.times: dict[tuple[str, int], float] = defaultdict(float)
        self._sync = sync  # e.g. torch.cuda.synchronize, so device work is charged to its section

    @contextmanager
    def section(self, name: str, layer: int):
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.times[(name, layer)] += time.perf_counter() - t0

    def reset(self) -> None:
        self.times.clear()

    def by_section(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (name, _), t in self.times.items():
            out[name] += t
        return dict(out)

    def by_layer(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for (name, layer), t in self.times.items():
            out[layer][name] += t
        return {k: dict(v) for k, v in sorted(out.items())}
