"""Triton expert kernels (decode GEMV, prefill grouped GEMM) against their torch twins, and the
twins against plain dequantize-then-matmul. On a machine without CUDA the kernels run in
Triton's CPU interpreter (TRITON_INTERPRET=1, set here before triton is imported); on the GPU
box scripts/gpu_check.py runs this same file on CUDA.

Interpreter limits (triton 3.9, seen here): a tl.dot of bfloat16 operands multiplies their raw
uint16 bits, and float32 -> bfloat16 casts truncate. So on CPU the bfloat16-activation GEMM is
left to the GPU run and bfloat16 decode outputs get one bf16 ulp of tolerance.
"""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashmoe_pack.backends import triton_kernels as tk  # noqa: E402
from flashmoe_pack.pack.reader import ExpertWeights  # noqa: E402
from flashmoe_pack.quant import dequantize, quantize  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3 if CUDA else 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm()).item()


def make_experts(n: int, hidden: int, inter: int, bits: int, group: int, sdt: torch.dtype, seed: int):
    """n random experts, each in its own record-like buffer, on DEV."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ps = []
        for o, i in ((inter, hidden), (inter, hidden), (hidden, inter)):
            qt = quantize(torch.randn(o, i, generator=g) * 0.1, bits, group, sdt, "minmax")
            qt.weight, qt.scales, qt.biases = (t.to(DEV) for t in (qt.weight, qt.scales, qt.biases))
            ps.append(qt)
        out.append(ExpertWeights(*ps, nbytes=0))
    return out


def dense_ref(x, experts, ids, weights):
    """float64 reference: dequantize, then matmul, per assignment."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            gate, up, down = (
                dequantize(p).double().cpu()
                for p in (
                    experts[int(ids[t, k])].gate,
                    experts[int(ids[t, k])].up,
                    experts[int(ids[t, k])].down,
                )
            )
            xt = x[t].double().cpu()
            out[t] += float(weights[t, k]) * (down @ (F.silu(gate @ xt) * (up @ xt)))
    return out


def routing(t: int, k: int, e: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.softmax(torch.randn(t, k, generator=g), -1)
    return ids, w


def test_triton_importable():
    """The kernels need triton (the test extra installs it; CUDA machines ship it with torch)."""
    assert tk.HAVE_TRITON, "triton is not installed: pip install triton"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_twins_match_dequantized_matmul(bits):
    """Both twins compute the expert MLP: against float64 dequantize-then-matmul."""
    exps = make_experts(4, 96, 64, bits, 32, torch.bfloat16, seed=bits)
    x = torch.randn(5, 96, device=DEV)
    ids, w = routing(5, 2, 4, seed=1)
    ref = dense_ref(x, exps, ids, w)
    assert rel(tk.decode_twin(x, exps, ids.to(DEV), w.to(DEV)), ref) < 1e-5
    assert rel(tk.gemm_twin(x, exps, ids.to(DEV), w.to(DEV)), ref) < 1e-5


def test_sort_assignments():
    order, tiles = tk.sort_assignments([[2, 0], [0, 1], [2, 1], [0, 2]], bm=2)
    assert order.tolist() == [1, 2, 6, 3, 5, 0, 4, 7]  # flat t*K+k grouped by expert 0, 1, 2
    assert tiles.tolist() == [0, 0, 2, 0, 2, 3, 1, 3, 5, 2, 5, 7, 2, 7, 8]


# (bits, scale dtype, hidden, inter, group): odd sizes, rows and columns not multiples of the blocks
SHAPES = [
    (2, torch.bfloat16, 160, 96, 32),
    (4, torch.bfloat16, 192, 320, 64),
    (4, torch.float16, 96, 160, 32),
    (8, torch.bfloat16, 160, 96, 32),
    (8, torch.float16, 128, 64, 64),
]


@pytest.mark.parametrize("bits,sdt,hidden,inter,group", SHAPES)
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_kernels_match_twin(bits, sdt, hidden, inter, group, xdt):
    exps = make_experts(6, hidden, inter, bits, group, sdt, seed=bits + hidden)
    table = tk.table_from_experts(exps, hidden, inter)
    # the default (DECODE_CFG), then with float32 x other tiles, each down path (split 1: a program per
    # assignment, then _sum_k), each gate/up path (pair 1: one pass) and the alignment hints (align 1, taken only
    # where the table and the row lengths allow); 64-row blocks: partial row blocks too.
    # Other x dtypes take the default and one split + pair config (the interpreter is slow; x is read as
    # float32 either way)
    # i8 (7th, float32 x only: the interpreter is slow): activations rounded to int8 per word span (1) or per
    # weight group (2), against the i8 twin
    cases = ((1, 4, None), (3, 2, (64, 64, 2, 1, 1, 1)))
    if xdt == torch.float32:
        cases += ((1, 4, (8, 64, 4)), (3, 2, (64, 64, 2)), (2, 3, (8, 128, 4, 1)), (1, 4, (16, 256, 4, 0, 1)),
                  (1, 4, (16, 64, 4, 0, 0, 1)), (2, 2, (16, 128, 4, 1, 0, 1, 1)),
                  (1, 3, (4, 256, 2, 1, 1, 0, 2, 16)))  # (i8 1 with pair: the shipped-config test; 16 down rows)
    for t, k, cfg in cases:
        x = torch.randn(t, hidden, device=DEV).to(xdt)
        ids, w = routing(t, k, 6, seed=t)
        i8 = tk._cfg(cfg or tk.decode_cfg(bits, group, DEV))[6]  # (a tuned default may round to int8)
        ref = tk.decode_twin(x.float(), exps, ids.to(DEV), w.to(DEV), i8)  # float32; rounding compared below
        aexp = ids.reshape(-1).to(torch.int32).to(DEV)
        rw = w.reshape(-1).to(DEV)
        rw = rw.to(xdt) if t == 3 else rw  # router weights in x's dtype too (the resident path passes them so)
        if t == 3:
            ref = tk.decode_twin(x.float(), exps, ids.to(DEV), w.to(xdt).to(DEV), i8)
        got = tk.moe_decode(x, table, aexp, rw, k, cfg)
        assert got.dtype == xdt and got.shape == (t, hidden)
        assert rel(got, ref) < TOL[xdt], (t, k)
        if xdt == torch.float32 and (cfg is None or len(cfg) == 8):
            # router ids through a slot map (the resident path): ids e of 9 experts, smap[e] their slots
            smap = torch.full((9,), -1, dtype=torch.int32)
            rids = torch.randperm(9, generator=torch.Generator().manual_seed(t))[:6]
            smap[rids] = torch.arange(6, dtype=torch.int32)
            mapped = tk.moe_decode(x, table, rids[ids.reshape(-1)].to(DEV), rw, k, cfg, smap=smap.to(DEV))
            assert torch.equal(mapped, got), (t, k)


GEMM_XDT = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])  # see module docstring


