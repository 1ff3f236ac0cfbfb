"""The `unclip` command line: parses and validates options, then calls library functions (no tensor math here).

Examples:

    unclip generate "a red apple" -o apple.png
    unclip data shapes --out data/shapes --n 20000 --seed 0
    unclip train clip --data data/shapes/train --out models/shapes --preset tiny-32
"""

from __future__ import annotations

import functools
import sys

import click


def friendly_errors(fn):
    """Turn library ValueErrors (bad input) into one-line click errors; --debug shows the traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
            raise click.ClickException(message) from None
    return wrapper


@click.group()
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="unclip")
def main(debug):
    """unclip: text-to-image with a CLIP prior and a diffusion decoder (DALL-E 2 style)."""


def train_options(fn):
    """Options every `unclip train ...` command shares (they fill a unclip.training.TrainConfig)."""
    options = [
        # Length and batch
        click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Samples per process per micro-step."),
        click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Micro-batches per optimizer step."),
        # Optimizer
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True,
                     help="Peak learning rate (AdamW)."),
        click.option("--warmup", type=click.IntRange(min=0), default=200, show_default=True,
                     help="Linear warm-up steps."),
        click.option("--grad-clip", type=click.FloatRange(min=0), default=1.0, show_default=True,
                     help="Max gradient norm (0 disables)."),
        click.option("--ema", "ema_decay", type=click.FloatRange(0, 1), default=0.999, show_default=True,
                     help="EMA decay of the exported weights."),
        # Run
        click.option("--bf16", is_flag=True, help="bf16 autocast (faster on CPUs with bf16 matmul and on GPUs)."),
        click.option("--cpu", is_flag=True, help="Train on the CPU even when a GPU is present."),
        click.option("--run-dir", type=click.Path(file_okay=False), default=None,
                     help="Checkpoints, samples and metrics.csv [default: MODEL/runs/<component>]."),
        click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the run folder."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True,
                     help="Steps between checkpoints (and exports)."),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="DataLoader worker processes."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of data order and noise."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def make_train_config(kw: dict, **extra):
    """Pop the shared training options out of a command's kwargs into a TrainConfig."""
    from unclip.training import TrainConfig

    names = dict(steps="steps", batch_size="batch_size", grad_accum="grad_accum", lr="lr", warmup="warmup_steps",
                 grad_clip="grad_clip", ema_decay="ema_decay", cpu="cpu", checkpoint_every="checkpoint_every",
                 workers="num_workers", seed="seed")
    values = {field: kw.pop(option) for option, field in names.items()}
    values["mixed_precision"] = "bf16" if kw.pop("bf16") else "no"
    return TrainConfig(**values, **extra)


@main.group()
def data():
    """Build data sets (shapes world, emoji)."""


@main.group()
def train():
    """Train a component: clip, prior, decoder, upsampler."""


@main.group("eval")
def eval_():
    """Evaluate a model and write JSON reports."""


# ---------------------------------------------------------------- data commands (unclip data ...)
# DATA-COMMANDS-BEGIN
def _parse_pairs(text: str) -> list[tuple[str, str]]:
    """'purple-triangle,orange-circle' -> [('purple', 'triangle'), ('orange', 'circle')]; '' -> []."""
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        color, sep, shape = item.partition("-")
        if not sep:
            raise ValueError(f"--held-out: expected COLOR-SHAPE items like purple-triangle, got {item!r}")
        pairs.append((color, shape))
    return pairs


@data.command("shapes")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Output folder (train/, test/, split.json).")
@click.option("--n", type=click.IntRange(min=1), default=20000, show_default=True, help="Scenes in all (train + test).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same data).")
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of scenes in the test split.")
@click.option("--held-out", default="purple-triangle,orange-circle,green-square", show_default=True,
              help="Colour-shape pairs seen only in the test split ('' for none).")
@friendly_errors
def data_shapes(out, n, seed, test_fraction, held_out):
    """Render the shapes world, e.g. `unclip data shapes --out data/shapes --n 20000 --seed 0`."""
    from unclip.data.shapes import build_shapes

    info = build_shapes(out, n, seed, test_fraction=test_fraction, held_out=_parse_pairs(held_out))
    train_n, test_n = info["counts"]["train"]["total"], info["counts"]["test"]["total"]
    click.echo(f"wrote {train_n} train + {test_n} test scenes ({info['counts']['test']['held_out']} held-out) to {out}")


