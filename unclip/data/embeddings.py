"""Precomputed CLIP embeddings in the clip-retrieval / embedding-reader layout, written in resumable shards.

    emb_dir/img_emb/img_emb_{i}.npy        [n_i, D] float16 or float32, l2-normalised image embeddings
    emb_dir/text_emb/text_emb_{i}.npy      [n_i, D] text embeddings of the captions
    emb_dir/metadata/metadata_{i}.parquet  columns caption, key (one row per embedding, same order)

Shard i holds samples [i * shard_size, (i + 1) * shard_size) of the data set, or, for webdataset shards, the
samples of input shard i (one output shard per input shard; the list is kept in input_shards.json). Each file
is written atomically (temp + rename), metadata last, so a shard with all three files is complete; a rerun
skips complete shards. Under `accelerate launch` process r of P writes shards r, r + P, ...
(`write_embeddings_distributed`), so a restart with another number of processes finishes the same folder.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from .encode import encode_captions, read_or_skip

SUBDIRS = {"image": ("img_emb", "img_emb_{}.npy"), "text": ("text_emb", "text_emb_{}.npy"),
           "meta": ("metadata", "metadata_{}.parquet")}
DTYPES = {"float16": np.float16, "float32": np.float32}


def _path(out_dir: Path, part: str, i: int) -> Path:
    folder, name = SUBDIRS[part]
    return out_dir / folder / name.format(i)


def _shard_rows(out_dir: Path, i: int) -> int | None:
    """Rows of shard i if all its files exist (a complete shard), else None."""
    if not all(_path(out_dir, part, i).is_file() for part in SUBDIRS):
        return None
    return pq.ParquetFile(_path(out_dir, "meta", i)).metadata.num_rows


def _shard_unreadable(out_dir: Path, i: int) -> int:
    """Input samples of complete shard i that could not be read (recorded in its metadata file)."""
    meta = pq.ParquetFile(_path(out_dir, "meta", i)).schema_arrow.metadata or {}
    return int(meta.get(b"unreadable_samples", 0))


def _atomic(path: Path, write) -> None:
    """Run `write(tmp_path)` and rename the temp file into place."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _shards(dataset, shard_size: int) -> Iterator[tuple[int, Iterable[dict], int | None]]:
    """(shard index, its items, expected size or None when unknown) over a map-style or iterable data set."""
    if isinstance(dataset, IterableDataset):
        items = iter(dataset)
        for i in itertools.count():
            chunk = list(itertools.islice(items, shard_size))
            if not chunk:
                return
            yield i, chunk, None
    else:
        n = len(dataset)
        for i, start in enumerate(range(0, n, shard_size)):
            size = min(shard_size, n - start)
            yield i, (read_or_skip(dataset, j) for j in range(start, start + size)), size


def _input_shards(dataset) -> Iterator[tuple[int, Iterable[dict], None]]:
    """(i, the samples of input shard i, None) for a ShardDataset; nothing is read until iterated."""
    for i, url in enumerate(dataset.urls):
        yield i, type(dataset)([url], dataset.image_size, split=False), None


def _check_input_shards(out_dir: Path, urls: list[str], rank: int) -> None:
    """A rerun must see the same input shard list (output shard i is input shard i)."""
    from ..config import read_json, write_json

    path = out_dir / "input_shards.json"
    if path.is_file():
        if read_json(path) != urls:
            raise ValueError(f"{out_dir} was embedded from another list of input shards ({path}); "
                             "use the same --data or a new output folder")
    elif rank == 0:
        write_json(path, urls)


@torch.inference_mode()
def _encode_items(clip, items: Iterable[dict | None], batch_size: int):
    """(image_emb [n, D], captions, keys, unreadable) for items {"image": [3, S, S], "caption", "key"}, each image
    read once; None items (samples that could not be read) are skipped and counted in `unreadable`."""
    image_embs, captions, keys, images, unreadable, end = [], [], [], [], 0, object()
    for item in itertools.chain(items, [end]):
        if item is None:
            unreadable += 1
            continue
        if item is not end:
            images.append(item["image"])
            captions.append(item["caption"])
            keys.append(str(item.get("key", len(keys))))
        if images and (item is end or len(images) == batch_size):
            image_embs.append(clip.encode_image(torch.stack(images)).cpu())  # [b, 3, S, S] -> [b, D]
            images = []
    image_emb = torch.cat(image_embs) if image_embs else torch.zeros(0, clip.embed_dim)
    return image_emb, captions, keys, unreadable


