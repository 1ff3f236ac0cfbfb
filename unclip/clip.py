"""The one open_clip wrapper: text -> (text_emb, text_tokens, mask), images -> image_emb.

Build it from an open_clip name + pretrained tag (open_clip downloads where a network exists), from a
local open_clip checkpoint, or from a config (the tiny presets train from scratch on a CPU).

Shapes: B batch, L text context, W text width, D joint embedding size, S image side.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import load_component, load_component_config, load_weights_into, save_component
from .config import read_json
from .images import pil_to_tensor

# ---------------------------------------------------------------- config and presets


@dataclass
class ClipConfig:
    model_name: str = ""        # open_clip architecture ("ViT-B-32"); empty for a custom config below
    pretrained: str = ""        # open_clip pretrained tag ("laion2b_s34b_b79k") or a local checkpoint file
    embed_dim: int = 128        # D, the joint embedding size
    vision: dict = field(default_factory=dict)  # open_clip CLIPVisionCfg fields
    text: dict = field(default_factory=dict)    # open_clip CLIPTextCfg fields
    tokenizer: str = "words"    # "words": word-level vocabulary kept in vocab.json; "openclip": the model's own
    mean: tuple[float, ...] = open_clip.OPENAI_DATASET_MEAN
    std: tuple[float, ...] = open_clip.OPENAI_DATASET_STD


def _tiny(image_size: int, patch_size: int, width: int = 128, layers: int = 4, context: int = 32) -> ClipConfig:
    return ClipConfig(
        embed_dim=width,
        vision=dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers, head_width=32,
                    mlp_ratio=2.0),
        text=dict(context_length=context, width=width, heads=width // 32, layers=layers, mlp_ratio=2.0),
    )


CLIP_PRESETS: dict[str, ClipConfig] = {
    "tiny-32": _tiny(32, 4),                # 32 px, 8x8 patches of 4 px, width 128, 4+4 layers
    "tiny-64": _tiny(64, 8),                # 64 px, 8x8 patches of 8 px
    "small-64": _tiny(64, 8, width=256, layers=6, context=48),
}

# ---------------------------------------------------------------- a small word-level tokenizer

SPECIALS = ["<pad>", "<unk>"]  # <sot>, <eot> are the two highest ids (open_clip's argmax pooling finds <eot>)
WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case words and punctuation marks."""
    return WORD_RE.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary; unknown words map to <unk>."""

    def __init__(self, words: Sequence[str], context_length: int):
        self.words = list(words)
        self.vocab = SPECIALS + self.words + ["<sot>", "<eot>"]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length
        self.sot, self.eot = len(self.vocab) - 2, len(self.vocab) - 1

    @classmethod
    def from_captions(cls, captions: Sequence[str], context_length: int, max_words: int = 8000) -> "WordTokenizer":
        counts: dict[str, int] = {}
        for caption in captions:
            for word in split_words(caption):
                counts[word] = counts.get(word, 0) + 1
        words = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
        return cls(sorted(words), context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def count_tokens(self, text: str) -> int:
        return len(split_words(text)) + 2

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)  # [B, L]
        unk = self.index["<unk>"]
        for i, text in enumerate(texts):
            ids = [self.index.get(w, unk) for w in split_words(text)][: self.context_length - 2]
            ids = [self.sot] + ids + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def _count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` with <sot> and <eot> (0 for a tokenizer that cannot tell)."""
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.count_tokens(text)
    return len(tokenizer.encode(text)) + 2 if hasattr(tokenizer, "encode") else 0  # open_clip's BPE tokenizer


# ---------------------------------------------------------------- the encoder


