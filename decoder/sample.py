"""Sampling the decoder (guided by image and text) and the upsamplers, through the one loop in unclip.sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip.sampling import denoise, guided
from unclip.schedulers import make_scheduler

from .config import noise_schedule
from .upsampler import Upsampler, corrupt, downsample


def make_stage_scheduler(scheduler, config, dynamic_threshold: float | None = None):
    """A scheduler by name (or a given one) over the stage's noise schedule; Imagen's dynamic thresholding at p."""
    overrides = {}
    if dynamic_threshold is not None:
        if not 0.0 < dynamic_threshold <= 1.0:
            raise ValueError(f"dynamic_threshold is a percentile in (0, 1], e.g. 0.995; got {dynamic_threshold}")
        overrides = dict(thresholding=True, dynamic_thresholding_ratio=dynamic_threshold, sample_max_value=1.0)
    if isinstance(scheduler, str):
        return make_scheduler(scheduler, noise_schedule(config), **overrides)
    if scheduler.config.get("prediction_type") != config.prediction_type:
        raise ValueError(f"the scheduler predicts {scheduler.config.get('prediction_type')!r} but the model was "
                         f"trained for {config.prediction_type!r}")
    if overrides and "thresholding" not in scheduler.config:
        raise ValueError(f"{type(scheduler).__name__} does not support dynamic thresholding")
    return type(scheduler).from_config(scheduler.config, **overrides) if overrides else scheduler


def initial_noise(shape: tuple, latents: torch.Tensor | None, generator, device) -> torch.Tensor:
    """x_T: the given latents (checked) or fresh unit Gaussian noise."""
    if latents is None:
        return torch.randn(shape, generator=generator, device=device)
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must be {list(shape)}, got {list(latents.shape)}")
    return latents.to(device, torch.float32)


# (low, high) in t / T: decoder steps outside it run the most conditioned branch alone, one forward of batch B
# instead of the guided batch. Guidance only in the middle (Kynkäänniemi et al. 2024) cut the CLIP-space FD by a fifth
# to a third on both bundled models at the same R-precision / oracle (docs/BENCHMARKS.md, "Guidance interval"); the
# pipeline and sample_decoder share it. (0.0, 1.0) guides every step.
GUIDANCE_INTERVAL = (0.3, 0.7)


def check_guidance_interval(interval) -> tuple[float, float]:
    """(low, high) as floats with 0 <= low <= high <= 1 (fractions of the training noise schedule), or ValueError."""
    values = tuple(float(v) for v in interval)
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise ValueError(f"guidance interval must be (low, high) with 0 <= low <= high <= 1, got {tuple(interval)}")
    return values


@torch.inference_mode()
def sample_decoder(model, image_emb, text_tokens, mask, *, scheduler="ddim", num_steps: int = 25,
                   guidance_scale: float = 3.0, text_guidance_scale: float | None = None,
                   guidance_interval: tuple[float, float] = GUIDANCE_INTERVAL, eta: float | None = None,
                   dynamic_threshold: float | None = None, generator: torch.Generator | None = None,
                   latents: torch.Tensor | None = None, prior_free: bool = False, progress: bool = True) -> dict:
    """image_emb [B, D] (None when prior_free), text_tokens [B, L, W] (token ids [B, L] for a decoder with its
    own text transformer) and mask [B, L] (None: no caption) -> {images [B, 3, S, S] in [-1, 1], latents: x_T}.

    Guidance over [null, image only, image + text]: pred = p_null + guidance_scale * (p_image - p_null)
    + text_guidance_scale * (p_image_text - p_image). prior_free nulls the image embedding: [null, text only];
    without text tokens it is [null, image only]. guidance_interval (low, high), fractions of the training
    noise schedule: steps with t / num_train_timesteps outside [low, high] take the image + text branch alone
    (the default, GUIDANCE_INTERVAL, is the pipeline's; (0, 1) guides every step).
    """
    c = model.config
    if image_emb is None and (not prior_free or text_tokens is None):
        raise ValueError("image_emb is required unless prior_free=True (which needs text_tokens)")
    if (text_tokens is None) != (mask is None):
        raise ValueError("give text_tokens and mask together (or neither, for no caption)")
    ref = text_tokens if text_tokens is not None else image_emb
    B, device = ref.shape[0], ref.device
    image_emb = torch.zeros(B, c.embed_dim, device=device) if image_emb is None else image_emb
    text_guidance_scale = guidance_scale if text_guidance_scale is None else text_guidance_scale
    yes, no = torch.ones(B, dtype=torch.bool, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    cond = dict(image_emb=image_emb, text_tokens=text_tokens, mask=mask)
    null = {**cond, "force_drop_image": yes, "force_drop_text": yes}
    if prior_free:
        conds, scales = [null, {**cond, "force_drop_image": yes, "force_drop_text": no}], [text_guidance_scale]
    elif text_tokens is None:
        conds, scales = [null, {**cond, "force_drop_image": no, "force_drop_text": yes}], [guidance_scale]
    else:
        conds = [null, {**cond, "force_drop_image": no, "force_drop_text": yes},
                 {**cond, "force_drop_image": no, "force_drop_text": no}]
        scales = [guidance_scale, text_guidance_scale]
    x_T = initial_noise((B, c.out_channels, c.image_size, c.image_size), latents, generator, device)
    lo, hi = check_guidance_interval(guidance_interval)
    T = c.num_train_timesteps
    interval = None if (lo, hi) == (0.0, 1.0) else (lo * T, hi * T)
    model_fn = guided(model, conds, scales, guide_channels=c.out_channels,  # extra channels: learned variance
                      interval=interval)
    x_0 = denoise(model_fn, x_T, make_stage_scheduler(scheduler, c, dynamic_threshold),
                  num_steps, generator=generator, eta=eta, progress=progress, desc="decoder")
    return {"images": x_0.clamp(-1, 1), "latents": x_T}


@torch.inference_mode()
def upsample(model, low_res: torch.Tensor, *, scheduler="ddim", num_steps: int = 25, aug_level: float = 0.0,
             eta: float | None = None, generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             match_low_res: bool | None = None, progress: bool = True) -> torch.Tensor:
    """low_res [B, 3, s, s] in [-1, 1] -> [B, 3, k*s, k*s] in [-1, 1]; low_res is first noised at aug_level.

    match_low_res replaces the output's low frequencies with the input's (afterwards downsample(out) equals
    low_res): the upsampler adds detail but cannot shift colours or tint the background. On the shapes
    model's upsampler it lifts PSNR from 29.1 dB (bicubic: 28.2) to 40.6 dB (scripts/compare_upsampler.py).
    None: on for unclip's own upsamplers, off for imported ones (Karlo's are used as published).
    """
    c = model.config
    if low_res.ndim != 4 or low_res.shape[1] != c.in_channels:
        raise ValueError(f"low_res must be [B, {c.in_channels}, s, s], got {tuple(low_res.shape)}")
    if not 0.0 <= aug_level <= 1.0:
        raise ValueError(f"aug_level must be in [0, 1], got {aug_level}")
    B, _, h, w = low_res.shape
    shape = (B, c.out_channels, h * c.scale, w * c.scale)
    down = 2 ** (len(c.block_out_channels) - 1)
    if shape[-1] % down or shape[-2] % down:
        raise ValueError(f"the upsampled side ({shape[-2]}x{shape[-1]}) must divide by {down} (UNet levels)")
    clean = low_res.float()
    low_res = corrupt(clean, aug_level, generator=generator)  # Imagen: condition on a noised input
    x_T = initial_noise(shape, latents, generator, low_res.device)
    model_fn = lambda x_t, t: model(x_t, t, low_res, aug_level)  # noqa: E731
    x_0 = denoise(model_fn, x_T, make_stage_scheduler(scheduler, c), num_steps, generator=generator, eta=eta,
                  progress=progress, desc=f"upsampler {c.image_size}")
    if match_low_res or (match_low_res is None and isinstance(model, Upsampler)):
        residual = clean - downsample(x_0.float(), h)                              # [B, 3, s, s]
        x_0 = x_0 + F.interpolate(residual, size=shape[-2:], mode="bicubic", align_corners=False)
    return x_0.clamp(-1, 1)
