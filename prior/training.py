"""train_prior: encode the pairs once with the frozen CLIP, then run the one training loop on embeddings.

Under `accelerate launch` every process encodes the whole data set itself (deterministic, no collective);
at scale, precompute once in parallel with `accelerate launch -m cli embed` and train on --embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from unclip.checkpoint import update_model_index
from unclip.clip import ClipEncoder
from unclip.config import config_from_dict, config_to_dict, read_json
from unclip.data.embeddings import embed_pairs, is_embeddings_dir
from unclip.eval.prior import prior_metrics
from unclip.training import Hooks, TrainConfig, split_heldout, train

from .config import PriorConfig, prior_preset
from .loss import prior_loss
from .model import DiffusionPrior


class PriorDataset(Dataset):
    """Encoded pairs (`embed_pairs` output) as training items: image_emb, text_emb, text_tokens, mask."""

    def __init__(self, emb: dict, rows: torch.Tensor):
        self.emb, self.rows = emb, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        caption = int(self.emb["index"][row])
        return {"image_emb": self.emb["image_emb"][row], "text_emb": self.emb["text_emb"][row],
                "text_tokens": self.emb["text_tokens"][caption].float(), "mask": self.emb["mask"][caption]}


def subset(emb: dict, rows: torch.Tensor) -> dict:
    """The samples `rows` of encoded pairs (per-caption tensors are shared)."""
    return {**emb, "image_emb": emb["image_emb"][rows], "text_emb": emb["text_emb"][rows],
            "index": emb["index"][rows], "captions": [emb["captions"][int(r)] for r in rows]}


def make_prior_config(clip: ClipEncoder, preset: str = "tiny", config: PriorConfig | None = None) -> PriorConfig:
    """The preset (or given config) with D, W and L taken from the CLIP; a given config must agree with it."""
    dims = dict(embed_dim=clip.embed_dim, text_width=clip.text_width, context_length=clip.context_length)
    if config is None:
        return prior_preset(preset, **dims)
    wrong = {k: (getattr(config, k), v) for k, v in dims.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"prior config does not fit the CLIP (config, CLIP): {wrong}")
    return config


def _resumed_config(run_dir: Path) -> PriorConfig | None:
    """The prior config recorded by an earlier run in run_dir, if any."""
    path = run_dir / "train_config.json"
    saved = read_json(path).get("prior") if path.is_file() else None
    return config_from_dict(PriorConfig, saved) if saved else None


def _hooks(model_dir: Path, heldout: dict | None, eval_steps: int) -> Hooks:
    def export(ema: DiffusionPrior, step: int) -> None:
        ema.save(model_dir / "prior")
        update_model_index(model_dir)

    def evaluate(ema: DiffusionPrior, step: int) -> dict:
        metrics = prior_metrics(ema, heldout, num_steps=eval_steps)
        return {f"heldout_{k}": v for k, v in metrics.items() if k.startswith("cos")}

    return Hooks(export=export, evaluate=evaluate if heldout else None)


def train_prior(model_dir: str | os.PathLike, *, data=None, embeddings=None, train_config: TrainConfig,
                preset: str = "tiny", config: PriorConfig | None = None, run_dir=None, resume: bool = False,
                heldout: int = 256, eval_steps: int = 10, progress: bool = True) -> DiffusionPrior:
    """Train MODEL_DIR/prior on pairs (`data`: a data set or folder) or precomputed `embeddings` (a folder).

    Uses the frozen MODEL_DIR/clip; holds out up to `heldout` samples for cosine metrics; exports the EMA
    weights to MODEL_DIR/prior. With `resume`, the prior config recorded in the run folder is used.
    Returns the EMA model.
    """
    if (data is None) == (embeddings is None):
        raise ValueError("give exactly one of data (pairs) or embeddings (a precomputed embeddings folder)")
    if embeddings is not None and not is_embeddings_dir(embeddings):
        raise ValueError(f"{embeddings} is not an embeddings folder (expected img_emb/, text_emb/, metadata/ "
                         "written by `unclip embed`; for a folder of pairs use --data)")
    model_dir = Path(model_dir)
    run_dir = Path(run_dir) if run_dir is not None else model_dir / "runs" / "prior"
    clip = ClipEncoder.load(model_dir / "clip").eval().requires_grad_(False)
    config = make_prior_config(clip, preset, (_resumed_config(run_dir) if resume else None) or config)
    emb = embed_pairs(clip, data if data is not None else embeddings, progress=progress)
    train_rows, heldout_rows = split_heldout(len(emb["captions"]), heldout, train_config.seed)
    torch.manual_seed(train_config.seed)  # a seeded initialisation: torch seeds each process at random
    model = DiffusionPrior(config)
    model.set_image_statistics(emb["image_emb"][train_rows])  # sec. 2.1: unit variance before noising
    hooks = _hooks(model_dir, subset(emb, heldout_rows) if len(heldout_rows) else None, eval_steps)
    source = {"data": str(data) if data is not None and not isinstance(data, Dataset) else None,
              "embeddings": str(embeddings) if embeddings is not None else None}
    info = {"prior": config_to_dict(config), "source": source, "train_samples": len(train_rows),
            "heldout_samples": len(heldout_rows)}
    return train(model, prior_loss, PriorDataset(emb, train_rows), run_dir, train_config, hooks=hooks,
                 resume=resume, extra_info=info, progress=progress, skipped=emb["unreadable"])