@pytest.mark.parametrize("bits,sdt,hidden,inter,group", SHAPES)
@pytest.mark.parametrize("xdt", GEMM_XDT)
def test_gemm_kernels_match_twin(bits, sdt, hidden, inter, group, xdt):
    exps = make_experts(5, hidden, inter, bits, group, sdt, seed=bits * hidden)
    table = tk.table_from_experts(exps, hidden, inter)
    t, k = 37, 3  # 111 assignments: several tiles for some experts, partial tiles for all
    x = torch.randn(t, hidden, device=DEV).to(xdt)
    ids, w = routing(t, k, 5, seed=7)
    ref = tk.gemm_twin(x, exps, ids.to(DEV), w.to(DEV))
    for magic in (0, 1):  # weights dequantized through an int -> float conversion, or the bit trick
        got = tk.moe_gemm(x, table, ids.tolist(), w.to(DEV), cfg={"BM": 16, "magic": magic})
        assert got.dtype == xdt
        assert rel(got, ref) < TOL[xdt], magic


def test_forward_picks_decode_or_gemm_and_skips_nothing():
    """moe_forward: few tokens -> decode kernels, many -> GEMM; both equal the float64 reference."""
    exps = make_experts(3, 64, 96, 4, 32, torch.bfloat16, seed=3)
    table = tk.table_from_experts(exps, 64, 96)
    for t in (1, tk.DECODE_MAX_T, tk.DECODE_MAX_T + 1, 20):
        x = torch.randn(t, 64, device=DEV)
        ids, w = routing(t, 2, 3, seed=t)
        assert rel(tk.moe_forward(x, table, ids.tolist(), w.to(DEV)), dense_ref(x, exps, ids, w)) < 1e-5


@pytest.mark.parametrize("bits,group,sdt", [(4, 64, torch.bfloat16), (8, 32, torch.float16), (2, 32, torch.float32)])
@pytest.mark.parametrize("rows,cols,t", [(37, 192, 1), (130, 256, 3)])
def test_qmatvec_equals_dequantize_then_matmul(bits, group, sdt, rows, cols, t):
    """A resident quantized matrix on CUDA (layers.linear, T <= DECODE_MAX_T): odd row counts."""
    g = torch.Generator().manual_seed(rows + bits)
    qt = quantize(torch.randn(rows, cols, generator=g) * 0.1, bits, group, sdt, "minmax")
    qt.weight, qt.scales, qt.biases = (x.to(DEV) for x in (qt.weight, qt.scales, qt.biases))
    for xdt in (torch.float32, torch.bfloat16):
        x = torch.randn(t, cols, generator=g).to(xdt).to(DEV)
        want = x.double().cpu() @ dequantize(qt).double().cpu().T
        for cfg in (None, (16, 128, 2)):  # another tile too
            y = tk.qmatvec(x, qt, torch.float32, cfg)
            assert y.dtype == torch.float32 and y.shape == (t, rows)
            assert rel(y, want) < 2e-5


