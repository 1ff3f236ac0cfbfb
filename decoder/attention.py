"""The decoder's attention (GLIDE / Karlo: the image tokens attend to themselves and to the context tokens), as a
diffusers attention processor arranged for the CPU.

It computes what diffusers' `AttnAddedKVProcessor2_0` computes for the UNet's SimpleCrossAttn blocks (the same
weights, the same result within rounding; tests/test_precision.py), with four differences in how:

- It returns a contiguous (NCHW) feature map. diffusers returns a channels_last view plus the residual, which
  leaves every later layer of the UNet channels_last, and CPU GroupNorm is 5-20x slower on channels_last
  tensors at these sizes: on the W3 decoder (docs/BENCHMARKS.md) this alone makes a step 1.14x faster.
- The projections and the GroupNorm follow the autocast around them (bf16 on a CPU with native bf16). When
  training under CPU autocast, the attention product itself is written out as two bf16 matrix products around
  a softmax (`bf16_attention`), which is what autocast does to a hand-written attention: the softmax accumulates
  in fp32 and its input and output are bf16. torch's CPU flash-attention kernel is slower in bf16 than in fp32
  at these sizes (its backward 1.5-4x), and in fp32 slower than the two bf16 products: a W1 training step is
  1.08x faster in-process, and W1 1.14x (docs/BENCHMARKS.md). Sampling (no autograd) keeps the fp32 flash
  kernel: forward only, the two are equally fast (141 against 145 ms per W3 step), and fp32 is the more exact.
  Above `MATH_ATTENTION_MAX` score elements (where the [B, h, HW, N] score tensor saved for the backward would
  cost memory), training falls back to the fp32 flash kernel too.
- The context mask is built once per call as a [B, 1, 1, N] bias broadcast over the heads, instead of being
  repeated per head.
- The heads are split with views where diffusers copies (`head_to_batch_dim`).

Einstein notation:
    B  batch
    C  channels of the feature map (= heads x head width)
    HW positions of the feature map (its tokens)
    M  context tokens (the K image-embedding tokens and the L text tokens)
    N  keys: M + HW
    h  heads
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


MATH_ATTENTION_MAX = 2**25  # score elements [B, h, HW, N] up to which training uses bf16_attention (64 MiB each)


def bf16_attention(q, k, v, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v, with q [B, h, HW, d], k and v [B, h, N, d] in the autocast dtype."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)                      # [B, h, HW, N]
    if bias is not None:
        scores = scores + bias.to(scores.dtype)                                    # [B, 1, 1, N] broadcast
    return scores.softmax(-1) @ v                                                  # [B, h, HW, d]


class AddedKVAttention:
    """diffusers attention processor: self-attention over the feature map with the context as extra keys."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        B, C, H, W = hidden_states.shape
        residual = hidden_states
        tokens = hidden_states.flatten(2).transpose(1, 2)                         # [B, C, H, W] -> [B, HW, C]
        x = tokens if attn.group_norm is None else attn.group_norm(hidden_states).flatten(2).transpose(1, 2)
        if encoder_hidden_states is None:
            context = tokens
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)      # [B, M, C]
        else:
            context = encoder_hidden_states
        q = attn.to_q(x)                                                          # [B, HW, C]
        k = attn.add_k_proj(context)                                              # [B, M, C]
        v = attn.add_v_proj(context)
        if not attn.only_cross_attention:
            k = torch.cat([k, attn.to_k(x)], dim=1)                               # [B, N, C]
            v = torch.cat([v, attn.to_v(x)], dim=1)
        bias = None
        if attention_mask is not None:  # the UNet's additive context bias [B, 1, M]; image tokens are all kept
            bias = F.pad(attention_mask, (0, k.shape[1] - attention_mask.shape[-1]))[:, None]  # [B, 1, 1, N]
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, h, *, C / h]
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            if torch.is_grad_enabled() and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MATH_ATTENTION_MAX:
                out = bf16_attention(q.to(dtype), k.to(dtype), v.to(dtype), bias)
            else:
                with torch.autocast("cpu", enabled=False):
                    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                         attn_mask=None if bias is None else bias.float())
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        out = attn.to_out[0](out.transpose(1, 2).flatten(2))                      # [B, h, HW, C / h] -> [B, HW, C]
        out = attn.to_out[1](out)                                                 # dropout
        # [B, HW, C] -> [B, C, H, W] as a contiguous NCHW tensor: diffusers' reshaped view is channels_last, and
        # adding the residual to it leaves the rest of the UNet channels_last, where CPU GroupNorm is 5-20x slower.
        return residual + out.transpose(1, 2).contiguous().view(B, C, H, W)


def use_added_kv_attention(unet) -> None:
    """Give every attention layer of a diffusers UNet with SimpleCrossAttn blocks an AddedKVAttention."""
    unet.set_attn_processor(AddedKVAttention())
