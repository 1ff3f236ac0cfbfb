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
