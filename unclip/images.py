"""PIL <-> tensor conversion, image loading with clear errors, grids, GIFs and PNG metadata.

Tensors are `[B, 3, H, W]` floats in [-1, 1] (the diffusion convention) unless a name says otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .config import atomic_write

Image.MAX_IMAGE_PIXELS = 8192 * 8192  # refuse decompression bombs larger than 64 Mpx
MAX_IMAGE_SIDE = 8192


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, CMYK...) -> RGB; transparency is composited onto `background`."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).round().clip(0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, raising ValueError with the reason when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise ValueError(f"image too large: {path} is {image.size[0]}x{image.size[1]} (max side {MAX_IMAGE_SIDE})")
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image: {path} ({error.__class__.__name__})") from None
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error} (truncated or corrupt file?)") from None


def pil_to_tensor(images: Image.Image | Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL image(s) -> [B, 3, H, W] in [-1, 1]; resized (bicubic, center crop) to `size` when given."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for image in images:
        image = to_rgb(image)
        if size is not None and image.size != (size, size):
            image = center_crop_resize(image, size)
        arrays.append(np.asarray(image, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W]
    return x.float() / 127.5 - 1.0


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Crop the central square and resize it to size x size."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.BICUBIC)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    if x.ndim == 3:
        x = x[None]
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in x]


def make_grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 2,
              background=(255, 255, 255)) -> Image.Image:
    """Tile images (all the same size) into one contact sheet."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(image, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a PNG atomically; `metadata` values go into text chunks (non-strings as JSON)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_metadata(path: str | os.PathLike) -> dict:
    """The text chunks of a PNG as a dict (values left as strings)."""
    try:
        with Image.open(path) as image:
            return dict(getattr(image, "text", {}) or {})
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read PNG metadata from {path}: {error}") from None


def save_gif(images: Iterable[Image.Image], path: str | os.PathLike, duration_ms: int = 100,
             loop: int = 0) -> None:
    """Write an animated GIF atomically."""
    images = list(images)
    if not images:
        raise ValueError("save_gif needs at least one frame")
    atomic_write(Path(path), lambda tmp: images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=loop))
