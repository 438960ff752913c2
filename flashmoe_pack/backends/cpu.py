"""The `--device cpu` expert kernel: C kernels (runtime/cpu/) called through ctypes.

The package build compiles runtime/cpu/*.c into flashmoe_pack/_cpu_kernels<ext suffix> (setup.py);
it has no Python API, only the fmk_* functions of runtime/cpu/fmk.h. The kernels pick the
instruction set at run time (AVX-512, AVX2+FMA, or portable C); FLASHMOE_ISA=scalar|avx2|avx512
caps it and `set_isa` forces one (tests). Decode products (T <= 3) are float32 FMA-form by default;
FLASHMOE_CPU_DOT=int8 (or `set_dot("int8")`) quantizes activations to int8 per weight group and uses
AVX-512 VNNI dot products where the CPU has them: faster when compute bound, less exact (fmk.h).
Threads: the `threads` argument, else FLASHMOE_THREADS,
else torch.get_num_threads(). FLASHMOE_CPU_KERNEL=torch makes backends.get_kernel("cpu") use the
torch kernel instead (A/B runs).

The torch twins are quant.dequantize + matmul (`matmul_twin`) and TorchKernel (the expert MLP):
the C code computes the same products in float32, per group in the FMA form
scale * sum(q*x) + bias * sum(x), so only the float32 summation order differs.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
import threading
from pathlib import Path

import torch

from ..pack.reader import ExpertWeights
from ..quant import QTensor, dequantize

log = logging.getLogger(__name__)

LIB_STEM = "_cpu_kernels"
ISAS = ("scalar", "avx2", "avx512")  # fmk_isa values 0, 1, 2
DOTS = ("f32", "int8")  # fmk_dot values 0, 1: decode arithmetic (fmk.h)
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # enum fmk_dtype
ERRORS = {-1: "invalid argument", -2: "out of memory", -3: "cannot start a worker thread",
          -4: "instruction set not supported by this CPU"}


class CpuKernelError(RuntimeError):
    """A C kernel returned an error code (fmk_strerror names it)."""

    def __init__(self, what: str, code: int):
        super().__init__(f"{what}: {ERRORS.get(code, 'unknown error')} (fmk status {code})")
        self.code = code


class FmkMatrix(ctypes.Structure):
    """struct fmk_matrix (runtime/cpu/fmk.h), field for field."""

    _fields_ = [("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("biases", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("group_size", ctypes.c_int32), ("wdtype", ctypes.c_int32), ("sdtype", ctypes.c_int32)]


def library_path() -> Path | None:
    """The built shared library inside the package (any ABI tag this interpreter accepts), or the
    file FLASHMOE_CPU_LIB names (another build of runtime/cpu, e.g. the portable-only one)."""
    if os.environ.get("FLASHMOE_CPU_LIB"):
        return Path(os.environ["FLASHMOE_CPU_LIB"])
    here = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"{LIB_STEM}{suffix}").is_file():
            return here / f"{LIB_STEM}{suffix}"
    return None


_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "lib" -> CDLL, or "error" -> why there is none


def library():
    """(CDLL, None), or (None, reason) when the C kernels cannot be used. Loaded once."""
    with _lock:
        if not _loaded:
            path = library_path()
            try:
                if path is None or not path.is_file():
                    where = path or f"{LIB_STEM}*.so in flashmoe_pack/"
                    raise FileNotFoundError(f"no {where} (the package was installed without building "
                                            "runtime/cpu: run `pip install -e .`)")
                _loaded["lib"] = _declare(ctypes.CDLL(str(path)))
            except (OSError, AttributeError) as e:  # missing file, wrong arch, missing symbol
                _loaded["error"] = f"CPU kernels unavailable ({type(e).__name__}: {e})"
        return _loaded.get("lib"), _loaded.get("error")


def _declare(lib):
    mat, f32p, i64, i32 = ctypes.POINTER(FmkMatrix), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fmk_matmul.argtypes = [mat, f32p, i64, f32p, i32]
    lib.fmk_expert_forward.argtypes = [mat, mat, mat, f32p, i64, f32p, i32]
    lib.fmk_read_bytes.argtypes = [ctypes.c_void_p, i64, i32, ctypes.POINTER(ctypes.c_uint64)]
    lib.fmk_dequantize.argtypes = [mat, i64, i64, ctypes.c_void_p, i32, i32]
    lib.fmk_quantize.argtypes = [mat, mat, i32]
    for name in ("fmk_isa_supported", "fmk_set_isa", "fmk_isa_name", "fmk_dot_supported", "fmk_set_dot"):
        getattr(lib, name).argtypes = [i32]
    lib.fmk_isa_name.restype = ctypes.c_char_p
    for name in ("fmk_matmul", "fmk_expert_forward", "fmk_read_bytes", "fmk_dequantize", "fmk_quantize",
                 "fmk_isa_supported", "fmk_isa_best",
                 "fmk_isa_active", "fmk_set_isa", "fmk_dot_supported", "fmk_dot_active", "fmk_set_dot"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def available() -> bool:
    return library()[0] is not None


def unavailable_reason() -> str | None:
    """None when the C kernels load, else why not."""
    return library()[1]


def _lib():
    lib, reason = library()
    if lib is None:
        raise RuntimeError(reason)
    return lib


def supported_isas() -> list[str]:
    """The instruction sets this CPU can run, lowest first."""
    lib = _lib()
    return [name for i, name in enumerate(ISAS) if lib.fmk_isa_supported(i)]


def active_isa() -> str:
    return ISAS[_lib().fmk_isa_active()]


def set_isa(name: str | None) -> None:
    """Force an instruction set for this process (None: back to FLASHMOE_ISA / the best)."""
    rc = _lib().fmk_set_isa(-1 if name is None else ISAS.index(name))
    if rc:
        raise CpuKernelError(f"set_isa({name!r})", rc)


def supported_dots() -> list[str]:
    """Decode arithmetics this CPU can run: "f32" always, "int8" on AVX-512 VNNI CPUs."""
    lib = _lib()
    return [name for i, name in enumerate(DOTS) if lib.fmk_dot_supported(i)]


def active_dot() -> str:
    return DOTS[_lib().fmk_dot_active()]


def set_dot(name: str | None) -> None:
    """Force the decode arithmetic for this process (None: back to FLASHMOE_CPU_DOT / "f32")."""
    rc = _lib().fmk_set_dot(-1 if name is None else DOTS.index(name))
    if rc:
        raise CpuKernelError(f"set_dot({name!r})", rc)


def default_threads() -> int:
    env = os.environ.get("FLASHMOE_THREADS")
    return int(env) if env else max(1, torch.get_num_threads())


def fmk_matrix(p: QTensor | torch.Tensor) -> FmkMatrix:
    """The C view of one projection (asserts what the kernels assume: CPU, contiguous, dtypes, shapes).
    The struct holds raw pointers: keep `p` alive while it is used."""
    if isinstance(p, QTensor):
        out, n = p.shape
        per_word = 32 // p.bits
        assert p.bits in (2, 4, 8), f"bits {p.bits}"
        assert p.weight.dtype in (torch.int32, torch.uint32) and p.weight.dim() == 2, "words: int32 2-D"
        assert p.scales.dtype in DTYPES and p.biases.dtype == p.scales.dtype, "scales/biases: one float dtype"
        assert p.group_size % per_word == 0 and n % p.group_size == 0, "group size: whole words, whole groups"
        assert p.scales.shape == p.biases.shape == (out, n // p.group_size), "scales/biases [out, in/group]"
        for t in (p.weight, p.scales, p.biases):
            assert t.is_contiguous() and t.device.type == "cpu", "tensors must be contiguous on the CPU"
        return FmkMatrix(p.weight.data_ptr(), p.scales.data_ptr(), p.biases.data_ptr(), out, n, p.bits,
                         p.group_size, 0, DTYPES[p.scales.dtype])
    assert isinstance(p, torch.Tensor) and p.dim() == 2, "float weight: 2-D tensor [out, in]"
    assert p.dtype in DTYPES, f"float weight dtype {p.dtype} (float32, float16, bfloat16)"
    assert p.is_contiguous() and p.device.type == "cpu", "float weight must be contiguous on the CPU"
    return FmkMatrix(p.data_ptr(), None, None, p.shape[0], p.shape[1], 16, 0, DTYPES[p.dtype], 0)


def _check_x(x: torch.Tensor, n: int) -> None:
    assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == n, f"x: float32 [T, {n}]"
    assert x.is_contiguous() and x.device.type == "cpu", "x must be contiguous on the CPU"


def matmul(x: torch.Tensor, p: QTensor | torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x [T, in] float32 @ W^T -> [T, out] float32 (decode for T == 1, batched otherwise)."""
    m = fmk_matrix(p)
    _check_x(x, m.cols)
    y = torch.empty(x.shape[0], m.rows, dtype=torch.float32)
    threads = threads or default_threads()
    rc = _lib().fmk_matmul(ctypes.byref(m), x.data_ptr(), x.shape[0], y.data_ptr(), threads)
    if rc:
        raise CpuKernelError("fmk_matmul", rc)
    return y


