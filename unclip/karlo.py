"""Published unCLIP weights: Karlo (kakaobrain/karlo-v1-alpha) in diffusers' folder layout, run by unclip.

Each diffusers component folder (prior/, decoder/ + text_proj/, super_res_first/ + super_res_last/, *_scheduler/,
text_encoder/ + tokenizer/) is loaded with its own diffusers class and wrapped in a thin adapter with the
interface of unclip's stage (`forward(x_t, t, ...)`, `config`, `scheduler_config`, `save`/`load`), so it samples
through unclip's own loop and CFG helper. Kept from Karlo (and diffusers' UnCLIPPipeline): raw (unnormalised)
CLIP embeddings; the empty prompt "" as the unconditional text (plus the learned null image embedding); guidance
on the decoder's 3 eps channels with its learned variance from the conditional branch; super_res_first on every
step but the last (t = 0), super_res_last on the last; each stage's saved UnCLIPScheduler settings ("unclip").

Einstein notation: B batch, D CLIP embedding size, L text context, W text width, K extra context tokens.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # imports without transformers

from decoder.attention import use_added_kv_attention

from .checkpoint import (CONFIG_NAME, FORMAT_VERSION, INDEX_NAME, SCHEDULER_NAME, load_component,
                         load_scheduler_config, read_model_index, replace_dir, save_component)
from .clip import ClipEncoder
from .config import read_json, write_json
from .images import tensor_to_pil
from .schedulers import SCHEDULERS

DIFFUSERS_PIPELINES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")
REQUIRED_FOLDERS = ("decoder", "text_proj", "super_res_first", "super_res_last", "decoder_scheduler",
                    "super_res_scheduler")
OPEN_CLIP_MODEL = ("ViT-L-14", "openai")  # Karlo's CLIP: OpenAI's ViT-L/14, the same weights as text_encoder/

# Karlo's own sampling recipe (diffusers' UnCLIPPipeline defaults): pass as `pipe.generate(prompt, **KARLO_SETTINGS)`.
KARLO_SETTINGS = dict(prior_sampler="unclip", prior_steps=25, prior_guidance=4.0, candidates=1,
                      decoder_sampler="unclip", decoder_steps=25, decoder_guidance=8.0,
                      decoder_guidance_interval=(0.0, 1.0),  # diffusers guides every decoder step
                      upsampler_sampler="unclip", upsampler_steps=7)


# ---------------------------------------------------------------- finding the layout


def is_karlo_folder(folder: str | os.PathLike) -> bool:
    """A diffusers unCLIP folder (model_index.json naming UnCLIPPipeline, or its folders) or a converted one."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        index = read_json(folder / INDEX_NAME)
        if isinstance(index, dict) and index.get("_class_name") in DIFFUSERS_PIPELINES:
            return True
    elif all((folder / name).is_dir() for name in REQUIRED_FOLDERS):
        return True
    return is_converted_folder(folder)


def is_converted_folder(folder: Path) -> bool:
    """A unclip model folder written by `unclip convert` (its decoder config says architecture "karlo")."""
    path = Path(folder) / "decoder" / CONFIG_NAME
    config = read_json(path) if path.is_file() else None
    return isinstance(config, dict) and config.get("architecture") == "karlo"


def check_layout(folder: Path) -> None:
    """Raise a ValueError naming every folder a diffusers unCLIP model needs but lacks."""
    missing = [name for name in REQUIRED_FOLDERS if not (folder / name).is_dir()]
    if (folder / "prior").is_dir() != (folder / "prior_scheduler").is_dir():
        missing.append("prior_scheduler" if (folder / "prior").is_dir() else "prior")
    if missing:
        raise ValueError(f"{folder} is not a complete Karlo (diffusers unCLIP) folder: missing "
                         f"{', '.join(m + '/' for m in missing)}")


