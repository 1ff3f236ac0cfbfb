"""The `unclip` command line: parses and validates options, then calls library functions (no tensor math here).

Examples:

    unclip generate "a red apple" -o apple.png
    unclip data shapes --out data/shapes --n 20000 --seed 0
    unclip train clip --data data/shapes/train --out models/shapes --preset tiny-32
"""

from __future__ import annotations

import functools
import os
import sys

import click


def friendly_errors(fn):
    """Turn library ValueErrors (bad input) and OS errors into one-line click errors, warnings into one
    `Warning:` line each, and refuse NaN/inf numbers; --debug shows tracebacks and warnings as Python prints them."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        debug = click.get_current_context().find_root().params.get("debug")
        _check_finite_options(kwargs)
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.simplefilter("ignore", FutureWarning)       # library deprecation notices: not for users
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.showwarning = _one_line_warning
                return fn(*args, **kwargs)
        except (ValueError, OSError) as error:
            if debug:
                raise
            if isinstance(error, OSError) and error.filename and error.strerror:
                message = f"{error.filename}: {error.strerror} (check the path and its permissions)"
            else:
                message = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
            raise click.ClickException(message) from None
    return wrapper


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for users: `Warning: <first line>` on stderr, no source location."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    click.echo(f"Warning: {text}", err=True)


def _check_finite_options(kwargs: dict) -> None:
    """NaN and inf pass click's FloatRange checks (comparisons with NaN are false): refuse them for every option."""
    import math

    params = {p.name: p for p in click.get_current_context().command.params}
    for name, value in kwargs.items():
        values = value if isinstance(value, (tuple, list)) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise click.BadParameter(f"must be a finite number, got {bad[0]}", param=params.get(name))


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
        click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
                     show_default=True, help="After the warm-up: constant, or cosine down to 10% at the last step."),
        click.option("--grad-clip", type=click.FloatRange(min=0), default=1.0, show_default=True,
                     help="Max gradient norm (0 disables)."),
        click.option("--ema", "ema_decay", type=click.FloatRange(0, 1), default=0.999, show_default=True,
                     help="EMA decay of the exported weights."),
        # Run
        click.option("--precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), default="auto",
                     show_default=True, help="Autocast precision; auto: bf16 where the CPU or GPU does bf16 math "
                     "natively, else fp32 (no)."),
        click.option("--bf16", is_flag=True, help="Short for --precision bf16."),
        click.option("--compile", "compile_model", is_flag=True,
                     help="torch.compile the network (a minute or two of start-up; pays back on long runs)."),
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
                 lr_schedule="lr_schedule", grad_clip="grad_clip", ema_decay="ema_decay", cpu="cpu",
                 checkpoint_every="checkpoint_every",
                 workers="num_workers", seed="seed")
    values = {field: kw.pop(option) for option, field in names.items()}
    precision = kw.pop("precision")
    values["mixed_precision"] = "bf16" if kw.pop("bf16") else precision
    values["compile"] = kw.pop("compile_model")
    return TrainConfig(**values, **extra)


@main.group()
def data():
    """Build data sets (shapes world, emoji)."""


@main.group()
def train():
    """Train a component: clip, prior, decoder, upsampler, verifier; or a whole model from a recipe."""