def write_embeddings(clip, dataset, out_dir: str | os.PathLike, shard_size: int = 10_000, batch_size: int = 256,
                     dtype: str = "float16", progress: bool = True, rank: int = 0, world: int = 1) -> dict:
    """Encode a data set of {"image", "caption", "key"} with CLIP into `out_dir` shards; resumable by shard.

    A ShardDataset gives one output shard per input shard (shard_size unused). With `world` > 1 this call
    writes only shards rank, rank + world, ... (one process of several; see write_embeddings_distributed).
    Returns {"shards", "written", "skipped", "count"} of the shards this call handled. Samples that cannot be
    read (corrupt images) are left out with a warning each and counted in the shard's metadata file.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    out_dir = Path(out_dir)
    for folder, _ in SUBDIRS.values():
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    per_input = hasattr(dataset, "urls") and hasattr(dataset, "unsplit")  # webdataset shards
    if per_input:
        _check_input_shards(out_dir, dataset.urls, rank)
    written = skipped = count = 0
    bar = tqdm(desc="embedding shards", unit="shard", disable=not progress)
    for i, items, size in _input_shards(dataset) if per_input else _shards(dataset, shard_size):
        if i % world != rank:
            continue
        rows = _shard_rows(out_dir, i)
        if rows is not None and size is None and not per_input:
            items = list(items)  # iterable data: the shard's items were read; check their count
            size = len(items)
        if rows is not None:
            if size is not None and rows + _shard_unreadable(out_dir, i) != size:
                raise ValueError(f"{out_dir} shard {i} holds {rows} rows but shard_size {shard_size} gives {size}; "
                                 "use the shard size of the earlier run or a new output folder")
            skipped, count = skipped + 1, count + rows
        else:
            image_emb, captions, keys, bad = _encode_items(clip, items, batch_size)
            bad += getattr(items, "skipped", 0)  # a ShardDataset counts the samples (or shard) it skipped
            text_emb = torch.zeros(0, clip.embed_dim)  # an input shard without usable samples: an empty shard
            if captions:
                text = encode_captions(clip, captions, batch_size=batch_size, progress=False)
                text_emb = text["text_emb"][text["index"]]  # [U, D] -> [n, D]
            _write_shard(out_dir, i, image_emb, text_emb, captions, keys, DTYPES[dtype], unreadable=bad)
            written, count = written + 1, count + len(keys)
        bar.update(1)
    bar.close()
    return {"shards": written + skipped, "written": written, "skipped": skipped, "count": count}


def write_embeddings_distributed(clip, dataset, out_dir: str | os.PathLike, progress: bool = True, **kw) -> dict:
    """write_embeddings in every process of `accelerate launch`, each on its own device; plain without it.

    Process r writes shards r, r + P, ...; returns the totals over all processes (on every process).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return write_embeddings(clip, dataset, out_dir, progress=progress, **kw)
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    clip = clip.to(state.device)
    mine = write_embeddings(clip, dataset, out_dir, progress=progress and state.is_main_process,
                            rank=state.process_index, world=state.num_processes, **kw)
    results = gather_object([mine])
    state.wait_for_everyone()
    return {k: sum(r[k] for r in results) for k in mine}


def _write_shard(out_dir: Path, i: int, image_emb, text_emb, captions, keys, dtype, unreadable: int = 0) -> None:
    """Write one shard: the two .npy files, then the metadata that marks the shard complete (it also records
    how many input samples could not be read)."""
    for part, emb in (("image", image_emb), ("text", text_emb)):
        array = emb.float().numpy().astype(dtype)
        _atomic(_path(out_dir, part, i), lambda tmp, a=array: np.save(tmp, a))
    table = pa.table({"caption": pa.array(captions, pa.string()), "key": pa.array(keys, pa.string())},
                     metadata={"unreadable_samples": str(unreadable)})
    _atomic(_path(out_dir, "meta", i), lambda tmp: pq.write_table(table, tmp))


def _shard_indices(emb_dir: Path) -> list[int]:
    folder, _ = SUBDIRS["image"]
    found = [re.fullmatch(r"img_emb_(\d+)\.npy", p.name) for p in (emb_dir / folder).glob("img_emb_*.npy")]
    return sorted(int(m.group(1)) for m in found if m)


def read_embeddings(emb_dir: str | os.PathLike) -> dict:
    """Read all shards: image_emb [N, D] and text_emb [N, D] (float32 tensors), captions and keys (lists)."""
    emb_dir = Path(emb_dir)
    if not emb_dir.is_dir():
        raise ValueError(f"embeddings folder not found: {emb_dir}")
    missing = [folder for folder, _ in SUBDIRS.values() if not (emb_dir / folder).is_dir()]
    if missing:
        raise ValueError(f"{emb_dir} is not an embeddings folder: missing {missing} "
                         "(expected img_emb/, text_emb/, metadata/ as written by `unclip embed`)")
    indices = _shard_indices(emb_dir)
    if not indices:
        raise ValueError(f"no img_emb/img_emb_*.npy shards in {emb_dir}")
    images, texts, captions, keys = [], [], [], []
    for i in indices:
        image, text, table = _read_shard(emb_dir, i)
        if images and image.shape[1] != images[0].shape[1]:
            raise ValueError(f"shard {i} in {emb_dir} has D={image.shape[1]} but shard {indices[0]} has "
                             f"D={images[0].shape[1]}")
        images.append(image)
        texts.append(text)
        captions += table.column("caption").to_pylist()
        keys += table.column("key").to_pylist() if "key" in table.column_names else [str(len(keys) + j)
                                                                                   for j in range(len(image))]
    image_emb, text_emb = torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(texts))
    return {"image_emb": image_emb.float(), "text_emb": text_emb.float(), "captions": captions, "keys": keys}


