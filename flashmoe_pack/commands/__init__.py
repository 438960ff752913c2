"""CLI commands that live in their own modules. Each module defines `register(app)`.

cli.py holds download | quantize | verify | run | inspect; add a module name to MODULES to add
a command (the module is imported when the CLI starts: keep its top-level imports light).
"""

from __future__ import annotations

import importlib

MODULES: tuple[str, ...] = ("chat", "serve")


def register_all(app) -> None:
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)

# --resident of run, chat and serve (engine/resident.py has the modes; kept here so --help imports no torch)
RESIDENT_HELP = ("Non-expert matrices: auto (q8 on the CPU with the C kernels; on cuda bf16 if it fits in 70% of "
                 "free VRAM, else q8) | bf16 | stored (as packed) | q8 | q4-head.")
