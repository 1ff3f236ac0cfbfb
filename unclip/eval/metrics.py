"""Metrics in CLIP space: retrieval accuracy, R-precision, Fréchet distance, cosine helpers."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def same_caption_matrix(captions: Sequence[str], device=None) -> torch.Tensor:
    """[N, N] bool: True where two samples share a caption (both count as the right answer)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[c] for c in captions], device=device)
    return labels[:, None] == labels[None, :]


def retrieval_accuracy(text_emb: torch.Tensor, image_emb: torch.Tensor, captions: Sequence[str],
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Text -> image retrieval: for each caption, is an image with that caption among the top k?"""
    sims = F.normalize(text_emb.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T  # [N, N]
    correct = same_caption_matrix(captions, sims.device)
    order = sims.argsort(dim=1, descending=True)
    hits = torch.gather(correct, 1, order)  # [N, N] in rank order
    return {f"top{k}": float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, target: Sequence[int],
                ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """CLIP R-precision: rank all candidate captions for each generated image; is the prompt in the top k?

    Args:
        image_emb: [N, D] embeddings of generated images; text_emb: [C, D] all candidate captions;
        target: [N] index of each image's own caption in text_emb.
    """
    rank = caption_ranks(image_emb, text_emb, target)
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


def caption_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """[N] rank of each image's own caption among all candidates by cosine similarity (0 = best)."""
    sims = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T  # [N, C]
    target_sim = sims[torch.arange(len(target)), torch.as_tensor(target)]
    return (sims > target_sim[:, None]).sum(dim=1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (FID's formula, in CLIP space)."""
    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrt(cov_a cov_b)) from the eigenvalues of sqrt(cov_a) cov_b sqrt(cov_a), which is symmetric PSD
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two [N, D] tensors."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def psnr(images: torch.Tensor, real: torch.Tensor) -> float:
    """Mean PSNR in dB of images [B, 3, H, W] in [-1, 1] against real ones (peak-to-peak 2)."""
    mse = (images.float() - real.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4 / mse)).mean())