def test_linear_on_cuda_takes_the_kernel_for_decode_and_row_chunks_for_prefill(monkeypatch):
    """layers.linear with a QTensor off the CPU C kernels: up to DECODE_MAX_T rows through qmatvec, more
    rows dequantized a chunk of rows at a time (chunks forced small here): both equal the plain product."""
    from flashmoe_pack.models import layers

    g = torch.Generator().manual_seed(3)
    qt = quantize(torch.randn(300, 128, generator=g) * 0.1, 8, 64, torch.bfloat16, "minmax")
    qt.weight, qt.scales, qt.biases = (x.to(DEV) for x in (qt.weight, qt.scales, qt.biases))
    monkeypatch.setenv("FLASHMOE_CPU_KERNEL", "torch")  # no C kernels: the path a CUDA tensor takes
    monkeypatch.setattr(layers, "_gpu_qkernels", lambda x: tk)
    calls = []
    real = tk.qmatvec
    monkeypatch.setattr(tk, "qmatvec", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 128 * 70)  # 70-row chunks: 5 of them, the last short
    w = dequantize(qt).double().cpu()
    for t in (1, 4, 9):
        x = torch.randn(2, t, 128, generator=g).to(DEV) if t == 9 else torch.randn(t, 128, generator=g).to(DEV)
        y = layers.linear(x, qt, out_dtype=torch.float32)
        assert y.shape == x.shape[:-1] + (300,)
        assert rel(y, x.double().cpu() @ w.T) < 2e-5
    assert calls == [1, 4]  # 18 rows: the chunked path


def test_decode_cfg_reads_tuned_configs_by_gpu_and_group(tmp_path, monkeypatch):
    """Tuned launch configs are data keyed by GPU name and bits/group; anything not listed takes GENERIC_CFG on
    CUDA (DECODE_CFG with FLASHMOE_DECODE_I8=0) and DECODE_CFG elsewhere,
    and a malformed file is refused with its path."""
    monkeypatch.setattr(tk, "_gpu_name", lambda device: "Fake GPU")
    monkeypatch.delenv("FLASHMOE_DECODE_I8", raising=False)  # (gpu_check runs the tests with it set to 0)
    f = tmp_path / "cfg.json"
    f.write_text('{"Fake GPU": {"4/32": [16, 512, 4, 1], "8/64": [4, 512, 2, 1, 1, 1, 2, 8]}, '
                 '"Other GPU": {"4/64": [4, 256, 2]}}')
    monkeypatch.setenv("FLASHMOE_DECODE_CONFIGS", str(f))
    cuda = torch.device("cuda")
    assert tk.decode_cfg(4, 32, cuda) == (16, 512, 4, 1, 0, 0, 0, 0)
    assert tk.decode_cfg(4, 64, cuda) == tk.GENERIC_CFG[4]  # listed for another GPU only
    assert tk.decode_cfg(4, 32, torch.device("cpu")) == tk.DECODE_CFG[4]
    assert tk.decode_cfg(8, 64, cuda) == (4, 512, 2, 1, 1, 1, 2, 8)
    monkeypatch.setenv("FLASHMOE_DECODE_I8", "0")  # the float32 kernels asked for: the tuned tiles, no int8
    assert tk.decode_cfg(8, 64, cuda) == (4, 512, 2, 1, 1, 1, 0, 8)
    assert tk.decode_cfg(4, 64, cuda) == tk.DECODE_CFG[4]
    bad = tmp_path / "bad.json"
    bad.write_text('{"Fake GPU": {"4/32": [16, "x"]}}')
    monkeypatch.setenv("FLASHMOE_DECODE_CONFIGS", str(bad))
    with pytest.raises(ValueError, match="bad.json"):
        tk.decode_cfg(4, 32, cuda)


