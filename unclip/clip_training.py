"""Contrastive CLIP training from scratch on a folder of pairs (open_clip's model and logits).

Captions repeat within a batch on small worlds (shapes, emoji styles), so every pair that shares a caption
counts as a positive: the targets are the row-normalised same-caption matrix (soft targets). With unique
captions this is exactly open_clip's ClipLoss.

Hard negative captions (NegCLIP, Yuksekgonul et al. 2023): a contrastive CLIP trained on random batches
hardly ever meets two captions that differ only in "left" and "right", so nothing makes it tell them apart
(the bundled shapes CLIP before this: cos 0.994 between a caption and its side-swapped twin; its image
embedding picked the right one of the two 52% of the time). With `negative_swaps`, every caption that
contains a swappable word also brings its swapped twin ("... on the left" -> "... on the right") as an extra
text column of the image -> text loss: a negative for its own image, and a positive for any image in the
batch that the twin does describe.

Text twins alone did not separate "left" from "right" in 1,000 steps on shapes (cos 0.998 after training):
while the image tower does not yet encode the side, nothing rewards the text tower for keeping it. Mirrored
pairs (`mirror_swaps`) give the image tower that reason: a picture whose caption names a side joins the batch
together with its mirror image captioned with the swapped words ("on the left" mirrored left to right is
"on the right"), so the same content appears on both sides with two captions that must be told apart.

Word swaps cannot teach a relation. "a red circle to the left of a green triangle" and "a green triangle to the
left of a red circle" hold the same words and describe mirrored pictures, so a text tower that pools its words
as a bag gives both one embedding, and its twin with "left" and "right" swapped describes the mirrored picture
too. `negative_reorders` adds the reordered caption (the two sides of a relation phrase exchanged) as a second
hard negative: the only way to tell it from the positive is word order.

Binding is the last thing a bag of words hides: "a red circle above a green square" and "a green circle above a
red square" hold the same words in the same order of kinds. `negative_exchanges` (word classes such as the
colours) adds each caption's twin with two different words of one class exchanged, so only which word goes with
which object tells it from the positive.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .captions import TWIN_RULES, caption_twins, exchange_words, reorder_caption, swap_words  # noqa: F401 (re-exported)
from .checkpoint import update_model_index
from .clip import CLIP_PRESETS, ClipConfig, ClipEncoder, WordTokenizer
from .data.encode import encode_images, read_or_skip
from .eval.metrics import retrieval_accuracy, same_caption_matrix
from .training import Hooks, TrainConfig, train


NEGATIVE_KEYS = ("negative", "reordered", "exchanged")  # hard negative captions per item ("" where a caption has none)


def clip_loss_fn(model: ClipEncoder, batch: dict):
    """Symmetric contrastive loss with soft targets for repeated captions.

    Under DDP every process's samples are the negatives (open_clip's ClipLoss with gather_with_grad and
    local_loss): this process's b rows against all N columns, so N processes train like one with batch N*b.
    """
    pixels, tokens, local = batch["pixels"], batch["tokens"], list(batch["caption"])
    mirrored = [i for i, c in enumerate(batch.get("mirror", [])) if c]              # pairs with a mirror twin
    if mirrored:  # the mirror pairs join the batch as ordinary pairs: [b] -> [b + m]
        pixels = torch.cat([pixels, batch["mirror_pixels"][mirrored]])
        tokens = torch.cat([tokens, batch["mirror_tokens"][mirrored]])
        local += [batch["mirror"][i] for i in mirrored]
    twins, twin_tokens = [], []                                                     # this process's twins
    for key in NEGATIVE_KEYS:
        rows = [i for i, c in enumerate(batch.get(key, [])) if c]
        twins += [batch[key][i] for i in rows]
        twin_tokens += [batch[f"{key}_tokens"][rows]] if rows else []
    if twins:  # one text forward for captions and twins (the model may be DDP-wrapped)
        tokens = torch.cat([tokens, *twin_tokens])                                  # [b + n, L]
    image, text, logit_scale = model(pixels, tokens)                                # [b, D], [b + n, D]
    text, text_neg = text[:len(image)], text[len(image):]
    image_all, text_all, captions, first = _gather_features(image, text, local)     # [N, D] each
    logits_image = logit_scale * image @ text_all.T                                 # [b, N]
    logits_text = logit_scale * text @ image_all.T                                  # [b, N]
    same = same_caption_matrix(captions, image.device).float()[first:first + len(image)]  # [b, N]
    targets_image = same
    if twins:
        logits_image = torch.cat([logits_image, logit_scale * image @ text_neg.T], dim=1)  # [b, N + n]
        targets_image = torch.cat([same, _matches(local, twins, image.device)], dim=1)
    loss = (F.cross_entropy(logits_image, targets_image / targets_image.sum(dim=1, keepdim=True))
            + F.cross_entropy(logits_text, same / same.sum(dim=1, keepdim=True))) / 2
    return loss, {"logit_scale": float(logit_scale.detach())}


def _matches(rows: Sequence[str], columns: Sequence[str], device) -> torch.Tensor:
    """[len(rows), len(columns)] float: 1 where a row's caption is the column's caption."""
    return torch.tensor([[float(r == c) for c in columns] for r in rows], device=device)


def _gather_features(image: torch.Tensor, text: torch.Tensor, captions: list[str]):
    """Every process's features in rank order (gradients flow back to their owners), captions, and the row
    of this process's first sample; the inputs themselves when not distributed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image, text, captions, 0
    from torch.distributed.nn.functional import all_gather

    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, captions)            # batches may differ in size (skipped samples)
    sizes = [len(c) for c in per_rank]
    pad = lambda x: F.pad(x, (0, 0, 0, max(sizes) - len(x)))  # noqa: E731  [b, D] -> [b_max, D]
    image_all = torch.cat([x[:n] for x, n in zip(all_gather(pad(image)), sizes)])  # [N, D]
    text_all = torch.cat([x[:n] for x, n in zip(all_gather(pad(text)), sizes)])    # [N, D]
    return image_all, text_all, [c for chunk in per_rank for c in chunk], sum(sizes[:dist.get_rank()])