def read_scheduler_config(folder: Path) -> dict:
    """A *_scheduler/scheduler_config.json completed with its class's defaults (the settings Karlo samples with)."""
    import diffusers

    raw = read_json(folder / SCHEDULER_NAME)
    cls = getattr(diffusers, raw.get("_class_name", "UnCLIPScheduler"), None)
    if not any(cls is not None and issubclass(c, cls) for c, _ in SCHEDULERS.values()):
        raise ValueError(f"{folder / SCHEDULER_NAME}: unsupported scheduler class {raw.get('_class_name')!r}")
    return {k: v for k, v in cls.from_config(raw).config.items() if not k.startswith("_")}


# ---------------------------------------------------------------- CLIP as Karlo uses it


@dataclass
class KarloClipConfig:
    source: str = "transformers"   # clip/ holds text_encoder/ + tokenizer/ (+ image_encoder/) in transformers' layout
    embed_dim: int = 768           # D


class KarloClip(nn.Module):
    """CLIP ViT-L/14 as Karlo uses it: raw (unnormalised) text and image embeddings, final token states."""

    def encode_text(self, prompts: str | Sequence[str]):
        """Prompts -> text_emb [B, D] (raw), text_tokens [B, L, W], mask [B, L] (True = real token)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("empty prompt: give some text to encode")
        return self.encode_raw(prompts)

    def null_text(self):
        """Karlo's unconditional text: the encoding of the empty prompt "" (batch 1)."""
        return self.encode_raw([""])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "KarloClip":
        """A clip/ folder of a converted model (transformers' layout, or a unclip ClipEncoder folder)."""
        folder = Path(folder)
        if (folder / "text_encoder").is_dir():
            return TransformersClip.load(folder)
        return OpenClipClip(ClipEncoder.load(folder))


class OpenClipClip(KarloClip):
    """Karlo's CLIP through open_clip (unclip's ClipEncoder): ViT-L-14 with the `openai` tag, or any ClipEncoder."""

    def __init__(self, clip: ClipEncoder):
        super().__init__()
        self.clip, self.config = clip, clip.config
        self.embed_dim, self.text_width, self.context_length = clip.embed_dim, clip.text_width, clip.context_length

    def text_projection(self) -> torch.Tensor:
        """[D, W]: final token state -> text_emb."""
        proj = self.clip.model.text_projection
        return (proj.weight if isinstance(proj, nn.Linear) else proj.T).detach()

    @torch.inference_mode()
    def encode_raw(self, prompts: Sequence[str]):
        tokens = self.clip.tokenizer(list(prompts)).to(self.device)  # [B, L]; "" allowed (the null prompt)
        text_emb, states = self.clip.text_forward(tokens)            # [B, D], [B, L, W]
        return text_emb.float(), states.float(), tokens != 0

    @torch.inference_mode()
    def encode_image(self, images) -> torch.Tensor:
        """PIL images or [B, 3, H, W] in [-1, 1] -> raw image_emb [B, D]."""
        pixels = self.clip.preprocess(images).to(self.dtype)
        return self.clip.image_forward(pixels).float()

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        self.clip.save(folder, dtype=dtype)