def test_shipped_tuned_configs_are_valid_launch_configs():
    """decode_configs.json (the H200 sweep's picks) parses, and each entry, and each of GENERIC_CFG, runs here
    against the twin."""
    tuned = tk._tuned(str(tk.TUNED_FILE))
    assert tuned, f"{tk.TUNED_FILE} lists no GPU"
    exps = make_experts(3, 64, 64, 4, 32, torch.bfloat16, seed=3)
    table = tk.table_from_experts(exps, 64, 64)
    x = torch.randn(1, 64, device=DEV)
    ids, w = routing(1, 2, 3, seed=1)
    ref = tk.decode_twin(x, exps, ids.to(DEV), w.to(DEV))
    for gpu, configs in tuned.items():
        for key, cfg in configs.items():
            bits, group = (int(v) for v in key.split("/"))
            assert bits in tk.BITS and group & (group - 1) == 0, (gpu, key)
            bn, bk, warps, split, pair, align, i8, bn_dn = tk._cfg(tuple(cfg))
            assert {split, pair, align} <= {0, 1} and i8 in (0, 1, 2), (gpu, key)
            assert bn & (bn - 1) == 0 and bk & (bk - 1) == 0 and bn_dn & (bn_dn - 1) == 0, (gpu, key)
    for gpu, configs in list(tuned.items()) + [("generic", {f"{b}/64": c for b, c in tk.GENERIC_CFG.items()})]:
        for cfg in {tuple(c) for c in configs.values()}:  # any listed config computes the twin's function
            got = tk.moe_decode(x, table, ids.reshape(-1).to(torch.int32).to(DEV), w.reshape(-1).to(DEV), 2, cfg)
            want = ref if not tk._cfg(cfg)[6] else tk.decode_twin(x, exps, ids.to(DEV), w.to(DEV), tk._cfg(cfg)[6])
            assert rel(got, want) < TOL[torch.float32], (gpu, cfg)


@pytest.mark.parametrize("bits,i8", [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (8, 2)])
def test_int8_activations_layout_and_cost(bits, i8):
    """_quant_x's rows: lane j's bytes are each word span's values j, L+j, 2L+j, 3L+j as round_i8 rounds them
    (per word span, i8 1, or per 32-value weight group, i8 2), with each span's scale and rounded sum beside;
    and what the rounding costs an expert MLP (i8 twin against the exact one) stays at the level of bf16
    activations, not of the 2-4 bit weights."""
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 96, generator=g) * torch.linspace(0.01, 10, 96)).to(DEV)  # spans of unlike scale
    span = tk.i8_span(i8, bits, 32)
    xq, xf = tk.quant_rows_i8(x, bits, span)
    p = 32 // bits
    vals = xq.view(torch.int8).reshape(3, p // 4, 96 // p, 4).permute(0, 2, 3, 1).reshape(3, 96).float()
    want = tk.round_i8(x, span)
    scale = xf[:, : 96 // span].repeat_interleave(span, 1)
    # the same values: on the GPU torch divides by 127 through its reciprocal (an ulp off the kernel's scale, in a
    # few spans: H200, 2026-12-03), and a fused multiply-add may round a value at a tie the other way
    off = (vals * scale - want).abs() > 1e-5 * want.abs() + 1e-6
    assert ((vals * scale - want).abs() <= 1.01 * scale).all() and off.float().mean() < 0.02
    assert torch.allclose(xf[:, 96 // span :], (vals * scale).reshape(3, -1, span).sum(-1), rtol=1e-5, atol=1e-5)
    assert vals.abs().max() == 127 and rel(want, x) < 2e-2
    exps = make_experts(4, 128, 96, bits, 32, torch.bfloat16, seed=bits)
    xs = torch.randn(4, 128, generator=g).to(DEV)
    ids, w = routing(4, 2, 4, seed=2)
    exact = tk.decode_twin(xs, exps, ids.to(DEV), w.to(DEV))
    assert 1e-4 < rel(tk.decode_twin(xs, exps, ids.to(DEV), w.to(DEV), i8), exact) < 2e-2


def test_tables_say_whether_word_rows_are_16_byte_aligned():
    """ExpertTable.aligned (what a decode config's align relies on): true for the VRAM pool's slot tables and
    for tensors at 16-byte offsets, false for experts whose words sit at an offset of 4 bytes."""
    from flashmoe_pack.engine.gpu_cache import slot_table
    from flashmoe_pack.pack import format as fmt

    exps = make_experts(2, 64, 64, 4, 32, torch.float16, seed=1)
    assert tk.table_from_experts(exps, 64, 64).aligned
    lay = fmt.record_layout(64, 64, 4, 32, "float16")
    pool = torch.zeros(3, fmt.align_up(lay.record_bytes, 256), dtype=torch.uint8)
    assert slot_table(pool, lay, [0, 2], 4, 32, 64, 64).aligned
    shifted = make_experts(1, 64, 64, 4, 32, torch.float16, seed=2)
    buf = torch.zeros(shifted[0].gate.weight.numel() + 1, dtype=torch.int32, device=DEV)
    buf[1:].copy_(shifted[0].gate.weight.reshape(-1))
    shifted[0].gate.weight = buf[1:].view_as(shifted[0].gate.weight)  # 4 bytes past a 16-byte boundary
    assert not tk.table_from_experts(shifted, 64, 64).aligned