def _read_shard(emb_dir: Path, i: int):
    """(image [n, D], text [n, D], metadata table) of shard i, checking that they agree."""
    for part in SUBDIRS:
        if not _path(emb_dir, part, i).is_file():
            raise ValueError(f"incomplete shard {i} in {emb_dir}: missing {_path(emb_dir, part, i).name} "
                             "(rerun `unclip embed` with the same options to finish it)")
    try:
        image, text = np.load(_path(emb_dir, "image", i)), np.load(_path(emb_dir, "text", i))
        table = pq.read_table(_path(emb_dir, "meta", i))
    except (OSError, ValueError, pa.ArrowException) as error:
        raise ValueError(f"corrupt shard {i} in {emb_dir}: {error}") from None
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"shard {i} in {emb_dir}: image embeddings {image.shape} and text embeddings "
                         f"{text.shape} must both be [n, D] with the same D")
    if not (len(image) == len(text) == table.num_rows):
        raise ValueError(f"shard {i} in {emb_dir}: {len(image)} image embeddings, {len(text)} text embeddings "
                         f"and {table.num_rows} metadata rows (they must match)")
    if "caption" not in table.column_names:
        raise ValueError(f"shard {i} in {emb_dir}: metadata has no 'caption' column ({table.column_names})")
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise ValueError(f"shard {i} in {emb_dir} holds NaN or infinite embeddings; re-run `unclip embed` into a "
                         "new folder")
    return image, text, table


# ---------------------------------------------------------------- a data set, encoded once, for the prior


def _limited(dataset, limit: int | None):
    """The first `limit` items of a map-style or iterable data set."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if isinstance(dataset, IterableDataset):
        return iter(dataset) if limit is None else itertools.islice(iter(dataset), limit)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return (read_or_skip(dataset, i) for i in range(n))  # None for a sample that cannot be read


def is_embeddings_dir(path) -> bool:
    """True for a folder in the layout above (it has img_emb/)."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / SUBDIRS["image"][0]).is_dir()


def embed_pairs(clip, source, *, limit: int | None = None, batch_size: int = 256, progress: bool = True) -> dict:
    """A data set of pairs (or a folder of pairs / of embeddings) encoded once with a frozen CLIP.

    Returns image_emb [N, D], text_emb [N, D], captions (N), and per unique caption text_tokens [U, L, W]
    (float16), mask [U, L] with `index` [N] mapping each sample to its caption's row; `unreadable` counts the
    samples left out because they could not be read (corrupt images, with a warning each).
    """
    unreadable = 0
    if is_embeddings_dir(source):
        emb = read_embeddings(source)
        n = len(emb["captions"]) if limit is None else min(limit, len(emb["captions"]))
        image_emb, text_emb, captions = emb["image_emb"][:n], emb["text_emb"][:n], emb["captions"][:n]
    else:
        if isinstance(source, (str, os.PathLike)):
            from .datasets import open_dataset
            source = open_dataset(source, clip.image_size)
        source = source.unsplit() if hasattr(source, "unsplit") else source  # shards: every process reads all
        image_emb, captions, _, unreadable = _encode_items(clip, tqdm(_limited(source, limit), desc="CLIP images",
                                                                      disable=not progress), batch_size)
        unreadable += getattr(source, "skipped", 0)  # samples a ShardDataset skipped
        text_emb = None
    if not captions:
        raise ValueError(f"the data set is empty: no readable image-caption pairs to encode ({unreadable} "
                         "unreadable samples skipped)")
    text = encode_captions(clip, captions, batch_size=batch_size, progress=progress)
    if text_emb is None:
        text_emb = text["text_emb"][text["index"]]  # [U, D] -> [N, D]
    _check_same_clip(clip, text_emb, text["text_emb"][text["index"]], source)
    return {"image_emb": image_emb, "text_emb": text_emb, "captions": captions, "text_tokens": text["text_tokens"],
            "mask": text["mask"], "index": text["index"], "unreadable": unreadable}


def _check_same_clip(clip, stored: torch.Tensor, fresh: torch.Tensor, source) -> None:
    """Precomputed text embeddings must come from this CLIP (same D, nearly the same vectors)."""
    if stored.shape[1] != clip.embed_dim:
        raise ValueError(f"embeddings in {source} have D={stored.shape[1]} but the CLIP has D={clip.embed_dim}")
    cos = float(torch.nn.functional.cosine_similarity(stored.float(), fresh.float(), dim=-1).mean())
    if cos < 0.99:
        raise ValueError(f"the text embeddings in {source} were not made by this CLIP (mean cosine {cos:.3f} "
                         "to a fresh encoding of their captions); re-run `unclip embed` with it")
