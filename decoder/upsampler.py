"""The upsamplers: a diffusers UNet2DModel on concat(x_t, upsample(low_res)), one per stage (upsampler_{S}/).

Ramesh et al. 2022, sec. 2.1: "To improve the robustness of our upsamplers, we slightly corrupt the
conditioning images during training. For the first upsampling stage, we use gaussian blur". We add Imagen's
noise conditioning augmentation (Saharia et al. 2022, sec. 2.5): the low-res input is noised at a level
aug_level that the network is told; "During training, aug_level is chosen randomly, while during inference,
we sweep over its different values to find the best sample quality."

Einstein notation:
    B  batch
    S  output side (image_size)
    s  input side (low_res_size)
    K  blur kernel size
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from unclip.checkpoint import load_component, load_weights_into, save_component

from .config import UpsamplerConfig, noise_schedule

# ---------------------------------------------------------------- low-res degradations


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, H] -> [B, 3, size, size]: box average for integer factors, antialiased bicubic otherwise."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if images.shape[-1] % size == 0 and images.shape[-2] % size == 0:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def random_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """A random size x size crop per image (global RNG); [B, 3, H, W] -> [B, 3, size, size]."""
    B, _, H, W = images.shape
    if H < size or W < size:
        raise ValueError(f"images of {H}x{W} px are smaller than the training crop {size} px")
    if H == size and W == size:
        return images
    ys = torch.randint(0, H - size + 1, (B,)).tolist()
    xs = torch.randint(0, W - size + 1, (B,)).tolist()
    return torch.stack([img[:, y:y + size, x:x + size] for img, y, x in zip(images, ys, xs)])


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Blur each image with its own Gaussian sigma [B] (sigma 0 leaves it unchanged); reflect padding."""
    B, C, H, W = images.shape
    r = kernel_size // 2
    offsets = torch.arange(-r, r + 1, device=images.device, dtype=torch.float32)          # [K]
    sigma = sigma.to(images.device, torch.float32).reshape(B, 1).clamp(min=1e-6)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)                                   # [B, K]
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.dtype).repeat_interleave(C, 0)  # [B*C, K]
    x = F.pad(images.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")             # [1, B*C, H+2r, W+2r]
    x = F.conv2d(x, kernel[:, None, None, :], groups=B * C)                             # rows
    x = F.conv2d(x, kernel[:, None, :, None], groups=B * C)                             # columns
    return x.reshape(B, C, H, W)


def corrupt(low_res: torch.Tensor, aug_level, blur_sigma: torch.Tensor | None = None, kernel_size: int = 3,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise conditioning augmentation: optional Gaussian blur, then sqrt(1 - a^2) * x + a * eps at a = aug_level.

    aug_level (a float or [B] in [0, 1]) is the std of the added noise; the signal shrinks so the variance is
    kept (the diffusion forward process at that level). aug_level 0 and no blur return the input unchanged.
    """
    B = low_res.shape[0]
    a = torch.as_tensor(aug_level, dtype=torch.float32, device=low_res.device).reshape(-1).expand(B)
    if bool(((a < 0) | (a > 1)).any()):
        raise ValueError(f"aug_level must be in [0, 1], got {a.min().item():g}..{a.max().item():g}")
    x = gaussian_blur(low_res, blur_sigma, kernel_size) if blur_sigma is not None else low_res
    if not bool((a > 0).any()):
        return x
    eps = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # a generator or one per row
    a = a.to(x.dtype).reshape(B, 1, 1, 1)
    return (1 - a ** 2).sqrt() * x + a * eps


def random_corruption(config: UpsamplerConfig, low_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training draw (global RNG): blur with prob blur_prob, aug_level ~ U[0, aug_max] -> (corrupted, aug_level [B])."""
    B = low_res.shape[0]
    lo, hi = config.blur_sigma
    sigma = lo + (hi - lo) * torch.rand(B, device=low_res.device)
    sigma = torch.where(torch.rand(B, device=low_res.device) < config.blur_prob, sigma, torch.zeros_like(sigma))
    aug_level = config.aug_max * torch.rand(B, device=low_res.device)
    return corrupt(low_res, aug_level, sigma, config.blur_kernel_size), aug_level


# ---------------------------------------------------------------- the network


def unet_kwargs(config: UpsamplerConfig) -> dict:
    """UNet2DModel arguments: 2 x in_channels in; the aug_level enters as a second, timestep-like embedding."""
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)]
    return dict(sample_size=config.image_size, in_channels=2 * config.in_channels, out_channels=config.out_channels,
                block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
                down_block_types=tuple(down), up_block_types=tuple(up), add_attention=any(config.attention_levels),
                attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
                class_embed_type="timestep", resnet_time_scale_shift="scale_shift")


class Upsampler(nn.Module):
    """(x_t, t, low_res, aug_level) -> eps or v prediction [B, 3, S, S]; no text, no guidance."""

    _no_split_modules = ["ResnetBlock2D"]  # the UNet's blocks: FSDP's TRANSFORMER_BASED_WRAP units

    def __init__(self, config: UpsamplerConfig):
        super().__init__()
        self.config = config
        # diffusers' initialisation throughout: nothing here starts at zero (the aug_level MLP must learn
        # to tell levels apart from the first step).
        self.unet = UNet2DModel(**unet_kwargs(config))

    def _check(self, x_t, low_res) -> None:
        c = self.config
        if x_t.ndim != 4 or x_t.shape[1] != c.in_channels:
            raise ValueError(f"x_t must be [B, {c.in_channels}, S, S], got {tuple(x_t.shape)}")
        expected = (x_t.shape[0], c.in_channels, x_t.shape[-2] // c.scale, x_t.shape[-1] // c.scale)
        if tuple(low_res.shape) != expected:
            raise ValueError(f"low_res must be {list(expected)} ({c.scale}x smaller than x_t), "
                             f"got {list(low_res.shape)}")

    def forward(self, x_t, t, low_res, aug_level):
        """x_t [B, 3, S, S], t [B] or scalar, low_res [B, 3, s, s] (already corrupted), aug_level [B] or float."""
        self._check(x_t, low_res)
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(B)                    # [B]
        level = torch.as_tensor(aug_level, dtype=torch.float32, device=x_t.device).reshape(-1).expand(B)  # [B]
        up = F.interpolate(low_res.to(x_t.dtype), size=x_t.shape[-2:], mode="bicubic", align_corners=False)
        h = torch.cat([x_t, up], dim=1)              # [B, 3, S, S] + upsampled [B, 3, s, s] -> [B, 6, S, S]
        # the level goes through the UNet's timestep features (x num_train_timesteps) and is added to the
        # time embedding: class_embed_type="timestep"
        return self.unet(h, t, class_labels=level * self.config.num_train_timesteps).sample

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write an `upsampler_{S}/` component folder."""
        save_component(folder, "upsampler", self.config, self.state_dict(),
                       scheduler_config=noise_schedule(self.config), dtype=dtype)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Upsampler":
        """Load an `upsampler_{S}/` component folder (eval mode, float32)."""
        config, state_dict = load_component(folder, "upsampler", UpsamplerConfig)
        model = cls(config)
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        load_weights_into(model, state_dict, str(folder))
        return model.eval()
