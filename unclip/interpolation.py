"""Moves on the unit sphere of CLIP embeddings: slerp, weighted mixes, DALL-E 2 text diffs.

Directions move on the sphere; lengths are carried along (interpolated, or kept), so unit embeddings stay unit
and raw CLIP embeddings (what Karlo's prior and decoder use, unclip.karlo) keep their usual norm.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between a and b ([D] or [B, D]) at t (a scalar or [T]).

    z(t) = sin((1 - t) θ) / sin θ · a + sin(t θ) / sin θ · b, θ = arccos(a · b) (Shoemake 1985) on the unit
    directions, times the linearly interpolated length: unit vectors stay on the unit sphere. It hits a at
    t = 0 and b at t = 1. Returns [..., D] for a scalar t and [T, ..., D] for a sequence.
    """
    length_a, length_b = a.float().norm(dim=-1, keepdim=True), b.float().norm(dim=-1, keepdim=True)  # [..., 1]
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    t_tensor = torch.as_tensor(t, dtype=torch.float32, device=a.device)
    scalar = t_tensor.ndim == 0
    t_tensor = t_tensor.reshape(-1, *([1] * a.ndim))                         # [T, 1.., 1]
    dot = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)                      # [..., 1]
    theta = torch.arccos(dot)
    sin = torch.sin(theta)
    near = sin.abs() < 1e-5                                                   # parallel: lerp is exact enough
    wa = torch.where(near, 1 - t_tensor, torch.sin((1 - t_tensor) * theta) / sin.where(~near, torch.ones_like(sin)))
    wb = torch.where(near, t_tensor, torch.sin(t_tensor * theta) / sin.where(~near, torch.ones_like(sin)))
    length = (1 - t_tensor) * length_a + t_tensor * length_b                 # [T, ..., 1]
    out = F.normalize(wa * a + wb * b, dim=-1) * length                       # [T, ..., D]
    return out[0] if scalar else out


def mix(embeddings: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A weighted mix of embeddings [K, D] -> [D]: the normalised weighted mean of the directions (a spherical
    centroid) at the weighted mean length."""
    w = torch.as_tensor(weights, dtype=torch.float32, device=embeddings.device)
    if w.ndim != 1 or len(w) != len(embeddings):
        raise ValueError(f"mix needs one weight per embedding: {len(embeddings)} embeddings, {w.numel()} weights")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("mix weights must be non-negative and not all zero")
    mean = (w[:, None] * F.normalize(embeddings.float(), dim=-1)).sum(0)
    if mean.norm() < 1e-6:
        raise ValueError("the weighted embeddings cancel out; choose other weights")
    length = (w * embeddings.float().norm(dim=-1)).sum() / w.sum()
    return F.normalize(mean, dim=-1) * length


def text_diff(image_emb: torch.Tensor, from_text_emb: torch.Tensor, to_text_emb: torch.Tensor,
              amount: float | Sequence[float]) -> torch.Tensor:
    """DALL-E 2 text diffs (Ramesh et al. 2022, sec. 3.3): slerp(z_i, z_d, amount), z_d = norm(z_t - z_t0)
    (z_d at the length of z_i, so the edited embedding keeps the image embedding's length)."""
    z_d = to_text_emb.float() - from_text_emb.float()
    if z_d.norm(dim=-1).min() < 1e-6:
        raise ValueError("the two texts have the same embedding: there is no direction to edit towards")
    return slerp(image_emb, F.normalize(z_d, dim=-1) * image_emb.float().norm(dim=-1, keepdim=True), amount)
