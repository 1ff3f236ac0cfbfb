"""Image-caption datasets: a folder of pairs (img2dataset "files" layout) and webdataset shards.

Both yield `{"image": [3, S, S] float tensor in [-1, 1], "caption": str, "key": str}`.

    folder/00000.png  folder/00000.txt  [folder/00000.json]      (also nested: folder/00000/000000000.jpg ...)
    shards/00000.tar  containing  key.png  key.txt  key.json     (img2dataset webdataset layout)
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from unclip.images import MAX_IMAGE_SIDE, load_image, pil_to_tensor, to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
LAYOUT_HINT = ("expected img2dataset 'files' layout: NNNNN.png|jpg|jpeg|webp with a same-stem NNNNN.txt caption "
               "(optional NNNNN.json), e.g. 00000.png + 00000.txt")


def _scan(root: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    """Map key (relative path without extension) -> image / caption / metadata file, walking subfolders."""
    images, texts, metas = {}, {}, {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            key = path.relative_to(root).with_suffix("").as_posix()
            ext = path.suffix.lower()
            if ext in IMAGE_EXTENSIONS:
                if key in images:
                    raise ValueError(f"two images share the key {key!r}: {images[key].name} and {name}")
                images[key] = path
            elif ext == ".txt":
                texts[key] = path
            elif ext == ".json":
                metas[key] = path
    return images, texts, metas


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"caption file is not UTF-8 text: {path}") from None


class ImageTextFolder(Dataset):
    """A folder of image-caption pairs; images without a (non-empty) caption are skipped and counted."""

    def __init__(self, root: str | os.PathLike, image_size: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data folder not found: {self.root} ({LAYOUT_HINT})")
        images, texts, metas = _scan(self.root)
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.skipped_missing_caption = 0
        for key in sorted(images):
            text = _read_caption(texts[key]) if key in texts else ""
            if not text:
                self.skipped_missing_caption += 1
                continue
            self.keys.append(key)
            self.captions.append(text)
        if not self.keys:
            raise ValueError(f"no image-caption pairs in {self.root} ({len(images)} images, {len(texts)} captions); "
                             f"{LAYOUT_HINT}")
        if self.skipped_missing_caption:
            warnings.warn(f"{self.root}: skipping {self.skipped_missing_caption} image(s) without a caption "
                          "(no or empty same-stem .txt file)", stacklevel=2)
        self.image_paths = [images[k] for k in self.keys]
        self.meta_paths = [metas.get(k) for k in self.keys]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        image = load_image(self.image_paths[i])  # ValueError naming the file when corrupt
        return {"image": pil_to_tensor(image, self.image_size)[0], "caption": self.captions[i], "key": self.keys[i]}

    def metadata(self, i: int) -> dict:
        """The pair's .json sidecar as a dict ({} when there is none)."""
        path = self.meta_paths[i]
        if path is None:
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"corrupt JSON in {path}: {error}") from None


# ---------------------------------------------------------------- webdataset shards

def write_shards(folder_dataset_root: str | os.PathLike, out_dir: str | os.PathLike,
                 shard_size: int = 1000) -> list[str]:
    """Pack a folder of pairs into webdataset shards out_dir/00000.tar ... (raw file bytes, no re-encoding)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = ImageTextFolder(folder_dataset_root)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.glob("*.tar")):
        raise ValueError(f"{out_dir} already holds .tar shards; delete them or choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(folder), shard_size):
        path = out_dir / f"{start // shard_size:05d}.tar"
        _write_shard(path, folder, range(start, min(start + shard_size, len(folder))))
        paths.append(str(path))
    return paths


def _write_shard(path: Path, folder: ImageTextFolder, indices: range) -> None:
    """Write one tar atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with wds.TarWriter(str(tmp), encoder=False) as sink:
            for i in indices:
                image_path = folder.image_paths[i]
                sample = {"__key__": folder.keys[i], image_path.suffix.lower().lstrip("."): image_path.read_bytes(),
                          "txt": folder.captions[i].encode("utf-8")}
                if folder.meta_paths[i] is not None:
                    sample["json"] = folder.meta_paths[i].read_bytes()
                sink.write(sample)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", url) is not None


def _expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Brace-expand shard patterns; local files must exist."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    expanded = [u for item in items for u in braceexpand.braceexpand(str(item))]
    if not expanded:
        raise ValueError("no shard URLs given (expected e.g. shards/{00000..00009}.tar)")
    missing = [u for u in expanded if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} shard file(s) not found, e.g. {missing[0]}")
    return expanded


