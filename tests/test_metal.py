"""The Metal expert kernel (backends/mps.py, metal/qmv.metal).

Metal cannot run on Linux, so these tests check: the shader's arithmetic through its torch twin
`qmv_twin`; that the shipped .metal source defines the entry points and argument order mps.py
launches; MetalKernel's launch glue, driven by a stand-in library that runs the twin; and the
fallback to the torch kernel. Only test_real_shader_on_mps runs the shader, on Apple Silicon.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import tomllib
import torch

from flashmoe_pack.backends import mps
from flashmoe_pack.backends.mps import MetalKernel, qmv_twin
from flashmoe_pack.backends.torch_ref import TorchKernel
from flashmoe_pack.pack.reader import ExpertWeights
from flashmoe_pack.quant import QTensor, dequantize, quantize

ROOT = Path(__file__).resolve().parents[1]
SCALES = (torch.bfloat16, torch.float16, torch.float32)


def _qt(out: int, n: int, bits: int, group: int, sdtype: torch.dtype, seed: int) -> QTensor:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(out, n, generator=g), bits, group, sdtype, method="minmax")


def _expert(hidden: int, inter: int, bits: int, group: int, sdtype: torch.dtype) -> ExpertWeights:
    gate, up = (_qt(inter, hidden, bits, group, sdtype, seed) for seed in (1, 2))
    return ExpertWeights(gate=gate, up=up, down=_qt(hidden, inter, bits, group, sdtype, 3), nbytes=0)


def _shader_params(source: str) -> list[str]:
    """Buffer argument names of the QMV kernel, in buffer-index order."""
    found = sorted((int(i), name) for name, i in re.findall(r"(\w+)\s*\[\[buffer\((\d+)\)\]\]", source))
    assert [i for i, _ in found] == list(range(len(found))), "buffer indices must be 0..n-1"
    return [name for _, name in found]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sdtype", SCALES)
@pytest.mark.parametrize("out,n,group", [(37, 5 * 64, 64), (129, 7 * 32, 32), (37, 3 * 128, 128)])
def test_twin_equals_dequantized_matvec(bits, sdtype, out, n, group):
    qt = _qt(out, n, bits, group, sdtype, seed=out + n + bits)
    x = torch.randn(n, generator=torch.Generator().manual_seed(7))
    ref = dequantize(qt).double() @ x.double()  # [out]
    y = qmv_twin(qt.weight, qt.scales, qt.biases, x, bits, group)
    assert y.dtype == torch.float32 and y.shape == (out,)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_twin_on_raw_words_all_bits_set():
    """Random words (every bit pattern, incl. the sign bit of int32) and random-sign scales."""
    g = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        words = torch.randint(-(2**31), 2**31, (37, 4 * bits), generator=g, dtype=torch.int64).to(torch.int32)
        n = words.shape[1] * 32 // bits  # 128 values = 4 groups of 32
        scales, biases = torch.randn(37, n // 32, generator=g), torch.randn(37, n // 32, generator=g)
        qt = QTensor(words, scales.half(), biases.half(), bits, 32)
        x = torch.randn(n, generator=g).half()  # half input, read as float like the launcher does
        ref = dequantize(qt).double() @ x.double()
        y = qmv_twin(qt.weight, qt.scales, qt.biases, x, bits, 32)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_shader_ships_and_matches_launcher():
    src_path = ROOT / "flashmoe_pack" / mps.SHADER
    assert src_path.is_file()
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(mps.SHADER, pat) for pat in globs["flashmoe_pack"]), "not package data"
    source = mps.shader_source()  # read through importlib.resources, as at run time
    assert source == src_path.read_text()
    assert sorted(mps.shader_kernels(source)) == sorted(mps.KERNEL_NAMES)
    # every kernel name the source defines via the QMV macro is what kernel_name() produces
    assert re.search(r"kernel void qmv_##BITS##_##SNAME\(", source)
    assert _shader_params(source) == list(mps.QMV_ARGS)
    assert "simd_sum" in source and "#include <metal_stdlib>" in source


def test_falls_back_on_cpu(caplog):
    w = _expert(hidden=128, inter=96, bits=4, group=32, sdtype=torch.bfloat16)
    x = torch.randn(1, 128)
    kernel = MetalKernel()
    with caplog.at_level("INFO", logger="flashmoe_pack.backends.mps"):
        for _ in range(3):
            y = kernel.expert_mlp(x, w)
    assert torch.equal(y, TorchKernel().expert_mlp(x, w))
    assert kernel.fallback_reason and "cpu" in kernel.fallback_reason
    assert kernel.launches == 0
    assert len([r for r in caplog.records if "fallback" in r.getMessage()]) == 1  # logged once

    xs = torch.randn(5, 128)  # prefill
    assert torch.equal(kernel.expert_mlp(xs, w), TorchKernel().expert_mlp(xs, w))
    assert "T > 1" in kernel.fallback_reason
    dense = ExpertWeights(*(t.float() for t in w.dense()), nbytes=0)  # bits 16
    assert torch.equal(kernel.expert_mlp(x, dense), TorchKernel().expert_mlp(x, dense))
    assert "bits 16" in kernel.fallback_reason


class _TwinLibrary:
    """Stands in for the compiled qmv.metal on CPU: each entry point runs qmv_twin on the
    arguments bound by position, named as in the shader source."""

    def __init__(self):
        source = mps.shader_source()
        self.names, self.params, self.calls = set(mps.shader_kernels(source)), _shader_params(source), []

    def __getattr__(self, name):
        if name not in self.names:
            raise AttributeError(name)
        bits = int(name.split("_")[1])

        def launch(*args, threads, group_size):
            a = dict(zip(self.params, args, strict=True))
            assert threads == 32 * a["out_features"] and group_size % 32 == 0
            assert a["scales"].dtype == {"bf16": torch.bfloat16, "f16": torch.float16,
                                         "f32": torch.float32}[name.split("_")[2]]
            assert a["y"].shape == (a["out_features"],) and a["x"].shape == (a["in_features"],)
            a["y"].copy_(qmv_twin(a["w"], a["scales"], a["biases"], a["x"], bits, a["group_size"]))
            self.calls.append(name)

        return launch


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sdtype", SCALES)
def test_launch_glue_with_twin_library(bits, sdtype):
    w = _expert(hidden=160, inter=96, bits=bits, group=32, sdtype=sdtype)
    lib = _TwinLibrary()
    kernel = MetalKernel(library=lib, device_type="cpu")
    for xdtype in (torch.float32, torch.float16):
        x = torch.randn(1, 160, generator=torch.Generator().manual_seed(bits)).to(xdtype)
        y = kernel.expert_mlp(x, w)
        ref = TorchKernel().expert_mlp(x.float(), w)
        assert y.dtype == xdtype and y.shape == (1, 160)
        tol = 1e-4 if xdtype == torch.float32 else 2e-3
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert kernel.fallback_reason is None and kernel.launches == 6
    assert lib.calls == [mps.kernel_name(bits, sdtype)] * 6


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple Silicon")
def test_real_shader_on_mps():
    """The one test that runs qmv.metal. It is skipped on every machine without Apple Silicon
    (so on all of this project's CI/test machines): it is NOT counted as coverage of the shader."""
    for bits in (2, 4, 8):
        for sdtype in SCALES:
            w = _expert(hidden=320, inter=192, bits=bits, group=64, sdtype=sdtype)
            ref = TorchKernel().expert_mlp(torch.randn(1, 320, generator=torch.Generator().manual_seed(1)), w)
            x = torch.randn(1, 320, generator=torch.Generator().manual_seed(1)).to("mps")
            w_mps = ExpertWeights(*(QTensor(p.weight.to("mps"), p.scales.to("mps"), p.biases.to("mps"),
                                            p.bits, p.group_size) for p in (w.gate, w.up, w.down)), nbytes=0)
            kernel = MetalKernel()
            y = kernel.expert_mlp(x, w_mps).cpu()
            assert kernel.fallback_reason is None and kernel.launches == 3
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