@data.command("emoji")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder (must be empty).")
@click.option("--styles", default="google,twitter", show_default=True, help="Comma-separated emoji styles.")
@click.option("--from-tarball", "tarballs", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="Local emoji-datasource-<style> npm tarball (repeatable); default: npm pack the pinned version.")
@friendly_errors
def data_emoji(out, styles, tarballs):
    """Build the emoji data set, e.g. `unclip data emoji --out data/emoji`."""
    from unclip.data.emoji import build_emoji

    names = [s.strip() for s in styles.split(",") if s.strip()]
    info = build_emoji(out, styles=names, tarballs=list(tarballs) or None)
    per_style = ", ".join(f"{style} {c['images']}" for style, c in info["counts"].items())
    click.echo(f"wrote {info['total']} emoji images ({per_style}) to {out}")


@data.command("shards")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder of image/caption pairs.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder for NNNNN.tar shards.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Samples per shard.")
@friendly_errors
def data_shards(data_dir, out, shard_size):
    """Pack a folder of pairs into webdataset shards, e.g. `unclip data shards --data d/train --out d/shards`."""
    from unclip.data.datasets import write_shards

    paths = write_shards(data_dir, out, shard_size=shard_size)
    click.echo(f"wrote {len(paths)} shards to {out}")
# DATA-COMMANDS-END

# ---------------------------------------------------------------- clip commands
# CLIP-COMMANDS-BEGIN
@train.command("clip")
@click.option("--data", type=click.Path(exists=True), required=True, help="Folder of image/caption pairs or shards.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Model folder; writes OUT/clip.")
@click.option("--preset", default="tiny-32", show_default=True,
              help="CLIP architecture: tiny-32, tiny-64 or small-64 (unclip.clip.CLIP_PRESETS).")
@click.option("--heldout", type=click.FloatRange(0, 0.5), default=0.05, show_default=True,
              help="Fraction of pairs held out for the retrieval metric (at most 1,000).")
@train_options
@friendly_errors
def train_clip_cmd(data, out, preset, heldout, resume, run_dir, quiet, **kw):
    """Train a small CLIP from scratch (contrastive, open_clip's model).

    \b
    unclip train clip --data data/shapes/train --out models/shapes --preset tiny-32 --steps 3000
    """
    from unclip.clip_training import train_clip

    config = make_train_config(kw, eval_every=kw["checkpoint_every"])
    metrics = train_clip(data, out, config, preset=preset, run_dir=run_dir, resume=resume,
                         heldout_fraction=heldout, progress=not quiet)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    click.echo(f"wrote {out}/clip" + (f" (held-out {summary})" if summary else ""))
# CLIP-COMMANDS-END

# ---------------------------------------------------------------- prior commands
# PRIOR-COMMANDS-BEGIN
PRIOR_PRESET_NAMES = ["tiny", "small", "base"]                       # prior.config.PRIOR_PRESETS (checked by a test)
PRIOR_SAMPLERS = ["ddim", "ddpm", "dpm++", "dpm++sde", "euler", "unipc"]  # unclip.schedulers names (checked)


def _clip_folder(path: str):
    """MODEL_DIR/clip, or PATH itself when it is a clip/ component folder."""
    from pathlib import Path

    path = Path(path)
    return path if (path / "config.json").is_file() and not (path / "clip").is_dir() else path / "clip"


@main.command("embed")
@click.option("--data", "data_dir", type=click.Path(exists=True), required=True,
              help="Folder of image/caption pairs, or webdataset shards.")