def matmul_twin(x: torch.Tensor, p: QTensor | torch.Tensor) -> torch.Tensor:
    """The torch twin of `matmul`: dequantize, then matmul (float32)."""
    w = dequantize(p) if isinstance(p, QTensor) else p.float()
    return x.float() @ w.T


def dequantize_rows(p: QTensor, r0: int = 0, r1: int | None = None, dtype: torch.dtype = torch.float32,
                    threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [r0, r1) of p dequantized to `dtype` [r1 - r0, in]: quant.dequantize(p, dtype)[r0:r1], bit for bit."""
    m = fmk_matrix(p)
    r1 = m.rows if r1 is None else r1
    assert 0 <= r0 <= r1 <= m.rows, f"rows [{r0}, {r1}) of {m.rows}"
    assert dtype in DTYPES, f"dtype {dtype}"
    if out is None:
        out = torch.empty(r1 - r0, m.cols, dtype=dtype)
    assert out.shape == (r1 - r0, m.cols) and out.dtype == dtype and out.is_contiguous(), "out [rows, in] contiguous"
    if r1 == r0:
        return out
    rc = _lib().fmk_dequantize(ctypes.byref(m), r0, r1, out.data_ptr(), DTYPES[dtype], threads or default_threads())
    if rc:
        raise CpuKernelError("fmk_dequantize", rc)
    return out


def quantize(w: torch.Tensor, bits: int = 8, group_size: int = 64, scale_dtype: torch.dtype = torch.bfloat16,
             threads: int | None = None) -> QTensor:
    """Min/max group-wise quantization of a float matrix w [out, in] in C: the same QTensor as
    quant.quantize(w, bits, group_size, scale_dtype, method="minmax")."""
    src = fmk_matrix(w)
    out, n = w.shape
    if bits not in (2, 4, 8) or group_size % (32 // bits) or n % group_size:
        raise ValueError(f"cannot quantize [{out}, {n}] to {bits} bits in groups of {group_size}")
    groups = n // group_size
    q = QTensor(torch.empty(out, n * bits // 32, dtype=torch.int32), torch.empty(out, groups, dtype=scale_dtype),
                torch.empty(out, groups, dtype=scale_dtype), bits, group_size)
    dst = fmk_matrix(q)
    rc = _lib().fmk_quantize(ctypes.byref(src), ctypes.byref(dst), threads or default_threads())
    if rc:
        raise CpuKernelError("fmk_quantize", rc)
    return q


def expert_forward(x: torch.Tensor, w: ExpertWeights, threads: int | None = None) -> torch.Tensor:
    """down(silu(gate x) * up x) for x [T, H] float32 -> [T, H] float32, one C call."""
    gate, up, down = fmk_matrix(w.gate), fmk_matrix(w.up), fmk_matrix(w.down)
    assert (gate.rows, gate.cols) == (up.rows, up.cols) == (down.cols, down.rows), "expert shapes"
    _check_x(x, gate.cols)
    y = torch.empty(x.shape[0], down.rows, dtype=torch.float32)
    rc = _lib().fmk_expert_forward(ctypes.byref(gate), ctypes.byref(up), ctypes.byref(down), x.data_ptr(),
                                   x.shape[0], y.data_ptr(), threads or default_threads())
    if rc:
        raise CpuKernelError("fmk_expert_forward", rc)
    return y


def read_bandwidth_probe(buf: torch.Tensor, threads: int | None = None) -> int:
    """Read all of buf (contiguous, a multiple of 32 bytes) with `threads` threads; returns a checksum."""
    assert buf.is_contiguous() and buf.device.type == "cpu"
    out = ctypes.c_uint64()
    nbytes = buf.numel() * buf.element_size()
    rc = _lib().fmk_read_bytes(buf.data_ptr(), nbytes, threads or default_threads(), ctypes.byref(out))
    if rc:
        raise CpuKernelError("fmk_read_bytes", rc)
    return out.value


class CpuKernel:
    """Expert MLP on the CPU through the C kernels (float32 activations inside)."""

    name = "cpu-c"

    def __init__(self, threads: int | None = None):
        _lib()  # raise now, with the reason, rather than on the first token
        self.threads = threads

    def expert_mlp(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype (bf16/fp16 -> float32 is exact; the result is rounded back)."""
        xf = x.to(torch.float32).contiguous()  # [T, H]
        return expert_forward(xf, w, self.threads or default_threads()).to(x.dtype)


_logged: set[str] = set()


def select_kernel(threads: int | None = None) -> tuple[CpuKernel | None, str | None]:
    """(CpuKernel, None) for backends.get_kernel("cpu"), or (None, why the torch kernel runs instead)."""
    if os.environ.get("FLASHMOE_CPU_KERNEL", "").lower() == "torch":
        reason = "FLASHMOE_CPU_KERNEL=torch"
    else:
        reason = unavailable_reason()
    if reason is None:
        return CpuKernel(threads), None
    if reason not in _logged:  # once per process, never per token
        _logged.add(reason)
        level = logging.INFO if reason.startswith("FLASHMOE_CPU_KERNEL") else logging.WARNING
        log.log(level, "CPU expert kernel: using the torch kernel: %s", reason)
    return None, reason
