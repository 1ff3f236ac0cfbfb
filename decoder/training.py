"""train_decoder / train_upsampler: read the pairs, encode them with the frozen CLIP, run the one training loop.

Map-style data (a folder of pairs): every image and unique caption is encoded once up front. Under
`accelerate launch` every process reads and encodes the whole data set itself (CLIP inference is
deterministic, so all ranks hold the same embeddings; DDP also broadcasts rank 0's buffers): no collective
before the loop starts. Streamed shards (an IterableDataset) are trained on straight from the stream, split by
process and DataLoader worker: the decoder's loss encodes each batch with the frozen CLIP on the training
device (`clip_encoded`); the upsampler needs no CLIP.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from unclip.checkpoint import update_model_index
from unclip.clip import ClipEncoder
from unclip.config import config_from_dict, config_to_dict, read_json
from unclip.data.encode import encode_captions, encode_readable_images, read_or_skip
from unclip.images import make_grid, tensor_to_pil
from unclip.training import Hooks, TrainConfig, collate, split_heldout, train

from .config import DecoderConfig, UpsamplerConfig, decoder_preset, upsampler_preset
from .loss import decoder_loss, upsampler_loss
from .model import Decoder, decoder_text
from .sample import sample_decoder, upsample
from .upsampler import Upsampler, downsample

# ---------------------------------------------------------------- data


def open_data(data, image_size: int):
    """A data set object as is, or a path through unclip.data.datasets.open_dataset at `image_size` px."""
    if isinstance(data, (Dataset, IterableDataset)):
        return data
    from unclip.data.datasets import open_dataset
    return open_dataset(data, image_size)


class WithSkipped(IterableDataset):
    """A ShardDataset's items with a None for each sample it skipped, so that `collate` counts them in `_skipped`."""

    def __init__(self, stream: IterableDataset):
        self.stream = stream

    def _skipped(self) -> int:
        return getattr(self.stream, "skipped", 0)  # this process's (or DataLoader worker's) copy counts its own

    def __iter__(self):
        counted = self._skipped()
        for item in self.stream:
            yield from [None] * (self._skipped() - counted)
            counted = self._skipped()
            yield item
        yield from [None] * (self._skipped() - counted)  # skipped after the last good sample


class DecoderDataset(Dataset):
    """Items for decoder_loss: the image at the decoder's size, its image_emb, its caption's tokens and mask.

    text["text_tokens"] holds CLIP's token states [U, L, W] ([U, L, 2W] for "clip+input"; fp16), or token ids
    [U, L] for a decoder with its own text transformer.
    """

    def __init__(self, source, rows: torch.Tensor, image_emb: torch.Tensor, text: dict, image_size: int):
        self.source, self.rows, self.image_emb, self.text, self.image_size = source, rows, image_emb, text, image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        caption = int(self.text["index"][row])
        image = downsample(self.source[row]["image"][None], self.image_size)[0]  # [3, H, H] -> [3, S, S]
        tokens = self.text["text_tokens"][caption]
        return {"image": image, "image_emb": self.image_emb[row],
                "text_tokens": tokens.float() if tokens.is_floating_point() else tokens,
                "mask": self.text["mask"][caption]}


def encode_batch(clip: ClipEncoder, batch: dict, config: DecoderConfig) -> dict:
    """A collated {"image" [B, 3, H, H], "caption": B strings, ...} -> decoder_loss's batch, like DecoderDataset.

    The frozen CLIP encodes on the images' device in fp32 (autocast off, as when encoding once): image_emb
    [B, D] from the images, text_tokens and mask [B, L] from the captions (`decoder_text`: CLIP's token states,
    or token ids for a decoder with its own text transformer). The image is downsampled to the decoder's size;
    other entries (the loop's per-sample random draws) pass through.
    """
    image, captions = batch["image"], list(batch["caption"])
    with torch.autocast(image.device.type, enabled=False):
        image_emb = clip.encode_image(image)                                       # [B, 3, H, H] -> [B, D]
        x_0 = downsample(image, config.image_size)                                 # [B, 3, S, S]
        tokens, mask = decoder_text(clip, config, captions)                        # [B, L, W] or [B, L], [B, L]
    # clone: inference-mode tensors cannot be saved for the decoder's backward
    return {**batch, "image": x_0, "image_emb": image_emb.clone(),
            "text_tokens": tokens.clone(), "mask": mask.clone()}