@click.option("--clip", "clip_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Model folder holding clip/ (or a clip/ folder itself).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Embeddings folder: img_emb/, text_emb/, metadata/ (clip-retrieval layout).")
# Sharding and speed
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Pairs per shard; a rerun skips complete shards (keep the same value).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per CLIP batch.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the .npy embeddings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def embed_cmd(data_dir, clip_dir, out, shard_size, batch_size, dtype, quiet):
    """Encode image/caption pairs once with a frozen CLIP (for prior training at scale).

    \b
    unclip embed --data data/shapes/train --clip models/shapes --out data/shapes-emb
    unclip train prior --model models/shapes --embeddings data/shapes-emb
    """
    from unclip.clip import ClipEncoder
    from unclip.data.datasets import open_dataset
    from unclip.data.embeddings import write_embeddings

    clip = ClipEncoder.load(_clip_folder(clip_dir)).eval()
    result = write_embeddings(clip, open_dataset(data_dir, clip.image_size), out, shard_size=shard_size,
                              batch_size=batch_size, dtype=dtype, progress=not quiet)
    click.echo(f"{out}: {result['count']} pairs in {result['shards']} shards "
               f"({result['written']} written, {result['skipped']} already complete)")


@train.command("prior")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Model folder holding clip/; writes MODEL/prior (EMA weights).")
# Data: exactly one of
@click.option("--data", type=click.Path(exists=True), default=None,
              help="Folder of image/caption pairs or shards (encoded once with the CLIP).")
@click.option("--embeddings", type=click.Path(exists=True, file_okay=False), default=None,
              help="Precomputed embeddings folder (from `unclip embed`).")
# Model
@click.option("--preset", type=click.Choice(PRIOR_PRESET_NAMES), default="tiny", show_default=True,
              help="Prior size (width/depth/heads); D, W and L come from the CLIP.")
@click.option("--heldout", type=click.IntRange(min=0), default=256, show_default=True,
              help="Pairs held out for the cosine metrics (at most a tenth of the data).")
@train_options
@friendly_errors
def train_prior_cmd(model_dir, data, embeddings, preset, heldout, resume, run_dir, quiet, **kw):
    """Train the diffusion prior: CLIP text embedding -> CLIP image embedding.

    \b
    unclip train prior --model models/shapes --data data/shapes/train --steps 3000
    unclip train prior --model models/shapes --embeddings data/shapes-emb --preset small --bf16
    """
    from prior.training import train_prior

    config = make_train_config(kw, eval_every=kw["checkpoint_every"])
    train_prior(model_dir, data=data, embeddings=embeddings, train_config=config, preset=preset,
                run_dir=run_dir, resume=resume, heldout=heldout, progress=not quiet)
    click.echo(f"wrote {model_dir}/prior")


@eval_.command("prior")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Model folder holding clip/ and prior/.")
@click.option("--data", type=click.Path(exists=True), required=True,
              help="Held-out pairs: a folder of pairs, shards, or an embeddings folder.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON report here.")
# Sampling
@click.option("--sampler", type=click.Choice(PRIOR_SAMPLERS), default="ddim", show_default=True,
              help="Scheduler used to sample the prior.")
@click.option("--steps", type=click.IntRange(min=1), default=25, show_default=True, help="Sampling steps.")
@click.option("--guidance", type=click.FloatRange(min=0), default=4.0, show_default=True,
              help="Classifier-free guidance scale.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N pairs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Prompts per batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling noise.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def eval_prior_cmd(model_dir, data, out, sampler, steps, guidance, limit, batch_size, seed, quiet):
    """Cosine of sampled to true image embeddings on held-out pairs, against the text-embedding baseline.

    \b
    unclip eval prior --model models/shapes --data data/shapes/test --out reports/prior.json
    """
    import json

    from unclip.config import write_json
    from unclip.eval.prior import evaluate_prior

    report = evaluate_prior(model_dir, data, limit=limit, scheduler=sampler, num_steps=steps,
                            guidance_scale=guidance, batch_size=batch_size, seed=seed, progress=not quiet)
    if out:
        write_json(out, report)
    click.echo(json.dumps(report, indent=2))
# PRIOR-COMMANDS-END

# ---------------------------------------------------------------- decoder / upsampler commands
# DECODER-COMMANDS-BEGIN
# DECODER-COMMANDS-END

# ---------------------------------------------------------------- pipeline commands
# PIPELINE-COMMANDS-BEGIN
# PIPELINE-COMMANDS-END


if __name__ == "__main__":
    sys.exit(main())
