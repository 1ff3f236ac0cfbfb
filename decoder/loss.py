"""One batch -> loss for the decoder and the upsamplers: eps or v prediction with min-SNR-gamma weighting."""

from __future__ import annotations

import functools
import json

import torch

from unclip.schedulers import training_scheduler
from unclip.training import SampleRandom, sample_random

from .config import DecoderConfig, UpsamplerConfig, noise_schedule
from .upsampler import downsample, random_corruption, random_crop


@functools.lru_cache(maxsize=8)
def _noise_scheduler(schedule_json: str):
    return training_scheduler(json.loads(schedule_json))


def min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Hang et al. 2023 ("Min-SNR weighting"): min(SNR_t, gamma) over the target's scale.

    The weight on the x0 error is min(SNR, gamma); in eps units that is min(SNR, gamma) / SNR, in v units
    min(SNR, gamma) / (SNR + 1).
    """
    snr = alphas_cumprod / (1 - alphas_cumprod).clamp(min=1e-12)  # [B]
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def diffusion_loss(model_fn, x_0: torch.Tensor, config: DecoderConfig | UpsamplerConfig,
                   rng: SampleRandom | None = None):
    """Noise x_0 at random t, predict eps or v with `model_fn(x_t, t)`; returns (loss, {"mse": unweighted}).

    t and eps are drawn per sample from `rng` (the batch's `sample_random`; torch's global RNG when None).
    """
    scheduler = _noise_scheduler(json.dumps(noise_schedule(config), sort_keys=True))
    B = x_0.shape[0]
    rng = rng if rng is not None else sample_random({}, B, x_0.device)
    t = rng.randint(config.num_train_timesteps)                                    # [B]
    eps = rng.randn(*x_0.shape[1:], dtype=x_0.dtype)                               # [B, 3, S, S]
    x_t = scheduler.add_noise(x_0, eps, t)                                         # [B, 3, S, S]
    target = eps if config.prediction_type == "epsilon" else scheduler.get_velocity(x_0, eps, t)
    pred = model_fn(x_t, t)
    mse = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))               # [B]
    if config.min_snr_gamma > 0:
        alphas_cumprod = scheduler.alphas_cumprod.to(x_0.device)[t].float()
        loss = (min_snr_weight(alphas_cumprod, config.min_snr_gamma, config.prediction_type) * mse).mean()
    else:
        loss = mse.mean()
    return loss, {"mse": mse.mean().detach()}


def _config(model):
    return getattr(model, "module", model).config  # unwrap DistributedDataParallel


def _check_image(image: torch.Tensor, channels: int, size: int | None, what: str) -> None:
    if image.ndim != 4 or image.shape[1] != channels or (size is not None and tuple(image.shape[-2:]) != (size, size)):
        side = size if size is not None else "S"
        raise ValueError(f"{what} images must be [B, {channels}, {side}, {side}], got {tuple(image.shape)}")


def decoder_loss(model, batch: dict):
    """batch: image [B, 3, S, S] in [-1, 1], image_emb [B, D], text_tokens [B, L, W], mask [B, L].

    t, the noise and the CFG drops (image_emb 10%, text 50%) are drawn per sample (`sample_random`).
    """
    config = _config(model)
    image = batch["image"]
    _check_image(image, config.in_channels, config.image_size, "decoder training")
    rng = sample_random(batch, image.shape[0], image.device)
    training = getattr(model, "module", model).training
    drop_image = rng.rand() < config.image_drop_prob if training else None   # [B]
    drop_text = rng.rand() < config.text_drop_prob if training else None     # [B]
    return diffusion_loss(lambda x_t, t: model(x_t, t, batch["image_emb"], batch["text_tokens"], batch["mask"],
                                               drop_image, drop_text), image, config, rng)


def upsampler_loss(model, batch: dict):
    """batch: image [B, 3, H, H] at full size; random crop, downsample, corrupt, then denoise with the low-res input."""
    config = _config(model)
    image = batch["image"]
    _check_image(image, config.in_channels, None, "upsampler training")
    image = random_crop(image, config.crop_size or config.image_size)            # [B, 3, S, S]
    low_res = downsample(image, image.shape[-1] // config.scale)                   # [B, 3, s, s]
    low_res, aug_level = random_corruption(config, low_res)  # crop and corruption: torch's global RNG
    return diffusion_loss(lambda x_t, t: model(x_t, t, low_res, aug_level), image, config,
                          sample_random(batch, image.shape[0], image.device))
