"""The diffusion prior: a decoder-only causal transformer from CLIP text to a clean CLIP image embedding.

Ramesh et al. 2022 ("DALL-E 2"), sec. 2.1: "a decoder-only Transformer with a causal attention mask on a
sequence consisting of, in order: the encoded text, the CLIP text embedding, an embedding for the diffusion
timestep, the noised CLIP image embedding, and a final embedding whose output from the Transformer is used
to predict the unnoised CLIP image embedding."

Einstein notation:
    B  batch
    L  text context (CLIP's text tokens)
    W  CLIP text-token width
    D  CLIP joint embedding size (text_emb, image_emb)
    C  transformer width
    R  readout tokens
    N  sequence length = L + 3 + R
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from x_transformers import ContinuousTransformerWrapper, Decoder

from unclip.checkpoint import load_component, load_scheduler_config, load_weights_into, save_component

from .config import PRIOR_NOISE_SCHEDULE, PriorConfig


class TextConditionEmbedder(nn.Module):
    """Text tokens + text_emb -> C-wide condition tokens; drops them to learned null tokens for CFG.

    The dropout follows DiT's `LabelEmbedder.token_drop`: random in training, or forced per sample.
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.drop_prob = config.cond_drop_prob
        self.token_proj = nn.Linear(config.text_width, config.width)
        self.emb_proj = nn.Linear(config.embed_dim, config.width)
        self.null_tokens = nn.Parameter(torch.zeros(config.context_length, config.width))  # [L, C]
        self.null_emb = nn.Parameter(torch.zeros(config.width))                           # [C]

    def drop_mask(self, batch: int, device, force_drop: torch.Tensor | None) -> torch.Tensor:
        """[B] bool: which samples lose their text condition."""
        if force_drop is not None:
            return force_drop.to(device=device, dtype=torch.bool).reshape(batch)
        if self.training and self.drop_prob > 0:
            return torch.rand(batch, device=device) < self.drop_prob
        return torch.zeros(batch, dtype=torch.bool, device=device)

    def forward(self, text_emb, text_tokens, mask, force_drop=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns condition tokens [B, L + 1, C] and their key mask [B, L + 1] (True = attend)."""
        dtype = self.token_proj.weight.dtype
        tokens = self.token_proj(text_tokens.to(dtype))            # [B, L, W] -> [B, L, C]
        emb = self.emb_proj(text_emb.to(dtype))                    # [B, D] -> [B, C]
        drop = self.drop_mask(text_emb.shape[0], text_emb.device, force_drop)  # [B]
        tokens = torch.where(drop[:, None, None], self.null_tokens.to(tokens.dtype), tokens)
        emb = torch.where(drop[:, None], self.null_emb.to(emb.dtype), emb)
        mask = mask.bool() | drop[:, None]                         # null tokens are all attended
        cond = torch.cat([tokens, emb[:, None]], dim=1)            # [B, L + 1, C]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [B, L + 1]
        return cond, mask


class DiffusionPrior(nn.Module):
    """Causal transformer over [text tokens, text_emb, time, x_t, readout] predicting the scaled clean x0."""

    _no_split_modules = ["Attention", "FeedForward"]  # x-transformers' blocks: FSDP's TRANSFORMER_BASED_WRAP units

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        c = config.width
        self.scheduler_config = dict(PRIOR_NOISE_SCHEDULE)  # replaced by scheduler_config.json on load
        self.text_embedder = TextConditionEmbedder(config)
        self.time_proj = Timesteps(c, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(c, c)
        self.x_proj = nn.Linear(config.embed_dim, c)
        self.readout = nn.Parameter(torch.zeros(config.num_readout, c))  # [R, C]
        seq_len = config.context_length + 3 + config.num_readout
        self.transformer = ContinuousTransformerWrapper(
            max_seq_len=seq_len, project_out=nn.Linear(c, config.embed_dim),
            attn_layers=Decoder(dim=c, depth=config.depth, heads=config.heads, attn_dim_head=c // config.heads,
                                ff_mult=config.ff_mult))
        # Per-dimension statistics of the training image embeddings (sec. 2.1 scales embeddings before
        # noising); set by `set_image_statistics` at the start of training, saved with the weights.
        self.register_buffer("image_mean", torch.zeros(config.embed_dim))  # [D]
        self.register_buffer("image_std", torch.ones(config.embed_dim))    # [D]
        self.initialize_weights()

    def initialize_weights(self):
        # Linear layers (x-transformers' included): Xavier-uniform weights, zero biases, as in DiT.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)
        # Learned tokens (null condition, readout): small normal, like positional embeddings.
        for p in (self.text_embedder.null_tokens, self.text_embedder.null_emb, self.readout):
            nn.init.normal_(p, std=0.02)
        # Time MLP: normal(0.02) as in DiT's TimestepEmbedder.
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        # Output projection to D: zero, so the untrained prior predicts the mean embedding (DiT zero-init).
        nn.init.zeros_(self.transformer.project_out.weight)
        nn.init.zeros_(self.transformer.project_out.bias)

    # ---- embedding scale (sec. 2.1)

    @torch.no_grad()
    def set_image_statistics(self, image_emb: torch.Tensor) -> None:
        """Store the per-dimension mean and std of training image embeddings [N, D]."""
        if image_emb.ndim != 2 or image_emb.shape[1] != self.config.embed_dim or image_emb.shape[0] < 2:
            raise ValueError(f"image statistics need [N >= 2, {self.config.embed_dim}] embeddings, "
                             f"got {tuple(image_emb.shape)}")
        image_emb = image_emb.double()
        self.image_mean.copy_(image_emb.mean(0))
        self.image_std.copy_(image_emb.std(0).clamp_min(self.config.stats_eps))

    def scale_image(self, image_emb: torch.Tensor) -> torch.Tensor:
        """CLIP image_emb [B, D] -> per-dimension unit-variance x0 [B, D]."""
        return (image_emb.float() - self.image_mean) / self.image_std

    def unscale_image(self, x0: torch.Tensor) -> torch.Tensor:
        """Scaled x0 [B, D] -> the scale of CLIP image embeddings [B, D]."""
        return x0.float() * self.image_std + self.image_mean

    # ---- the network

    def _check_inputs(self, text_emb, text_tokens, mask) -> None:
        cfg, b = self.config, text_emb.shape[0]
        want = {"text_emb": (text_emb, (b, cfg.embed_dim)),
                "text_tokens": (text_tokens, (b, cfg.context_length, cfg.text_width)),
                "mask": (mask, (b, cfg.context_length))}
        for name, (tensor, shape) in want.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"prior input {name}: expected shape {list(shape)}, got {list(tensor.shape)}")

    def _step_tokens(self, x_t, t, batch: int) -> torch.Tensor:
        """[time, x_t, readout] tokens [B, 2 + R, C]: the part of the sequence that changes at every step."""
        if tuple(x_t.shape) != (batch, self.config.embed_dim):
            raise ValueError(f"prior input x_t: expected shape {[batch, self.config.embed_dim]}, "
                             f"got {list(x_t.shape)}")
        dtype = self.x_proj.weight.dtype
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        if t.shape[0] not in (1, batch):
            raise ValueError(f"prior input t: expected a scalar or {batch} timesteps, got {t.shape[0]}")
        time = self.time_embed(self.time_proj(t.expand(batch)).to(dtype))           # [B] -> [B, C]
        x = self.x_proj(x_t.to(dtype))                                                # [B, D] -> [B, C]
        readout = self.readout.expand(batch, -1, -1).to(dtype)                        # [B, R, C]
        return torch.cat([time[:, None], x[:, None], readout], dim=1)                 # [B, 2 + R, C]

    def forward(self, x_t, t, text_emb, text_tokens, mask, force_drop=None) -> torch.Tensor:
        """(x_t [B, D], t [B] or [], text_emb [B, D], text_tokens [B, L, W], mask [B, L]) -> x0_pred [B, D]."""
        self._check_inputs(text_emb, text_tokens, mask)
        b = text_emb.shape[0]
        cond, cond_mask = self.text_embedder(text_emb, text_tokens, mask, force_drop)  # [B, L + 1, C], [B, L + 1]
        step = self._step_tokens(x_t, t, b)                                            # [B, 2 + R, C]
        seq = torch.cat([cond.to(step.dtype), step], dim=1)                            # [B, N, C]
        seq_mask = F.pad(cond_mask, (0, step.shape[1]), value=True)                    # [B, N]
        out = self.transformer(seq, mask=seq_mask)                                     # [B, N, C] -> [B, N, D]
        return out[:, -self.config.num_readout:].mean(dim=1)                           # [B, D]

    def prepare_condition(self, text_emb, text_tokens, mask, force_drop=None):
        """The network for one condition as fn(x_t, t), with the text prefix computed once (exact).

        The condition tokens come first and the attention is causal, so their keys and values at every layer
        do not depend on t or x_t: they are computed once here (x-transformers' KV cache), and each sampling
        step runs only its 2 + R tokens against them, about (L + 3 + R) / (2 + R) times less work.
        """
        self._check_inputs(text_emb, text_tokens, mask)
        b = text_emb.shape[0]
        cond, cond_mask = self.text_embedder(text_emb, text_tokens, mask, force_drop)  # [B, L + 1, C], [B, L + 1]
        _, prefix = self.transformer(cond.to(self.x_proj.weight.dtype), mask=cond_mask, return_intermediates=True)
        new_tokens = 2 + self.config.num_readout
        seq_mask = F.pad(cond_mask, (0, new_tokens), value=True)                       # [B, N]

        def network(x_t, t):
            step = self._step_tokens(x_t, t, b)                                        # [B, 2 + R, C]
            out = self.transformer(step, mask=seq_mask, cache=prefix, input_not_include_cache=True,
                                   cache_age=new_tokens)                               # [B, 2 + R, D]
            return out[:, -self.config.num_readout:].mean(dim=1)                       # [B, D]

        return network

    # ---- save / load

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write a `prior/` component folder (config.json, model.safetensors, scheduler_config.json)."""
        save_component(folder, "prior", self.config, self.state_dict(), scheduler_config=self.scheduler_config,
                       dtype=dtype)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "DiffusionPrior":
        """Load a `prior/` component folder written by `save`."""
        config, state_dict = load_component(folder, "prior", PriorConfig)
        model = cls(config)
        load_weights_into(model, {k: v.float() for k, v in state_dict.items()}, str(folder))
        schedule = load_scheduler_config(folder) or dict(PRIOR_NOISE_SCHEDULE)
        if schedule.get("prediction_type") != "sample":
            raise ValueError(f"{Path(folder) / 'scheduler_config.json'}: the prior predicts x0, so prediction_type "
                             f"must be 'sample', got {schedule.get('prediction_type')!r}")
        model.scheduler_config = schedule
        return model.eval()