class TransformersClip(KarloClip):
    """Karlo's own text_encoder/ + tokenizer/ (transformers), and image_encoder/ where the folder has one.

    Without image_encoder/ (karlo-v1-alpha has none) image embeddings come from open_clip ViT-L-14 `openai`,
    the same CLIP, loaded on first use.
    """

    def __init__(self, text_model, tokenizer, vision_model=None, image_processor=None):
        super().__init__()
        self.text_model, self.tokenizer = text_model, tokenizer
        self.vision_model, self.image_processor = vision_model, image_processor
        self.image_clip: OpenClipClip | None = None
        self.config = KarloClipConfig(embed_dim=self.embed_dim)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TransformersClip":
        """text_encoder/, tokenizer/ and (optional) image_encoder/ + feature_extractor/ of `folder` (float32)."""
        from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                                  CLIPVisionModelWithProjection)

        folder = Path(folder)
        text = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").float()
        vision = processor = None
        if (folder / "image_encoder").is_dir():
            vision = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").float().eval()
            processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
        return cls(text.eval(), CLIPTokenizer.from_pretrained(folder / "tokenizer"), vision, processor)

    @property
    def embed_dim(self) -> int:
        return int(self.text_model.config.projection_dim)

    @property
    def text_width(self) -> int:
        return int(self.text_model.config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def text_projection(self) -> torch.Tensor:
        return self.text_model.text_projection.weight.detach()  # [D, W]

    @torch.inference_mode()
    def encode_raw(self, prompts: Sequence[str]):
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.context_length, truncation=True,
                               return_tensors="pt")
        out = self.text_model(batch.input_ids.to(self.device))
        mask = batch.attention_mask.bool().to(self.device)
        return out.text_embeds.float(), out.last_hidden_state.float(), mask

    @torch.inference_mode()
    def encode_image(self, images) -> torch.Tensor:
        """PIL images or [B, 3, H, W] in [-1, 1] -> raw image_emb [B, D]."""
        if self.vision_model is None:
            if self.image_clip is None:
                clip = ClipEncoder.from_open_clip(*OPEN_CLIP_MODEL).eval()
                self.image_clip = OpenClipClip(clip).to(self.device, self.dtype)
            return self.image_clip.encode_image(images)
        images = tensor_to_pil(images) if isinstance(images, torch.Tensor) else list(images)
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        return self.vision_model(pixels.to(self.device, self.dtype)).image_embeds.float()

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write the transformers folders and a clip/config.json that names this layout."""
        cast = (lambda m: copy.deepcopy(m).to(dtype)) if dtype is not None else (lambda m: m)

        def fill(tmp: Path) -> None:
            cast(self.text_model).save_pretrained(tmp / "text_encoder")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            if self.vision_model is not None:
                cast(self.vision_model).save_pretrained(tmp / "image_encoder")
                self.image_processor.save_pretrained(tmp / "feature_extractor")
            write_json(tmp / CONFIG_NAME, {"_kind": "clip", "_format_version": FORMAT_VERSION,
                                           "architecture": "karlo", "source": "transformers",
                                           "embed_dim": self.embed_dim})

        replace_dir(Path(folder), fill)


def make_clip(folder: Path, clip: ClipEncoder | KarloClip | None) -> KarloClip:
    """The CLIP for a Karlo folder: the one given, the folder's own (with transformers), else open_clip ViT-L-14."""
    if isinstance(clip, KarloClip):
        return clip
    if isinstance(clip, ClipEncoder):
        return OpenClipClip(clip)
    if clip is not None:
        raise ValueError(f"clip must be a unclip ClipEncoder, got {type(clip).__name__}")
    if (folder / "text_encoder").is_dir() and _has_transformers():
        return TransformersClip.load(folder)
    return OpenClipClip(ClipEncoder.from_open_clip(*OPEN_CLIP_MODEL).eval())


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


# ---------------------------------------------------------------- the adapters


