"""Builds the C kernels (runtime/cpu/*.c) into flashmoe_pack/_cpu_kernels<ext suffix>.

Metadata lives in pyproject.toml; this file only adds the extension. The library has no Python
API: flashmoe_pack/backends/cpu.py loads it with ctypes. One portable binary: -O3 without
-march=native; the AVX2 / AVX-512 paths carry per-function target attributes and are chosen at
run time. The build is optional: without a C compiler the package still installs and the CPU
backend falls back to the torch kernel (backends.cpu.unavailable_reason says why).
"""

import sys
from glob import glob

from setuptools import Extension, setup

UNIX_FLAGS = ["-std=c11", "-O3", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-function"]

cpu_kernels = Extension(
    "flashmoe_pack._cpu_kernels",
    sources=sorted(glob("runtime/cpu/*.c")),
    depends=sorted(glob("runtime/cpu/*.h")),
    include_dirs=["runtime/cpu"],
    extra_compile_args=[] if sys.platform == "win32" else UNIX_FLAGS,
    libraries=[] if sys.platform == "win32" else ["m", "pthread"],
    optional=True,
)

setup(ext_modules=[cpu_kernels])
