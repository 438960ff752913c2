"""Check that llama.cpp reads make_synthetic.py's GGUF as the same model flashmoe-pack runs.

    pip install llama-cpp-python   # built from source: minutes
    python scripts/check_llama_cpp.py

llama.cpp quantizes activations (Q8_0 for Q4_0 weights), so logits differ by a few percent; a wrong
tensor conversion (e.g. GatedDeltaNet V heads not reordered) drops the correlation to ~0.3.
Exits non-zero when the two disagree. (Moved out of the test suite: CI has no llama.cpp.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu  # noqa: E402
import make_synthetic as ms  # noqa: E402

import flashmoe_pack  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        out = ms.write(d / "m", ms.text_config("tiny"), seed=7, gguf_path=d / "m.gguf", progress=False)
        ids = [1, 2, 3, 4, 5, 6, 7, 8]
        got = np.asarray(bench_cpu.llama_logits(str(d / "m.gguf"), ids))
        ref = flashmoe_pack.load(out, dtype="float32").logits(ids).numpy()
    corr = float(np.corrcoef(got.ravel(), ref.ravel())[0, 1])
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"llama.cpp vs flashmoe-pack on the tiny synthetic model: logit correlation {corr:.4f}, "
          f"top-1 agreement {top1:.2f}")
    return 0 if corr > 0.995 and top1 >= 0.6 else 1


if __name__ == "__main__":
    sys.exit(main())