class NullText(nn.Module):
    """Karlo's unconditional text, the encoding of "": text_emb [D], tokens [L, W], mask [L]."""

    def __init__(self, embed_dim: int, context_length: int, text_width: int):
        super().__init__()
        self.register_buffer("text_emb", torch.zeros(embed_dim))
        self.register_buffer("tokens", torch.zeros(context_length, text_width))
        self.register_buffer("mask", torch.zeros(context_length, dtype=torch.bool))

    @torch.no_grad()
    def fill(self, text_emb: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Store the encoding of "" from `KarloClip.null_text()` (batch 1)."""
        self.text_emb.copy_(text_emb[0])
        self.tokens.copy_(tokens[0])
        self.mask.copy_(mask[0])

    def swap(self, drop: torch.Tensor | None, text_emb, tokens, mask):
        """Rows where drop [B] is True get the empty prompt; text_emb may be None (the decoder pools its own)."""
        if drop is None:
            return text_emb, tokens, mask
        d = drop.to(tokens.device, torch.bool).reshape(-1, 1)                                   # [B, 1]
        tokens = torch.where(d[..., None], self.tokens.to(tokens.dtype), tokens)               # [B, L, W]
        mask = torch.where(d, self.mask, mask.bool())                                           # [B, L]
        if text_emb is not None:
            text_emb = torch.where(d, self.text_emb.to(text_emb.dtype), text_emb)              # [B, D]
        return text_emb, tokens, mask


def _check(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):  # a clear message instead of a shape error deep in diffusers
        raise ValueError(f"Karlo {name}: expected shape {list(shape)}, got {list(tensor.shape)}")


@dataclass
class KarloPriorConfig:
    embed_dim: int = 768                           # D
    text_width: int = 768                          # W
    context_length: int = 77                       # L
    prior: dict = field(default_factory=dict)      # the diffusers PriorTransformer config
    architecture: str = "karlo"


class KarloPrior(nn.Module):
    """diffusers' PriorTransformer as a unclip prior: (x_t, t, text_emb, text_tokens, mask) -> x0_pred [B, D]."""

    unit_embeddings = False  # it predicts raw CLIP image embeddings: sample_prior keeps their length

    def __init__(self, prior: PriorTransformer, scheduler_config: dict, config: KarloPriorConfig):
        super().__init__()
        self.prior, self.config = prior, config
        self.scheduler_config = dict(scheduler_config)
        self.null_text = NullText(config.embed_dim, config.context_length, config.text_width)

    def forward(self, x_t, t, text_emb, text_tokens, mask, force_drop=None) -> torch.Tensor:
        c, B, dtype = self.config, x_t.shape[0], self.prior.dtype
        _check("prior text_tokens", text_tokens, (B, c.context_length, c.text_width))
        text_emb, text_tokens, mask = self.null_text.swap(force_drop, text_emb.to(dtype), text_tokens.to(dtype), mask)
        out = self.prior(x_t.to(dtype), t, proj_embedding=text_emb, encoder_hidden_states=text_tokens,
                         attention_mask=mask)
        return out.predicted_image_embedding.float()                                   # [B, D]

    def unscale_image(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 [B, D] -> raw CLIP image embedding (x0 * clip_std + clip_mean)."""
        return self.prior.post_process_latents(x0.to(self.prior.dtype)).float()

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        save_component(folder, "prior", self.config, self.state_dict(), scheduler_config=self.scheduler_config,
                       dtype=dtype)

    @classmethod
    def load(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> "KarloPrior":
        config, state = load_component(folder, "prior", KarloPriorConfig)
        model = cls(_empty(PriorTransformer, config.prior), load_scheduler_config(folder) or {}, config)
        return _assign(model, state, dtype, folder)


@dataclass
class KarloDecoderConfig:
    image_size: int = 64                           # S
    in_channels: int = 3
    out_channels: int = 3                          # guided channels; the UNet adds 3 of learned variance
    embed_dim: int = 768                           # D
    text_width: int = 768                          # W
    context_length: int = 77                       # L
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    scheduler_config: dict = field(default_factory=dict)  # the stage's saved scheduler settings (noise_schedule)
    unet: dict = field(default_factory=dict)       # the diffusers UNet2DConditionModel config
    text_proj: dict = field(default_factory=dict)  # the diffusers UnCLIPTextProjModel config
    architecture: str = "karlo"


class KarloDecoder(nn.Module):
    """UNet2DConditionModel + UnCLIPTextProjModel as a unclip decoder: (x_t, t, image_emb, text_tokens, mask)
    -> [B, 6, S, S] (eps, learned variance). text_emb is pooled from the tokens: the final token's state
    times CLIP's text projection, exactly as CLIP computes it."""

    def __init__(self, unet: UNet2DConditionModel, text_proj: UnCLIPTextProjModel, config: KarloDecoderConfig):
        super().__init__()
        self.unet, self.text_proj, self.config = unet, text_proj, config
        use_added_kv_attention(self.unet)  # the same attention as diffusers', faster on the CPU (decoder.attention)
        self.null_text = NullText(config.embed_dim, config.context_length, config.text_width)
        self.register_buffer("text_projection", torch.zeros(config.embed_dim, config.text_width))  # [D, W]

    def pooled_text(self, text_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The final real token's state [B, W] -> text_emb [B, D] (what CLIP's text_embeds are)."""
        B, L = mask.shape
        last = (L - 1) - mask.int().flip(1).argmax(1)                                   # [B]
        final = text_tokens[torch.arange(B, device=mask.device), last]                   # [B, L, W] -> [B, W]
        return F.linear(final, self.text_projection.to(final.dtype))                     # [B, D]

    def forward(self, x_t, t, image_emb, text_tokens, mask, force_drop_image=None, force_drop_text=None):
        c, B, dtype = self.config, x_t.shape[0], self.unet.dtype
        if text_tokens is None:  # no caption (image variations): the empty prompt, as Karlo does
            text_tokens, mask = self.null_text.tokens.expand(B, -1, -1), self.null_text.mask.expand(B, -1)
        _check("decoder text_tokens", text_tokens, (B, c.context_length, c.text_width))
        _check("decoder image_emb", image_emb, (B, c.embed_dim))
        _, text_tokens, mask = self.null_text.swap(force_drop_text, None, text_tokens.to(dtype), mask)
        image_emb = image_emb.to(dtype)
        if force_drop_image is not None:  # the learned null image embedding (sec. 2.1)
            null = self.text_proj.learned_classifier_free_guidance_embeddings.to(dtype)
            image_emb = torch.where(force_drop_image.to(x_t.device, torch.bool).reshape(B, 1), null, image_emb)
        context, time_offset = self.text_proj(image_embeddings=image_emb, prompt_embeds=self.pooled_text(text_tokens, mask),
                                              text_encoder_hidden_states=text_tokens, do_classifier_free_guidance=False)
        context_mask = F.pad(mask, (self.text_proj.clip_extra_context_tokens, 0), value=True)   # [B, K + L]
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=context, class_labels=time_offset,
                         attention_mask=context_mask).sample.float()                         # [B, 6, S, S]

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        save_component(folder, "decoder", self.config, self.state_dict(),
                       scheduler_config=self.config.scheduler_config, dtype=dtype)

    @classmethod
    def load(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> "KarloDecoder":
        config, state = load_component(folder, "decoder", KarloDecoderConfig)
        config.scheduler_config = load_scheduler_config(folder) or config.scheduler_config
        model = cls(_empty(UNet2DConditionModel, config.unet), _empty(UnCLIPTextProjModel, config.text_proj), config)
        return _assign(model, state, dtype, folder)


@dataclass
class KarloUpsamplerConfig:
    image_size: int = 256                          # output side
    low_res_size: int = 64                         # input side (the decoder's)
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (320, 640, 960, 1280)
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    scheduler_config: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)      # super_res_first (UNet2DModel) config: every step but the last
    last: dict = field(default_factory=dict)       # super_res_last config: the last step (t = 0)
    architecture: str = "karlo"

    @property
    def scale(self) -> int:
        return self.image_size // self.low_res_size


class KarloUpsampler(nn.Module):
    """super_res_first + super_res_last as a unclip upsampler: (x_t, t, low_res, aug_level) -> eps [B, 3, S, S].
    The last step (t = 0) runs super_res_last, the others super_res_first (dpm++ and unipc never reach t = 0)."""

    def __init__(self, first: UNet2DModel, last: UNet2DModel, config: KarloUpsamplerConfig):
        super().__init__()
        self.first, self.last, self.config = first, last, config

    def forward(self, x_t, t, low_res, aug_level=0.0) -> torch.Tensor:
        if bool((torch.as_tensor(aug_level) != 0).any()):
            raise ValueError("Karlo's super-resolution UNets take no noise level: use aug_level 0")
        _check("upsampler x_t", x_t, (low_res.shape[0], 3, *[s * self.config.scale for s in low_res.shape[-2:]]))
        up = F.interpolate(low_res.float(), size=x_t.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
        unet = self.last if bool((torch.as_tensor(t) == 0).all()) else self.first
        h = torch.cat([x_t.float(), up], dim=1).to(unet.dtype)      # [B, 3 + 3, S, S]
        return unet(h, t).sample.float()

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        save_component(folder, "upsampler", self.config, self.state_dict(),
                       scheduler_config=self.config.scheduler_config, dtype=dtype)

    @classmethod
    def load(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> "KarloUpsampler":
        config, state = load_component(folder, "upsampler", KarloUpsamplerConfig)
        config.scheduler_config = load_scheduler_config(folder) or config.scheduler_config
        model = cls(_empty(UNet2DModel, config.first), _empty(UNet2DModel, config.last), config)
        return _assign(model, state, dtype, folder)


def _empty(cls, config: dict):
    """A diffusers model built from its config without initialising weights (they are loaded next)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls.from_config(config)


def _assign(model: nn.Module, state: dict, dtype: torch.dtype | None, where) -> nn.Module:
    """Load a saved state dict (cast to dtype, float32 by default) into a model built by `_empty`."""
    dtype = dtype or torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"weights in {where} do not fit the config: {str(error).splitlines()[0]}") from None
    return model.eval()


def _module_config(module) -> dict:
    """A diffusers model's config without its private (_class_name, _diffusers_version) keys."""
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def _stage_fields(schedule: dict) -> dict:
    """Config fields every stage config shares, from its scheduler settings."""
    return dict(scheduler_config=schedule, prediction_type=schedule.get("prediction_type", "epsilon"),
                num_train_timesteps=int(schedule.get("num_train_timesteps", 1000)),
                beta_schedule=schedule.get("beta_schedule", "squaredcos_cap_v2"))


# ---------------------------------------------------------------- loading, converting, offloading


def load_diffusers_stages(folder: Path, clip: KarloClip, dtype: torch.dtype | None):
    """(prior or None, decoder, [upsampler]) from diffusers component folders, each by its own class."""
    dims = dict(embed_dim=clip.embed_dim, text_width=clip.text_width, context_length=clip.context_length)
    prior = None
    if (folder / "prior").is_dir():
        net = PriorTransformer.from_pretrained(folder / "prior", torch_dtype=dtype)
        prior = KarloPrior(net, read_scheduler_config(folder / "prior_scheduler"),
                           KarloPriorConfig(prior=_module_config(net), **dims))
    unet = UNet2DConditionModel.from_pretrained(folder / "decoder", torch_dtype=dtype)
    text_proj = UnCLIPTextProjModel.from_pretrained(folder / "text_proj", torch_dtype=dtype)
    size = int(unet.config.sample_size)
    decoder = KarloDecoder(unet, text_proj, KarloDecoderConfig(
        image_size=size, in_channels=int(unet.config.in_channels), out_channels=int(unet.config.in_channels),
        unet=_module_config(unet), text_proj=_module_config(text_proj),
        **_stage_fields(read_scheduler_config(folder / "decoder_scheduler")), **dims))
    first = UNet2DModel.from_pretrained(folder / "super_res_first", torch_dtype=dtype)
    last = UNet2DModel.from_pretrained(folder / "super_res_last", torch_dtype=dtype)
    upsampler = KarloUpsampler(first, last, KarloUpsamplerConfig(
        image_size=int(first.config.sample_size), low_res_size=size,
        block_out_channels=tuple(first.config.block_out_channels), first=_module_config(first),
        last=_module_config(last), **_stage_fields(read_scheduler_config(folder / "super_res_scheduler"))))
    return prior, decoder, [upsampler]


def load_converted_stages(folder: Path, dtype: torch.dtype | None):
    """(prior or None, decoder, [upsamplers]) from a folder written by `unclip convert`."""
    components = read_model_index(folder).get("components", {})
    prior = KarloPrior.load(folder / "prior", dtype) if "prior" in components else None
    ups = [KarloUpsampler.load(folder / name, dtype) for name, kind in components.items() if kind == "upsampler"]
    return prior, KarloDecoder.load(folder / "decoder", dtype), ups


def fill_text_condition(clip: KarloClip, prior: KarloPrior | None, decoder: KarloDecoder) -> None:
    """Give the adapters what they take from CLIP: the encoding of "" and the text projection."""
    null = [x.to(decoder.null_text.tokens.device) for x in clip.null_text()]
    for module in (prior, decoder):
        if module is not None:
            module.null_text.fill(*null)
    with torch.no_grad():
        decoder.text_projection.copy_(clip.text_projection())


def load_karlo(pipeline_cls, folder: str | os.PathLike, *, clip: ClipEncoder | KarloClip | None = None,
               torch_dtype: torch.dtype | None = None, model_id: str = ""):
    """A `pipeline_cls` (UnCLIPPipeline) over a Karlo folder (diffusers layout) or a converted one.

    Args:
        clip: the CLIP to encode with (default: the folder's own; for a diffusers folder its text_encoder/ when
            transformers is installed, else open_clip ViT-L-14 `openai`, the same weights).
        torch_dtype: load the weights in this dtype (e.g. torch.float16 on a GPU); default float32.
    """
    folder = Path(folder)
    if torch_dtype is not None and torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"torch_dtype must be torch.float32, float16 or bfloat16, got {torch_dtype}")
    converted = is_converted_folder(folder)
    if not converted:
        check_layout(folder)
    text = KarloClip.load(folder / "clip") if converted and clip is None else make_clip(folder, clip)
    if converted:
        prior, decoder, ups = load_converted_stages(folder, torch_dtype)
    else:
        prior, decoder, ups = load_diffusers_stages(folder, text, torch_dtype)
    if clip is not None or not converted:  # encoded in float32 whatever the dtype, so every dtype agrees
        fill_text_condition(text, prior, decoder)
    text = text.to(torch_dtype) if torch_dtype is not None else text
    return pipeline_cls(text.eval(), prior, decoder, ups, model_id=model_id or str(folder))


