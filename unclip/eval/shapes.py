"""The shapes-world oracle: read objects back from an image and score a caption's requirements (GenEval style).

Pipeline: image -> 64x64 (BOX when shrinking, NEAREST when enlarging) -> each pixel to the nearest palette
colour or white (pixels farther than COLOR_THRESHOLD from every palette colour are background) -> 4-connected
components of one colour -> components of at least MIN_PIXELS become objects: shape from the fill ratio of the
bounding box (square ~1.0, circle ~0.785, triangle ~0.5 with its mass low), size from the box side, position
from the centroid. `score` is 1 only when every requirement of the caption holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from unclip.data.shapes import (DEFAULT_HELD_OUT, IMAGE_SIZE, PALETTE, PLACES, RELATIONS, Requirements,
                                parse_caption)
from unclip.images import tensor_to_pil, to_rgb

COLOR_NAMES = tuple(PALETTE)
COLOR_THRESHOLD = 80.0     # max RGB distance from a palette colour for a pixel to count as that colour
MIN_PIXELS = 15            # smaller components are noise (at 64x64)
SQUARE_FILL = 0.90         # fill >= this: square
TRIANGLE_FILL = 0.75       # fill below this with the mass low (apex up): triangle
TRIANGLE_OFFSET = 0.08     # centroid below the box centre by this fraction of the height (ideal 1/6)
CIRCLE_FILL = 0.60         # otherwise fill in [CIRCLE_FILL, SQUARE_FILL): circle; less: blob
MAX_ASPECT = 1.4           # all shapes have square bounding boxes; wider/taller components are blobs
LARGE_SIDE = 17            # box side >= this: large (renders are 12 and 22 px)
PLACE_TOLERANCE = 1.0      # placed: centroid at least this far past the midline
RELATION_TOLERANCE = 8.0   # relation: centroids differ by at least this along the axis, and more than across


@dataclass
class DetectedObject:
    """An object read from an image (coordinates at 64x64 scale, pixel centres at +0.5)."""
    color: str
    shape: str          # circle, square, triangle or blob
    size: str           # small or large
    cx: float
    cy: float
    pixels: int
    fill: float


def to_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    """PIL image, [3,H,W] / [1,3,H,W] tensor in [-1,1], or HxWx3 uint8 array -> 64x64x3 uint8."""
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a [3, H, W] image tensor, got shape {tuple(image.shape)}")
        image = tensor_to_pil(image)[0]
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 array, got {image.shape} {image.dtype}")
        image = Image.fromarray(image, "RGB")
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, tensor or array, got {type(image).__name__}")
    image = to_rgb(image)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        shrink = min(image.size) >= IMAGE_SIZE
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX if shrink else Image.NEAREST)
    return np.asarray(image, dtype=np.uint8)


_COLORS = np.array([PALETTE[c] for c in COLOR_NAMES] + [(255, 255, 255)], dtype=np.float32)  # [7, 3]


def quantize(array: np.ndarray) -> np.ndarray:
    """[H,W,3] uint8 -> [H,W] palette index (0..5), or -1 for background."""
    dist = np.linalg.norm(array[:, :, None, :].astype(np.float32) - _COLORS, axis=-1)  # [H, W, 7]
    nearest = dist.argmin(-1)
    fg = (nearest < len(COLOR_NAMES)) & (dist.min(-1) <= COLOR_THRESHOLD)
    return np.where(fg, nearest, -1)


def label_components(colors: np.ndarray) -> np.ndarray:
    """4-connected components of equal colour: [H,W] ids (the smallest flat pixel index in each), -1 background."""
    h, w = colors.shape
    fg = colors >= 0
    big = h * w
    labels = np.where(fg, np.arange(big).reshape(h, w), big)
    while True:
        new = labels.copy()
        # take the smallest label among 4-neighbours of the same colour
        same_v = fg[1:] & (colors[1:] == colors[:-1])           # [H-1, W]: pixel and the one above
        same_h = fg[:, 1:] & (colors[:, 1:] == colors[:, :-1])  # [H, W-1]: pixel and the one to its left
        new[1:] = np.where(same_v, np.minimum(new[1:], labels[:-1]), new[1:])
        new[:-1] = np.where(same_v, np.minimum(new[:-1], labels[1:]), new[:-1])
        new[:, 1:] = np.where(same_h, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(same_h, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        flat = new.ravel()
        flat[fg.ravel()] = flat[flat[fg.ravel()]]             # pointer jumping: follow label to its label
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _classify(fill: float, aspect: float, mass_offset: float) -> str:
    """Shape name from the bounding-box fill ratio, aspect ratio and where the mass sits vertically."""
    if aspect > MAX_ASPECT:
        return "blob"
    if fill >= SQUARE_FILL:
        return "square"
    if fill < TRIANGLE_FILL and mass_offset >= TRIANGLE_OFFSET:
        return "triangle"                                   # apex up: centroid below the box centre
    return "circle" if fill >= CIRCLE_FILL else "blob"


def detect_objects(image) -> list[DetectedObject]:
    """All objects (components of at least MIN_PIXELS) in an image, in reading order."""
    colors = quantize(to_array(image))
    labels = label_components(colors)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    objects = []
    for label in ids[counts >= MIN_PIXELS]:
        ys, xs = np.nonzero(labels == label)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
        mass_offset = (cy - (ys.min() + h / 2)) / h
        shape = _classify(len(ys) / (h * w), max(h, w) / min(h, w), mass_offset)
        size = "large" if max(h, w) >= LARGE_SIDE else "small"
        color = COLOR_NAMES[colors[ys[0], xs[0]]]
        objects.append(DetectedObject(color, shape, size, float(cx), float(cy), len(ys), len(ys) / (h * w)))
    return objects


def _matches(obj: DetectedObject, color: str, shape: str, size: str | None) -> bool:
    return obj.color == color and obj.shape == shape and (size is None or obj.size == size)


def _placed(obj: DetectedObject, place: str) -> bool:
    axis, sign = PLACES[place]
    return sign * ((obj.cx, obj.cy)[axis] - IMAGE_SIZE / 2) >= PLACE_TOLERANCE


def _related(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    axis, sign = RELATIONS[relation]
    along = sign * ((a.cx, a.cy)[axis] - (b.cx, b.cy)[axis])
    across = abs((a.cx, a.cy)[1 - axis] - (b.cx, b.cy)[1 - axis])
    return along >= RELATION_TOLERANCE and across <= along


def check(objects: list[DetectedObject], req: Requirements) -> bool:
    """Whether detected objects satisfy parsed requirements."""
    (color, shape, size) = req.objects[0]
    if req.kind in ("single", "placed"):
        ok = len(objects) == 1 and _matches(objects[0], color, shape, size)
        return ok and (req.kind == "single" or _placed(objects[0], req.position))
    if req.kind == "count":
        return len(objects) == req.count and all(_matches(o, color, shape, None) for o in objects)
    other = req.objects[1]
    firsts = [o for o in objects if _matches(o, *req.objects[0])]
    seconds = [o for o in objects if _matches(o, *other)]
    return any(_related(a, b, req.position) for a in firsts for b in seconds if a is not b)


def score(image, caption: str) -> float:
    """1.0 if the image satisfies every requirement of the caption, else 0.0 (ValueError outside the grammar)."""
    return float(check(detect_objects(image), parse_caption(caption)))


def evaluate(images: Sequence, captions: Sequence[str],
             held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT) -> dict:
    """Accuracy overall, per scene kind, and on prompts using a held-out colour-shape pair (None where empty)."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if not captions:
        raise ValueError("evaluate needs at least one image and caption")
    held = {tuple(p) for p in held_out}
    groups: dict[str, list[float]] = {"overall": [], "single": [], "placed": [], "relation": [], "count": [],
                                      "held_out": []}
    for image, text in zip(images, captions):
        req = parse_caption(text)
        value = float(check(detect_objects(image), req))
        groups["overall"].append(value)
        groups[req.kind].append(value)
        if req.pairs & held:
            groups["held_out"].append(value)
    report: dict = {name: (float(np.mean(v)) if v else None) for name, v in groups.items()}
    report["n"] = {name: len(v) for name, v in groups.items()}
    return report
