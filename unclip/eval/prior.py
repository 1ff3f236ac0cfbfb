"""Prior evaluation: how close sampled image embeddings come to the true ones on held-out pairs.

Reported (all mean cosines on l2-normalised embeddings):
    cos_pred_c1 / cos_pred_c2   sampled image_emb (1 or 2 candidates, same noise) vs the true image_emb
    cos_text                    the baseline: text_emb itself vs the true image_emb
    cos_pred_unrelated          sampled image_emb vs the image_emb of another sample (batch rolled by one)
                                with a different caption: how much is caption-specific
    cos_caption_mean            a ceiling for repeated captions: each true image_emb vs the mean of the
                                other held-out image_embs with the same caption (leave-one-out), roughly
                                the best a prior that knows only the caption can do
and one distance between distributions, which the cosines miss (a prior that returns each caption's mean
embedding scores a high cosine with no diversity):
    fd_pred / fd_text           Fréchet distance of the sampled image_embs (2 candidates) / of the text_embs
                                to the true image_embs (unclip.eval.metrics.frechet_distance)
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from prior.model import DiffusionPrior
from prior.sample import sample_prior
from unclip.clip import ClipEncoder
from unclip.data.embeddings import embed_pairs
from unclip.eval.metrics import frechet_distance


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)  # [N]


def _fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """frechet_distance, or nan for fewer than 2 pairs (no covariance to fit)."""
    return frechet_distance(a, b) if len(a) >= 2 else float("nan")


def caption_mean_ceiling(image_emb: torch.Tensor, captions: list[str]) -> float:
    """Mean cosine of each image_emb to the mean of the *other* image embeddings with its caption.

    Leave-one-out, over samples whose caption occurs at least twice (nan when none does).
    """
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions])                                    # [N]
    x = image_emb.float().cpu()
    sums = torch.zeros(len(ids), x.shape[1]).index_add_(0, label, x)                    # [U, D]
    counts = torch.bincount(label, minlength=len(ids))                                  # [U]
    keep = counts[label] >= 2                                                           # [N]
    return float(_cos(sums[label] - x, x)[keep].mean()) if keep.any() else float("nan")


def unrelated_cosine(pred: torch.Tensor, image_emb: torch.Tensor, captions: list[str]) -> float:
    """Mean cosine of pred[i] to image_emb[i - 1] over pairs whose captions differ (nan if none do)."""
    other = [captions[-1]] + list(captions[:-1])
    keep = torch.tensor([a != b for a, b in zip(captions, other)])
    cos = _cos(pred.cpu(), image_emb.cpu().roll(1, dims=0))
    return float(cos[keep].mean()) if keep.any() else float("nan")


@torch.inference_mode()
def prior_metrics(prior, emb: dict, *, scheduler: str = "ddim", num_steps: int = 25, guidance_scale: float = 4.0,
                  batch_size: int = 256, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Sample the prior on encoded held-out pairs (`embed_pairs` output) and compute the metrics above."""
    device = next(prior.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    preds = []
    for rows in torch.arange(len(emb["captions"])).split(batch_size):
        index = emb["index"][rows]
        batch = [emb["text_emb"][rows], emb["text_tokens"][index].float(), emb["mask"][index]]
        out = sample_prior(prior, *[x.to(device) for x in batch], scheduler=scheduler, num_steps=num_steps,
                           guidance_scale=guidance_scale, candidates=2, generator=generator, progress=progress)
        preds.append(torch.stack([out["candidates"][:, 0], out["image_emb"]], dim=1).cpu())  # [b, 2, D]
    preds = torch.cat(preds)                                                    # [N, 2, D]: c1, c2
    image_emb, captions = emb["image_emb"], emb["captions"]
    return {"cos_pred_c1": float(_cos(preds[:, 0], image_emb).mean()),
            "cos_pred_c2": float(_cos(preds[:, 1], image_emb).mean()),
            "cos_text": float(_cos(emb["text_emb"], image_emb).mean()),
            "cos_pred_unrelated": unrelated_cosine(preds[:, 0], image_emb, captions),
            "cos_caption_mean": caption_mean_ceiling(image_emb, captions),
            "fd_pred": _fd(preds[:, 1], image_emb), "fd_text": _fd(emb["text_emb"], image_emb),
            "n": float(len(captions)), "n_captions": float(len(set(captions)))}


def evaluate_prior(model, data, *, limit: int | None = None, scheduler: str = "ddim", num_steps: int = 25,
                   guidance_scale: float = 4.0, batch_size: int = 256, seed: int = 0,
                   progress: bool = True) -> dict:
    """Evaluate a prior on held-out pairs.

    Args:
        model: a model folder (with clip/ and prior/) or a (ClipEncoder, DiffusionPrior) pair.
        data: a data set of {"image", "caption", "key"} items, a folder of pairs, or an embeddings folder.
    """
    if isinstance(model, (str, os.PathLike)):
        model = (ClipEncoder.load(os.path.join(model, "clip")).eval(),
                 DiffusionPrior.load(os.path.join(model, "prior")))
    clip, prior = model
    emb = embed_pairs(clip, data, limit=limit, batch_size=batch_size, progress=progress)
    metrics = prior_metrics(prior.eval(), emb, scheduler=scheduler, num_steps=num_steps,
                            guidance_scale=guidance_scale, batch_size=batch_size, seed=seed, progress=progress)
    metrics = {k: None if math.isnan(v) else v for k, v in metrics.items()}  # JSON has no NaN
    metrics.update(n=int(metrics["n"]), n_captions=int(metrics["n_captions"]))
    return {**metrics, "scheduler": scheduler, "num_steps": num_steps, "guidance_scale": guidance_scale,
            "seed": seed}