def decode_sample(sample: dict, image_size: int | None = None) -> dict:
    """A raw webdataset sample (bytes per extension) -> {"image", "caption", "key"}; ValueError when unusable."""
    key = sample.get("__key__", "?")
    ext = next((e.lstrip(".") for e in IMAGE_EXTENSIONS if e.lstrip(".") in sample), None)
    if ext is None or "txt" not in sample:
        raise ValueError(f"sample {key!r} lacks an image or a txt caption (has {sorted(sample)})")
    caption = sample["txt"].decode("utf-8", errors="strict").strip()
    if not caption:
        raise ValueError(f"sample {key!r} has an empty caption")
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise ValueError(f"sample {key!r}: image too large ({image.size})")
            image.load()
            image = to_rgb(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"sample {key!r}: corrupt image ({error.__class__.__name__}: {error})") from None
    return {"image": pil_to_tensor(image, image_size)[0], "caption": caption, "key": key}


def check_shard_split(num_shards: int, processes: int, workers: int, warn: bool = True) -> None:
    """Shards are dealt round-robin to processes, then to each process's DataLoader workers.

    Fewer shards than processes raises (a process would get no data and wait forever on the others). Fewer
    shards than processes x workers, or a count that does not divide evenly, warns: within one pass every
    sample is still read exactly once, but some slots read one shard more (or none), so over many passes
    (each process cycles its own shards) those samples are seen more often.
    """
    if num_shards < processes:
        raise ValueError(f"{num_shards} shard(s) cannot feed {processes} processes: every process needs at least "
                         "one (write smaller shards, e.g. `unclip data shards --shard-size`)")
    slots = processes * max(workers, 1)
    if warn and num_shards % slots:
        warnings.warn(f"{num_shards} shards over {processes} process(es) x {max(workers, 1)} worker(s): some read "
                      f"{num_shards // slots + 1} shards per pass and others {num_shards // slots}; use a multiple "
                      f"of {slots} shards for an even split", stacklevel=3)


class ShardDataset(IterableDataset):
    """Stream image-caption pairs from webdataset shards; split across processes and workers; bad samples skipped.

    With `split` (the default) process r of P reads shards r, r + P, ... (webdataset's split_by_node, from
    RANK/WORLD_SIZE or torch.distributed) and its DataLoader worker w of W every W-th of those
    (split_by_worker): each shard is read by exactly one (process, worker) slot per pass. See
    `check_shard_split` for uneven counts. `unsplit()` gives a copy that every process reads whole.
    """

    def __init__(self, urls: str | os.PathLike | Sequence[str | os.PathLike], image_size: int | None = None,
                 split: bool = True):
        self.urls = _expand_urls(urls)
        self.image_size = image_size
        self.split = split
        self.skipped = 0  # bad samples skipped in this process (each DataLoader worker counts its own)

    def unsplit(self) -> "ShardDataset":
        """The same shards, read whole by every process (still split across one process's workers)."""
        return ShardDataset(self.urls, self.image_size, split=False)

    def _skip(self, error: Exception) -> bool:
        """webdataset handler: warn, count, continue."""
        self.skipped += 1
        shard = next((a for a in reversed(error.args) if isinstance(a, str) and a.endswith(".tar")), None)
        if shard is not None:  # the tar stream itself failed (webdataset appends the shard to the arguments)
            warnings.warn(f"skipping the rest of corrupt shard {shard}: {error.args[0]}", stacklevel=2)
        else:
            warnings.warn(f"skipping bad sample: {error}", stacklevel=2)
        return True

    def _decode(self, sample: dict) -> dict:
        return decode_sample(sample, self.image_size)

    def __iter__(self) -> Iterator[dict]:
        rank, processes, worker, workers = wds.utils.pytorch_worker_info()
        if self.split:
            check_shard_split(len(self.urls), processes, workers, warn=rank == 0 and worker == 0)
        nodesplitter = wds.split_by_node if self.split else None
        pipeline = wds.WebDataset(self.urls, handler=self._skip, nodesplitter=nodesplitter,
                                  workersplitter=wds.split_by_worker, shardshuffle=False, empty_check=False)
        return iter(pipeline.map(self._decode, handler=self._skip))


def open_dataset(path: str | os.PathLike, image_size: int | None = None) -> ImageTextFolder | ShardDataset:
    """A folder of pairs -> ImageTextFolder; a .tar, a folder of .tar shards, a brace pattern or URL -> ShardDataset."""
    text = str(path)
    if _is_remote(text) or "{" in text:
        return ShardDataset(text, image_size)
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise ValueError(f"{path} is a file but not a .tar shard ({LAYOUT_HINT})")
        return ShardDataset([str(path)], image_size)
    if not path.is_dir():
        raise ValueError(f"data not found: {path} (a folder of pairs, a folder of .tar shards, a .tar, "
                         "or a pattern like shards/{00000..00009}.tar)")
    shards = sorted(path.glob("*.tar"))
    has_pairs = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
    if shards and not has_pairs:
        return ShardDataset([str(s) for s in shards], image_size)
    return ImageTextFolder(path, image_size)
