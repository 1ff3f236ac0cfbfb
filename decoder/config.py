"""DecoderConfig, UpsamplerConfig and their presets (Ramesh et al. 2022, "DALL-E 2", sec. 2.1 and appendix C)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unclip.config import config_from_dict
from unclip.schedulers import DEFAULT_NOISE_SCHEDULE

PREDICTION_TYPES = ("epsilon", "v_prediction")
TEXT_ENCODERS = ("clip", "clip+input", "transformer")


@dataclass
class DecoderConfig:
    image_size: int = 32                                 # S, side of the generated image
    in_channels: int = 3
    out_channels: int = 3
    position_channels: bool = False                      # give the UNet x_t plus 2 pixel-coordinate channels
                                                         # (CoordConv): where an object goes can then depend
                                                         # on the condition (docs/MODELS.md)
    image_map_channels: int = 0                          # > 0: image_emb is also projected to a coarse map
                                                         # [c, g, g], upsampled and fed with x_t to the UNet's
                                                         # input, a direct path from the embedding to the layout
    image_map_size: int = 8                              # g, side of that map (image_size must divide by it)
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # UNet width per resolution level
    layers_per_block: int = 2                            # residual blocks per level
    attention_levels: tuple[bool, ...] = (False, True, True)  # which levels attend to the context tokens
    attention_head_dim: int = 32                         # channels per attention head
    norm_num_groups: int = 32                            # GroupNorm groups (every width must divide by it)
    cross_attention_dim: int = 128                       # C, width of the context tokens
    embed_dim: int = 0                                   # D, CLIP embedding size (0: taken from the CLIP)
    text_width: int = 0                                  # W, text-token width (0: taken from the CLIP)
    context_length: int = 0                              # L, CLIP text context (0: taken from the CLIP)
    num_image_tokens: int = 4                            # extra context tokens projected from image_emb
    image_drop_prob: float = 0.1                         # CFG: image_emb -> learned null embedding in training
    text_drop_prob: float = 0.2                          # CFG: text tokens -> learned null tokens in training
                                                         # (the paper's 0.5 lost counts on the shapes oracle)
    text_encoder: str = "clip"                           # "clip": CLIP's final token states [L, W]; "clip+input":
                                                         # those and CLIP's input embeddings [L, 2W] (word
                                                         # identity); "transformer": GLIDE's own
    text_layers: int = 4                                 # "transformer": causal layers of the text transformer
    text_heads: int = 4                                  # "transformer": attention heads (W must divide by it)
    text_vocab_size: int = 0                             # "transformer": token ids (0: the CLIP tokenizer's)
    prediction_type: str = "v_prediction"                # "v_prediction" | "epsilon" (see UpsamplerConfig)
    min_snr_gamma: float = 5.0                           # min-SNR-gamma loss weighting (Hang et al. 2023); 0: off
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"             # diffusers beta schedule (cosine: Nichol & Dhariwal)

    def __post_init__(self):
        _check_common(self, "DecoderConfig")
        if self.image_map_channels < 0 or self.image_map_size < 1 or self.image_size % self.image_map_size:
            raise ValueError(f"DecoderConfig: image_map_channels ({self.image_map_channels}) must be >= 0 and "
                             f"image_size ({self.image_size}) must divide by image_map_size ({self.image_map_size})")
        if self.cross_attention_dim < 1 or self.num_image_tokens < 0:
            raise ValueError("DecoderConfig: cross_attention_dim must be >= 1 and num_image_tokens >= 0")
        for name in ("image_drop_prob", "text_drop_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"DecoderConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"DecoderConfig.text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}")
        if self.text_layers < 1 or self.text_heads < 1 or self.text_vocab_size < 0:
            raise ValueError(f"DecoderConfig: text_layers ({self.text_layers}) and text_heads ({self.text_heads}) "
                             f"must be >= 1 and text_vocab_size ({self.text_vocab_size}) >= 0")
        if self.text_encoder == "transformer" and self.text_width % self.text_heads:
            raise ValueError(f"DecoderConfig: text_width ({self.text_width}) must divide by text_heads "
                             f"({self.text_heads})")


@dataclass
class UpsamplerConfig:
    image_size: int = 64                                 # output side; the folder is upsampler_{image_size}
    low_res_size: int = 32                               # input side (image_size must be a multiple of it)
    in_channels: int = 3                                 # image channels (the UNet sees 2x: x_t and low_res)
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False)  # self-attention per level (no text: no cross)
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    crop_size: int = 0                                   # train on random crops of this side (0: whole images)
    aug_max: float = 0.5                                 # noise augmentation level drawn from U[0, aug_max]
    blur_prob: float = 0.5                               # probability of blurring the low-res input in training
    blur_sigma: tuple[float, float] = (0.4, 0.6)         # Gaussian blur sigma range (low-res pixels)
    blur_kernel_size: int = 3
    # v-prediction: the cosine schedule ends at alpha_bar = 2.4e-9, where an epsilon model's x0 estimate
    # (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies its error by ~2e4 and the first sampling steps go astray
    prediction_type: str = "v_prediction"
    min_snr_gamma: float = 5.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self):
        _check_common(self, "UpsamplerConfig")
        if self.low_res_size < 1 or self.image_size % self.low_res_size or self.image_size == self.low_res_size:
            raise ValueError(f"UpsamplerConfig: image_size ({self.image_size}) must be a multiple (> 1x) of "
                             f"low_res_size ({self.low_res_size})")
        if not 0.0 <= self.aug_max <= 1.0 or not 0.0 <= self.blur_prob <= 1.0:
            raise ValueError("UpsamplerConfig: aug_max and blur_prob must be in [0, 1]")
        if not 0.0 <= self.blur_sigma[0] <= self.blur_sigma[1] or self.blur_kernel_size % 2 == 0:
            raise ValueError("UpsamplerConfig: blur_sigma must be (low, high) with 0 <= low <= high, and "
                             "blur_kernel_size odd")
        if self.crop_size and (self.crop_size % 2 ** (len(self.block_out_channels) - 1) or
                               self.crop_size % (self.image_size // self.low_res_size)):
            raise ValueError(f"UpsamplerConfig.crop_size ({self.crop_size}) must divide by the UNet's downsampling "
                             "and by the upsampling factor")

    @property
    def scale(self) -> int:
        return self.image_size // self.low_res_size


def _check_common(config, name: str) -> None:
    """Checks shared by both configs: widths, levels, groups, prediction type."""
    levels = len(config.block_out_channels)
    if levels < 1 or len(config.attention_levels) != levels:
        raise ValueError(f"{name}: attention_levels ({len(config.attention_levels)}) must have one entry per "
                         f"level of block_out_channels ({levels})")
    if any(c % config.norm_num_groups for c in config.block_out_channels):
        raise ValueError(f"{name}: every block_out_channels entry must divide by norm_num_groups "
                         f"({config.norm_num_groups}), got {config.block_out_channels}")
    if any(c % config.attention_head_dim for c, a in zip(config.block_out_channels, config.attention_levels) if a):
        raise ValueError(f"{name}: attention levels' widths must divide by attention_head_dim "
                         f"({config.attention_head_dim})")
    if config.image_size % 2 ** (levels - 1):
        raise ValueError(f"{name}: image_size ({config.image_size}) must divide by 2^{levels - 1} (UNet levels)")
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{name}.prediction_type must be one of {PREDICTION_TYPES}, got {config.prediction_type!r}")
    if config.min_snr_gamma < 0:
        raise ValueError(f"{name}.min_snr_gamma must be >= 0 (0 turns it off), got {config.min_snr_gamma}")


def noise_schedule(config: DecoderConfig | UpsamplerConfig) -> dict:
    """The training noise schedule (scheduler_config.json) of a decoder or upsampler (an imported one's own)."""
    if getattr(config, "scheduler_config", None):   # imported weights (unclip.karlo) carry their saved schedule
        return dict(config.scheduler_config)
    return {**DEFAULT_NOISE_SCHEDULE, "num_train_timesteps": config.num_train_timesteps,
            "beta_schedule": config.beta_schedule, "prediction_type": config.prediction_type}


DECODER_PRESETS: dict[str, DecoderConfig] = {
    "tiny": DecoderConfig(block_out_channels=(32, 64, 128), cross_attention_dim=128),    # 32 px
    "small": DecoderConfig(block_out_channels=(64, 128, 128), cross_attention_dim=128),  # 32 px
    "base-64": DecoderConfig(image_size=64, block_out_channels=(128, 256, 384, 512), layers_per_block=3,
                             attention_levels=(False, True, True, True), attention_head_dim=64,
                             cross_attention_dim=512),
}

UPSAMPLER_PRESETS: dict[str, UpsamplerConfig] = {
    "tiny-64": UpsamplerConfig(image_size=64, low_res_size=32),                           # 32 -> 64, small UNet
    "small-64": UpsamplerConfig(image_size=64, low_res_size=32, block_out_channels=(64, 128, 128),
                                layers_per_block=2, attention_levels=(False, False, True)),
    "tiny-256": UpsamplerConfig(image_size=256, low_res_size=64, block_out_channels=(32, 64, 128, 128),
                                attention_levels=(False, False, False, False), crop_size=64),
}


def decoder_preset(name: str, **fields) -> DecoderConfig:
    """A copy of a decoder preset with some fields replaced."""
    if name not in DECODER_PRESETS:
        raise ValueError(f"unknown decoder preset {name!r} (choose from {', '.join(DECODER_PRESETS)})")
    return _replace(DECODER_PRESETS[name], fields)


def upsampler_preset(name: str, **fields) -> UpsamplerConfig:
    """A copy of an upsampler preset with some fields replaced."""
    if name not in UPSAMPLER_PRESETS:
        raise ValueError(f"unknown upsampler preset {name!r} (choose from {', '.join(UPSAMPLER_PRESETS)})")
    return _replace(UPSAMPLER_PRESETS[name], fields)


def _replace(config, fields: dict):
    """dataclasses.replace with a ValueError naming unknown fields, values typed as a saved config's are
    (JSON lists become tuples), so a preset with overrides equals the same config loaded from disk."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{type(config).__name__}: unknown fields {unknown}")
    return config_from_dict(type(config), {**dataclasses.asdict(config), **fields})