def convert_karlo(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None,
                  clip: ClipEncoder | None = None) -> Path:
    """Write a Karlo folder (diffusers layout) as a unclip model folder (safetensors + JSON, one per component)."""
    from .pipeline import UnCLIPPipeline

    src, out = Path(src), Path(out)
    if not is_karlo_folder(src):
        raise ValueError(f"{src} is not a Karlo (diffusers unCLIP) folder: no model_index.json naming "
                         f"{' or '.join(DIFFUSERS_PIPELINES)} and not all of {', '.join(REQUIRED_FOLDERS)}")
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from the Karlo folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: give a new folder")
    UnCLIPPipeline.from_pretrained(src, clip=clip, torch_dtype=dtype).save_pretrained(out, dtype=dtype)
    return out


def enable_model_offload(pipe, device: str | torch.device) -> None:
    """Keep the prior, decoder and upsamplers in CPU memory and move each to `device` only while it samples
    (CLIP stays on `device`). Use instead of `pipe.to(device)`; peak GPU memory is then CLIP + one stage."""
    device = torch.device(device)
    pipe.device = device
    pipe.clip.to(device)
    stages = [m for m in (pipe.prior, pipe.decoder, *pipe.upsamplers) if m is not None]
    for module in stages:
        module.to("cpu")
        module.offload_active = False
        module.register_forward_pre_hook(functools.partial(_bring_to, stages=stages, device=device))


def _bring_to(module: nn.Module, args, stages: list, device: torch.device) -> None:
    """Forward pre-hook: move the other stages back to the CPU and this one to the device."""
    if module.offload_active:
        return
    for other in stages:
        if other.offload_active:
            other.to("cpu")
            other.offload_active = False
    if device.type == "cuda":
        torch.cuda.empty_cache()
    module.to(device)
    module.offload_active = True