MIRROR_DIMS = {"horizontal": -1, "vertical": -2}  # mirror_swaps axis -> the pixel dimension it flips


class _Tokenised(torch.utils.data.Dataset):
    """Adds CLIP-ready pixels and token ids to each item of a pairs dataset."""

    def __init__(self, dataset, clip: ClipEncoder, negative_swaps: Sequence[Sequence[str]] = (),
                 mirror_swaps: dict | None = None, negative_reorders: Sequence[str] = (),
                 negative_exchanges: Sequence[Sequence[str]] = ()):
        self.dataset, self.clip = dataset, clip
        swaps, reorders = [tuple(pair) for pair in negative_swaps], list(negative_reorders)
        classes = [set(group) for group in negative_exchanges]
        self.twins = ([("negative", lambda c, i: swap_words(c, swaps))] if swaps else []) + \
            ([("reordered", lambda c, i: reorder_caption(c, reorders))] if reorders else []) + \
            ([("exchanged", self._exchange(classes))] if classes else [])  # NEGATIVE_KEYS
        self.calls = 0
        self.mirrors = [(MIRROR_DIMS[axis], swaps) for axis, swaps in (mirror_swaps or {}).items() if swaps]

    def _exchange(self, classes):
        # which class is exchanged changes from one visit of an item to the next, so every one gets its turn
        return lambda caption, i: exchange_words(caption, classes, pick=i + self.calls // max(len(self), 1))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.calls += 1
        item = self.dataset[i]
        pixels = self.clip.preprocess(item["image"][None], device="cpu")[0]
        tokens = self.clip.tokenize([item["caption"]], warn=False)[0]
        out = {"pixels": pixels, "tokens": tokens, "caption": item["caption"]}
        for key, twin_of in self.twins:  # "" when the caption has no twin: the loss skips it
            twin = twin_of(item["caption"], i)
            changed = twin != item["caption"]
            out[key] = twin if changed else ""
            out[f"{key}_tokens"] = self.clip.tokenize([twin], warn=False)[0] if changed else tokens
        if self.mirrors:  # the first axis whose words the caption uses; "" (and an unused copy) when none
            out["mirror"], out["mirror_pixels"], out["mirror_tokens"] = "", pixels, tokens
            for dim, swaps in self.mirrors:
                twin = swap_words(item["caption"], swaps)
                if twin != item["caption"]:
                    out["mirror"], out["mirror_pixels"] = twin, pixels.flip(dim)
                    out["mirror_tokens"] = self.clip.tokenize([twin], warn=False)[0]
                    break
        return out


def split_heldout(n: int, fraction: float, seed: int, cap: int = 1000) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out index split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(cap, int(n * fraction)) if n >= 10 else 0
    return sorted(order[k:]), sorted(order[:k])


def make_retrieval_eval(heldout, clip_ref: ClipEncoder):
    """evaluate(ema, step) -> held-out text->image retrieval top-1 / top-5 (unreadable images left out)."""
    heldout = torch.utils.data.Subset(heldout, [i for i in range(len(heldout)) if read_or_skip(heldout, i)])
    captions = [heldout[i]["caption"] for i in range(len(heldout))]

    def evaluate(ema: ClipEncoder, step: int) -> dict:
        ema.eval()
        image_emb = encode_images(ema, heldout, progress=False)
        text_emb = ema.encode_text(captions)[0].cpu()
        return {f"retrieval_{k}": v for k, v in retrieval_accuracy(text_emb, image_emb, captions).items()}

    return evaluate


def train_clip(data: str | os.PathLike, out: str | os.PathLike, train_config: TrainConfig,
               preset: str = "tiny-32", run_dir: str | os.PathLike | None = None, resume: bool = False,
               heldout_fraction: float = 0.05, progress: bool = True, config: ClipConfig | None = None,
               negative_swaps: Sequence[Sequence[str]] = (), mirror_swaps: dict | None = None,
               negative_reorders: Sequence[str] = (), init_from: str | os.PathLike | None = None,
               negative_exchanges: Sequence[Sequence[str]] = (), component: str = "clip") -> dict:
    """Train a CLIP on a folder of pairs (from scratch, or on from the CLIP folder `init_from`, whose config and
    vocabulary it keeps) and export it to `out/<component>`; returns final metrics. component "judge" makes the
    model's judge: a second CLIP that only ranks best-of-k candidates against the prompt (UnCLIPPipeline.decode),
    free to move away from the embeddings the prior and the decoder were trained on.

    negative_swaps: word pairs such as [("left", "right"), ("two", "three")]; each caption's swapped twin is
    a hard negative for its image. mirror_swaps: {"horizontal": [("left", "right")], "vertical": [("top",
    "bottom")]}; a caption with one of an axis's words brings its picture mirrored along that axis, captioned
    with the words swapped, into the batch. negative_reorders: relation phrases such as ["to the left of",
    "above"]; a caption "A <phrase> B" brings "B <phrase> A" as a hard negative (module docstring).
    negative_exchanges: word classes such as [["red", "green", "blue"], ["circle", "square"]]; a caption with two
    different words of a class brings its twin with the two exchanged as a hard negative (`exchange_words`).
    """
    bad = [p for p in negative_reorders if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"negative reorders are relation phrases such as 'to the left of', got {bad}")
    bad = [g for g in negative_exchanges if isinstance(g, str) or len(set(g)) < 2
           or not all(isinstance(w, str) and w and " " not in w for w in g)]
    if bad:
        raise ValueError(f"negative exchanges are classes of at least two single words, got {bad}")
    mirror_swaps = dict(mirror_swaps or {})
    unknown = sorted(set(mirror_swaps) - set(MIRROR_DIMS))
    if unknown:
        raise ValueError(f"mirror_swaps axes are {', '.join(MIRROR_DIMS)}, got {unknown}")
    for pairs in [negative_swaps, *mirror_swaps.values()]:
        bad = [p for p in pairs if len(p) != 2 or not all(isinstance(w, str) and w and " " not in w for w in p)]
        if bad:
            raise ValueError(f"word swaps are pairs of single words, got {bad}")
    from .data.datasets import open_dataset

    if component not in ("clip", "judge"):
        raise ValueError(f"a CLIP is exported as the model's clip or its judge, got {component!r}")
    out = Path(out)
    run_dir = Path(run_dir) if run_dir else out / "runs" / component
    start = ClipEncoder.load(init_from) if init_from is not None else None
    config = start.config if start is not None else config or _preset(preset)
    dataset = open_dataset(data, config.vision.get("image_size", 32))
    if not hasattr(dataset, "captions"):
        raise ValueError(f"train clip reads a folder of image/caption pairs, not webdataset shards ({data}); "
                         "give the folder the shards were made from")
    if start is not None:
        clip = start
    else:
        vocab = _vocab(run_dir, list(dataset.captions), config, resume)
        torch.manual_seed(train_config.seed)  # a seeded initialisation: torch seeds each process at random
        clip = ClipEncoder.from_config(config, vocab)
    train_idx, held_idx = split_heldout(len(dataset), heldout_fraction, train_config.seed)
    heldout = torch.utils.data.Subset(dataset, held_idx)
    evaluate = make_retrieval_eval(heldout, clip) if held_idx else None
    export = lambda ema, step: _export(ema, out, component)  # noqa: E731
    pairs = _Tokenised(torch.utils.data.Subset(dataset, train_idx), clip, negative_swaps, mirror_swaps,
                       negative_reorders, negative_exchanges)
    info = {"clip": dataclasses.asdict(config), "data": str(data), "negative_swaps": [list(p) for p in negative_swaps],
            "mirror_swaps": mirror_swaps, "negative_reorders": list(negative_reorders),
            "negative_exchanges": [list(g) for g in negative_exchanges],
            "init_from": None if init_from is None else str(init_from), "component": component}
    ema = train(clip, clip_loss_fn, pairs, run_dir, train_config, Hooks(export=export, evaluate=evaluate),
                resume=resume, progress=progress, extra_info=info)
    return evaluate(ema, train_config.steps) if evaluate else {}


def _preset(name: str) -> ClipConfig:
    if name not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r} (choose from {', '.join(CLIP_PRESETS)})")
    return dataclasses.replace(CLIP_PRESETS[name])


def _vocab(run_dir: Path, captions: list[str], config: ClipConfig, resume: bool) -> list[str]:
    """The word vocabulary of the training captions, kept in the run folder so a resume uses the same one."""
    from .config import read_json, write_json

    path = run_dir / "vocab.json"
    if resume and path.is_file():
        return read_json(path)
    words = WordTokenizer.from_captions(captions, config.text.get("context_length", 32)).words
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, words)
    return words


def _export(ema: ClipEncoder, out: Path, component: str) -> None:
    ema.save(out / component)
    update_model_index(out)
