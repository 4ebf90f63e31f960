"""The runtime a slim model ships to, and the channel block it computes in.

onnxruntime's CPU convolutions run in NCHWc layout on blocks of 8 or 16
channels (MLAS, by the CPU's vector width): a conv whose channel counts are
not multiples of the block falls back to a slower path, and one with 100
channels costs what 112 do. On a GPU, cuDNN and cuBLAS reach the tensor
cores with channel counts in multiples of 8. So pruned widths are rounded to
the block of the runtime the model will run on (see budget.Constraints).
"""
from __future__ import annotations

import functools
import os

import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}  # runtime -> onnxruntime provider
CUDA_BLOCK = 8


def check_runtime(runtime: str) -> str:
    if runtime not in PROVIDERS:
        raise ValueError(f"runtime={runtime!r}: choose {' or '.join(map(repr, PROVIDERS))}, "
                         f"the onnxruntime provider the slim model will run on")
    return runtime


def channel_block(runtime: str = "cpu") -> int:
    """The channel block of `runtime`: on the CPU, onnxruntime's MLAS NCHWc
    block of this machine (16 with AVX-512, 8 with AVX2/AVX, else 4 for NEON
    and others); on CUDA, 8."""
    return CUDA_BLOCK if check_runtime(runtime) == "cuda" else _cpu_block()


def _cpu_block() -> int:
    """This CPU's MLAS block, from its flags (see cpu_flags)."""
    words = cpu_flags()
    return 16 if "avx512f" in words else 8 if words & {"avx2", "avx"} else 4


@functools.cache
def cpu_flags() -> frozenset:
    """This CPU's feature flags (avx2, avx512f, avx512_vnni, ... on x86; the
    Features of an ARM CPU), read from /proc/cpuinfo once per process (every
    solve asks for the block); empty where there is no /proc/cpuinfo."""
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[-1] for line in f if line.startswith(("flags", "Features"))), "")
    return frozenset(flags.split())


def provider(runtime: str) -> str:
    """The onnxruntime provider that times `runtime`; refused in one line when
    this onnxruntime lacks it (widths can still be aligned for a GPU from a
    machine without one: only timing needs the provider)."""
    name = PROVIDERS[check_runtime(runtime)]
    available = ort.get_available_providers()
    if name not in available:
        raise ValueError(f"runtime={runtime!r} is timed on onnxruntime's {name}, which this onnxruntime lacks "
                         f"(it has {', '.join(available)}): install onnxruntime-gpu on a machine with a GPU, "
                         f"or give runtime='cpu'")
    return name