@train.result_callback()
def _leave_process_group(*_, **__):
    """After a training command succeeds, every process leaves the group that `accelerate launch` set up, all
    of them still alive: left to interpreter teardown, NCCL warns and gloo's threads can abort a rank."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def echo_main(message: str) -> None:
    """click.echo on the main process only (`accelerate launch` runs a command once per process)."""
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(message)


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
@click.option("--negative-swap", "negative_swaps", multiple=True, metavar="WORD,WORD",
              help="Hard negatives: each caption with one of these words also brings its swapped twin as a "
                   "negative for its image (repeat: --negative-swap left,right --negative-swap two,three).")
@click.option("--mirror-swap", "mirror_swaps", multiple=True, metavar="AXIS:WORD,WORD",
              help="Mirrored pairs: a picture whose caption has one of the words also trains mirrored along AXIS "
                   "(horizontal or vertical) with the words swapped (--mirror-swap horizontal:left,right).")
@click.option("--negative-reorder", "negative_reorders", multiple=True, metavar="PHRASE",
              help="Hard negatives for word order: a caption 'A PHRASE B' also brings 'B PHRASE A' as a negative "
                   "for its image (repeat: --negative-reorder 'to the left of' --negative-reorder above).")
@click.option("--negative-exchange", "negative_exchanges", multiple=True, metavar="WORD,WORD,...",
              help="Hard negatives for binding: a caption with two different words of this class also brings its "
                   "twin with the two exchanged ('a red circle above a blue square' -> 'a blue circle above a red "
                   "square'; repeat: --negative-exchange red,green,blue --negative-exchange circle,square).")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Train on from this clip/ folder (its architecture and vocabulary) instead of from scratch.")
@click.option("--judge", is_flag=True,
              help="Write OUT/judge instead of OUT/clip: a second CLIP that ranks best-of-k candidates against the "
                   "prompt (--image-candidates), usually trained on from OUT/clip with --negative-exchange.")
@train_options
@friendly_errors
def train_clip_cmd(data, out, preset, heldout, negative_swaps, mirror_swaps, negative_reorders, negative_exchanges,
                   init_from, judge, resume, run_dir, quiet, **kw):
    """Train a small CLIP (contrastive, open_clip's model), from scratch or on from a CLIP folder.

    \b
    unclip train clip --data data/shapes/train --out models/shapes --preset tiny-32 --steps 3000
    """
    from unclip.clip_training import MIRROR_DIMS, train_clip

    mirrors: dict[str, list] = {}
    for text in mirror_swaps:
        axis, _, words = text.partition(":")
        if axis not in MIRROR_DIMS:
            raise click.BadParameter(f"{text!r}: start with horizontal: or vertical:, like horizontal:left,right",
                                     param_hint="--mirror-swap")
        mirrors.setdefault(axis, []).append(_word_pair(words, "--mirror-swap"))
    config = make_train_config(kw, eval_every=kw["checkpoint_every"])
    metrics = train_clip(data, out, config, preset=preset, run_dir=run_dir, resume=resume,
                         heldout_fraction=heldout, progress=not quiet, mirror_swaps=mirrors,
                         negative_swaps=[_word_pair(p, "--negative-swap") for p in negative_swaps],
                         negative_reorders=negative_reorders, init_from=init_from,
                         negative_exchanges=[_word_class(c) for c in negative_exchanges],
                         component="judge" if judge else "clip")
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    echo_main(f"wrote {out}/{'judge' if judge else 'clip'}" + (f" (held-out {summary})" if summary else ""))


@train.command("verifier")
@click.option("--data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder of image/caption pairs (with .json scene records, the shapes world's pictures also come "
                   "corrupted as negatives).")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Model folder with judge/ (or clip/); writes MODEL/verifier.")
@click.option("--substitute", "classes", multiple=True, metavar="WORD,WORD,...",
              help="A class of interchangeable words or phrases: each caption's one-word substitutions within it are "
                   "negatives (repeat: --substitute red,green,blue --substitute 'above,below,to the left of').")
@click.option("--oversample", "oversample", multiple=True, metavar="REGEX=N",
              help="See the pairs whose caption matches REGEX N times as often (repeatable).")
@click.option("--width", type=click.IntRange(min=8), default=128, show_default=True, help="Head width.")
@click.option("--depth", type=click.IntRange(min=1), default=2, show_default=True, help="Head transformer layers.")
@click.option("--parser", type=click.IntRange(min=0), default=0, show_default=True,
              help="Channels of a scene parser (a small CNN at full resolution) beside the judge's patch tokens; "
                   "0: none.")
@click.option("--patch-drop", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="With --parser: the share of training pictures read without the judge's patch tokens, so that "
                   "the head learns to read the parser.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="A verifier folder to start from (one without a parser gains one that starts switched off).")
@train_options
@friendly_errors
def train_verifier_cmd(data, model_dir, classes, oversample, width, depth, parser, patch_drop, init_from, resume,
                       run_dir, quiet, **kw):
    """Train the best-of-k verifier: a joint head on the model's judge that tells a picture's caption from its
    hard negatives (the model's rerank_twins and --substitute classes).

    \b
    unclip train verifier --data runs/shapes/data/train --model runs/shapes/model --steps 4000 \\
        --substitute red,green,blue,yellow,purple,orange --substitute two,three
    """
    from unclip.checkpoint import read_model_index
    from unclip.verifier import VerifierConfig, train_verifier

    groups = [[w.strip() for w in c.split(",")] for c in classes]
    bad = [c for c, g in zip(classes, groups) if len(set(g)) < 2 or not all(g)]
    if bad:
        raise click.BadParameter(f"{bad[0]!r}: give two or more different words joined by commas",
                                 param_hint="--substitute")
    rules = read_model_index(model_dir).get("sampling", {}).get("rerank_twins") or {}
    config = VerifierConfig(width=width, depth=depth, parser=parser, patch_drop=patch_drop)
    metrics = train_verifier(data, model_dir, make_train_config(kw, eval_every=kw["checkpoint_every"]), rules,
                             groups, config=config, run_dir=run_dir, resume=resume, progress=not quiet,
                             oversample=[_oversample_option(o) for o in oversample], init_from=init_from)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    echo_main(f"wrote {model_dir}/verifier" + (f" ({summary})" if summary else ""))


# CLIP-COMMANDS-END

# ---------------------------------------------------------------- prior commands
# PRIOR-COMMANDS-BEGIN
PRIOR_PRESET_NAMES = ["tiny", "small", "base"]                       # prior.config.PRIOR_PRESETS (checked by a test)
PRIOR_SAMPLERS = ["ddim", "ddpm", "dpm++", "dpm++sde", "euler", "unipc"]  # unclip.schedulers names (checked)


def _word_pair(text: str, option: str) -> tuple[str, str]:
    pair = tuple(text.split(","))
    if len(pair) != 2 or not all(pair):
        raise click.BadParameter(f"{text!r}: give two words joined by a comma, like left,right", param_hint=option)
    return pair


def _word_class(text: str) -> list[str]:
    words = text.split(",")
    if len(set(words)) < 2 or not all(words):
        raise click.BadParameter(f"{text!r}: give two or more different words joined by commas, like red,green,blue",
                                 param_hint="--negative-exchange")
    return words


def _clip_folder(path: str):
    """MODEL_DIR/clip, or PATH itself when it is a clip/ component folder."""
    from pathlib import Path

    path = Path(path)
    return path if (path / "config.json").is_file() and not (path / "clip").is_dir() else path / "clip"


@main.command("embed")
@click.option("--data", "data_dir", required=True,
              help="Folder of image/caption pairs, a folder of .tar shards, a shard pattern or URL (pipe: too).")
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

    Webdataset shards give one output shard per input shard. Runs in parallel under `accelerate launch`
    (process r writes shards r, r + P, ...); rerun the same command to finish an interrupted run.

    \b
    unclip embed --data data/shapes/train --clip models/shapes --out data/shapes-emb
    accelerate launch --num_processes 8 -m cli embed --data 'shards/{00000..00999}.tar' --clip M --out emb
    unclip train prior --model models/shapes --embeddings data/shapes-emb
    """
    from unclip.clip import ClipEncoder
    from unclip.data.datasets import open_dataset
    from unclip.data.embeddings import write_embeddings_distributed

    clip = ClipEncoder.load(_clip_folder(clip_dir)).eval()
    result = write_embeddings_distributed(clip, open_dataset(data_dir, clip.image_size), out, shard_size=shard_size,
                                          batch_size=batch_size, dtype=dtype, progress=not quiet)
    echo_main(f"{out}: {result['count']} pairs in {result['shards']} shards "
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
    unclip train prior --model models/shapes --embeddings data/shapes-emb --preset small
    """
    from prior.training import train_prior

    config = make_train_config(kw, eval_every=kw["checkpoint_every"])
    train_prior(model_dir, data=data, embeddings=embeddings, train_config=config, preset=preset,
                run_dir=run_dir, resume=resume, heldout=heldout, progress=not quiet)
    echo_main(f"wrote {model_dir}/prior")


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
DECODER_PRESET_NAMES = ["tiny", "small", "base-64"]            # decoder.config.DECODER_PRESETS (checked by a test)
UPSAMPLER_PRESET_NAMES = ["tiny-64", "small-64", "tiny-256"]   # decoder.config.UPSAMPLER_PRESETS (checked)
DECODER_TEXT_ENCODERS = ["clip", "clip+input", "transformer"]  # decoder.config.TEXT_ENCODERS (checked)


def stage_options(fn):
    """Options `train decoder` and `train upsampler` share (beyond train_options)."""
    options = [
        # Model and data
        click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), required=True,
                     help="Model folder (holds clip/); the stage is exported into it (EMA weights)."),
        click.option("--data", required=True,
                     help="Folder of image/caption pairs, a folder of .tar shards, or a shard pattern."),
        # Diffusion
        click.option("--prediction", type=click.Choice(["epsilon", "v_prediction"]), default=None,
                     help="What the network predicts [default: the preset's, v_prediction]."),
        click.option("--min-snr", type=click.FloatRange(min=0), default=None,
                     help="Min-SNR-gamma loss weighting, 0 turns it off [default: the preset's, 5]."),
        # Sample grids
        click.option("--sample-every", type=click.IntRange(min=0), default=500, show_default=True,
                     help="Steps between sample grids in RUN_DIR/samples (0: only at the end)."),
        click.option("--sample-steps", type=click.IntRange(min=1), default=25, show_default=True,
                     help="DDIM steps of the sample grids."),
        click.option("--heldout", type=click.IntRange(min=0), default=8, show_default=True,
                     help="Pairs held out for the sample grids (at most a tenth of the data)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _given(**fields) -> dict:
    """The config fields whose options were given."""
    return {name: value for name, value in fields.items() if value is not None}


@train.command("decoder")
@stage_options
@click.option("--preset", type=click.Choice(DECODER_PRESET_NAMES), default="tiny", show_default=True,
              help="Decoder UNet size (tiny, small: 32 px); D, W and L come from the CLIP.")
@click.option("--text-drop", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Training probability of dropping the caption for guidance [default: the preset's, 0.2].")
@click.option("--image-drop", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Training probability of dropping the image embedding [default: the preset's, 0.1].")
@click.option("--text-encoder", type=click.Choice(DECODER_TEXT_ENCODERS), default=None,
              help="Caption tokens: CLIP's final token states; those and CLIP's input embeddings (clip+input: "
                   "keeps word identity); or a small text transformer trained with the decoder (GLIDE's) "
                   "[default: the preset's, clip].")
@click.option("--position-channels/--no-position-channels", default=None,
              help="Give the UNet two pixel-coordinate input channels (CoordConv) [default: the preset's, off].")
@click.option("--image-map-channels", type=click.IntRange(min=0), default=None,
              help="Also feed the UNet a coarse map (8x8, this many channels) projected from the image embedding: "
                   "a direct path from the embedding to the layout [default: the preset's, 0 (off)].")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start from this decoder folder's weights (fine-tuning) instead of a fresh initialisation; "
                   "adding position channels to it is allowed.")
@click.option("--oversample", "oversample", multiple=True, metavar="REGEX=N",
              help="See the pairs whose caption matches REGEX N times per epoch (a kind of caption the model is "
                   "weak on); repeatable, the largest N of the matching patterns counts.")
@train_options
@friendly_errors
def train_decoder_cmd(model_dir, data, preset, text_drop, image_drop, text_encoder, position_channels,
                      image_map_channels, init_from, oversample, prediction, min_snr, sample_every, sample_steps, heldout, resume, run_dir, quiet, **kw):
    """Train the decoder: CLIP image embedding (+ caption tokens) -> base image.

    \b
    unclip train decoder --model models/shapes --data data/shapes/train --steps 20000
    unclip train decoder --model models/shapes --data data/shapes/train --preset small --text-drop 0.2
    unclip train decoder --model models/shapes --data data/shapes/train --text-encoder transformer
    unclip train decoder --model my-model --data my-pairs --init-from models/shapes/decoder --steps 2000
    unclip train decoder --model models/shapes --data data/shapes/train --oversample " (above|below) =3"
    """
    from decoder.config import decoder_preset
    from decoder.training import train_decoder

    config = decoder_preset(preset, **_given(text_drop_prob=text_drop, image_drop_prob=image_drop,
                                             text_encoder=text_encoder, prediction_type=prediction,
                                             min_snr_gamma=min_snr, position_channels=position_channels,
                                             image_map_channels=image_map_channels))
    train_decoder(model_dir, data, train_config=make_train_config(kw, sample_every=sample_every), config=config,
                  run_dir=run_dir, resume=resume, heldout=heldout, sample_steps=sample_steps, progress=not quiet,
                  init_from=init_from, oversample=[_oversample_option(o) for o in oversample])
    echo_main(f"wrote {model_dir}/decoder")


def _oversample_option(text: str) -> tuple[str, int]:
    """ "REGEX=N" -> (REGEX, N); the last "=" splits, so the pattern may hold one."""
    pattern, sep, times = text.rpartition("=")
    if not sep or not pattern or not times.strip().isdigit():
        raise click.BadParameter(f"expected REGEX=N (N a whole number), got {text!r}", param_hint="--oversample")
    return pattern, int(times)


@train.command("upsampler")
@stage_options
@click.option("--size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Output side; writes MODEL/upsampler_SIZE.")
@click.option("--preset", type=click.Choice(UPSAMPLER_PRESET_NAMES), default=None,
              help="Upsampler UNet [default: tiny-SIZE].")
@click.option("--aug-max", type=click.FloatRange(0, 1), default=None,
              help="Largest noise-augmentation level of the low-res input [default: the preset's, 0.5].")
@click.option("--blur-prob", type=click.FloatRange(0, 1), default=None,
              help="Probability of blurring the low-res input [default: the preset's, 0.5].")
@train_options
@friendly_errors
def train_upsampler_cmd(model_dir, data, size, preset, aug_max, blur_prob, prediction, min_snr, sample_every,
                        sample_steps, heldout, resume, run_dir, quiet, **kw):
    """Train an upsampler (no text): low-res image -> SIZE px image, with noise conditioning augmentation.

    \b
    unclip train upsampler --model models/shapes --data data/shapes/train --size 64 --steps 5000
    """
    from decoder.config import upsampler_preset
    from decoder.training import train_upsampler

    config = upsampler_preset(preset or f"tiny-{size}", **_given(aug_max=aug_max, blur_prob=blur_prob,
                                                                 prediction_type=prediction, min_snr_gamma=min_snr))
    train_upsampler(model_dir, data, size, train_config=make_train_config(kw, sample_every=sample_every),
                    config=config, run_dir=run_dir, resume=resume, heldout=heldout, sample_steps=sample_steps,
                    progress=not quiet)
    echo_main(f"wrote {model_dir}/upsampler_{size}")
# DECODER-COMMANDS-END

# ---------------------------------------------------------------- pipeline commands
# PIPELINE-COMMANDS-BEGIN
IMAGE_SAMPLERS = ["ddpm", "ddim", "dpm++", "dpm++sde", "euler", "unipc", "unclip"]  # unclip.schedulers (checked)
STAGES = ("prior", "decoder", "upsampler")
# unclip.pipeline.SamplingSettings' defaults (checked by a test; the CLI does not import torch to show --help)
RERANK = ["image", "text", "both"]  # unclip.pipeline.RERANK (not imported here: `unclip --help` stays fast)
SAMPLING_DEFAULTS = dict(prior_sampler="ddim", prior_steps=10, prior_guidance=2.0, decoder_sampler="ddim",
                         decoder_steps=20, decoder_guidance=3.0, decoder_guidance_interval=(0.3, 0.7),
                         upsampler_sampler="unipc", upsampler_steps=6, rerank="both")


def sampling_options(fn):
    """Options of every image-making command (model, seed, per-stage samplers, steps and guidance, output)."""
    options = [
        # Model and device
        click.option("--model", default=None, help="Model folder, bundled name (emoji, shapes) or hub id "
                     "[default: the bundled emoji model]."),
        click.option("--device", default=None, help="torch device [default: cuda when present, else cpu]."),
        click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="Autocast precision of the networks (auto: bf16 where the CPU or GPU "
                     "does bf16 math natively, else fp32)."),
        click.option("--compile", "compile_model", is_flag=True,
                     help="torch.compile the decoder and upsamplers (about a minute per network before the first "
                          "image; pays back over many images)."),
        # Randomness and count
        click.option("-n", "--num-images", type=click.IntRange(min=1, max=1024), default=1, show_default=True,
                     help="Images per input."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Image i uses seed + i, whatever the batch."),
        # Samplers per stage
        click.option("--sampler", default=None, type=click.Choice(IMAGE_SAMPLERS),
                     help="Sampler of every stage, in place of the per-stage ones (unclip: Karlo's "
                          "UnCLIPScheduler, for Karlo folders)."),
        *[click.option(f"--sampler-{stage}", type=click.Choice(IMAGE_SAMPLERS), show_default=True,
                       default=SAMPLING_DEFAULTS[f"{stage}_sampler"]) for stage in STAGES],
        *[click.option(f"--steps-{stage}", type=click.IntRange(min=1, max=1000), show_default=True,
                       default=SAMPLING_DEFAULTS[f"{stage}_steps"]) for stage in STAGES],
        click.option("--guidance-prior", type=float, default=SAMPLING_DEFAULTS["prior_guidance"], show_default=True,
                     help="Prior CFG scale."),
        click.option("--guidance-decoder", type=float, default=SAMPLING_DEFAULTS["decoder_guidance"],
                     show_default=True, help="Decoder CFG scale (image embedding and text)."),
        click.option("--guidance-text", type=float, default=None,
                     help="The decoder's text guidance, on top of its image-embedding guidance [default: the "
                          "model's own (shapes: see its model_index.json), else --guidance-decoder's]."),
        click.option("--guidance-interval-decoder", type=click.FloatRange(0, 1), nargs=2, show_default=True,
                     default=SAMPLING_DEFAULTS["decoder_guidance_interval"], metavar="LOW HIGH",
                     help="Guide the decoder only at noise levels t/T in [LOW, HIGH]; other steps take one "
                          "unguided forward (cheaper)."),
        click.option("--dynamic-threshold", type=click.FloatRange(0.5, 1.0, min_open=True), default=None,
                     help="Imagen's dynamic thresholding percentile for the decoder, e.g. 0.995."),
        click.option("--image-candidates", type=click.IntRange(min=1, max=64), default=1,
                     help="Decoder samples per image; keep the one the CLIP ranks best (--rerank; k times the "
                          "decoder's time) [default: the model's own (shapes: 8), else 1]."),
        click.option("--rerank", type=click.Choice(RERANK), default=SAMPLING_DEFAULTS["rerank"], show_default=True,
                     help="What --image-candidates ranks by: closeness to the image embedding the decoder was "
                          "given, to the prompt, or the sum of both (the prompt through the model's judge CLIP "
                          "where it has one)."),
        click.option("--share-prior", is_flag=True,
                     help="Decode all --image-candidates from one prior sample instead of one each."),
        click.option("--no-rerank-twins", is_flag=True,
                     help="Rank --image-candidates by the prompt alone, not also against its twins (the model's "
                          "rerank_twins: the prompt with a colour, shape or relation exchanged; shapes has them)."),
        click.option("--no-rerank-paraphrase", is_flag=True,
                     help="Rank --image-candidates by the prompt as given, not also by the same scene told from its "
                          "other side (the model's rerank_paraphrase: \"B to the right of A\" for \"A to the left of "
                          "B\"; shapes has it)."),
        click.option("--verify-weight", type=click.FloatRange(min=0), default=0.0,
                     help="Weight of the model's verifier (verifier/) in ranking --image-candidates; 0 turns it off "
                          "[default: the model's own (shapes: see its model_index.json), else 0]."),
        click.option("--prior-twin-guidance", type=click.FloatRange(min=0), default=0.0,
                     help="Also guide each prior sample away from one of the prompt's twins, by this much; 0 turns "
                          "it off [default: the model's own (shapes: see its model_index.json), else 0]."),
        # Output
        click.option("-o", "--out", "out", type=click.Path(), default="outputs", show_default=True,
                     help="A .png file for one image, or a folder that receives 0000.png, 0001.png, ..."),
        click.option("--grid", is_flag=True, help="Write one contact sheet instead of separate images."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_pipeline(kw: dict):
    """Pop model/device/dtype/quiet/compile from kw and load the pipeline."""
    import torch

    from unclip import UnCLIPPipeline

    device = kw.pop("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = UnCLIPPipeline.from_pretrained(kw.pop("model"))
    pipe.to(device, kw.pop("dtype"))
    quiet = kw.pop("quiet")
    pipe.set_progress_bar_config(disable=quiet)
    if kw.pop("compile_model"):
        pipe.compile()
        if not quiet:
            click.echo("--compile: the first decoder and upsampler steps compile (a minute or two on 2 CPU cores)",
                       err=True)
    return pipe


def pop_settings(kw: dict) -> dict:
    """Pop the sampler options into SamplingSettings fields: those given on the command line (or by the
    environment), so that a model's own sampling defaults (its model_index.json "sampling") hold for the rest."""
    import math

    given = _given_on_command_line()
    every = kw.pop("sampler")
    settings, options = {}, {}
    for stage in STAGES:
        own = kw.pop(f"sampler_{stage}")
        settings[f"{stage}_sampler"] = every or own
        options[f"{stage}_sampler"] = ("sampler", f"sampler_{stage}")
        settings[f"{stage}_steps"] = kw.pop(f"steps_{stage}")
        options[f"{stage}_steps"] = (f"steps_{stage}",)
    settings.update(prior_guidance=kw.pop("guidance_prior"), decoder_guidance=kw.pop("guidance_decoder"),
                    text_guidance=kw.pop("guidance_text"),
                    decoder_guidance_interval=kw.pop("guidance_interval_decoder"),
                    dynamic_threshold=kw.pop("dynamic_threshold"), image_candidates=kw.pop("image_candidates"),
                    rerank=kw.pop("rerank"), share_prior=kw.pop("share_prior"), verify_weight=kw.pop("verify_weight"),
                    prior_twin_guidance=kw.pop("prior_twin_guidance"))
    if kw.pop("no_rerank_twins"):
        settings["rerank_twins"] = {}
    if kw.pop("no_rerank_paraphrase"):
        settings["rerank_paraphrase"] = {}
    options.update(prior_guidance=("guidance_prior",), decoder_guidance=("guidance_decoder",),
                   text_guidance=("guidance_text",),
                   decoder_guidance_interval=("guidance_interval_decoder",), rerank_twins=("no_rerank_twins",),
                   rerank_paraphrase=("no_rerank_paraphrase",))
    for name, (option,) in [(n, options[n]) for n in ("prior_guidance", "decoder_guidance", "text_guidance")]:
        if settings[name] is not None and not math.isfinite(settings[name]):
            raise click.BadParameter(f"must be a finite number, got {settings[name]}",
                                     param_hint=f"--{option.replace('_', '-')}")
    return {name: value for name, value in settings.items() if given(*options.get(name, (name,)))}


def _given_on_command_line():
    """A test: was any of these options set by the user (not left at its default)?"""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return lambda *names: True
    from click.core import ParameterSource
    return lambda *names: any(ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None) for n in names)


def check_output(out: str, count: int, grid: bool, suffixes=(".png",)) -> None:
    """Fail before sampling when the output cannot be written."""
    import tempfile
    from pathlib import Path

    path = Path(out)
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff") and suffix not in suffixes:
        raise click.BadParameter(f"cannot write {suffix} files: give a {' or '.join(suffixes)} file or a folder",
                                 param_hint="-o")
    is_file = suffix in suffixes
    if is_file and count > 1 and not grid and suffix == ".png":
        raise click.BadParameter(f"{count} images do not fit in one .png: give a folder or --grid", param_hint="-o")
    target = path.parent if is_file else path
    probe = target
    while not probe.exists():  # the deepest folder that exists (a file on the way is reported below)
        probe = probe.parent
    if not probe.is_dir():
        raise click.BadParameter(f"{probe} is a file, not a folder", param_hint="-o")
    try:  # a real write: as root, permission bits do not tell (read-only mounts, /proc)
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as error:
        raise click.ClickException(f"cannot write to {target} ({error.strerror or error}); choose another -o") from None


def write_images(output, out: str, grid: bool, metadata: list[dict]) -> list[str]:
    """Save an UnCLIPOutput as one PNG, a folder of PNGs or a grid; each PNG carries its provenance."""
    import json
    from pathlib import Path

    from unclip.images import make_grid, save_png

    path = Path(out)
    images = output.images
    if grid:
        target = path if path.suffix.lower() == ".png" else path / "grid.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_png(make_grid(images), target, {"unclip": json.dumps(metadata)})
        return [str(target)]
    if path.suffix.lower() == ".png":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(images[0], path, {"unclip": json.dumps(metadata[0])})
        return [str(path)]
    path.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (image, meta) in enumerate(zip(images, metadata)):
        save_png(image, path / f"{i:04d}.png", {"unclip": json.dumps(meta)})
        written.append(str(path / f"{i:04d}.png"))
    return written


def provenance(output, per_image: list[dict]) -> list[dict]:
    info = {k: v for k, v in output.info.items() if k not in ("prompts", "seed")}
    return [{**info, **extra} for extra in per_image]


@main.command()
@click.argument("prompt", required=False)
@click.option("--negative", default=None, help="Negative prompt for the prior's unconditional branch.")
@click.option("--prior-free", is_flag=True, help="Skip the prior: decode from the text alone (for comparison).")
@click.option("--from-png", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Re-create an image from the settings stored in a PNG this tool wrote.")
@sampling_options
@friendly_errors
def generate(prompt, negative, prior_free, from_png, out, grid, **kw):
    """Text to image.

    \b
    unclip generate "a red apple" -o apple.png
    unclip generate "a blue square on the left" --model shapes -n 8 --grid -o sheet.png
    unclip generate --from-png apple.png -o again.png
    """
    if from_png:
        prompt, negative, prior_free, kw = settings_from_png(from_png, kw)
    if prompt is None or not prompt.strip():
        raise click.UsageError("give a PROMPT (non-empty text) or --from-png FILE")
    check_output(out, kw["num_images"], grid)
    n, seed = kw.pop("num_images"), kw.pop("seed")
    pipe = load_pipeline(kw)
    if not kw.get("settings"):
        kw["settings"] = pop_settings(kw)
    output = pipe.generate(prompt, num_images=n, negative_prompt=negative, seed=seed, prior_free=prior_free,
                           **kw["settings"])
    meta = provenance(output, [{"prompt": prompt, "seed": seed + i} for i in range(n)])
    for path in write_images(output, out, grid, meta):
        click.echo(path)


def settings_from_png(path: str, kw: dict):
    """Read the provenance a PNG carries back into generate's arguments."""
    import json

    from unclip.images import read_png_metadata

    raw = read_png_metadata(path).get("unclip")
    if not raw:
        raise click.ClickException(f"{path} carries no unclip settings (was it written by `unclip generate`?)")
    from unclip.config import config_from_dict, config_to_dict
    from unclip.pipeline import SamplingSettings

    try:
        meta = json.loads(raw)
        if isinstance(meta, list) or meta.get("command") != "generate":
            raise click.ClickException(f"{path} was not written by `unclip generate` for a single image")
        # PNGs from before the guidance interval (2026-12-02) were guided at every decoder step, those from before
        # `rerank` (2026-12-06) ranked their image candidates by the prompt, and those from before `share_prior`
        # (2026-12-07) decoded them all from one prior sample
        old = {"decoder_guidance_interval": (0.0, 1.0), "rerank": "text", "share_prior": True}
        settings = config_to_dict(config_from_dict(SamplingSettings, {**old, **meta["settings"]}))
        seed, prompt = int(meta["seed"]), str(meta["prompt"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise click.ClickException(f"{path}: damaged unclip settings ({error.__class__.__name__}: {error}); "
                                   "give the prompt and options instead of --from-png") from None
    dtype = kw["dtype"] if kw["dtype"] != "auto" else {"float32": "fp32", "bfloat16": "bf16",
                                                       "float16": "fp16"}.get(meta.get("dtype"), "auto")
    kw.update(model=kw["model"] or meta.get("model"), seed=seed, num_images=1, settings=settings, dtype=dtype)
    return prompt, meta.get("negative_prompt"), bool(meta.get("prior_free")), kw


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--invert", is_flag=True, help="Start from the picture's DDIM-inverted noise (keeps its layout).")
@sampling_options
@friendly_errors
def vary(image, invert, out, grid, **kw):
    """Variations of a picture from its CLIP image embedding.

    \b
    unclip vary photo.png -n 4 --grid -o variations.png
    """
    check_output(out, kw["num_images"], grid)
    n, seed = kw.pop("num_images"), kw.pop("seed")
    pipe = load_pipeline(kw)
    output = pipe.vary(image, num_images=n, seed=seed, invert=invert, **pop_settings(kw))
    meta = provenance(output, [{"image": image, "seed": seed + i} for i in range(n)])
    for path in write_images(output, out, grid, meta):
        click.echo(path)


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--frames", type=click.IntRange(min=2, max=512), default=8, show_default=True)
@sampling_options
@friendly_errors
def interpolate(a, b, frames, out, grid, **kw):
    """Morph between two prompts or pictures (slerp of image embeddings, decoder noise fixed).

    -o ends in .gif for an animation, .png for a strip, or names a folder of frames.

    \b
    unclip interpolate "a red circle" "a blue square" --model shapes --frames 8 -o morph.gif
    """
    from pathlib import Path

    from unclip.images import make_grid, save_gif

    check_output(out, frames, True, suffixes=(".png", ".gif"))
    seed = kw.pop("seed")
    kw.pop("num_images")
    pipe = load_pipeline(kw)
    output = pipe.interpolate(a, b, frames=frames, seed=seed, **pop_settings(kw))
    if Path(out).suffix.lower() == ".gif":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_gif(output.images, out, duration_ms=120)
        click.echo(out)
        return
    strip = Path(out).suffix.lower() == ".png"
    meta = provenance(output, [{"frame": i, "seed": seed} for i in range(frames)])
    if strip:
        output.images = [make_grid(output.images, cols=frames)]
    for path in write_images(output, out, False, meta[:1] if strip else meta):
        click.echo(path)


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--from", "from_text", required=True, help="What the picture shows, e.g. 'a red circle'.")
@click.option("--to", "to_text", required=True, help="What it should show, e.g. 'a blue circle'.")
@click.option("--amount", type=click.FloatRange(0, 1), multiple=True, default=[0.3], show_default=True,
              help="How far to move (0 = unchanged; repeat for a sweep).")
@click.option("--no-invert", is_flag=True, help="Use seeded noise instead of the picture's inverted noise.")
@sampling_options
@friendly_errors
def edit(image, from_text, to_text, amount, no_invert, out, grid, **kw):
    """DALL-E 2 text diffs: change a picture toward a new description.

    \b
    unclip edit circle.png --from "a red circle" --to "a blue circle" --amount 0.2 --amount 0.4 --grid -o edit.png
    """
    check_output(out, len(amount), grid)
    seed = kw.pop("seed")
    kw.pop("num_images")
    pipe = load_pipeline(kw)
    output = pipe.edit(image, from_text, to_text, amount=list(amount), seed=seed, invert=not no_invert,
                       **pop_settings(kw))
    meta = provenance(output, [{"image": image, "amount": a, "seed": seed} for a in amount])
    for path in write_images(output, out, grid, meta):
        click.echo(path)


@main.command()
@click.argument("model", required=False)
@friendly_errors
def info(model):
    """Describe a model folder: components, sizes, parameters, training noise schedules."""
    from unclip.info import describe

    click.echo(describe(model))
@eval_.command("model")
@click.option("--model", required=True, help="Model folder or bundled name.")
@click.option("--data", "test", type=click.Path(exists=True, file_okay=False), required=True,
              help="Held-out pairs (e.g. data/shapes/test).")
@click.option("--train-data", type=click.Path(exists=True, file_okay=False), required=True,
              help="Training pairs (for the nearest-training-image baseline).")
@click.option("--n", type=click.IntRange(min=2), default=200, show_default=True, help="Held-out captions to generate.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--markdown", type=click.Path(dir_okay=False), default=None,
              help="Write (or replace) this model's section in a Markdown report, e.g. docs/MODELS.md.")
@click.option("--name", default=None, help="Section title [default: the model name].")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Write a sample grid PNG.")
@click.option("--image-candidates", type=click.IntRange(min=1, max=64), default=None,
              help="Decoder samples per caption, reranked by the CLIP (as in `unclip generate`) [default: the "
                   "model's own (shapes: 8), else 1].")
@click.option("--rerank", type=click.Choice(RERANK), default=None,
              help="What the candidates are ranked by (as in `unclip generate`) [default: the model's own, else both].")
@click.option("--share-prior", is_flag=True, default=None,
              help="Decode all candidates from one prior sample (as in `unclip generate`).")
@click.option("--no-rerank-twins", is_flag=True, default=None,
              help="Rank the candidates by the prompt alone, not also against its twins (as in `unclip generate`).")
@click.option("--verify-weight", type=click.FloatRange(min=0), default=None,
              help="Weight of the model's verifier in the ranking (as in `unclip generate`).")
@click.option("--prior-twin-guidance", type=click.FloatRange(min=0), default=None,
              help="Guide each prior sample away from one of the prompt's twins (as in `unclip generate`).")
@click.option("--no-rerank-paraphrase", is_flag=True,
              help="Rank by the prompt as given, not also by its paraphrase (as in `unclip generate`).")
@click.option("--fresh", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also score the shapes oracle on this many captions drawn afresh from the grammar, as the test "
                   "split draws them but from their own random stream (shapes data only).")
@friendly_errors
def eval_model(model, test, train_data, n, seed, json_out, markdown, name, grid, image_candidates, rerank,
               share_prior, no_rerank_twins, verify_weight, prior_twin_guidance, no_rerank_paraphrase, fresh):
    """Quality report: prior cosines, CLIP R-precision, FD in CLIP space, shapes oracle.

    \b
    unclip eval model --model shapes --data data/shapes/test --train-data data/shapes/train --markdown docs/MODELS.md
    unclip eval model --model shapes --data data/shapes/test --train-data data/shapes/train --fresh 400
    """
    import json

    from unclip.config import write_json
    from unclip.eval.report import evaluate_model, markdown as to_markdown, update_markdown

    given = {"image_candidates": image_candidates, "rerank": rerank, "share_prior": share_prior or None,
             "rerank_twins": {} if no_rerank_twins else None, "verify_weight": verify_weight,
             "prior_twin_guidance": prior_twin_guidance, "rerank_paraphrase": {} if no_rerank_paraphrase else None}
    settings = {key: value for key, value in given.items() if value is not None}
    report = evaluate_model(model, test, train_data, n=n, seed=seed, grid=grid, fresh=fresh, **settings)
    if json_out:
        write_json(json_out, report)
    if markdown:
        update_markdown(markdown, name or str(model), to_markdown(name or str(model), report))
    click.echo(json.dumps(report, indent=2))


@train.command("recipe")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder (data, runs, model, export).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def train_recipe(recipe, out, quiet):
    """Build a whole model from a recipe (configs/*.json); re-run the same command to resume.

    \b
    nohup unclip train recipe configs/shapes.json --out runs/shapes &
    """
    from unclip.recipe import run_recipe

    records = run_recipe(recipe, out, progress=not quiet, log=click.echo)
    for stage, record in records.items():
        click.echo(f"{stage:10s} {record['wall_s']:8.0f} s")
# PIPELINE-COMMANDS-END

# ---------------------------------------------------------------- conversion of published weights (Karlo)
# KARLO-COMMANDS-BEGIN
@main.command("convert")
@click.argument("karlo_dir", type=click.Path(exists=True, file_okay=False))
# Output
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="New unclip model folder (model_index.json + one folder per component).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Precision of the written weights (fp16 halves the size; load on a GPU).")
# Text encoder
@click.option("--clip", "clip_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="A unclip clip/ folder to encode text and images with [default: the Karlo folder's text_encoder/ "
                   "with transformers installed, else open_clip ViT-L-14 'openai', the same weights].")
@friendly_errors
def convert(karlo_dir, out, dtype, clip_dir):
    """Convert published unCLIP weights (Karlo, diffusers layout) into a unclip model folder.

    The converted folder gives the same images as the Karlo folder; every --model command takes either.

    \b
    huggingface-cli download kakaobrain/karlo-v1-alpha --local-dir karlo
    unclip convert karlo --out models/karlo --dtype fp16
    unclip generate "a red apple on a table" --model models/karlo -o apple.png
    """
    import torch

    from unclip.clip import ClipEncoder
    from unclip.karlo import convert_karlo

    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    clip = ClipEncoder.load(clip_dir) if clip_dir else None
    path = convert_karlo(karlo_dir, out, dtype=dtypes[dtype], clip=clip)
    click.echo(f"wrote {path}")
# KARLO-COMMANDS-END

# ---------------------------------------------------------------- scale-out helpers
# SCALE-COMMANDS-BEGIN
# SCALE-COMMANDS-END


if __name__ == "__main__":
    sys.exit(main())