class ClipEncoder(torch.nn.Module):
    """A frozen-or-trainable open_clip model with the tokenizer and preprocessing that belong to it."""

    def __init__(self, config: ClipConfig, model: torch.nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        # FSDP's TRANSFORMER_BASED_WRAP units: open_clip's transformer blocks, where the towers have them
        has_blocks = any(type(m).__name__ == "ResidualAttentionBlock" for m in model.modules())
        self._no_split_modules = ["ResidualAttentionBlock"] if has_blocks else []

    # ---- construction

    @classmethod
    def from_config(cls, config: ClipConfig, vocab: Sequence[str] | None = None) -> "ClipEncoder":
        """A randomly initialised open_clip.CLIP from a custom config (word vocabulary given)."""
        if config.model_name:
            return cls.from_open_clip(config.model_name, config.pretrained or None)
        text = dict(config.text)
        context = text.get("context_length", 32)
        if config.tokenizer != "words":
            raise ValueError(f"a custom CLIP config needs tokenizer 'words', got {config.tokenizer!r}")
        if vocab is None:
            raise ValueError("a custom CLIP config needs a word vocabulary (vocab.json)")
        tokenizer = WordTokenizer(vocab, context)
        text["vocab_size"] = tokenizer.vocab_size
        try:
            model = open_clip.CLIP(config.embed_dim, open_clip.CLIPVisionCfg(**config.vision),
                                   open_clip.CLIPTextCfg(**text))
        except TypeError as error:  # an unknown key in the vision / text dicts
            raise ValueError(f"bad CLIP config: {error}") from None
        return cls(config, model, tokenizer)

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained: str | None = None) -> "ClipEncoder":
        """Any open_clip model by name; `pretrained` is a tag (downloaded by open_clip) or a local file."""
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
        model = open_clip.create_model(model_name, pretrained=pretrained or None)
        preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
        config = ClipConfig(model_name=model_name, pretrained=pretrained or "", tokenizer="openclip",
                            embed_dim=int(model.text_projection.shape[-1]) if hasattr(model, "text_projection")
                            and model.text_projection is not None else 0,
                            mean=tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                            std=tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)))
        return cls(config, model, open_clip.get_tokenizer(model_name))

    @classmethod
    def from_preset(cls, name: str, vocab: Sequence[str]) -> "ClipEncoder":
        if name not in CLIP_PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r} (choose from {', '.join(CLIP_PRESETS)})")
        return cls.from_config(dataclasses.replace(CLIP_PRESETS[name]), vocab)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ClipEncoder":
        """Load a `clip/` component folder (weights, or only a name + pretrained tag)."""
        folder = Path(folder)
        config = load_component_config(folder, "clip", ClipConfig)
        if config.model_name and not (folder / "model.safetensors").is_file():
            return cls.from_open_clip(config.model_name, config.pretrained or None).eval()
        vocab = read_json(folder / "vocab.json") if config.tokenizer == "words" else None
        encoder = cls.from_config(dataclasses.replace(config, model_name=""), vocab) if not config.model_name \
            else cls.from_open_clip(config.model_name, None)
        _, state_dict = load_component(folder, "clip", ClipConfig)
        load_weights_into(encoder.model, state_dict, str(folder))
        return encoder.eval()

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None,
             state_dict: dict | None = None) -> None:
        """Write a `clip/` component folder (weights as safetensors, the vocabulary as JSON)."""
        extra = {"vocab.json": self.tokenizer.words} if isinstance(self.tokenizer, WordTokenizer) else {}
        save_component(folder, "clip", self.config, state_dict or self.model.state_dict(), extra_json=extra,
                       dtype=dtype)

    # ---- properties

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @property
    def text_width(self) -> int:
        return int(self.model.ln_final.normalized_shape[0])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def vocab_size(self) -> int:
        """V, how many token ids `tokenize` can give."""
        return int(self.model.token_embedding.num_embeddings)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        """The learned temperature: image-text cosines times this are the contrastive loss's logits."""
        return float(self.model.logit_scale.detach().exp())

    # ---- tokens and preprocessing

    def tokenize(self, prompts: Sequence[str], warn: bool = True) -> torch.Tensor:
        """Prompts -> token ids [B, L]; over-long prompts are truncated with a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError("empty prompt: give some text to encode")
        if warn:
            for prompt in prompts:
                if _count_tokens(self.tokenizer, prompt) > self.context_length:
                    warnings.warn(f"prompt is longer than the text context ({self.context_length} tokens) "
                                  f"and was truncated: {prompt[:60]!r}...", stacklevel=3)
        return self.tokenizer(list(prompts))

    def preprocess(self, images, device: torch.device | str | None = None) -> torch.Tensor:
        """PIL image(s) or a [B, 3, H, W] tensor in [-1, 1] -> normalised [B, 3, S, S] for the vision tower."""
        if isinstance(images, Image.Image) or (isinstance(images, (list, tuple)) and images
                                               and isinstance(images[0], Image.Image)):
            x = pil_to_tensor(images, self.image_size)
        elif isinstance(images, torch.Tensor):
            x = images[None] if images.ndim == 3 else images
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"expected images as [B, 3, H, W], got {tuple(images.shape)}")
        else:
            raise ValueError(f"expected PIL images or a tensor, got {type(images).__name__}")
        x = x.to(device or self.device, torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False)
        mean = torch.tensor(self.config.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, device=x.device).view(1, 3, 1, 1)
        return ((x + 1) / 2 - mean) / std

    # ---- encoders (differentiable; the public encode_* wrap them without gradients)

    def text_forward(self, tokens: torch.Tensor, with_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] -> (pooled projection [B, D] unnormalised, final token states [B, L, W]).

        with_input: the states are [final states, the transformer's layer-normalised input] [B, L, 2W]. The
        input (token + position embeddings) keeps each word's identity, which a small contrastive CLIP's final
        states lose for words its image tower barely sees (a tiny CLIP's "left" and "right" states have cosine
        0.88 there, 0.22 at the input: docs/MODELS.md).
        """
        m = self.model
        x_in = m.token_embedding(tokens) + m.positional_embedding  # [B, L, W]
        x = m.transformer(x_in, attn_mask=m.attn_mask)
        x = m.ln_final(x)                                         # [B, L, W]
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # <eot> state [B, W]
        proj = m.text_projection
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj  # [B, D]
        if with_input:
            x = torch.cat([x, F.layer_norm(x_in, x_in.shape[-1:])], dim=-1)  # [B, L, W] -> [B, L, 2W]
        return pooled, x

    def image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> unnormalised image features [B, D]."""
        return self.model.encode_image(pixels)

    def token_ids(self, prompts: Sequence[str] | str, warn: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> token ids [B, L] and mask [B, L] (True = real token; padding id is 0 for both tokenizers)."""
        tokens = self.tokenize(prompts, warn=warn).to(self.device)
        return tokens, tokens != 0

    @torch.inference_mode()
    def encode_text(self, prompts: Sequence[str] | str, batch_size: int = 256, with_input: bool = False):
        """Prompts -> text_emb [B, D] (l2-normalised), text_tokens [B, L, W], mask [B, L] (True = real token).

        with_input: text_tokens are [B, L, 2W], the final states and the input embeddings (`text_forward`).
        """
        tokens, mask = self.token_ids(prompts, warn=True)
        embs, states = [], []
        for chunk in tokens.split(batch_size):
            pooled, x = self.text_forward(chunk, with_input)
            embs.append(F.normalize(pooled.float(), dim=-1))
            states.append(x.float())
        return torch.cat(embs), torch.cat(states), mask

    @torch.inference_mode()
    def encode_image(self, images, batch_size: int = 256) -> torch.Tensor:
        """PIL image(s) or [B, 3, H, W] in [-1, 1] -> image_emb [B, D] (l2-normalised)."""
        if isinstance(images, Image.Image):
            images = [images]
        n = len(images)
        out = []
        for start in range(0, n, batch_size):
            pixels = self.preprocess(images[start:start + batch_size])
            out.append(F.normalize(self.image_forward(pixels).float(), dim=-1))
        return torch.cat(out)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor):
        """Training forward: (image_features [B, D], text_features [B, D]) l2-normalised, and logit_scale."""
        image = F.normalize(self.image_forward(pixels), dim=-1)
        text = F.normalize(self.text_forward(tokens)[0], dim=-1)
        return image, text, self.model.logit_scale.exp()
