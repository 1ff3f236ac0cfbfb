"""The shapes world: procedural 64x64 scenes with captions whose truth the oracle can check (GenEval style).

Scene kinds and captions (lower case, one grammar shared with the oracle through `parse_caption`):

    single     a large red circle
    placed     a blue square on the left            (left / right / top / bottom half)
    relation   a red circle to the left of a green triangle   (to the right of / above / below)
    count      two yellow squares, three blue circles

"an" is used before a vowel ("an orange circle on the left"); the parser accepts "a" or "an".
Rendering is aliasing-free: every pixel is white or exactly one palette colour.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from unclip.config import write_json

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 12, "large": 22}  # bounding-box side in pixels
KINDS = ("single", "placed", "relation", "count")
PLACES = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}  # (axis 0=x 1=y, sign)
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
NUMBERS = {"two": 2, "three": 3}
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("orange", "circle"), ("green", "square"))
SIZE_NAMES = tuple(SIZES)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in PALETTE for s in SHAPES)

MARGIN = 2           # px between an object and the image border
GAP = 2              # px kept free between objects' bounding boxes
PLACE_MARGIN = 6     # a placed object's centre lies at least this far from the midline
RELATION_MIN = 16    # relation: centres differ by at least this along the named axis ...
#                      ... and by at most half the actual difference across it
MAX_TRIES = 1000

VOCABULARY: tuple[str, ...] = tuple(sorted(
    {"a", "an", "on", "the", *SIZES, *PALETTE, *SHAPES, *(s + "s" for s in SHAPES), *PLACES, *NUMBERS}
    | {w for r in RELATIONS for w in r.split()}))


@dataclass
class ShapeObject:
    """One object: colour and shape names, size name, and the centre of its bounding box in pixels."""
    color: str
    shape: str
    size: str
    cx: float
    cy: float

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive."""
        half = SIZES[self.size] // 2
        x0, y0 = int(round(self.cx)) - half, int(round(self.cy)) - half
        return x0, y0, x0 + 2 * half, y0 + 2 * half


