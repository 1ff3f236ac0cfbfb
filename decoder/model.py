"""The unCLIP decoder: a diffusers UNet2DConditionModel conditioned on a CLIP image embedding and text tokens.

Ramesh et al. 2022 ("DALL-E 2"), sec. 2.1: "we modify the architecture described in Nichol et al. (2021) by
projecting and adding CLIP embeddings to the existing timestep embedding, and by projecting CLIP embeddings
into four extra tokens of context that are concatenated to the sequence of outputs from the GLIDE text encoder."
The text tokens are CLIP's final token states (text_encoder="clip") or the states of GLIDE's own small text
transformer, trained with the decoder from the CLIP tokenizer's ids (text_encoder="transformer").

The UNet is GLIDE's (ADM with attention layers that also attend to the context tokens: diffusers'
SimpleCrossAttn blocks, as in Karlo). The conditioning module keeps the parameter names and shapes of
diffusers' `UnCLIPTextProjModel`, so compatible weights can be imported later.

Einstein notation:
    B  batch
    S  image side
    D  CLIP embedding size (image_emb)
    L  text context (CLIP's text tokens)
    W  text-token width (CLIP's, or the decoder's own text transformer's)
    K  extra context tokens projected from image_emb (num_image_tokens, 4)
    C  context-token width (cross_attention_dim)
    T  UNet time-embedding width (4 x block_out_channels[0])
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import x_transformers
from diffusers import UNet2DConditionModel

from unclip.checkpoint import load_component, load_weights_into, save_component

from .attention import use_added_kv_attention
from .config import DecoderConfig, noise_schedule


def drop_mask(batch: int, prob: float, force: torch.Tensor | None, training: bool, device) -> torch.Tensor:
    """[B] bool: which samples lose a condition (DiT `LabelEmbedder.token_drop`: random in training, or forced)."""
    if force is not None:
        return force.to(device=device, dtype=torch.bool).reshape(batch)
    if training and prob > 0:
        return torch.rand(batch, device=device) < prob
    return torch.zeros(batch, dtype=torch.bool, device=device)


class TextTransformer(nn.Module):
    """GLIDE's text encoder, trained with the decoder: token ids [B, L] -> token states [B, L, W].

    Nichol et al. 2021 ("GLIDE"): "To condition on the text, we first encode it into a sequence of K tokens,
    and feed these tokens into a Transformer model." Causal, like GLIDE's (and CLIP's): the final token's
    state, which goes to the time embedding, sees the whole caption, and no real token attends to padding.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        W = config.text_width
        self.transformer = x_transformers.TransformerWrapper(
            num_tokens=config.text_vocab_size, max_seq_len=config.context_length, return_only_embed=True,
            attn_layers=x_transformers.Decoder(dim=W, depth=config.text_layers, heads=config.text_heads,
                                               attn_dim_head=W // config.text_heads))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids)  # token + position embeddings, causal layers, final LayerNorm: [B, L, W]


class ImageTextEmbedder(nn.Module):
    """image_emb + text tokens -> (context tokens [B, K + L, C], their mask, time-embedding offset [B, T],
    image map [B, M, S, S] or None).

    Holds the classifier-free guidance dropout: image_emb is replaced by a learned null embedding with
    probability image_drop_prob and the text tokens by learned null tokens with probability text_drop_prob.
    Names and shapes follow diffusers' UnCLIPTextProjModel, except `embedding_proj`, which reads the final
    text-token state [W] (GLIDE) instead of the projected CLIP text embedding [D]: the same shape when W == D.
    `image_map` (image_map_channels > 0) is this project's own.
    """

    def __init__(self, config: DecoderConfig, time_embed_dim: int):
        super().__init__()
        D, W, L, K, C = (config.embed_dim, config.text_width, config.context_length, config.num_image_tokens,
                         config.cross_attention_dim)
        self.image_drop_prob, self.text_drop_prob, self.num_image_tokens = (
            config.image_drop_prob, config.text_drop_prob, K)
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(D))  # null image_emb [D]
        self.null_text_tokens = nn.Parameter(torch.zeros(L, W))                            # null text [L, W]
        self.embedding_proj = nn.Linear(W, time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(D, time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(D, K * C)
        self.encoder_hidden_states_proj = nn.Linear(W, C)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(C)
        M, G = config.image_map_channels, config.image_map_size
        self.image_map = nn.Linear(D, M * G * G) if M else None  # image_emb [D] -> coarse map [M, G, G]
        self.image_map_shape, self.image_size = (M, G, G), config.image_size

    def token_drop(self, image_emb, text_tokens, mask, force_drop_image=None, force_drop_text=None):
        """Replace dropped image_emb / text tokens by the learned null ones; null tokens are all attended."""
        B, device = image_emb.shape[0], image_emb.device
        drop_image = drop_mask(B, self.image_drop_prob, force_drop_image, self.training, device)  # [B]
        drop_text = drop_mask(B, self.text_drop_prob, force_drop_text, self.training, device)     # [B]
        null_image = self.learned_classifier_free_guidance_embeddings.to(image_emb.dtype)
        image_emb = torch.where(drop_image[:, None], null_image, image_emb)                      # [B, D]
        text_tokens = torch.where(drop_text[:, None, None], self.null_text_tokens.to(text_tokens.dtype),
                                  text_tokens)                                                    # [B, L, W]
        return image_emb, text_tokens, mask.bool() | drop_text[:, None]

    def forward(self, image_emb, text_tokens, mask, force_drop_image=None, force_drop_text=None):
        dtype = self.encoder_hidden_states_proj.weight.dtype
        image_emb, text_tokens, mask = self.token_drop(image_emb.to(dtype), text_tokens.to(dtype), mask,
                                                       force_drop_image, force_drop_text)
        B, L = mask.shape
        last = (L - 1) - mask.int().flip(1).argmax(1)                    # [B] index of the final real token
        final_token = text_tokens[torch.arange(B, device=mask.device), last]  # [B, L, W] -> [B, W]
        # "projecting and adding CLIP embeddings to the existing timestep embedding" (+ GLIDE's final token)
        time_offset = (self.clip_image_embeddings_project_to_time_embeddings(image_emb)  # [B, D] -> [B, T]
                       + self.embedding_proj(final_token))                            # [B, W] -> [B, T]
        # "projecting CLIP embeddings into four extra tokens of context that are concatenated to the
        # sequence of outputs from the GLIDE text encoder" (Karlo's [B, C, K] layout)
        extra = self.clip_extra_context_tokens_proj(image_emb).reshape(B, -1, self.num_image_tokens)  # [B, C, K]
        extra = extra.permute(0, 2, 1)                                                    # [B, K, C]
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_tokens))  # [B, L, C]
        context = torch.cat([extra, text], dim=1)                                         # [B, K + L, C]
        context_mask = F.pad(mask, (self.num_image_tokens, 0), value=True)                # [B, K + L]
        image_map = None
        if self.image_map is not None:
            # A linear map from the embedding to a layout: where a CLIP direction puts ink is one weight per cell
            image_map = self.image_map(image_emb).reshape(B, *self.image_map_shape)          # [B, M, G, G]
            image_map = F.interpolate(image_map, size=self.image_size, mode="nearest")       # [B, M, S, S]
        return context, context_mask, time_offset, image_map


def decoder_text(clip, config: DecoderConfig, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """What a decoder with this config reads of the prompts: (text_tokens, mask [B, L]).

    text_tokens are CLIP's final token states [B, L, W] ("clip"), those with CLIP's input embeddings
    [B, L, 2W] ("clip+input"), or the tokenizer's ids [B, L] for the decoder's own transformer ("transformer").
    """
    if config.text_encoder == "transformer":
        return clip.token_ids(prompts)
    _, text_tokens, mask = clip.encode_text(prompts, with_input=config.text_encoder == "clip+input")
    return text_tokens, mask


def position_channels(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 2, H, W]: each pixel's (x, y) centre in [-1, 1] (CoordConv, Liu et al. 2018).

    "We show that convolution lacks the ability to map coordinates to positions; CoordConv gives it access to
    its own input coordinates through extra channels." The shapes decoder without them put "on the left"
    objects on the left half only half of the time (docs/MODELS.md).
    """
    B, _, H, W = x.shape
    ys = (torch.arange(H, device=x.device, dtype=x.dtype) + 0.5) / H * 2 - 1  # [H]
    xs = (torch.arange(W, device=x.device, dtype=x.dtype) + 0.5) / W * 2 - 1  # [W]
    grid = torch.stack([xs[None, :].expand(H, W), ys[:, None].expand(H, W)])  # [2, H, W]
    return grid[None].expand(B, 2, H, W)


def unet_kwargs(config: DecoderConfig) -> dict:
    """UNet2DConditionModel arguments: GLIDE/Karlo-style blocks; class_labels add to the time embedding."""
    down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in config.attention_levels]
    up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(config.attention_levels)]
    in_channels = config.in_channels + (2 if config.position_channels else 0) + config.image_map_channels
    return dict(sample_size=config.image_size, in_channels=in_channels, out_channels=config.out_channels,
                block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
                down_block_types=tuple(down), up_block_types=tuple(up),
                mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=config.cross_attention_dim,
                attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
                class_embed_type="identity", resnet_time_scale_shift="scale_shift")


class Decoder(nn.Module):
    """(x_t, t, image_emb, text_tokens, mask) -> eps or v prediction [B, 3, S, S]."""

    _no_split_modules = ["ResnetBlock2D"]  # the UNet's blocks: FSDP's TRANSFORMER_BASED_WRAP units

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if min(config.embed_dim, config.text_width, config.context_length) < 1:
            raise ValueError("DecoderConfig needs embed_dim, text_width and context_length from the CLIP "
                             f"(got {config.embed_dim}, {config.text_width}, {config.context_length})")
        if config.text_encoder == "transformer" and config.text_vocab_size < 1:
            raise ValueError("text_encoder='transformer' needs text_vocab_size from the CLIP tokenizer "
                             f"(got {config.text_vocab_size})")
        self.config = config
        self.text_encoder = TextTransformer(config) if config.text_encoder == "transformer" else None
        self.unet = UNet2DConditionModel(**unet_kwargs(config))
        use_added_kv_attention(self.unet)  # diffusers' attention, faster on the CPU (decoder.attention)
        self.text_proj = ImageTextEmbedder(config, time_embed_dim=4 * config.block_out_channels[0])
        self.initialize_weights()

    def initialize_weights(self):
        # The UNet keeps diffusers' initialisation, the text transformer (if any) x-transformers'.
        # The two projections into the time embedding start at zero: the UNet starts as a plain
        # timestep-conditioned ADM and the CLIP offset grows from there (adaLN-Zero / ControlNet style).
        for layer in (self.text_proj.clip_image_embeddings_project_to_time_embeddings, self.text_proj.embedding_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # Null condition: "setting the CLIP embeddings to zero (or a learned embedding)" (sec. 2.1), learned.
        nn.init.zeros_(self.text_proj.learned_classifier_free_guidance_embeddings)
        nn.init.zeros_(self.text_proj.null_text_tokens)

    def _check(self, x_t, batch: int) -> None:
        c = self.config
        if x_t.ndim != 4 or x_t.shape[1] != c.in_channels or x_t.shape[0] != batch:
            raise ValueError(f"x_t must be [{batch}, {c.in_channels}, S, S], got {tuple(x_t.shape)}")

    def _check_image_emb(self, image_emb) -> None:
        if image_emb.ndim != 2 or image_emb.shape[1] != self.config.embed_dim:
            raise ValueError(f"image_emb must be [B, {self.config.embed_dim}], got {tuple(image_emb.shape)}")

    def _check_text(self, batch: int, text_tokens, mask) -> None:
        c = self.config
        if self.text_encoder is None and tuple(text_tokens.shape) != (batch, c.context_length, c.text_width):
            raise ValueError(f"text_tokens must be [{batch}, {c.context_length}, {c.text_width}], "
                             f"got {tuple(text_tokens.shape)}")
        if self.text_encoder is not None and (tuple(text_tokens.shape) != (batch, c.context_length)
                                              or text_tokens.is_floating_point()):
            raise ValueError(f"this decoder has its own text transformer: text_tokens must be token ids "
                             f"[{batch}, {c.context_length}] (ClipEncoder.tokenize), got {text_tokens.dtype} "
                             f"{tuple(text_tokens.shape)}")
        if tuple(mask.shape) != (batch, c.context_length):
            raise ValueError(f"mask must be [{batch}, {c.context_length}], got {tuple(mask.shape)}")

    def _no_text(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Placeholder text tokens, mask and an all-True text drop (the null text replaces them)."""
        c = self.config
        tokens = torch.zeros(batch, c.context_length, c.text_width, device=device)   # [B, L, W]
        mask = torch.ones(batch, c.context_length, dtype=torch.bool, device=device)   # [B, L]
        return tokens, mask, torch.ones(batch, dtype=torch.bool, device=device)

    def forward(self, x_t, t, image_emb, text_tokens, mask, force_drop_image=None, force_drop_text=None):
        """x_t [B, 3, S, S], t [B] or scalar, image_emb [B, D], text_tokens [B, L, W], mask [B, L] -> [B, 3, S, S].

        text_tokens are what `decoder_text` gives: CLIP's token states [B, L, W] ([B, L, 2W] for
        text_encoder="clip+input"), or token ids [B, L] for text_encoder="transformer".
        text_tokens=None (and mask=None) means no caption: the learned null text, as when the text is dropped.
        """
        return self._conditioned(image_emb, text_tokens, mask, force_drop_image, force_drop_text)(x_t, t)

    def _conditioned(self, image_emb, text_tokens, mask, force_drop_image=None, force_drop_text=None):
        """The network for one condition as fn(x_t, t): the context tokens, their mask and the time offset
        (and the decoder's own text transformer, if any) are computed here once, not at every sampling step."""
        self._check_image_emb(image_emb)
        B = image_emb.shape[0]
        if text_tokens is None:
            text_tokens, mask, force_drop_text = self._no_text(B, image_emb.device)
        else:
            self._check_text(B, text_tokens, mask)
            if self.text_encoder is not None:
                text_tokens = self.text_encoder(text_tokens)                 # ids [B, L] -> states [B, L, W]
        context, context_mask, time_offset, image_map = self.text_proj(image_emb, text_tokens, mask,
                                                                       force_drop_image, force_drop_text)

        def network(x_t, t):
            self._check(x_t, B)
            t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(B)  # [B]
            if self.config.position_channels:
                x_t = torch.cat([x_t, position_channels(x_t)], dim=1)         # [B, 3, S, S] -> [B, 5, S, S]
            if image_map is not None:
                x_t = torch.cat([x_t, image_map.to(x_t.dtype)], dim=1)        # [B, ., S, S] -> [B, . + M, S, S]
            # class_embed_type="identity": emb = time_embedding(t) + time_offset. Karlo passes the context mask
            # as `attention_mask` for SimpleCrossAttn blocks (image tokens pass unmasked).
            return self.unet(x_t, t, encoder_hidden_states=context, class_labels=time_offset,
                             attention_mask=context_mask).sample

        return network

    # public name for unclip.sampling.guided; forward calls _conditioned, so hiding this one (a benchmark lever) is safe
    prepare_condition = _conditioned

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write a `decoder/` component folder (config, safetensors weights, scheduler_config.json)."""
        save_component(folder, "decoder", self.config, self.state_dict(), scheduler_config=noise_schedule(self.config),
                       dtype=dtype)

    @torch.no_grad()
    def warm_start(self, folder: str | os.PathLike) -> "Decoder":
        """Start from the weights of the decoder in `folder` (the same network; training-only fields such as
        the drop rates and the loss weighting may differ, and position channels may be added).

        Where this decoder has position channels and that one has none, conv_in's two extra input channels
        start at zero, so the model computes what the other did until training gives them weight.
        """
        other = Decoder.load(folder)
        free = {"position_channels", "min_snr_gamma", "image_drop_prob", "text_drop_prob"}
        fields = {k: v for k, v in dataclasses.asdict(other.config).items() if k not in free}
        mine = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in free}
        if fields != mine:
            changed = sorted(k for k in mine if mine[k] != fields.get(k))
            raise ValueError(f"cannot start from {folder}: its decoder config differs in {', '.join(changed)}")
        state = other.state_dict()
        key = "unet.conv_in.weight"
        extra = self.unet.conv_in.weight.shape[1] - state[key].shape[1]   # [O, I, k, k]: input channels differ
        if extra > 0:
            state[key] = torch.cat([state[key], state[key].new_zeros(state[key].shape[0], extra,
                                                                     *state[key].shape[2:])], dim=1)
        load_weights_into(self, state, str(folder))
        return self

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Decoder":
        """Load a `decoder/` component folder (eval mode, float32)."""
        config, state_dict = load_component(folder, "decoder", DecoderConfig)
        model = cls(config)
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        load_weights_into(model, state_dict, str(folder))
        return model.eval()
