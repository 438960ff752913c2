"""The `--device mps` expert kernel: Metal shaders (metal/qmv.metal) for one decode token.

For T == 1 and 2/4/8-bit experts, gate, up and down each run as one quantized matrix-vector
product on the GPU (`qmv_<bits>_<scale dtype>` in qmv.metal) and silu(gate) * up runs in torch.
Everything else (prefill T > 1, unquantized bits-16 experts, no MPS device, a shader that does
not compile) falls back to the torch twin `TorchKernel`; `fallback_reason` says why, and each
distinct reason is logged once.

`qmv_twin` is the shader's arithmetic written in torch; qmv.metal follows it line by line.
Metal cannot run on the Linux test machines, so the twin is what tests/test_metal.py checks.
"""

from __future__ import annotations

import logging
import re
import threading
from importlib import resources

import torch
import torch.nn.functional as F

from ..pack.reader import ExpertWeights
from ..quant import QTensor
from .torch_ref import TorchKernel

log = logging.getLogger(__name__)

SHADER = "metal/qmv.metal"  # package data of flashmoe_pack
SIMD_WIDTH = 32  # lanes per SIMD group on every Apple GPU; the shader assumes it
ROWS_PER_GROUP = 4  # rows per threadgroup: threadgroup size = 4 * 32 = 128 threads
# The shader's buffer arguments, in order (tests check them against the .metal source).
QMV_ARGS = ("y", "w", "scales", "biases", "x", "out_features", "in_features", "group_size")
SCALE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
BITS = (2, 4, 8)


def kernel_name(bits: int, scale_dtype: torch.dtype) -> str:
    """The qmv.metal entry point for `bits`-bit weights with scales/biases in `scale_dtype`."""
    return f"qmv_{bits}_{SCALE_NAMES[scale_dtype]}"


KERNEL_NAMES = tuple(kernel_name(b, d) for b in BITS for d in SCALE_NAMES)


def shader_source() -> str:
    return (resources.files("flashmoe_pack") / SHADER).read_text()


def shader_kernels(source: str) -> list[str]:
    """Entry points the source defines: its `QMV(bits, type, name)` instantiation lines."""
    return [f"qmv_{b}_{n}" for b, n in re.findall(r"^QMV\((\d+),\s*\w+,\s*(\w+)\)", source, re.M)]


def qmv_twin(words: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, x: torch.Tensor,
             bits: int, group_size: int) -> torch.Tensor:
    """y = W x for a quantized W, in exactly the shader's float32 arithmetic (qmv_lane).

    words [out, in*bits/32] int32, scales/biases [out, in/group_size], x [in] -> y [out] float32.
    Per uint32 word: s1 = sum q*x, s2 = sum x over its 32/bits values, then scale*s1 + bias*s2
    with its group's scale and bias; the row sums these. Since no word straddles two groups,
    this is per group scale * sum(q*x) + bias * sum(x). Only the order of the final float32
    additions differs from the GPU (lane-strided, then simd_sum).
    """
    per_word = 32 // bits
    out, nwords = words.shape
    mask = (1 << bits) - 1
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits  # [P]
    w = words.to(torch.int64) & 0xFFFFFFFF  # uint32 values  [out, W]
    q = ((w.unsqueeze(-1) >> shifts) & mask).float()  # shader: (word >> BITS*i) & MASK  [out, W, P]
    xk = x.float().reshape(nwords, per_word)  # shader: xk = x + k*PER_WORD  [W, P]
    s1 = (q * xk).sum(-1)  # shader: s1 += q * xk[i]  [out, W]
    s2 = xk.sum(-1)  # shader: s2 += xk[i]  [W]
    group = torch.arange(nwords, device=words.device) // (group_size // per_word)  # shader: g  [W]
    part = scales.float()[:, group] * s1 + biases.float()[:, group] * s2  # shader: acc +=  [out, W]
    return part.sum(-1)  # shader: lane sums, then simd_sum  [out]


_lock = threading.Lock()
_compiled: dict[str, object] = {}  # "lib" -> library, or "error" -> why it is unusable


