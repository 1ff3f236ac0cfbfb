"""The one denoising loop and the classifier-free guidance wrapper that every stage samples through."""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _step_kwargs(scheduler, generator: torch.Generator | None, eta: float | None) -> dict:
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if generator is not None and "generator" in accepted:
        kwargs["generator"] = generator
    if eta is not None:
        if "eta" not in accepted:
            raise ValueError(f"eta is only used by DDIM; {type(scheduler).__name__} has no eta")
        kwargs["eta"] = eta
    return kwargs


def denoise(model_fn: ModelFn, x: torch.Tensor, scheduler, num_steps: int,
            generator: torch.Generator | None = None, eta: float | None = None,
            progress: bool = True, desc: str | None = None) -> torch.Tensor:
    """Run `scheduler` for `num_steps` from the noise `x` (unit variance) with `pred = model_fn(x_t, t)`."""
    if num_steps < 1:
        raise ValueError(f"number of sampling steps must be at least 1, got {num_steps}")
    scheduler.set_timesteps(num_steps, device=x.device)
    x = x * scheduler.init_noise_sigma
    kwargs = _step_kwargs(scheduler, generator, eta)
    learned = _learns_variance(scheduler)
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        pred = model_fn(scheduler.scale_model_input(x, t), t)  # same shape as x (+ learned variance channels)
        if pred.shape[1] != x.shape[1] and not learned:       # [B, 2C, ...] -> [B, C, ...]: the mean only
            pred = pred[:, : x.shape[1]]
        x = scheduler.step(pred, t, x, **kwargs).prev_sample
    return x


def _learns_variance(scheduler) -> bool:
    """Whether the scheduler reads a learned variance from extra prediction channels (improved DDPM)."""
    takes = "variance_type" in inspect.signature(type(scheduler).__init__).parameters  # others keep it unread
    return takes and scheduler.config.get("variance_type") in ("learned", "learned_range")


def _cat(values: Sequence):
    first = values[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(list(values))
    raise ValueError(f"cannot batch a condition of type {type(first).__name__}")


def guided(model: Callable, conds: Sequence[dict], scales: Sequence[float],
           guide_channels: int | None = None, interval: tuple[float, float] | None = None) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a model_fn, all branches in one batched forward.

    `conds` go from least to most conditioned (e.g. [null, image only, image + text]) and
    pred = p_0 + sum_i scales[i-1] * (p_i - p_{i-1}); one scale over [uncond, cond] is the usual
    eps_uncond + s * (eps_cond - eps_uncond). Branches that a scale of 1 or equal neighbours make
    redundant are skipped. With `guide_channels` only the first that many channels are guided; the rest (a
    learned variance) come from the most conditioned branch, as in GLIDE and diffusers' unCLIP pipeline.
    With `interval` = (t_lo, t_hi), steps whose timestep lies outside [t_lo, t_hi] run the most conditioned
    branch alone (guidance in a limited interval, Kynkäänniemi et al. 2024): one forward of batch B, not k*B.

    The condition is the same at every step, so a model with `prepare_condition(**cond)` encodes it once here:
    that returns the network for that condition as fn(x_t, t) (the prior caches its text prefix's keys and
    values, the decoder its context tokens). Other models are called as model(x_t, t, **cond) at each step.
    """
    if len(scales) != len(conds) - 1:
        raise ValueError(f"{len(conds)} conditions need {len(conds) - 1} guidance scales, got {len(scales)}")
    for s in scales:
        if not torch.isfinite(torch.tensor(float(s))):
            raise ValueError(f"guidance scale must be a finite number, got {s}")
    if guide_channels is not None and guide_channels < 1:
        raise ValueError(f"guide_channels must be at least 1, got {guide_channels}")
    if interval is not None and not interval[0] <= interval[1]:
        raise ValueError(f"guidance interval must be (low, high) with low <= high, got {interval}")
    conds, scales = _prune(list(conds), [float(s) for s in scales])
    k = len(conds)
    network = _prepared(model, {key: _cat([c[key] for c in conds]) for key in conds[0]})
    alone = _prepared(model, conds[-1]) if interval is not None and k > 1 else None  # outside the interval

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if alone is not None and not interval[0] <= float(t) <= interval[1]:
            return alone(x, torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]))
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0] * k)
        preds = network(torch.cat([x] * k), t).chunk(k)  # k x [B, ...]
        c = guide_channels if guide_channels is not None else preds[0].shape[1]
        out = preds[0][:, :c]
        for i, s in enumerate(scales, start=1):
            out = out + s * (preds[i][:, :c] - preds[i - 1][:, :c])
        return torch.cat([out, preds[-1][:, c:]], dim=1) if preds[-1].shape[1] > c else out

    return model_fn


def _prepared(model: Callable, cond: dict) -> ModelFn:
    """The network for one (batched) condition: prepared once where the model can, else called with it."""
    prepare = getattr(model, "prepare_condition", None)
    return prepare(**cond) if prepare is not None else lambda x_t, t: model(x_t, t, **cond)


def _prune(conds: list, scales: list[float]) -> tuple[list, list[float]]:
    """Drop branches whose guidance collapses: a leading scale of 1 or two equal consecutive scales."""
    while scales and scales[0] == 1.0:   # p_0 + 1*(p_1 - p_0) = p_1
        conds, scales = conds[1:], scales[1:]
    i = 1
    while i < len(scales):
        if scales[i] == scales[i - 1]:   # s*(p_i - p_{i-1}) + s*(p_{i+1} - p_i) = s*(p_{i+1} - p_{i-1})
            del conds[i]
            del scales[i]
        else:
            i += 1
    return conds, scales