def clip_encoded(clip: ClipEncoder, config: DecoderConfig, loss_fn=decoder_loss):
    """`loss_fn` for streamed batches: the frozen CLIP (moved to the batch's device) encodes each batch first."""
    def encoded_loss(model, batch: dict):
        if clip.device != batch["image"].device:
            clip.to(batch["image"].device)
        return loss_fn(model, encode_batch(clip, batch, config))

    return encoded_loss


# ---------------------------------------------------------------- configs


def make_decoder_config(clip: ClipEncoder, preset: str = "tiny", config: DecoderConfig | None = None) -> DecoderConfig:
    """The preset (or config) with D, W and L from the CLIP; non-zero values that disagree with it raise.

    A decoder with its own text transformer also takes the tokenizer's vocabulary size, and W only by default;
    "clip+input" reads 2W channels (CLIP's final states and input embeddings).
    """
    config = config if config is not None else decoder_preset(preset)
    dims = dict(embed_dim=clip.embed_dim, text_width=clip.text_width, context_length=clip.context_length)
    if config.text_encoder == "clip+input":
        dims.update(text_width=2 * clip.text_width)
    if config.text_encoder == "transformer":
        dims.update(text_width=config.text_width or clip.text_width, text_vocab_size=clip.vocab_size)
    wrong = {k: (getattr(config, k), v) for k, v in dims.items() if getattr(config, k) not in (0, v)}
    if wrong:
        raise ValueError(f"decoder config does not fit the CLIP (config, CLIP): {wrong}")
    return dataclasses.replace(config, **dims)


def _resumed_config(run_dir: Path, key: str, cls):
    """The component config recorded by an earlier run in run_dir, if any."""
    path = run_dir / "train_config.json"
    saved = read_json(path).get(key) if path.is_file() else None
    return config_from_dict(cls, saved) if saved else None


# ---------------------------------------------------------------- hooks


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def decoder_hooks(model_dir: Path, shown: dict, sample_steps: int) -> Hooks:
    """Export the EMA decoder; sample grid: ground truth (top row) above samples for the same embeddings."""
    def export(ema: Decoder, step: int) -> None:
        ema.save(model_dir / "decoder")
        update_model_index(model_dir)

    def sample(ema: Decoder, step: int):
        device = _device(ema)
        out = sample_decoder(ema, shown["image_emb"].to(device), shown["text_tokens"].to(device),
                             shown["mask"].to(device), num_steps=sample_steps,
                             generator=torch.Generator(device).manual_seed(0), progress=False)
        return make_grid(tensor_to_pil(shown["image"]) + tensor_to_pil(out["images"]), cols=len(shown["image"]))

    return Hooks(export=export, sample=sample)


def upsampler_hooks(model_dir: Path, folder: str, images: torch.Tensor, sample_steps: int) -> Hooks:
    """Export the EMA upsampler; sample grid rows: bicubic upsampling, samples, ground truth."""
    def export(ema: Upsampler, step: int) -> None:
        ema.save(model_dir / folder)
        update_model_index(model_dir)

    def sample(ema: Upsampler, step: int):
        device = _device(ema)
        low_res = downsample(images, images.shape[-1] // ema.config.scale).to(device)
        out = upsample(ema, low_res, num_steps=sample_steps, generator=torch.Generator(device).manual_seed(0),
                       progress=False)
        bicubic = torch.nn.functional.interpolate(low_res, size=images.shape[-2:], mode="bicubic")
        return make_grid(tensor_to_pil(bicubic) + tensor_to_pil(out) + tensor_to_pil(images), cols=len(images))

    return Hooks(export=export, sample=sample)


# ---------------------------------------------------------------- entry points


def encode_pairs(clip: ClipEncoder, source, progress: bool,
                 with_input: bool = False) -> tuple[Dataset, torch.Tensor, dict, int]:
    """(the readable samples of source, their image_emb [N, D], encode_captions' per-unique-caption text
    encodings, how many samples were left out as unreadable)."""
    image_emb, kept = encode_readable_images(clip, source, progress=progress)
    if not kept:
        raise ValueError(f"no readable image-caption pairs in the data ({len(source)} samples, none loaded)")
    captions = getattr(source, "captions", None)
    captions = [captions[i] for i in kept] if captions is not None else [source[i]["caption"] for i in kept]
    skipped = len(source) - len(kept)
    source = Subset(source, kept) if skipped else source
    return source, image_emb, encode_captions(clip, captions, progress=progress, with_input=with_input), skipped


def check_oversample(oversample: Sequence[tuple[str, int]]) -> list[re.Pattern]:
    """The compiled patterns of [(regex, times), ...]; ValueError for a bad pattern or a factor below 1."""
    compiled = []
    for item in oversample:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"oversample takes (regex, times) pairs, got {item!r}")
        pattern, factor = item
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"oversample factor for {pattern!r} must be a whole number >= 1, got {factor!r}")
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(f"oversample pattern {pattern!r} is not a regular expression: {error}") from None
    return compiled


