"""sample_prior: text encodings -> CLIP image embeddings with CFG and best-of-N candidates (DALL-E 2 sec. 2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip.sampling import denoise, guided
from unclip.schedulers import make_scheduler


def _condition(text_emb, text_tokens, mask, repeats: int, drop: bool) -> dict:
    """Model keyword arguments for one CFG branch, each prompt repeated `repeats` times."""
    cond = dict(text_emb=text_emb, text_tokens=text_tokens, mask=mask.bool())
    cond = {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}  # [B, ...] -> [B * K, ...]
    cond["force_drop"] = torch.full((text_emb.shape[0] * repeats,), drop, device=text_emb.device)  # [B * K]
    return cond


def _negative(negative, batch: int, repeats: int) -> dict:
    """The unconditional branch from a (text_emb, text_tokens, mask) negative prompt of batch 1 or B."""
    if not (isinstance(negative, (tuple, list)) and len(negative) == 3):
        raise ValueError("negative must be a (text_emb, text_tokens, mask) triple from ClipEncoder.encode_text")
    n = negative[0].shape[0]
    if n not in (1, batch):
        raise ValueError(f"negative prompt batch must be 1 or {batch}, got {n}")
    return _condition(*negative, repeats=repeats * batch // n, drop=False)


@torch.inference_mode()
def sample_prior(model, text_emb, text_tokens, mask, *, scheduler="ddim", num_steps: int = 25,
                 guidance_scale: float = 4.0, candidates: int = 2, generator=None, latents=None, negative=None,
                 negative_scale: float | None = None, eta: float | None = None, progress: bool = True) -> dict:
    """Sample image_emb [B, D] (l2-normalised, like CLIP's image embeddings) for each prompt.

    Draws `candidates` embeddings per prompt in one batched loop and keeps the one with the higher cosine
    to text_emb (DALL-E 2 sec. 2.1). `latents` [B, K, D] is the starting noise; `negative` (one prompt, or one
    per row) replaces the null condition in the unconditional CFG branch or, with `negative_scale` s, keeps it and
    adds a push away from the negative: pred = p_null + guidance_scale * (p_text - p_null) + s * (p_text -
    p_negative). A row whose negative is its own prompt is then guided as without one. Returns image_emb,
    latents [B, K, D], candidates [B, K, D] (l2-normalised) and scores [B, K] (cosine to text_emb).
    """
    b, k, d = text_emb.shape[0], candidates, model.config.embed_dim
    if k < 1:
        raise ValueError(f"candidates must be >= 1, got {k}")
    if isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler, model.scheduler_config)
    if scheduler.config.prediction_type != "sample":
        raise ValueError(f"the prior predicts x0: its scheduler needs prediction_type 'sample', "
                         f"got {scheduler.config.prediction_type!r}")
    if latents is None:
        latents = torch.randn(b, k, d, generator=generator, device=text_emb.device)  # [B, K, D]
    if tuple(latents.shape) != (b, k, d):
        raise ValueError(f"latents must have shape [{b}, {k}, {d}], got {list(latents.shape)}")
    cond = _condition(text_emb, text_tokens, mask, k, drop=False)
    null = _condition(text_emb, text_tokens, mask, k, True)
    if negative is None:
        model_fn = guided(model, [null, cond], [guidance_scale])
    elif negative_scale is None:
        model_fn = guided(model, [_negative(negative, b, k), cond], [guidance_scale])
    else:  # p_null + g (p_negative - p_null) + (g + s)(p_text - p_negative)
        if not negative_scale >= 0:
            raise ValueError(f"negative_scale must be >= 0, got {negative_scale}")
        model_fn = guided(model, [null, _negative(negative, b, k), cond],
                          [guidance_scale, guidance_scale + negative_scale])
    x0 = denoise(model_fn, latents.reshape(b * k, d).float(), scheduler, num_steps, generator=generator,
                 eta=eta, progress=progress, desc="prior")                       # [B * K, D]
    embs = model.unscale_image(x0).view(b, k, d)                                 # [B, K, D]
    if getattr(model, "unit_embeddings", True):  # Karlo's prior (unclip.karlo) predicts raw CLIP embeddings
        embs = F.normalize(embs, dim=-1)
    scores = F.cosine_similarity(embs, text_emb.float()[:, None], dim=-1)        # [B, K]
    best = embs[torch.arange(b, device=embs.device), scores.argmax(dim=1)]       # [B, D]
    return dict(image_emb=best, latents=latents, candidates=embs, scores=scores)
