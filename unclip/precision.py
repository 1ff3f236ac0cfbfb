"""Which precision to compute in, chosen by measurement (docs/BENCHMARKS.md, "Speed levers").

`precision="auto"` (the default for training and sampling) means bf16 autocast where the hardware does bf16
matrix math natively (a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16), and fp32 elsewhere: on a 2-core
Xeon with AMX, bf16 autocast made the shapes-sized decoder train 1.2x and sample 1.3x faster, the prior train
1.8x faster, with losses and samples equal to fp32 within noise. Without native bf16, autocast only adds casts.

When training under CPU autocast, the decoder's attention product is two bf16 matrix products around a softmax
that accumulates in fp32 (decoder.attention: its backward is faster than torch's flash kernel in either dtype at
these sizes); sampling keeps the fp32 flash kernel, as fast there and more exact.

Sampling stays under torch.inference_mode although autocast does not cache the weights' bf16 copies there (it
does under no_grad: 96 instead of 384 casts per forward of the emoji decoder). Measured on 2026-12-01, no_grad did
not make `generate` faster (1.54 against 1.55 s), so the simpler mode stays.
"""

from __future__ import annotations

import functools

import torch

PRECISIONS = ("auto", "no", "bf16", "fp16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs that report AMX-BF16 or AVX512-BF16 (Linux /proc/cpuinfo; False where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matrix math is native (and so faster than fp32) on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"auto" -> "bf16" where native on `device`, else "no"; other values pass through (checked)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "no"
    return precision
