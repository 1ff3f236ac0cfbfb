"""PriorConfig and presets for the diffusion prior (Ramesh et al. 2022, "DALL-E 2", sec. 2.1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unclip.schedulers import DEFAULT_NOISE_SCHEDULE


@dataclass
class PriorConfig:
    embed_dim: int = 128          # D, CLIP's joint embedding size (taken from the CLIP at training time)
    text_width: int = 128         # W, width of CLIP's per-token text states
    context_length: int = 32      # L, CLIP's text context (number of text tokens)
    width: int = 128              # transformer width
    depth: int = 4                # transformer layers
    heads: int = 4                # attention heads (width must divide by heads)
    ff_mult: int = 4              # feed-forward hidden size = ff_mult * width
    num_readout: int = 1          # learned readout tokens at the end; x0_pred is the mean of their outputs
    cond_drop_prob: float = 0.1   # training probability of replacing the text condition by null tokens (CFG)
    stats_eps: float = 1e-5       # floor of the per-dimension std used to scale image embeddings

    def __post_init__(self):
        for name in ("embed_dim", "text_width", "context_length", "width", "depth", "heads", "ff_mult",
                     "num_readout"):
            if getattr(self, name) < 1:
                raise ValueError(f"PriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"PriorConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"PriorConfig.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.stats_eps <= 0:
            raise ValueError(f"PriorConfig.stats_eps must be > 0, got {self.stats_eps}")


# The prior's training noise schedule (scheduler_config.json): cosine DDPM; the network predicts x0
# ("sample"), as DALL-E 2 sec. 2.1 does: "we train the decoder-only Transformer to predict the unnoised z_i".
PRIOR_NOISE_SCHEDULE = {**DEFAULT_NOISE_SCHEDULE, "prediction_type": "sample"}

PRIOR_PRESETS: dict[str, PriorConfig] = {
    "tiny": PriorConfig(width=128, depth=4, heads=4),    # ~0.9 M parameters at D=W=128
    "small": PriorConfig(width=256, depth=6, heads=8),
    "base": PriorConfig(width=512, depth=12, heads=8),
}


def prior_preset(name: str, **fields) -> PriorConfig:
    """A copy of a preset with some fields replaced (e.g. embed_dim, text_width, context_length from CLIP)."""
    if name not in PRIOR_PRESETS:
        raise ValueError(f"unknown prior preset {name!r} (choose from {', '.join(PRIOR_PRESETS)})")
    return dataclasses.replace(PRIOR_PRESETS[name], **fields)