def oversample_rows(rows: torch.Tensor, captions: Sequence[str],
                    oversample: Sequence[tuple[str, int]]) -> tuple[torch.Tensor, list[list]]:
    """Repeat the rows whose caption matches a pattern: `oversample` is [(regex, times), ...] and a row is taken
    as many times as the largest factor among the patterns it matches (`re.search`; once if none).

    Returns (the rows, repeats kept together in data order, and [[regex, times, rows matched], ...]). A pattern
    that is not a regular expression, a factor below 1, or a pattern matching no caption raises ValueError.
    """
    times = torch.ones(len(rows), dtype=torch.long)
    matched = []
    for (pattern, factor), regex in zip(oversample, check_oversample(oversample)):
        hits = torch.tensor([bool(regex.search(captions[int(r)])) for r in rows], dtype=torch.bool)
        if not hits.any():
            raise ValueError(f"oversample pattern {pattern!r} matches none of the {len(rows)} training captions")
        times[hits] = torch.clamp(times[hits], min=factor)
        matched.append([pattern, factor, int(hits.sum())])
    return rows.repeat_interleave(times), matched


def encoded_once(clip: ClipEncoder, config: DecoderConfig, source, heldout: int, seed: int, progress: bool,
                 oversample: Sequence[tuple[str, int]] = ()):
    """Map-style data: (train set, held-out items for the grids, info, samples left out as unreadable)."""
    source, image_emb, text, skipped = encode_pairs(clip, source, progress, config.text_encoder == "clip+input")
    if config.text_encoder == "transformer":  # the decoder's own text transformer reads token ids [U, L]
        text = {**text, "text_tokens": clip.tokenize(text["captions"], warn=False)}
    train_rows, heldout_rows = split_heldout(len(image_emb), heldout, seed)
    shown_rows = heldout_rows if len(heldout_rows) else train_rows[:4]
    shown = torch.utils.data.default_collate(
        [DecoderDataset(source, shown_rows, image_emb, text, config.image_size)[i] for i in range(len(shown_rows))])
    info = {"train_samples": len(train_rows), "heldout_samples": len(heldout_rows)}
    if oversample:
        row_captions = [text["captions"][int(i)] for i in text["index"]]   # caption of each sample
        train_rows, info["oversample"] = oversample_rows(train_rows, row_captions, oversample)
        info["epoch_samples"] = len(train_rows)
    return DecoderDataset(source, train_rows, image_emb, text, config.image_size), shown, info, skipped


def streamed(clip: ClipEncoder, config: DecoderConfig, stream: IterableDataset, grid_items: int = 4):
    """Streamed shards: (the stream, its first `grid_items` readable items encoded for the grids, info).

    Nothing is read up front beyond those items (trained on too: a stream holds nothing out); the loss
    encodes each batch (`clip_encoded`).
    """
    first = list(itertools.islice(iter(stream), grid_items))
    if not first:
        raise ValueError("no readable image-caption pairs in the data (the stream's first samples could not be "
                         "read, or it is empty)")
    batch = encode_batch(clip, collate(first), config)
    batch = {k: batch[k] for k in ("image", "image_emb", "text_tokens", "mask")}
    return WithSkipped(stream), batch, {"train_samples": None, "heldout_samples": 0, "streamed": True}


