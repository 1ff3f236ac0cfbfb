"""Encode a data set with a frozen CLIP once: image embeddings per sample, text encodings per unique caption."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


def read_or_skip(dataset, i: int):
    """dataset[i], or None with a one-line warning when the sample cannot be read (a corrupt image file)."""
    try:
        return dataset[i]
    except (ValueError, OSError) as error:
        warnings.warn(f"skipping sample {i}: {error}", stacklevel=2)
        return None


class _Readable(Dataset):
    """(i, image or None) per sample of a dataset of {"image", ...}; unreadable samples give None."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = read_or_skip(self.dataset, i)
        return i, None if item is None else item["image"]


@torch.inference_mode()
def encode_readable_images(clip, dataset: Dataset, batch_size: int = 256,
                           progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """(image_emb [N', D], the N' indices it covers): encode_images over the samples that can be read; the
    others (corrupt images) are left out with a warning each."""
    loader = DataLoader(_Readable(dataset), batch_size=batch_size, collate_fn=list)
    embs, kept = [], []
    for items in tqdm(loader, desc="CLIP images", disable=not progress):
        good = [(i, image) for i, image in items if image is not None]
        if good:
            kept += [i for i, _ in good]
            embs.append(clip.encode_image(torch.stack([image for _, image in good])).cpu())  # [b, D]
    return (torch.cat(embs) if embs else torch.empty(0, clip.embed_dim)), kept


@torch.inference_mode()
def encode_images(clip, dataset: Dataset, batch_size: int = 256, progress: bool = True,
                  num_workers: int = 0) -> torch.Tensor:
    """image_emb [N, D] (float32, CPU) for every sample of a dataset of {"image": [3, S, S] in [-1, 1], ...}."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=lambda items: torch.stack([item["image"] for item in items]))
    out = [clip.encode_image(images).cpu() for images in tqdm(loader, desc="CLIP images", disable=not progress)]
    return torch.cat(out) if out else torch.empty(0, clip.embed_dim)


@torch.inference_mode()
def encode_captions(clip, captions: Sequence[str], batch_size: int = 256, progress: bool = True,
                    token_dtype: torch.dtype = torch.float16, with_input: bool = False) -> dict[str, torch.Tensor]:
    """Encode each unique caption once.

    Returns text_emb [U, D], text_tokens [U, L, W] (in `token_dtype` to save memory; [U, L, 2W] `with_input`,
    see ClipEncoder.text_forward), mask [U, L] for the U unique captions, and `index` [N] mapping each input
    caption to its row.
    """
    unique = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(unique)}
    embs, tokens, masks = [], [], []
    for start in tqdm(range(0, len(unique), batch_size), desc="CLIP text", disable=not progress):
        emb, tok, mask = clip.encode_text(unique[start:start + batch_size], with_input=with_input)
        embs.append(emb.cpu())
        tokens.append(tok.to(token_dtype).cpu())
        masks.append(mask.cpu())
    return {"text_emb": torch.cat(embs), "text_tokens": torch.cat(tokens), "mask": torch.cat(masks),
            "index": torch.tensor([row[c] for c in captions], dtype=torch.long), "captions": unique}
