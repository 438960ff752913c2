"""C CPU kernels (runtime/cpu, backends/cpu.py) against their torch twins, on every ISA this CPU has.

Tolerance. The kernels and the twins both compute in float32 and differ only in summation order,
so neither is compared with the other bit for bit; both are compared with the exact product,
computed in float64 from the same q, scale, bias. A float32 sum of n terms is within
gamma_n * sum|terms| of the exact sum (gamma_n ~ n * 2**-24), whatever the order. The kernel's
terms are per group scale * sum(q*x) and bias * sum(x), so the bound uses
mag = (|q*scale| + |bias|) @ |x| and n = in + groups + 32 (the lane and final reductions).
This is a worst case: real errors are ~100x smaller; the twin meets the same bound (checked).
The opt-in int8 decode (set_dot("int8")) also rounds x to dx * round(x / dx), dx = max|x| / 127
per weight group: at most dx/2 per element, so its bound adds (|q*scale| @ dx/2).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from flashmoe_pack.pack.reader import ExpertWeights
from flashmoe_pack.quant import QTensor, quantize, unpack_bits

cpu = pytest.importorskip("flashmoe_pack.backends.cpu")
if not cpu.available():  # the build is optional in setup.py; here it must have happened
    pytest.fail(f"C kernels not built: {cpu.unavailable_reason()}", pytrace=False)

from flashmoe_pack.backends import get_kernel  # noqa: E402
from flashmoe_pack.backends.torch_ref import TorchKernel  # noqa: E402

U = 2.0**-24  # float32 unit roundoff
SHAPES = [(37, 192, 64), (129, 320, 64), (33, 256, 32), (17, 512, 128), (21, 288, 96)]  # (out, in, group)
TOKENS = (1, 3, 5, 17)  # below and above each ISA's batched threshold, with partial token tiles


@pytest.fixture(params=cpu.ISAS)
def isa(request):
    """Run the test under each instruction set this CPU supports (skipped ones are reported)."""
    if request.param not in cpu.supported_isas():
        pytest.skip(f"CPU lacks {request.param}")
    cpu.set_isa(request.param)
    assert cpu.active_isa() == request.param
    yield request.param
    cpu.set_isa(None)


def make_weight(out: int, n: int, bits: int, dtype: torch.dtype, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.1
    return quantize(w, bits, group, dtype) if bits != 16 else w.to(dtype)


def exact(p) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, |terms| W) in float64: W exactly q*scale + bias (no float32 rounding), and the
    magnitudes of the kernel's summands per weight."""
    if not isinstance(p, QTensor):
        return p.double(), p.double().abs()
    q = unpack_bits(p.weight, p.bits).double()  # [out, in]
    s = p.scales.double().repeat_interleave(p.group_size, 1)
    b = p.biases.double().repeat_interleave(p.group_size, 1)
    return q * s + b, (q * s).abs() + b.abs()


def bound(p, x: torch.Tensor, int8: bool = False) -> torch.Tensor:
    """Worst-case error of y = x W^T in float32 (and int8 activations), per element [T, out]."""
    _, mag_w = exact(p)
    n = p.shape[1] + (p.shape[1] // p.group_size if isinstance(p, QTensor) else 0) + 32
    err = n * U * (x.double().abs() @ mag_w.T) + 1e-30
    if int8 and isinstance(p, QTensor):
        q = unpack_bits(p.weight, p.bits).double()
        qs = (q * p.scales.double().repeat_interleave(p.group_size, 1)).abs()  # [out, in]
        T, n_in = x.shape
        amax = x.double().abs().reshape(T, n_in // p.group_size, p.group_size).amax(-1)
        err = err + (amax / 254).repeat_interleave(p.group_size, 1) @ qs.T * 1.001  # + dx/2 per element
    return err


CASES = ([(b, d) for b in (2, 4, 8) for d in (torch.bfloat16, torch.float16)] + [(4, torch.float32)]
         + [(16, d) for d in (torch.float32, torch.float16, torch.bfloat16)])  # (bits, scale or weight dtype)


@pytest.mark.parametrize("bits,dtype", CASES)
def test_matmul_matches_twin(isa, bits, dtype):
    """Decode (T=1), small batches (FMA form) and batched (dequantize once) vs dequantize + matmul."""
    for si, (out, n, group) in enumerate(SHAPES):
        p = make_weight(out, n, bits, dtype, group, seed=si)
        w_exact, _ = exact(p)
        for T in TOKENS:
            x = torch.randn(T, n, generator=torch.Generator().manual_seed(100 + T))
            ref, tol = x.double() @ w_exact.T, bound(p, x)
            twin = cpu.matmul_twin(x, p)
            assert ((twin.double() - ref).abs() <= tol).all(), "the bound must hold for the twin too"
            results = [cpu.matmul(x, p, threads) for threads in (1, 2, 3)]
            err = (results[0].double() - ref).abs()
            assert (err <= tol).all(), (f"{isa} bits={bits} {dtype} {out}x{n} g{group} T={T}: "
                                        f"max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}")
            for y in results[1:]:  # rows are independent: any thread count gives the same bits
                assert torch.equal(y, results[0])


def expert(bits: int, dtype: torch.dtype, hidden: int, inter: int, seed: int) -> ExpertWeights:
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))  # gate, up, down
    ps = [make_weight(out, n, bits, dtype, 64, seed + i) for i, (out, n) in enumerate(shapes)]
    return ExpertWeights(*ps, nbytes=0)