def train_decoder(model_dir: str | os.PathLike, data, *, train_config: TrainConfig, preset: str = "tiny",
                  config: DecoderConfig | None = None, run_dir=None, resume: bool = False, heldout: int = 8,
                  sample_steps: int = 25, progress: bool = True, init_from=None,
                  oversample: Sequence[tuple[str, int]] = ()) -> Decoder:
    """Train MODEL_DIR/decoder on image-caption pairs (a folder, shards, or a data set of {"image", "caption"}).

    The frozen MODEL_DIR/clip encodes every image and unique caption of a map-style data set once, keeping up
    to `heldout` pairs out for the sample grids; streamed shards (an IterableDataset) are encoded batch by batch
    in the loss, and their first 4 items make the grids. The EMA weights are exported to MODEL_DIR/decoder.
    `init_from`: a decoder folder to start from (fine-tuning; `Decoder.warm_start`), instead of a fresh
    initialisation. `oversample`: [(regex, times), ...] to see the pairs whose caption matches more often
    (`oversample_rows`; map-style data only). Returns the EMA model.
    """
    model_dir = Path(model_dir)
    run_dir = Path(run_dir) if run_dir is not None else model_dir / "runs" / "decoder"
    check_oversample(oversample)  # before minutes of encoding
    clip = ClipEncoder.load(model_dir / "clip").eval().requires_grad_(False)
    if resume:
        config = _resumed_config(run_dir, "decoder", DecoderConfig) or config
    config = make_decoder_config(clip, preset, config)
    source = open_data(data, max(config.image_size, clip.image_size))
    if isinstance(source, IterableDataset):
        if oversample:
            raise ValueError("oversample needs map-style data (a folder of pairs), not streamed shards")
        train_set, shown, counts = streamed(clip, config, source)
        loss_fn, skipped = clip_encoded(clip, config), 0
    else:
        train_set, shown, counts, skipped = encoded_once(clip, config, source, heldout, train_config.seed, progress,
                                                         [tuple(o) for o in oversample])
        loss_fn = decoder_loss
    info = {"decoder": config_to_dict(config), "data": None if isinstance(data, Dataset) else str(data), **counts,
            "init_from": None if init_from is None else str(init_from)}
    torch.manual_seed(train_config.seed)  # a seeded initialisation: torch seeds each process at random
    model = Decoder(config) if init_from is None else Decoder(config).warm_start(init_from)
    return train(model, loss_fn, train_set, run_dir, train_config,
                 hooks=decoder_hooks(model_dir, shown, sample_steps), resume=resume, extra_info=info,
                 progress=progress, skipped=skipped)


def train_upsampler(model_dir: str | os.PathLike, data, size: int = 64, *, train_config: TrainConfig,
                    preset: str | None = None, config: UpsamplerConfig | None = None, run_dir=None,
                    resume: bool = False, heldout: int = 8, sample_steps: int = 25,
                    progress: bool = True) -> Upsampler:
    """Train MODEL_DIR/upsampler_{size} on the images of a data set (captions unused); exports EMA weights."""
    model_dir, folder = Path(model_dir), f"upsampler_{size}"
    run_dir = Path(run_dir) if run_dir is not None else model_dir / "runs" / folder
    if resume:
        config = _resumed_config(run_dir, "upsampler", UpsamplerConfig) or config
    config = config if config is not None else upsampler_preset(preset or f"tiny-{size}")
    if config.image_size != size:
        raise ValueError(f"the upsampler config makes {config.image_size} px images, not {size} px "
                         f"(choose a preset ending in -{size})")
    source = open_data(data, size)
    if isinstance(source, IterableDataset):  # a stream holds nothing out: its first 4 images make the grids
        train_set, shown = WithSkipped(source), [item["image"] for item in itertools.islice(iter(source), 4)]
    else:
        train_rows, heldout_rows = split_heldout(len(source), heldout, train_config.seed)
        shown_rows = heldout_rows if len(heldout_rows) else train_rows[:4]
        shown = [item["image"] for item in (read_or_skip(source, int(r)) for r in shown_rows) if item is not None]
        train_set = Subset(source, train_rows.tolist())
    if not shown:
        raise ValueError("no readable images in the data (the data set is empty, or its first samples could not be "
                         "read)")
    info = {"upsampler": config_to_dict(config), "data": None if isinstance(data, (Dataset, IterableDataset))
            else str(data), "size": size}
    torch.manual_seed(train_config.seed)  # a seeded initialisation: torch seeds each process at random
    return train(Upsampler(config), upsampler_loss, train_set, run_dir, train_config,
                 hooks=upsampler_hooks(model_dir, folder, torch.stack(shown), sample_steps), resume=resume,
                 extra_info=info, progress=progress)
