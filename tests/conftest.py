"""Shared tiny fixtures: everything builds in well under a second and downloads nothing."""

import random

import numpy as np
import pytest
import torch

from unclip.clip import ClipConfig, ClipEncoder, WordTokenizer

SHAPES_WORDS = ("a an the two three large small red green blue yellow purple orange circle circles square squares "
                "triangle triangles on left right top bottom of to above below apple face").split()


def tiny_clip_config(image_size: int = 16, embed_dim: int = 16, width: int = 32, context: int = 16) -> ClipConfig:
    return ClipConfig(embed_dim=embed_dim,
                      vision=dict(image_size=image_size, patch_size=4, width=width, layers=1, head_width=16),
                      text=dict(context_length=context, width=width, heads=2, layers=1))


torch.set_num_threads(1)  # tiny networks: one thread is faster and leaves the other core to the rest


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_clip() -> ClipEncoder:
    """A random tiny CLIP: 16 px images, D=16, text width W=32, context L=16."""
    torch.manual_seed(0)
    return ClipEncoder.from_config(tiny_clip_config(), sorted(set(SHAPES_WORDS))).eval()


def make_tiny_pipeline(seed: int = 0):
    """A random tiny CLIP + prior + decoder (8 px) + upsampler (8 -> 16 px) pipeline."""
    from decoder.config import DecoderConfig, UpsamplerConfig
    from decoder.model import Decoder
    from decoder.upsampler import Upsampler
    from prior.config import PriorConfig
    from prior.model import DiffusionPrior
    from unclip.pipeline import UnCLIPPipeline

    torch.manual_seed(seed)
    clip = ClipEncoder.from_config(tiny_clip_config(), sorted(set(SHAPES_WORDS))).eval()
    dims = dict(embed_dim=16, text_width=32, context_length=16)
    prior = DiffusionPrior(PriorConfig(width=32, depth=1, heads=2, **dims))
    decoder = Decoder(DecoderConfig(image_size=8, block_out_channels=(16, 32), attention_levels=(False, True),
                                    attention_head_dim=8, norm_num_groups=8, cross_attention_dim=16, **dims))
    upsampler = Upsampler(UpsamplerConfig(image_size=16, low_res_size=8, block_out_channels=(8, 16),
                                          attention_levels=(False, False), norm_num_groups=8, attention_head_dim=8))
    with torch.no_grad():  # zero-initialised output layers would make every random network predict 0
        for module in (prior, decoder, upsampler):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    pipe = UnCLIPPipeline(clip, prior, decoder, [upsampler], model_id="tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model folder (shared by the pipeline and CLI tests; treat as read-only)."""
    path = tmp_path_factory.mktemp("tiny-model") / "model"
    make_tiny_pipeline().save_pretrained(path)
    return path
