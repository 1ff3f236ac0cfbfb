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

    # ---- the judge's side (frozen)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pictures [B, 3, S, S] in [-1, 1] -> (patch tokens [B, N, W], l2-normalised embedding [B, D])."""
        visual = self.judge.model.visual
        visual.output_tokens = True  # open_clip's switch for the patch tokens beside the pooled output
        try:
            pooled, tokens = visual(self.judge.preprocess(pixels))
        finally:
            visual.output_tokens = False
        return tokens, F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def text_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [B, L] -> (token states [B, L, W], mask [B, L], l2-normalised embedding [B, D])."""
        pooled, states = self.judge.text_forward(tokens)
        return states, tokens != 0, F.normalize(pooled, dim=-1)

    # ---- the head

    def match(self, image: tuple[torch.Tensor, torch.Tensor], text: tuple) -> torch.Tensor:
        """Logits [B] of `image_features` and `text_features` outputs, row by row."""
        patches, image_emb = image
        states, mask, text_emb = text
        b = states.shape[0]
        cosine = (image_emb * text_emb).sum(-1, keepdim=True)                           # the judge's own verdict
        cls = self.cls.expand(b, -1, -1) + self.cosine_in(cosine)[:, None]
        pooled = self.pooled_in(torch.stack([image_emb, text_emb], 1)) + self.kinds[2]
        x = torch.cat([cls, self.text_in(states) + self.kinds[0], self.image_in(patches) + self.kinds[1], pooled], 1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask,
                          torch.ones(b, patches.shape[1] + 2, dtype=torch.bool, device=mask.device)], 1)
        return self.head(self.encoder(x, mask=keep)[:, 0])[:, 0]

    def forward(self, pixels, tokens, neg_pixels, neg_tokens, has_neg) -> torch.Tensor:
        """Training forward: logits [2B + n] of (picture, caption), (picture, negative caption) and, for the n rows
        with a corrupted picture, (corrupted picture, caption)."""
        image = self.image_features(torch.cat([pixels, neg_pixels[has_neg]]))
        b = len(tokens)
        text = self.text_features(torch.cat([tokens, neg_tokens]))
        pairs_image = tuple(torch.cat([t[:b], t[:b], t[b:]]) for t in image)
        pairs_text = tuple(torch.cat([t[:b], t[b:], t[:b][has_neg]]) for t in text)
        return self.match(pairs_image, pairs_text)

    @torch.inference_mode()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Match logits [N] (float) of pictures [N, 3, S, S] in [-1, 1] and their prompts, one each."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} pictures but {len(prompts)} prompts")
        tokens = self.judge.tokenize(list(prompts), warn=False).to(images.device)
        return self.match(self.image_features(images), self.text_features(tokens)).float()

    # ---- files: the head only (the judge is the model's judge/ folder)

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

    def __init__(self, dataset, judge: ClipEncoder, rules: dict, classes: Sequence[Sequence[str]], seed: int = 0):
        from .data.shapes import Scene
        self.dataset, self.judge, self.rules, self.classes, self.seed = dataset, judge, rules, classes, seed
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
        return {"pixels": augment(pixels, rng), "neg_pixels": augment(neg_pixels, rng), "has_neg": has_neg,
                "tokens": tokens[0], "neg_tokens": tokens[1]}


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
    negatives together, each half of that."""
    has = batch["has_neg"].bool()
    logits = model(batch["pixels"], batch["tokens"], batch["neg_pixels"], batch["neg_tokens"], has).float()
    b, n = len(batch["tokens"]), int(has.sum())
    labels = torch.cat([torch.ones(b), torch.zeros(b + n)]).to(logits.device)
    weights = torch.cat([torch.ones(b), torch.full((b,), 0.5), torch.full((n,), 0.5 * b / max(n, 1))]).to(logits.device)
    loss = (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).sum() / weights.sum()
    with torch.no_grad():
        text_acc = (logits[:b] > logits[b:2 * b]).float().mean()
        image_acc = (logits[:b][has] > logits[2 * b:]).float().mean() if n else torch.tensor(float("nan"))
    return loss, {"text_neg_acc": float(text_acc), "image_neg_acc": float(image_acc)}


def train_verifier(data: str | os.PathLike, out: str | os.PathLike, train_config, rules: dict,
                   classes: Sequence[Sequence[str]] = (), config: VerifierConfig | None = None,
                   run_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
                   oversample: Sequence[tuple[str, int]] = ()) -> dict:
    """Train the verifier on a folder of pairs against the model folder `out`'s judge (or its CLIP where it has no
    judge) and export it to `out/verifier`. rules: twin rules (`caption_twins`); classes: word classes for one-word
    substitutions (`substitute_words`); oversample: [(regex, times), ...], the pairs whose caption matches seen
    more often (`decoder.training.oversample_rows`). Returns the accuracies on a fixed batch of training pairs."""
    from decoder.training import check_oversample, oversample_rows
    from .checkpoint import update_model_index
    from .data.datasets import open_dataset
    from .training import Hooks, train

    out = Path(out)
    judge_dir = out / "judge" if (out / "judge").is_dir() else out / "clip"
    judge = ClipEncoder.load(judge_dir)
    torch.manual_seed(train_config.seed)
    model = Verifier(config or VerifierConfig(), judge)
    dataset = open_dataset(data, judge.image_size)
    if not hasattr(dataset, "captions"):
        raise ValueError(f"train verifier reads a folder of image/caption pairs, not webdataset shards ({data})")
    check_oversample(oversample)
    pairs = VerifierPairs(dataset, judge, rules, classes, seed=train_config.seed)
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
            "classes": [list(c) for c in classes], "data": str(data), "oversample": repeats}
    train(model, verifier_loss, train_pairs, Path(run_dir) if run_dir else out / "runs" / "verifier", train_config,
          Hooks(export=export, evaluate=evaluate), resume=resume, progress=progress, extra_info=info)
    return last