def metal_library():
    """(library, None) or (None, reason). Compiles qmv.metal once per process, on first use."""
    with _lock:
        if not _compiled:
            try:
                if not torch.backends.mps.is_available():
                    raise RuntimeError("torch.backends.mps.is_available() is False")
                lib = torch.mps.compile_shader(shader_source())
                width = getattr(getattr(lib, KERNEL_NAMES[0]), "thread_execution_width", SIMD_WIDTH)
                if width != SIMD_WIDTH:
                    raise RuntimeError(f"SIMD width {width}, the shader assumes {SIMD_WIDTH}")
                _compiled["lib"] = lib
            except Exception as e:  # noqa: BLE001 - any failure means: use the torch kernel
                _compiled["error"] = f"Metal shaders unavailable ({type(e).__name__}: {e})"
        return _compiled.get("lib"), _compiled.get("error")


class MetalKernel:
    """Expert MLP on Apple GPUs. `library`/`device_type` exist so tests can drive the launch
    logic with a stand-in library on CPU; by default qmv.metal is compiled for "mps"."""

    name = "metal"

    def __init__(self, library=None, device_type: str = "mps"):
        self.fallback = TorchKernel()
        self.library, self.device_type = library, device_type
        self.fallback_reason: str | None = None  # why the last fallback happened
        self.launches = 0  # shader launches so far (tests, bench)
        self._logged: set[str] = set()

    def expert_mlp(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype."""
        lib, reason = self._route(x, w)
        if lib is None:
            self._note(reason)
            return self.fallback.expert_mlp(x, w)
        xf = x.reshape(-1).to(torch.float32).contiguous()  # exact for fp16/bf16/fp32  [H]
        gate = self._qmv(lib, w.gate, xf)  # [I]
        up = self._qmv(lib, w.up, xf)  # [I]
        h = (F.silu(gate) * up).contiguous()  # [I]
        return self._qmv(lib, w.down, h).to(x.dtype).unsqueeze(0)  # [1, H]

    def _route(self, x: torch.Tensor, w: ExpertWeights):
        """(library, None) when the shaders apply to this call, else (None, reason)."""
        if x.dim() != 2 or x.shape[0] != 1:
            return None, "T > 1 (prefill) runs the torch kernel"
        projs = (w.gate, w.up, w.down)
        if not all(isinstance(p, QTensor) for p in projs):
            return None, "unquantized (bits 16) experts run the torch kernel"
        for p in projs:
            if p.bits not in BITS or p.scales.dtype not in SCALE_NAMES or p.group_size % (32 // p.bits):
                return None, f"no shader for bits={p.bits} scales={p.scales.dtype} group={p.group_size}"
        if x.device.type != self.device_type or any(p.weight.device.type != self.device_type for p in projs):
            return None, f"tensors are on {x.device.type}, the shaders need {self.device_type}"
        if self.library is None:
            lib, err = metal_library()
            if lib is None:
                return None, err
            self.library = lib
        return self.library, None

    def _qmv(self, lib, qt: QTensor, x: torch.Tensor) -> torch.Tensor:
        """Launch qmv for W = qt on x [in] float32 -> y [out] float32 (asserts what it binds)."""
        out, n = qt.shape
        assert qt.weight.dtype in (torch.int32, torch.uint32) and qt.weight.is_contiguous(), "words: 32-bit"
        assert qt.scales.shape == qt.biases.shape == (out, n // qt.group_size), "scales/biases shape"
        assert qt.scales.dtype == qt.biases.dtype and qt.scales.is_contiguous() and qt.biases.is_contiguous()
        assert x.dtype == torch.float32 and x.shape == (n,) and x.is_contiguous(), "x: float32 [in]"
        y = torch.empty(out, dtype=torch.float32, device=x.device)
        fn = getattr(lib, kernel_name(qt.bits, qt.scales.dtype))
        fn(y, qt.weight, qt.scales, qt.biases, x, out, n, qt.group_size,
           threads=out * SIMD_WIDTH, group_size=ROWS_PER_GROUP * SIMD_WIDTH)
        self.launches += 1
        return y

    def _note(self, reason: str) -> None:
        self.fallback_reason = reason
        if reason not in self._logged:  # once per distinct reason, never per token
            self._logged.add(reason)
            unavailable = reason.startswith(("Metal", "tensors"))
            log.log(logging.WARNING if unavailable else logging.INFO, "MetalKernel fallback: %s", reason)