@dataclass
class Scene:
    """A scene: its kind, its objects, and the place ("left") or relation ("above") its caption names."""
    kind: str
    objects: list[ShapeObject] = field(default_factory=list)
    position: str | None = None

    @property
    def caption(self) -> str:
        """The scene's caption in the shapes grammar."""
        return caption(self)

    def to_dict(self) -> dict:
        """A JSON-able dict (objects, kind, position, caption)."""
        return {"kind": self.kind, "caption": self.caption, "position": self.position,
                "objects": [dataclasses.asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        """Inverse of `to_dict` (the caption is recomputed)."""
        return cls(data["kind"], [ShapeObject(**o) for o in data["objects"]], data.get("position"))


@dataclass(frozen=True)
class Requirements:
    """What a caption asks for: objects as (color, shape, size-or-None), exact count, place or relation."""
    kind: str
    objects: tuple[tuple[str, str, str | None], ...]
    count: int = 1
    position: str | None = None

    @property
    def pairs(self) -> set[tuple[str, str]]:
        """The colour-shape pairs the caption mentions."""
        return {(color, shape) for color, shape, _ in self.objects}


# ---------------------------------------------------------------- captions and the grammar

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(color: str, shape: str) -> str:
    return f"{_article(color)} {color} {shape}"


def caption(scene: Scene) -> str:
    """Caption of a scene: `a large red circle`, `a blue square on the left`, ..., `two yellow squares`."""
    first = scene.objects[0]
    if scene.kind == "single":
        return f"{_article(first.size)} {first.size} {first.color} {first.shape}"
    if scene.kind == "placed":
        return f"{_noun(first.color, first.shape)} on the {scene.position}"
    if scene.kind == "relation":
        second = scene.objects[1]
        return f"{_noun(first.color, first.shape)} {scene.position} {_noun(second.color, second.shape)}"
    if scene.kind == "count":
        word = {v: k for k, v in NUMBERS.items()}[len(scene.objects)]
        return f"{word} {first.color} {first.shape}s"
    raise ValueError(f"unknown scene kind {scene.kind!r} (expected one of {KINDS})")


_COLOR = "|".join(PALETTE)
_SHAPE = "|".join(SHAPES)
_OBJ = rf"an? ({_COLOR}) ({_SHAPE})"
_GRAMMAR = [
    ("single", re.compile(rf"an? ({'|'.join(SIZES)}) ({_COLOR}) ({_SHAPE})")),
    ("placed", re.compile(rf"{_OBJ} on the ({'|'.join(PLACES)})")),
    ("relation", re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}")),
    ("count", re.compile(rf"({'|'.join(NUMBERS)}) ({_COLOR}) ({_SHAPE})s")),
]


def parse_caption(text: str) -> Requirements:
    """Parse a caption of the shapes grammar into requirements; ValueError for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    normal = " ".join(text.lower().split()).rstrip(".").strip()
    for kind, pattern in _GRAMMAR:
        match = pattern.fullmatch(normal)
        if match is None:
            continue
        g = match.groups()
        if kind == "single":
            return Requirements(kind, ((g[1], g[2], g[0]),))
        if kind == "placed":
            return Requirements(kind, ((g[0], g[1], None),), position=g[2])
        if kind == "relation":
            return Requirements(kind, ((g[0], g[1], None), (g[3], g[4], None)), position=g[2])
        return Requirements(kind, ((g[1], g[2], None),), count=NUMBERS[g[0]])
    raise ValueError(f"caption {text!r} is outside the shapes grammar (e.g. 'a large red circle', "
                     "'a blue square on the left', 'a red circle above a green triangle', 'two yellow squares')")


# ---------------------------------------------------------------- rendering

def _make_masks() -> dict[tuple[str, int], np.ndarray]:
    """Binary s x s masks per (shape, side), sampled at pixel centres (no anti-aliasing)."""
    masks = {}
    for side in SIZES.values():
        v, u = np.mgrid[0:side, 0:side] + 0.5                       # pixel centres, [s, s]
        c = side / 2
        masks["square", side] = np.ones((side, side), bool)
        masks["circle", side] = (u - c) ** 2 + (v - c) ** 2 <= c ** 2
        masks["triangle", side] = np.abs(u - c) <= v / 2 + 0.25     # apex up, base on the last row
    return masks


MASKS = _make_masks()


def _paint(canvas: np.ndarray, obj: ShapeObject, value) -> None:
    """Set the object's pixels of a 64x64(xC) canvas to value; ValueError where it does not fit."""
    x0, y0, x1, y1 = obj.bbox
    if x0 < 0 or y0 < 0 or x1 > IMAGE_SIZE or y1 > IMAGE_SIZE:
        raise ValueError(f"object {obj} does not fit in the {IMAGE_SIZE}x{IMAGE_SIZE} image")
    canvas[y0:y1, x0:x1][MASKS[obj.shape, x1 - x0]] = value


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as a 64x64 RGB PIL image with crisp palette colours on white."""
    canvas = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
    for obj in scene.objects:
        _paint(canvas, obj, PALETTE[obj.color])
    return Image.fromarray(canvas, "RGB")


# per-cell targets of a scene: colour (background + the palette), shape (background + the shapes), centre nearness
DENSE_OUTPUTS = (1 + len(PALETTE), 1 + len(SHAPES), 1)


def scene_labels(scene: Scene, cells: int, sigma: float = 4.0) -> np.ndarray:
    """A scene's per-cell targets on a cells x cells grid over the 64 px picture, [3, cells, cells] float32: the
    colour index (0 background, 1 + the palette's order) and shape index (0 background, 1 + `SHAPES`' order) of
    the pixel at each cell's centre, and exp(-d^2 / 2 sigma^2) for the distance d (in 64 px pixels) from the cell
    centre to the nearest object's centre. What the verifier's scene parser learns to read (unclip.verifier)."""
    color = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    shape = np.zeros_like(color)
    colors = list(PALETTE)
    for obj in scene.objects:
        _paint(color, obj, 1 + colors.index(obj.color))
        _paint(shape, obj, 1 + SHAPES.index(obj.shape))
    centres = (np.arange(cells) + 0.5) * IMAGE_SIZE / cells
    pick = np.minimum(centres.astype(int), IMAGE_SIZE - 1)
    heat = np.zeros((cells, cells), np.float32)
    for obj in scene.objects:
        d2 = (centres[None, :] - obj.cx) ** 2 + (centres[:, None] - obj.cy) ** 2
        heat = np.maximum(heat, np.exp(-d2 / (2 * sigma ** 2)))
    return np.stack([color[np.ix_(pick, pick)], shape[np.ix_(pick, pick)], heat])


# ---------------------------------------------------------------- sampling

def _check_pairs(pairs: Iterable[Sequence[str]], what: str) -> list[tuple[str, str]]:
    pairs = [tuple(p) for p in pairs]
    bad = [p for p in pairs if len(p) != 2 or p[0] not in PALETTE or p[1] not in SHAPES]
    if bad:
        raise ValueError(f"{what}: unknown colour-shape pairs {bad} (colours {list(PALETTE)}, shapes {list(SHAPES)})")
    return pairs


def _choice(rng: np.random.Generator, items: Sequence):
    """One item, uniformly (faster than rng.choice for short Python lists)."""
    return items[int(rng.integers(len(items)))]


def _random_object(rng: np.random.Generator, pair: tuple[str, str], size: str | None = None) -> ShapeObject:
    size = size or _choice(rng, SIZE_NAMES)
    half = SIZES[size] // 2
    cx, cy = rng.integers(MARGIN + half, IMAGE_SIZE - MARGIN - half, size=2, endpoint=True)
    return ShapeObject(pair[0], pair[1], size, float(cx), float(cy))


def _overlaps(a: ShapeObject, b: ShapeObject) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax0 < bx1 + GAP and bx0 < ax1 + GAP and ay0 < by1 + GAP and by0 < ay1 + GAP


def _is_placed(obj: ShapeObject, place: str) -> bool:
    axis, sign = PLACES[place]
    return sign * ((obj.cx, obj.cy)[axis] - IMAGE_SIZE / 2) >= PLACE_MARGIN


def _is_related(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    axis, sign = RELATIONS[relation]
    along = sign * ((a.cx, a.cy)[axis] - (b.cx, b.cy)[axis])
    across = abs((a.cx, a.cy)[1 - axis] - (b.cx, b.cy)[1 - axis])
    return along >= RELATION_MIN and across <= along / 2


def _place_objects(rng, pairs, accept, sizes=None) -> list[ShapeObject]:
    """Rejection-sample one object per pair until none overlap and `accept(objects)` holds."""
    for _ in range(MAX_TRIES):
        objects = [_random_object(rng, p, None if sizes is None else sizes[i]) for i, p in enumerate(pairs)]
        clear = all(not _overlaps(a, b) for i, a in enumerate(objects) for b in objects[i + 1:])
        if clear and accept(objects):
            return objects
    raise RuntimeError(f"could not place {pairs} in {MAX_TRIES} tries")  # geometry bug, not bad input


def sample_scene(rng: np.random.Generator, kind: str, allowed_pairs: Sequence[tuple[str, str]] = ALL_PAIRS,
                 require_any: Sequence[tuple[str, str]] | None = None) -> Scene:
    """A random scene of `kind` using only `allowed_pairs`; with `require_any`, one object uses one of those."""
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r} (expected one of {KINDS})")
    allowed = _check_pairs(allowed_pairs, "allowed_pairs")
    required = _check_pairs(require_any, "require_any") if require_any else None
    if not allowed or (kind == "relation" and len(allowed) < 2 and not required):
        raise ValueError(f"not enough allowed colour-shape pairs for a {kind} scene: {allowed}")
    first = _choice(rng, required or allowed)
    if kind == "single":
        return Scene(kind, _place_objects(rng, [first], lambda objs: True))
    if kind == "placed":
        place = _choice(rng, tuple(PLACES))
        return Scene(kind, _place_objects(rng, [first], lambda objs: _is_placed(objs[0], place)), place)
    if kind == "count":
        n = _choice(rng, tuple(NUMBERS.values()))
        return Scene(kind, _place_objects(rng, [first] * n, lambda objs: True))
    others = [p for p in allowed if p != first] or [p for p in ALL_PAIRS if p != first]
    second = _choice(rng, others)
    pair = [first, second] if required is None or rng.random() < 0.5 else [second, first]
    relation = _choice(rng, tuple(RELATIONS))
    return Scene(kind, _place_objects(rng, pair, lambda objs: _is_related(objs[0], objs[1], relation)), relation)


def scene_pairs(scene: Scene) -> set[tuple[str, str]]:
    """The colour-shape pairs a scene uses."""
    return {(o.color, o.shape) for o in scene.objects}


# ---------------------------------------------------------------- building the data set

def _write_example(folder: Path, key: str, scene: Scene) -> None:
    render_scene(scene).save(folder / f"{key}.png", format="PNG", compress_level=1)
    (folder / f"{key}.txt").write_text(scene.caption)
    write_json(folder / f"{key}.json", {"key": key, **scene.to_dict()})


def _split_scenes(seed: int, index: int, n: int, allowed, held_out) -> list[tuple[Scene, bool]]:
    """Scenes of one split; in the test split (held_out given) every second scene uses a held-out pair."""
    rng = np.random.default_rng([seed, index])
    scenes = []
    for i in range(n):
        use_held_out = bool(held_out) and i % 2 == 0
        kind = KINDS[(i // 2 if held_out else i) % len(KINDS)]
        if use_held_out:
            scene = sample_scene(rng, kind, ALL_PAIRS, require_any=held_out)
        else:
            scene = sample_scene(rng, kind, allowed)
        scenes.append((scene, use_held_out))
    return scenes


def fresh_captions(n: int, seed: int, held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT) -> list[str]:
    """n captions drawn from the grammar the way the test split draws them (the kinds in turn, every second one naming
    a `held_out` pair), from a random stream of their own (neither split's): prompts that need be in no list."""
    held_out = _check_pairs(held_out, "held_out")
    allowed = [p for p in ALL_PAIRS if p not in held_out]
    return [scene.caption for scene, _ in _split_scenes(seed, 2, n, allowed, held_out)]


def _counts(scenes: list[tuple[Scene, bool]]) -> dict:
    counts = {"total": len(scenes), **{k: sum(s.kind == k for s, _ in scenes) for k in KINDS}}
    counts["held_out"] = sum(h for _, h in scenes)
    return counts


def _check_out_dir(out_dir: Path) -> None:
    for sub in ("train", "test"):
        if (out_dir / sub).is_dir() and any((out_dir / sub).iterdir()):
            raise ValueError(f"{out_dir / sub} already holds files; delete it or choose another output folder")


def build_shapes(out_dir: str | Path, n: int, seed: int, test_fraction: float = 0.1,
                 held_out: Sequence[tuple[str, str]] = DEFAULT_HELD_OUT, progress: bool = True) -> dict:
    """Write `n` scenes to out_dir/train, out_dir/test (files layout) and out_dir/split.json; returns the split info.

    Train scenes never use a `held_out` pair; every second test scene uses one, the others are ordinary.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    held_out = _check_pairs(held_out, "held_out")
    allowed = [p for p in ALL_PAIRS if p not in held_out]
    if len(allowed) < 2:
        raise ValueError(f"held_out leaves fewer than two colour-shape pairs for training: {held_out}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    n_test = int(round(n * test_fraction))
    splits = {"train": _split_scenes(seed, 0, n - n_test, allowed, []),
              "test": _split_scenes(seed, 1, n_test, allowed, held_out)}
    width = max(5, len(str(n)))
    bar = tqdm(total=n, desc="shapes", unit="img", disable=not progress or n < 2000)
    for name, scenes in splits.items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, (scene, _) in enumerate(scenes):
            _write_example(folder, f"{i:0{width}d}", scene)
            bar.update()
    bar.close()
    info = {"seed": seed, "n": n, "test_fraction": test_fraction, "image_size": IMAGE_SIZE,
            "held_out": [list(p) for p in held_out], "palette": {k: list(v) for k, v in PALETTE.items()},
            "counts": {name: _counts(scenes) for name, scenes in splits.items()}}
    write_json(out_dir / "split.json", info)
    return info


# ---------------------------------------------------------------- corrupted scenes (image-side hard negatives)

CORRUPTIONS: dict[str, tuple[str, ...]] = {
    "single": ("recolor", "reshape", "resize", "extra"),
    "placed": ("recolor", "reshape", "move", "move", "extra"),
    # geometry twice: the ways a decoder gets a relation wrong most often (docs/MODELS.md)
    "relation": ("recolor", "reshape", "exchange_color", "exchange_shape", "close", "close", "off_axis", "off_axis",
                 "reverse", "drop"),
    "count": ("recolor", "reshape", "extra_same", "extra", "drop"),
}


def corrupt_scene(scene: Scene, rng: np.random.Generator, allowed_pairs: Sequence[tuple[str, str]],
                  tries: int = 8) -> Scene | None:
    """The scene changed so that its caption no longer holds, or None where no change was found in `tries`.

    One change, drawn from `CORRUPTIONS[scene.kind]`: an object recoloured or reshaped, the two objects' colours or
    shapes exchanged, the second object moved too close to the first (touching or overlapping) or too far off the
    named axis, the two swapped, an object dropped or one added, a placed object moved off its half, a single
    object resized. New objects and new colour-shape combinations use only `allowed_pairs`, so a model trained on
    them never sees a pair its training data holds out. The pictures the verifier learns to reject (unclip.verifier).
    """
    allowed = [tuple(p) for p in allowed_pairs]
    for _ in range(tries):
        changed = _corrupt_once(scene, rng, allowed, _choice(rng, CORRUPTIONS[scene.kind]))
        if changed is not None:
            return changed
    return None


def _fits(obj: ShapeObject) -> bool:
    x0, y0, x1, y1 = obj.bbox
    return x0 >= 0 and y0 >= 0 and x1 <= IMAGE_SIZE and y1 <= IMAGE_SIZE


def _corrupt_once(scene: Scene, rng: np.random.Generator, allowed: list, how: str) -> Scene | None:
    objs = [dataclasses.replace(o) for o in scene.objects]
    replace = dataclasses.replace
    i = int(rng.integers(len(objs)))
    if how in ("recolor", "reshape"):
        o = objs[i]
        keep = 1 if how == "recolor" else 0  # the shape stays when recolouring, the colour when reshaping
        used = {(x.color, x.shape) for x in objs}
        options = [p for p in allowed if p[keep] == (o.color, o.shape)[keep] and p not in used]
        if not options:
            return None
        color, shape = _choice(rng, options)
        objs[i] = replace(o, color=color, shape=shape)
    elif how in ("exchange_color", "exchange_shape"):
        a, b = objs
        field_ = "color" if how == "exchange_color" else "shape"
        a2, b2 = replace(a, **{field_: getattr(b, field_)}), replace(b, **{field_: getattr(a, field_)})
        if getattr(a, field_) == getattr(b, field_) or {(a2.color, a2.shape), (b2.color, b2.shape)} - set(allowed):
            return None
        objs = [a2, b2]
    elif how == "reverse":
        a, b = objs
        objs = [replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)]
    elif how in ("close", "off_axis"):
        a, b = objs
        axis, sign = RELATIONS[scene.position]
        if how == "close":  # under half the generator's least distance: no reading of the caption holds
            along, across = rng.uniform(-2, RELATION_MIN / 2), rng.uniform(0, 4)
        else:               # further across than along
            along = rng.uniform(RELATION_MIN / 2, 24)
            across = along * rng.uniform(1.2, 2.0)
        centre = [a.cx, a.cy]
        centre[axis] -= sign * along                      # b on the far side of a, as the relation wants ...
        centre[1 - axis] += (1 if rng.random() < 0.5 else -1) * across  # ... but too close or too far across
        b2 = replace(b, cx=float(round(centre[0])), cy=float(round(centre[1])))
        objs = [a, b2]
    elif how == "drop":
        if len(objs) < 2:
            return None
        del objs[i]
    elif how in ("extra", "extra_same"):
        first = (objs[0].color, objs[0].shape)
        if how == "extra_same" and len(objs) >= max(NUMBERS.values()):
            return None
        pair = first if how == "extra_same" else _choice(rng, [p for p in allowed if p != first] or [first])
        size = objs[0].size if how == "extra_same" else _choice(rng, SIZE_NAMES)
        for _ in range(100):
            new = _random_object(rng, pair, size)
            if not any(_overlaps(new, o) for o in objs):
                objs.append(new)
                break
        else:
            return None
    elif how == "move":
        moved = _random_object(rng, (objs[0].color, objs[0].shape), objs[0].size)
        axis, sign = PLACES[scene.position]
        if sign * ((moved.cx, moved.cy)[axis] - IMAGE_SIZE / 2) > 0:  # on the named half, however little
            return None
        objs = [moved]
    elif how == "resize":
        objs = [replace(objs[0], size="small" if objs[0].size == "large" else "large")]
    else:
        raise ValueError(f"unknown corruption {how!r}")
    if not all(_fits(o) for o in objs):
        return None
    return Scene(scene.kind, objs, scene.position)
