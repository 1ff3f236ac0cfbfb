"""The verifier: does this picture show this caption? A small joint transformer on a frozen CLIP's (the judge's) token
outputs, trained to tell each training picture's caption from hard negatives on both sides, for best-of-k ranking.

A CLIP compares one vector per picture with one per caption, which is where it loses count and binding: "three red
circles" and "two red circles" differ by one word in a pooled embedding. The verifier reads every text token state
and every image patch token of the judge together (a CLS token attends over both, with the judge's own cosine and
pooled embeddings as further inputs, so it starts from the judge's verdict) and answers with one logit. It trains on
the picture and its caption (1), the picture and one of the caption's hard negatives (0: a twin or a one-word
substitution, `unclip.captions.caption_negatives`) and, for scenes whose layout the data records (the shapes world),
a re-rendered picture the caption no longer describes and the caption (0: `unclip.data.shapes.corrupt_scene`). The
judge is frozen: the verifier adds 0.45 M parameters (0.9 MB at fp16) to a model that has one.

The judge sees a 32 px picture in 4 px patches and was trained to pool them. `VerifierConfig.parser` adds a scene
parser: a small CNN over the full-resolution picture whose features answer, per 2 px cell, its colour, its shape and
how near an object's centre it is (a dense loss, where the data records its scenes), and whose tokens are added to
the judge's patch tokens of the same cells. It joins a trained head switched off (`warm_start`; its token projection
starts at zero), and `patch_drop` hides the judge's patches from part of each batch so that the head learns to read it.

Best-of-k adds `verify_weight` x log sigmoid(logit) to each candidate's score (`UnCLIPPipeline._rank`); on the shapes
model's sample banks it keeps the right count far more often than the CLIPs (0.89 against 0.77) and relations as
often (0.71), docs/MODELS.md, "A verifier for best of 8".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Encoder

from .captions import caption_negatives, word_pairs
from .clip import ClipEncoder
from .checkpoint import load_component, save_component


@dataclass
class VerifierConfig:
    width: int = 128
    depth: int = 2
    heads: int = 4
    parser: int = 0     # channels of a pixel-level scene parser whose grid tokens join the judge's (0: none)
    patch_drop: float = 0.0  # in training, the share of pictures read without the judge's patch tokens (parser only)


class SceneParser(nn.Module):
    """A small CNN over the picture at full resolution, for what the judge's 4 px patches blur: where each object's
    edge is, whether two objects touch, how many there are. Features on a grid of S/2 cells answer, per cell, its
    colour and shape and how close an object's centre is (`DENSE_OUTPUTS`; trained where the data records its
    scenes, `unclip.data.shapes.scene_labels`); a strided convolution turns them into one token per cell of the
    judge's patch grid, added to its patch token."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        from .data.shapes import DENSE_OUTPUTS
        c, h = channels, channels // 2
        act = nn.GELU
        self.features = nn.Sequential(
            nn.Conv2d(3, h, 3, padding=1), act(), nn.Conv2d(h, h, 3, padding=1), act(),
            nn.Conv2d(h, c, 3, stride=2, padding=1), act(), nn.Conv2d(c, c, 3, padding=1), act(),
            nn.Conv2d(c, c, 3, padding=2, dilation=2), act(), nn.Conv2d(c, c, 3, padding=2, dilation=2), act())
        self.dense = nn.Conv2d(c, sum(DENSE_OUTPUTS), 1)
        self.tokens = nn.Conv2d(c, width, 2, stride=2)

    def forward(self, pixels: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pictures [B, 3, S, S] in [-1, 1] -> (tokens [B, grid^2, width], dense logits [B, K, S/2, S/2])."""
        f = self.features(pixels)
        tokens = self.tokens(f)
        if tokens.shape[-1] != grid:
            tokens = F.adaptive_avg_pool2d(tokens, grid)
        return tokens.flatten(2).transpose(1, 2), self.dense(f)


class Verifier(nn.Module):
    """Match logits for (picture, caption) pairs from a frozen judge CLIP's tokens; see the module docstring."""

    def __init__(self, config: VerifierConfig, judge: ClipEncoder):
        super().__init__()
        if judge.config.tokenizer != "words" or "width" not in judge.config.vision:
            raise ValueError("the verifier reads a project-trained CLIP's tokens (a word-level ViT CLIP), "
                             f"got {judge.config.model_name or judge.config.tokenizer!r}")
        self.config, self.judge = config, judge.eval().requires_grad_(False)
        w = config.width
        self.text_in = nn.Linear(judge.text_width, w)
        self.image_in = nn.Linear(judge.config.vision["width"], w)
        self.pooled_in = nn.Linear(judge.embed_dim, w)
        self.cosine_in = nn.Linear(1, w)
        self.kinds = nn.Parameter(torch.randn(3, w) * 0.02)  # text / patch / pooled tokens
        self.cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.encoder = Encoder(dim=w, depth=config.depth, heads=config.heads, attn_dim_head=w // config.heads)
        self.head = nn.Linear(w, 1)
        self.parser = None
        if config.parser:  # its tokens are added to the judge's patch tokens of the same cells
            self.grid = judge.image_size // judge.config.vision["patch_size"]
            self.parser = SceneParser(config.parser, w)
            nn.init.zeros_(self.parser.tokens.weight)  # starts as the head without a parser (`warm_start`)
            nn.init.zeros_(self.parser.tokens.bias)

    # ---- the judge's side (frozen)

    def image_features(self, pixels: torch.Tensor, dense: bool = False):
        """Pictures [B, 3, S, S] in [-1, 1] -> (the judge's patch tokens [B, N, W], its l2-normalised embedding
        [B, D], the parser's grid tokens [B, G, w] or None); with dense=True also the parser's dense logits."""
        with torch.no_grad():
            visual = self.judge.model.visual
            visual.output_tokens = True  # open_clip's switch for the patch tokens beside the pooled output
            try:
                pooled, tokens = visual(self.judge.preprocess(pixels))
            finally:
                visual.output_tokens = False
        grid, maps = self.parser(pixels, self.grid) if self.parser is not None else (None, None)
        features = (tokens, F.normalize(pooled, dim=-1), grid)
        return (features, maps) if dense else features

    @torch.no_grad()
    def text_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [B, L] -> (token states [B, L, W], mask [B, L], l2-normalised embedding [B, D])."""
        pooled, states = self.judge.text_forward(tokens)
        return states, tokens != 0, F.normalize(pooled, dim=-1)

    # ---- the head

    def match(self, image: tuple, text: tuple) -> torch.Tensor:
        """Logits [B] of `image_features` and `text_features` outputs, row by row."""
        patches, image_emb, grid = image
        states, mask, text_emb = text
        b = states.shape[0]
        cosine = (image_emb * text_emb).sum(-1, keepdim=True)                           # the judge's own verdict
        cls = self.cls.expand(b, -1, -1) + self.cosine_in(cosine)[:, None]
        pooled = self.pooled_in(torch.stack([image_emb, text_emb], 1)) + self.kinds[2]
        patches = self.image_in(patches)
        if self.training and self.config.patch_drop and grid is not None:  # make the head read the parser too
            patches = patches * (torch.rand(b, 1, 1, device=patches.device) >= self.config.patch_drop)
        patches = patches + self.kinds[1] + (grid if grid is not None else 0)
        x = torch.cat([cls, self.text_in(states) + self.kinds[0], patches, pooled], 1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask,
                          torch.ones(b, patches.shape[1] + 2, dtype=torch.bool, device=mask.device)], 1)
        return self.head(self.encoder(x, mask=keep)[:, 0])[:, 0]

    def forward(self, pixels, tokens, neg_pixels, neg_tokens, has_neg):
        """Training forward: (logits [2B + n] of (picture, caption), (picture, negative caption) and, for the n rows
        with a corrupted picture, (corrupted picture, caption); the parser's dense logits of the B + n pictures or
        None)."""
        image, maps = self.image_features(torch.cat([pixels, neg_pixels[has_neg]]), dense=True)
        b = len(tokens)
        text = self.text_features(torch.cat([tokens, neg_tokens]))
        pairs_image = tuple(None if t is None else torch.cat([t[:b], t[:b], t[b:]]) for t in image)
        pairs_text = tuple(torch.cat([t[:b], t[b:], t[:b][has_neg]]) for t in text)
        return self.match(pairs_image, pairs_text), maps

    @torch.inference_mode()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Match logits [N] (float) of pictures [N, 3, S, S] in [-1, 1] and their prompts, one each."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} pictures but {len(prompts)} prompts")
        tokens = self.judge.tokenize(list(prompts), warn=False).to(images.device)
        return self.match(self.image_features(images), self.text_features(tokens)).float()

    # ---- files: the head only (the judge is the model's judge/ folder)

    def warm_start(self, folder: str | os.PathLike) -> None:
        """Take a trained verifier's weights (same width, depth and heads); a parser it lacks keeps its fresh
        weights, whose zero token projection leaves the head's answers where they were."""
        config, state = load_component(folder, "verifier", VerifierConfig)
        if (config.width, config.depth, config.heads) != (self.config.width, self.config.depth, self.config.heads):
            raise ValueError(f"the verifier in {folder} has width/depth/heads {config.width}/{config.depth}/"
                             f"{config.heads}, not {self.config.width}/{self.config.depth}/{self.config.heads}")
        if config.parser and config.parser != self.config.parser:
            raise ValueError(f"the verifier in {folder} has a parser of {config.parser} channels, "
                             f"not {self.config.parser}")
        self.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("judge.")}

    def save(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write a `verifier/` component folder (the head's weights; it reads the model's judge)."""
        save_component(folder, "verifier", self.config, self.head_state(), dtype=dtype)

    @classmethod
    def load(cls, folder: str | os.PathLike, judge: ClipEncoder) -> "Verifier":
        """Load a `verifier/` component folder onto the judge it was trained on."""
        config, state = load_component(folder, "verifier", VerifierConfig)
        model = cls(config, judge)
        try:
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        except RuntimeError as error:  # a shape that differs
            raise ValueError(f"weights in {folder} do not fit the config: "
                             f"{str(error).strip().splitlines()[1].strip()}") from None
        missing = [k for k in missing if not k.startswith("judge.")]  # the judge comes loaded
        if missing or unexpected:
            raise ValueError(f"weights in {folder} do not fit the config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return model.eval()


# ---------------------------------------------------------------- training data

class VerifierPairs(torch.utils.data.Dataset):
    """Each training pair with one negative caption and, where the pair's .json records a shapes scene, one
    corrupted re-rendering; pictures augmented towards decoder samples (blur, a pale background tint, noise)."""

    def __init__(self, dataset, judge: ClipEncoder, rules: dict, classes: Sequence[Sequence[str]], seed: int = 0,
                 dense: bool = False):
        from .data.shapes import Scene
        self.dataset, self.judge, self.rules, self.classes, self.seed = dataset, judge, rules, classes, seed
        self.dense = dense  # with the scene parser's targets (`scene_labels`)
        self.captions = list(dataset.captions)
        self.seen = word_pairs(self.captions)
        self.scenes = {}
        for i in range(len(dataset)):
            meta = dataset.metadata(i)
            if meta.get("objects") and meta.get("kind"):
                self.scenes[i] = Scene.from_dict(meta)
        # corruptions may only use the colour-shape pairs the data shows
        self.allowed = sorted({(o.color, o.shape) for s in self.scenes.values() for o in s.objects})

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        from .data.shapes import corrupt_scene, render_scene
        from .images import pil_to_tensor
        rng = np.random.default_rng([self.seed, i, int(torch.randint(0, 2**31 - 1, ()))])
        item = self.dataset[i]
        caption = self.captions[i]
        twins = caption_negatives(caption, self.rules, (), self.seen)
        subs = caption_negatives(caption, {}, self.classes, self.seen)
        pool = twins if twins and (rng.random() < 0.6 or not subs) else subs
        negative = pool[int(rng.integers(len(pool)))] if pool else self.captions[int(rng.integers(len(self)))]
        pixels = item["image"]
        neg_pixels, has_neg = torch.zeros_like(pixels), False
        scene = self.scenes.get(i)
        bad = corrupt_scene(scene, rng, self.allowed) if scene is not None else None
        if bad is not None:
            neg_pixels, has_neg = pil_to_tensor(render_scene(bad), pixels.shape[-1])[0], True
        tokens = self.judge.tokenize([caption, negative], warn=False)
        pair = {"pixels": augment(pixels, rng), "neg_pixels": augment(neg_pixels, rng), "has_neg": has_neg,
                "tokens": tokens[0], "neg_tokens": tokens[1]}
        if self.dense:
            cells = pixels.shape[-1] // 2
            pair.update(dense=_dense_targets(scene, cells), neg_dense=_dense_targets(bad, cells))
        return pair


def _dense_targets(scene, cells: int) -> torch.Tensor:
    """The scene parser's targets [3, cells, cells] (`scene_labels`), or -1 everywhere where no scene is recorded."""
    from .data.shapes import scene_labels
    if scene is None:
        return torch.full((3, cells, cells), -1.0)
    return torch.from_numpy(scene_labels(scene, cells))


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A rendered picture [3, S, S] in [-1, 1] made to look more like a decoder sample: a little blur, a colour
    gain, a pale tint pulling the white background off white, and noise."""
    sigma = rng.uniform(0, 1.2)
    if sigma > 0.15:
        r = torch.arange(-1, 2, dtype=torch.float32)
        k = torch.exp(-r ** 2 / (2 * sigma ** 2))
        k = (k[:, None] * k[None, :]) / k.sum() ** 2
        x = F.conv2d(x[:, None], k[None, None], padding=1)[:, 0]
    gain = torch.from_numpy(1 + (rng.random((3, 1, 1)) - 0.5) * 0.2).float()
    x = (x + 1) * gain - 1
    if rng.random() < 0.7:
        tint = torch.from_numpy(rng.random((3, 1, 1)) * 0.12).float()
        x = x - tint * (x + 1) / 2
    x = x + torch.from_numpy(rng.standard_normal(x.shape)).float() * rng.uniform(0, 0.08)
    return x.clamp(-1, 1)


def verifier_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Weighted binary cross-entropy: the positives weigh as much as the caption negatives and the picture
    negatives together, each half of that. With a scene parser, plus its dense loss on the pictures whose scene
    the data records: cross-entropy of each cell's colour and shape, squared error of its centre nearness (x 2)."""
    has = batch["has_neg"].bool()
    logits, maps = model(batch["pixels"], batch["tokens"], batch["neg_pixels"], batch["neg_tokens"], has)
    logits = logits.float()
    b, n = len(batch["tokens"]), int(has.sum())
    labels = torch.cat([torch.ones(b), torch.zeros(b + n)]).to(logits.device)
    weights = torch.cat([torch.ones(b), torch.full((b,), 0.5), torch.full((n,), 0.5 * b / max(n, 1))]).to(logits.device)
    loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).sum() / weights.sum()
    info = {}
    if maps is not None:
        dense_loss, info = parser_loss(maps.float(), torch.cat([batch["dense"], batch["neg_dense"][has]]))
        loss = loss + dense_loss
    with torch.no_grad():
        text_acc = (logits[:b] > logits[b:2 * b]).float().mean()
        image_acc = (logits[:b][has] > logits[2 * b:]).float().mean() if n else torch.tensor(float("nan"))
    return loss, {"text_neg_acc": float(text_acc), "image_neg_acc": float(image_acc), **info}


BACKGROUND_WEIGHT = 0.2  # a background cell's weight in the parser's cross-entropy (an object cell's: 1)
HEAT_WEIGHT = 2.0        # the centre-nearness squared error's weight


def parser_loss(maps: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The scene parser's dense loss and its accuracies on the object cells; rows whose targets are -1 (no scene)
    count for nothing."""
    from .data.shapes import DENSE_OUTPUTS
    known = targets[:, 0, 0, 0] >= 0
    if not known.any():
        return maps.sum() * 0, {}
    maps, targets = maps[known], targets[known]
    color, shape, heat = maps.split(DENSE_OUTPUTS, dim=1)
    color_t, shape_t = targets[:, 0].long(), targets[:, 1].long()
    ink = color_t > 0
    weight = torch.where(ink, 1.0, BACKGROUND_WEIGHT)  # most cells are background: the objects would drown
    cells = weight.sum()
    loss = ((F.cross_entropy(color, color_t, reduction="none") * weight).sum() / cells
            + (F.cross_entropy(shape, shape_t, reduction="none") * weight).sum() / cells
            + HEAT_WEIGHT * F.mse_loss(heat[:, 0].sigmoid(), targets[:, 2]))
    with torch.no_grad():
        info = {"parser_color_acc": float((color.argmax(1) == color_t)[ink].float().mean()),
                "parser_shape_acc": float((shape.argmax(1) == shape_t)[ink].float().mean())}
    return loss, info


def train_verifier(data: str | os.PathLike, out: str | os.PathLike, train_config, rules: dict,
                   classes: Sequence[Sequence[str]] = (), config: VerifierConfig | None = None,
                   run_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
                   oversample: Sequence[tuple[str, int]] = (), init_from: str | os.PathLike | None = None) -> dict:
    """Train the verifier on a folder of pairs against the model folder `out`'s judge (or its CLIP where it has no
    judge) and export it to `out/verifier`. rules: twin rules (`caption_twins`); classes: word classes for one-word
    substitutions (`substitute_words`); oversample: [(regex, times), ...], the pairs whose caption matches seen
    more often (`decoder.training.oversample_rows`); init_from: a verifier folder to start from (`warm_start`: a head
    trained without a parser gains one that starts switched off). Returns the accuracies on a fixed batch of training
    pairs."""
    from decoder.training import check_oversample, oversample_rows
    from .checkpoint import update_model_index
    from .data.datasets import open_dataset
    from .training import Hooks, train

    out = Path(out)
    judge_dir = out / "judge" if (out / "judge").is_dir() else out / "clip"
    judge = ClipEncoder.load(judge_dir)
    torch.manual_seed(train_config.seed)
    model = Verifier(config or VerifierConfig(), judge)
    if init_from is not None:
        model.warm_start(init_from)
    dataset = open_dataset(data, judge.image_size)
    if not hasattr(dataset, "captions"):
        raise ValueError(f"train verifier reads a folder of image/caption pairs, not webdataset shards ({data})")
    check_oversample(oversample)
    pairs = VerifierPairs(dataset, judge, rules, classes, seed=train_config.seed, dense=model.parser is not None)
    train_pairs, repeats = pairs, []
    if oversample:
        rows, repeats = oversample_rows(torch.arange(len(pairs)), pairs.captions, [tuple(o) for o in oversample])
        train_pairs = torch.utils.data.Subset(pairs, rows.tolist())
    last = {}

    def export(ema, step):
        ema.save(out / "verifier")
        update_model_index(out)

    def evaluate(ema, step):  # accuracies on a fixed batch of the training pairs' negatives
        gen = torch.random.fork_rng()
        with gen:
            torch.manual_seed(1234)
            batch = [pairs[i] for i in range(min(256, len(pairs)))]
        from .training import collate
        with torch.no_grad():
            _, info = verifier_loss(ema, collate(batch))
        last.update(info)
        return info

    info = {"verifier": dataclasses.asdict(model.config), "judge": str(judge_dir), "rules": rules,
            "classes": [list(c) for c in classes], "data": str(data), "oversample": repeats,
            "init_from": None if init_from is None else str(init_from)}
    train(model, verifier_loss, train_pairs, Path(run_dir) if run_dir else out / "runs" / "verifier", train_config,
          Hooks(export=export, evaluate=evaluate), resume=resume, progress=progress, extra_info=info)
    return last
