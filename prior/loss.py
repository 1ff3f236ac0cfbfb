"""One batch -> the prior's loss: MSE between the predicted and the true (scaled) clean image embedding."""

from __future__ import annotations

import json
from functools import lru_cache

import torch
import torch.nn.functional as F

from unclip.schedulers import training_scheduler
from unclip.training import sample_random

BATCH_KEYS = ("image_emb", "text_emb", "text_tokens", "mask")


@lru_cache(maxsize=8)
def _noise_scheduler(config_json: str):
    return training_scheduler(json.loads(config_json))


def prior_loss(model, batch: dict) -> torch.Tensor:
    """DALL-E 2 sec. 2.1: L = E_t ||f(z_i^(t), t, y) - z_i||^2, the network predicting the clean embedding.

    Args:
        model: a DiffusionPrior (or a DDP wrapper of one).
        batch: image_emb [B, D], text_emb [B, D], text_tokens [B, L, W], mask [B, L].

    t, the noise and the CFG condition drop are drawn per sample (`sample_random`), so a sample's draws do not
    depend on how the batch is split over processes.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"prior batch lacks {missing} (has {sorted(batch)})")
    core = getattr(model, "module", model)  # the DiffusionPrior inside a DDP wrapper
    scheduler = _noise_scheduler(json.dumps(core.scheduler_config, sort_keys=True))
    x0 = core.scale_image(batch["image_emb"])                                   # [B, D], unit variance per dim
    rng = sample_random(batch, x0.shape[0], x0.device)
    t = rng.randint(scheduler.config.num_train_timesteps)                      # [B]
    x_t = scheduler.add_noise(x0, rng.randn(x0.shape[1], dtype=x0.dtype), t)    # [B, D]
    drop = rng.rand() < core.config.cond_drop_prob if core.training else None  # [B], sec. 2.1: 10% CFG drop
    x0_pred = model(x_t, t, batch["text_emb"], batch["text_tokens"], batch["mask"], force_drop=drop)  # [B, D]
    return F.mse_loss(x0_pred.float(), x0)
