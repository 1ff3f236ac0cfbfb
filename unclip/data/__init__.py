"""Data: image-caption datasets (folder of pairs, webdataset shards) and builders (shapes world, emoji)."""

from unclip.data.datasets import ImageTextFolder, ShardDataset, decode_sample, open_dataset, write_shards
from unclip.data.emoji import EMOJI_VERSION, build_emoji, emoji_caption, fetch_package, read_package
from unclip.data.shapes import (DEFAULT_HELD_OUT, KINDS, PALETTE, SHAPES, SIZES, VOCABULARY, Requirements, Scene,
                                ShapeObject, build_shapes, caption, parse_caption, render_scene, sample_scene)

__all__ = [
    "ImageTextFolder", "ShardDataset", "decode_sample", "open_dataset", "write_shards",
    "EMOJI_VERSION", "build_emoji", "emoji_caption", "fetch_package", "read_package",
    "DEFAULT_HELD_OUT", "KINDS", "PALETTE", "SHAPES", "SIZES", "VOCABULARY", "Requirements", "Scene",
    "ShapeObject", "build_shapes", "caption", "parse_caption", "render_scene", "sample_scene",
]
