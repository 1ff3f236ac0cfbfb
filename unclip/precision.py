"""Which precision to compute in, chosen by measurement (docs/BENCHMARKS.md, "Speed levers").

`precision="auto"` (the default for training and sampling) means bf16 autocast where the hardware does bf16
matrix math natively (a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16), and fp32 elsewhere: on a 2-core
Xeon with AMX, bf16 autocast made the shapes-sized decoder train 1.2x and sample 1.3x faster, the prior train
1.8x faster, with losses and samples equal to fp32 within noise. Without native bf16, autocast only adds casts.

`attention_in_float32(unet)` keeps a diffusers UNet's attention in fp32 under CPU autocast: torch's CPU
flash-attention kernel is slower in bf16 than in fp32 at these sizes (its backward 1.5-4x slower), while the
convolutions and projections around it gain from bf16.
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


class Float32Attention:
    """A diffusers attention processor run in fp32 when CPU autocast is on (otherwise passed straight through)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if hidden_states.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        with torch.autocast("cpu", enabled=False):
            if encoder_hidden_states is not None:
                encoder_hidden_states = encoder_hidden_states.float()
            return self.processor(attn, hidden_states.float(), encoder_hidden_states, attention_mask, **kwargs)


def attention_in_float32(unet) -> None:
    """Wrap every attention processor of a diffusers UNet2DConditionModel in Float32Attention (idempotent)."""
    unet.set_attn_processor({name: p if isinstance(p, Float32Attention) else Float32Attention(p)
                             for name, p in unet.attn_processors.items()})
