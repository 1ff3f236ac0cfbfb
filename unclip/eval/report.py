"""`unclip eval model`: the quality report of a model (prior, images, shapes oracle) as JSON and Markdown.

- prior: cos(predicted, true image embedding) against the text-embedding baseline on held-out captions;
- images: CLIP R-precision (rank all test captions for each generated image, top-1 / top-5) and the Fréchet
  distance between CLIP image features of generated and held-out real images, next to the same distance for a
  "nearest training image" baseline (for each test caption, the training image CLIP ranks first);
- shapes: the oracle's accuracy per scene kind and on held-out colour-shape pairs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import read_json
from ..data.datasets import ImageTextFolder
from ..data.encode import encode_images
from ..images import make_grid, save_png
from .metrics import frechet_distance, r_precision


def _subset(folder: ImageTextFolder, n: int, seed: int) -> list[int]:
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:n])


def generate_for_captions(pipe, captions: list[str], batch_size: int = 64, seed: int = 0, **settings) -> list:
    """One image per caption; caption i uses seed + i, so any subset re-creates the same images."""
    images = []
    for start in range(0, len(captions), batch_size):
        out = pipe.generate(captions[start:start + batch_size], seed=seed + start, **settings)
        images.extend(out.images)
    return images


def image_metrics(pipe, generated: list, captions: list[str], real: torch.Tensor, train: ImageTextFolder) -> dict:
    """R-precision of generated images and FD (generated vs real) beside the nearest-training-image baseline."""
    unique = sorted(set(captions))
    text_emb = pipe.clip.encode_text(unique)[0].cpu()                       # [C, D]
    gen_emb = pipe.clip.encode_image(generated).cpu()                       # [N, D]
    target = [unique.index(c) for c in captions]
    train_emb = encode_images(pipe.clip, train, progress=False)             # [M, D]
    nearest = (text_emb[target] @ train_emb.T).argmax(dim=1)                # best training image per caption
    return {"r_precision": r_precision(gen_emb, text_emb, target),
            "fd_generated": frechet_distance(gen_emb, real),
            "fd_nearest_training_image": frechet_distance(train_emb[nearest], real),
            "n_images": len(generated), "n_captions": len(unique)}


def evaluate_model(model: str | os.PathLike, test: str | os.PathLike, train: str | os.PathLike,
                   n: int = 200, seed: int = 0, grid: str | os.PathLike | None = None, shapes: bool | None = None,
                   progress: bool = False, fresh: int = 0, **settings) -> dict:
    """The full report for one model: prior, image metrics, shapes oracle (when the data are shapes). `fresh` > 0
    also scores the oracle on that many captions drawn afresh from the shapes grammar (`fresh_captions`), in
    report["shapes_fresh"] with the number of them that neither split lists."""
    from ..pipeline import UnCLIPPipeline
    from .prior import evaluate_prior

    split = Path(test).parent / "split.json"
    shapes = shapes if shapes is not None else split.is_file()
    if fresh and not shapes:
        raise ValueError("fresh captions are drawn from the shapes grammar: give shapes data (a test folder with "
                         "split.json beside it)")
    pipe = UnCLIPPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=not progress)
    test_set = ImageTextFolder(test, pipe.image_size)
    rows = _subset(test_set, n, seed)
    captions = [test_set.captions[i] for i in rows]
    generated = generate_for_captions(pipe, captions, seed=seed, **settings)
    real = pipe.clip.encode_image(torch.stack([test_set[i]["image"] for i in rows])).cpu()
    train_set = ImageTextFolder(train, pipe.clip.image_size)
    used = pipe.settings(**settings)  # the defaults, the model's own sampling defaults, then `settings`
    report = {"model": str(model), "settings": settings, "model_sampling": pipe.sampling, "seed": seed,
              "prior": evaluate_prior((pipe.clip, pipe.prior), torch.utils.data.Subset(test_set, rows),
                                      guidance_scale=used.prior_guidance, num_steps=used.prior_steps,
                                      progress=False),
              "images": image_metrics(pipe, generated, captions, real, train_set)}
    if shapes:
        from ..data.shapes import DEFAULT_HELD_OUT, fresh_captions
        from .shapes import evaluate
        held_out = [tuple(p) for p in read_json(split)["held_out"]] if split.is_file() else DEFAULT_HELD_OUT
        report["shapes"] = evaluate(generated, captions, held_out)
        if fresh:
            drawn = fresh_captions(fresh, seed, held_out)
            images = generate_for_captions(pipe, drawn, seed=seed + n, **settings)  # noise no test caption had
            listed = set(test_set.captions) | set(train_set.captions)
            report["shapes_fresh"] = {**evaluate(images, drawn, held_out),
                                      "unlisted": sum(c not in listed for c in drawn)}
    if grid:
        save_png(make_grid(generated[:32], cols=8).quantize(256), grid)  # a 256-colour palette: half the bytes
        report["grid"] = str(grid)
    return report


def markdown(name: str, report: dict) -> str:
    """A MODELS.md section for one model's report."""
    p, im = report["prior"], report["images"]
    lines = [f"## {name}", "", f"Model `{report['model']}`, {im['n_images']} held-out captions, seed {report['seed']}.", "",
             "| prior (held-out captions) | value |", "|---|---|",
             f"| cos(predicted, true image emb), 2 candidates | {p['cos_pred_c2']:.3f} |",
             f"| cos(predicted, true image emb), 1 candidate | {p['cos_pred_c1']:.3f} |",
             f"| baseline cos(text emb, true image emb) | {p['cos_text']:.3f} |",
             f"| cos(predicted, image emb of an unrelated caption) | {_fmt(p['cos_pred_unrelated'])} |",
             f"| ceiling: cos(mean image emb of the caption, true) | {_fmt(p['cos_caption_mean'])} |",
             f"| FD of the sampled image embs to the true ones (text embs as baseline) | "
             f"{_fmt(p.get('fd_pred'))} ({_fmt(p.get('fd_text'))}) |",
             "", "| images | value |", "|---|---|",
             f"| CLIP R-precision top-1 / top-5 | {im['r_precision']['top1']:.3f} / {im['r_precision']['top5']:.3f} |",
             f"| FD in CLIP space, generated vs held-out real | {im['fd_generated']:.4f} |",
             f"| FD, nearest training image baseline | {im['fd_nearest_training_image']:.4f} |"]
    if "shapes" in report:
        lines += _oracle_table("shapes oracle", report["shapes"])
    if "shapes_fresh" in report:
        s = report["shapes_fresh"]
        lines += _oracle_table(f"shapes oracle, captions drawn afresh from the grammar ({s['unlisted']} of "
                               f"{s['n']['overall']} in neither split)", s)
    if report.get("grid"):
        lines += ["", f"![{name} samples]({Path(report['grid']).name})"]
    return "\n".join(lines) + "\n"


def _oracle_table(title: str, scores: dict) -> list[str]:
    rows = [f"| {kind} | {_fmt(scores[kind])} | {scores['n'][kind]} |"
            for kind in ("overall", "single", "placed", "relation", "count", "held_out")]
    return ["", f"| {title} | accuracy | prompts |", "|---|---|---|", *rows]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def update_markdown(path: str | os.PathLike, name: str, section: str) -> None:
    """Replace the `## name` section of a Markdown file (or append it), atomically."""
    path = Path(path)
    text = path.read_text() if path.is_file() else "# Models\n\nGenerated by `unclip eval model`.\n\n"
    parts = text.split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    sections = [s for s in sections if s.splitlines()[0] != f"## {name}"] + [section]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(head.rstrip("\n") + "\n\n" + "\n".join(s.rstrip("\n") + "\n" for s in sections))
    os.replace(tmp, path)