def expert_bound(w: ExpertWeights, x: torch.Tensor, int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact expert output (float64) and a worst-case bound on a float32 implementation's error:
    gate/up errors (bound()) carried through h = silu(g) * u (|silu'| <= 1.1), h's own rounding,
    then the down product's error."""
    (g_w, _), (u_w, _), (d_w, _) = exact(w.gate), exact(w.up), exact(w.down)
    xd = x.double()
    g, u = xd @ g_w.T, xd @ u_w.T
    h = F.silu(g) * u
    dh = 1.1 * u.abs() * bound(w.gate, x, int8) + F.silu(g).abs() * bound(w.up, x, int8) + 4 * U * h.abs()
    y = h @ d_w.T
    return y, dh @ d_w.abs().T + bound(w.down, (h.abs() + dh).float(), int8) * 1.01


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expert_forward_matches_torch_kernel(isa, bits, dtype):
    H, inter = 192, 128  # 3 and 2 groups of 64
    w = expert(bits, dtype, H, inter, seed=bits)
    for T in (1, 3, 17):
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
        ref, tol = expert_bound(w, x)
        twin = TorchKernel().expert_mlp(x, w)
        assert ((twin.double() - ref).abs() <= tol).all(), "the bound must hold for TorchKernel too"
        for threads in (1, 2):
            y = cpu.CpuKernel(threads).expert_mlp(x, w)
            assert y.shape == (T, H) and y.dtype == torch.float32
            assert ((y.double() - ref).abs() <= tol).all(), f"{isa} bits={bits} T={T} threads={threads}"


def test_expert_forward_unfused_gate_up(isa):
    """gate and up stored differently (per-module overrides) take two products, same result."""
    H, inter = 192, 128
    w = ExpertWeights(make_weight(inter, H, 4, torch.bfloat16, 64, 1),
                      make_weight(inter, H, 8, torch.float16, 32, 2),
                      make_weight(H, inter, 2, torch.bfloat16, 64, 3), nbytes=0)
    x = torch.randn(3, H)
    ref, tol = expert_bound(w, x)
    assert ((cpu.expert_forward(x, w, 2).double() - ref).abs() <= tol).all()


def test_bf16_activations_round_trip():
    w = expert(4, torch.bfloat16, 128, 64, seed=5)
    x = torch.randn(2, 128).to(torch.bfloat16)
    y = cpu.CpuKernel(2).expert_mlp(x, w)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, cpu.expert_forward(x.float(), w, 2).to(torch.bfloat16))


@pytest.fixture
def int8_dot():
    if "int8" not in cpu.supported_dots():
        pytest.skip("CPU lacks AVX-512 VNNI: no int8 decode")
    cpu.set_isa("avx512")
    cpu.set_dot("int8")
    assert cpu.active_dot() == "int8"
    yield
    cpu.set_dot(None)
    cpu.set_isa(None)


@pytest.mark.parametrize("bits,dtype", [(b, d) for b in (2, 4, 8) for d in (torch.bfloat16, torch.float16)])
def test_int8_decode_within_its_bound(int8_dot, bits, dtype):
    """Opt-in int8 activations: decode (T <= 3) within float + rounding bound; T > 3 stays float."""
    for si, (out, n, group) in enumerate(SHAPES):
        p = make_weight(out, n, bits, dtype, group, seed=si)
        w_exact, _ = exact(p)
        for T in (1, 3, 5):
            x = torch.randn(T, n, generator=torch.Generator().manual_seed(7 + T))
            ref = x.double() @ w_exact.T
            y1, y2 = cpu.matmul(x, p, 1), cpu.matmul(x, p, 2)
            assert torch.equal(y1, y2)
            tol = bound(p, x, int8=T <= 3)
            assert ((y1.double() - ref).abs() <= tol).all(), f"bits={bits} {out}x{n} T={T}"
    w = expert(bits, dtype, 192, 128, seed=bits)
    x = torch.randn(2, 192)
    ref, tol = expert_bound(w, x, int8=True)
    assert ((cpu.CpuKernel(2).expert_mlp(x, w).double() - ref).abs() <= tol).all()



def rounded_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as the int8 path rounds it, per token and weight group, in float32 as the C code does:
    dx = max|x| / 127, xq = round-half-even(x * (1 / dx)) in -127..127; returns dx * xq (float64)."""
    T, n = x.shape
    xg = x.float().reshape(T, n // group, group)
    dx = xg.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(dx > 0, 1.0 / dx, torch.zeros_like(dx))
    xq = torch.round((xg * inv).clamp(-127, 127))
    return (xq.double() * dx.double()).reshape(T, n)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int8_decode_is_the_dot_with_rounded_activations(int8_dot, bits):
    """The int8 result is the exact product of the dequantized weights with the rounded x, up to
    float32 summation: the bias term must use the rounded x too (with sum(x) it was 3-4x less
    accurate: the rounding error got multiplied by q instead of q minus its offset)."""
    for si, (out, n, group) in enumerate(SHAPES):
        p = make_weight(out, n, bits, torch.bfloat16, group, seed=50 + si)
        w_exact, _ = exact(p)
        x = torch.randn(2, n, generator=torch.Generator().manual_seed(60 + si))
        wpg = group // (32 // bits)
        if wpg & (wpg - 1):  # words per group not a power of two: the portable float kernel runs
            cpu.set_dot("f32")
            y_f32 = cpu.matmul(x, p, 1)
            cpu.set_dot("int8")
            assert torch.equal(cpu.matmul(x, p, 1), y_f32)
            continue
        xr = rounded_activations(x, group)
        ref = xr @ w_exact.T
        y = cpu.matmul(x, p, 1).double()
        tol = bound(p, xr.float()) * 2
        worst = ((y - ref).abs() / tol).max()
        assert worst <= 1, f"bits={bits} {out}x{n} g{group}: worst error / bound {worst:.3g}"

def _lib():
    lib, _ = cpu.library()
    return lib


def _call(m: cpu.FmkMatrix, x: torch.Tensor, T: int, y: torch.Tensor, threads: int) -> int:
    return _lib().fmk_matmul(ctypes.byref(m), x.data_ptr(), T, y.data_ptr(), threads)


def test_error_codes():
    """Bad arguments come back as FMK_EINVAL (-1) / FMK_EISA (-4), never a crash or an exit."""
    p = make_weight(8, 128, 4, torch.bfloat16, 64, 0)
    x, y = torch.randn(2, 128), torch.empty(2, 8)

    def mat(**kw):
        m = cpu.fmk_matrix(p)
        for k, v in kw.items():
            setattr(m, k, v)
        return m

    assert _call(mat(), x, 2, y, 1) == 0
    assert _call(mat(), x, 0, y, 1) == 0  # nothing to do is fine
    for bad in (dict(bits=3), dict(bits=16, wdtype=7), dict(sdtype=9), dict(group_size=0),
                dict(group_size=48), dict(group_size=4), dict(rows=0), dict(cols=-128), dict(weight=None),
                dict(scales=None)):
        assert _call(mat(**bad), x, 2, y, 1) == -1, bad
    assert _call(mat(), x, -1, y, 1) == -1
    for threads in (0, -2, 257):
        assert _call(mat(), x, 2, y, threads) == -1
    assert _lib().fmk_matmul(None, x.data_ptr(), 2, y.data_ptr(), 1) == -1
    assert _lib().fmk_matmul(ctypes.byref(mat()), None, 2, y.data_ptr(), 1) == -1
    g, d = cpu.fmk_matrix(p), cpu.fmk_matrix(p)  # down [8, 128] cannot follow gate [8, 128]
    assert _lib().fmk_expert_forward(ctypes.byref(g), ctypes.byref(g), ctypes.byref(d), x.data_ptr(), 2,
                                     y.data_ptr(), 1) == -1
    checksum = ctypes.c_uint64()
    assert _lib().fmk_read_bytes(x.data_ptr(), 100, 1, ctypes.byref(checksum)) == -1  # not a multiple of 32
    assert _lib().fmk_set_isa(7) == -4 and _lib().fmk_set_dot(5) == -4
    for name in cpu.ISAS:
        if name not in cpu.supported_isas():
            with pytest.raises(cpu.CpuKernelError, match="not supported"):
                cpu.set_isa(name)
    with pytest.raises(cpu.CpuKernelError, match="invalid argument"):
        cpu.matmul(x, p, threads=1000)
    with pytest.raises(AssertionError):  # the launcher checks layout before C sees a pointer
        cpu.matmul(torch.randn(128, 2).T, p)
    with pytest.raises(AssertionError):
        cpu.matmul(x.double(), p)


def test_isa_report_and_env():
    """Which ISA paths this machine ran; FLASHMOE_ISA caps the choice in a fresh process."""
    supported = cpu.supported_isas()
    print(f"\nCPU kernel ISAs supported here: {supported} (tests ran each); default {cpu.active_isa()}")
    assert supported[0] == "scalar" and cpu.active_isa() == supported[-1]
    print(f"decode arithmetics supported: {cpu.supported_dots()}; default {cpu.active_dot()}")
    assert cpu.active_dot() == "f32"
    code = "from flashmoe_pack.backends import cpu; print(cpu.active_isa(), cpu.active_dot())"
    env = {**os.environ, "FLASHMOE_ISA": "scalar", "FLASHMOE_CPU_DOT": "int8"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["scalar", "f32"]  # int8 runs only under the avx512 ISA


def test_get_kernel_cpu(monkeypatch):
    assert get_kernel("cpu").name == "cpu-c"
    monkeypatch.setenv("FLASHMOE_CPU_KERNEL", "torch")
    k = get_kernel("cpu")
    assert isinstance(k, TorchKernel) and k.fallback_reason == "FLASHMOE_CPU_KERNEL=torch"
    monkeypatch.delenv("FLASHMOE_CPU_KERNEL")
    monkeypatch.setattr(cpu, "library", lambda: (None, "CPU kernels unavailable (test)"))
    k = get_kernel("cpu")
    assert isinstance(k, TorchKernel) and "unavailable" in k.fallback_reason


def test_concurrent_callers_and_fork():
    """Jobs from several Python threads are serialised by the pool; a forked child gets a new pool."""
    p = make_weight(129, 320, 4, torch.bfloat16, 64, 0)
    x = torch.randn(5, 320)
    want = cpu.matmul(x, p, 2)
    got, errors = [], []

    def worker():
        try:
            for _ in range(20):
                got.append(cpu.matmul(x, p, 2))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 60 and all(torch.equal(g, want) for g in got)
    if sys.platform.startswith("linux"):
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert torch.equal(pool.apply(cpu.matmul, (x, p, 2)), want)


# ------------------------------------------------------------- dequantize / quantize (fmk_convert.c)

CONVERT = [(bits, sd) for bits in (2, 4, 8) for sd in (torch.bfloat16, torch.float16, torch.float32)]


@pytest.mark.parametrize("bits,sdtype", CONVERT)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_matches_minmax_twin(bits, sdtype, wdtype):
    """fmk_quantize is quant.quantize(method="minmax") bit for bit, also on constant groups
    (zero scale) and groups far from zero (bias rounding pushes q out of range: clamped)."""
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(37, 5 * 64, generator=g) * 0.1).to(wdtype)
    w[3] = 0.0
    w[5, :64] = 0.5
    w[6, :64] = 1000.0
    w[6, 1] = 1001.5
    got = cpu.quantize(w, bits, 64, sdtype, threads=2)
    want = quantize(w, bits, 64, sdtype, method="minmax")
    assert torch.equal(got.weight, want.weight)
    assert torch.equal(got.scales, want.scales) and torch.equal(got.biases, want.biases)


@pytest.mark.parametrize("bits,sdtype", CONVERT)
@pytest.mark.parametrize("odtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_rows_matches_twin(bits, sdtype, odtype):
    from flashmoe_pack.quant import dequantize

    p = make_weight(41, 288, bits, sdtype, 32, seed=bits)
    assert torch.equal(cpu.dequantize_rows(p, 0, None, odtype, threads=2), dequantize(p, odtype))
    assert torch.equal(cpu.dequantize_rows(p, 7, 30, odtype, threads=3), dequantize(p, odtype)[7:30])
    assert cpu.dequantize_rows(p, 5, 5, odtype).shape == (0, 288)


def test_convert_error_codes():
    p = make_weight(8, 128, 4, torch.bfloat16, 64, seed=0)
    with pytest.raises(AssertionError, match="rows"):
        cpu.dequantize_rows(p, 3, 9)
    m = cpu.fmk_matrix(p)
    out = torch.empty(8, 128)
    assert _lib().fmk_dequantize(ctypes.byref(m), 0, 8, out.data_ptr(), 7, 1) == -1  # unknown out dtype
    assert _lib().fmk_dequantize(ctypes.byref(m), 2, 1, out.data_ptr(), 0, 1) == -1  # r1 < r0
    with pytest.raises(ValueError, match="groups of 20"):
        cpu.quantize(torch.randn(4, 100), 4, 20)  # a group must be whole 32-bit words
    src, dst = cpu.fmk_matrix(torch.randn(8, 128)), cpu.fmk_matrix(p)
    dst.rows = 9
    assert _lib().fmk_quantize(ctypes.byref(src), ctypes.byref(dst), 1) == -1  # shapes differ
