"""Ablate the decoder: train one decoder per arm (a recipe's decoder with config values changed), score each alone.

Each arm is the recipe's decoder stage (same data, seed, schedule and batch) with `key=value` overrides of its
DecoderConfig, trained for `--steps` in RUN/ablation/ARM (resumable: run the command again after an
interruption), then scored like scripts/learning_curve.py: held-out captions decoded from their true image
embeddings, shapes oracle per scene kind and FD in CLIP space. RUN is a finished recipe run (its data/ and
model/clip are used). What chose the decoder's text-path defaults (docs/MODELS.md):

    python scripts/ablate_decoder.py --recipe configs/shapes.json --run runs/shapes --steps 2250 --n 400 \\
        --arm clip-drop0.2:text_drop_prob=0.2 --arm clip-drop0.5:text_drop_prob=0.5 \\
        --arm transformer-drop0.2:text_encoder=transformer,text_drop_prob=0.2
"""

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from learning_curve import load_decoder, score
from decoder.config import DecoderConfig, decoder_preset
from decoder.training import train_decoder
from unclip.clip import ClipEncoder
from unclip.config import config_from_dict
from unclip.data.datasets import ImageTextFolder
from unclip.data.shapes import parse_caption
from unclip.recipe import load_recipe
from unclip.training import TrainConfig, list_checkpoints

KINDS = ("overall", "single", "placed", "relation", "count")


def parse_arm(text: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> (name, overrides), values typed by DecoderConfig's defaults."""
    name, _, spec = text.partition(":")
    defaults = DecoderConfig()
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(defaults, key):
            raise SystemExit(f"--arm {text!r}: DecoderConfig has no field {key!r}")
        overrides[key] = type(getattr(defaults, key))(value)
    return name, overrides


def train_arm(recipe: dict, run: Path, name: str, overrides: dict, steps: int) -> Path:
    arm = run / "ablation" / name
    if not (arm / "model" / "clip").is_dir():
        shutil.copytree(run / "model" / "clip", arm / "model" / "clip")
    section = recipe["decoder"]
    config = decoder_preset(section.get("preset", "tiny"), **{**section.get("config", {}), **overrides})
    train_config = config_from_dict(TrainConfig, {**section.get("train", {}), "steps": steps})
    done = list_checkpoints(arm / "runs" / "decoder")
    if done and done[-1][0] >= steps and (arm / "model" / "decoder").is_dir():
        return arm  # trained in an earlier run of this command
    train_decoder(arm / "model", run / "data" / "train", train_config=train_config, config=config,
                  run_dir=arm / "runs" / "decoder", resume=True)
    return arm


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="a finished recipe run (data/, model/clip)")
    parser.add_argument("--arm", action="append", required=True, help="NAME:key=value,... (DecoderConfig fields)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--n", type=int, default=400, help="held-out captions scored per arm")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    arms = [parse_arm(a) for a in args.arm]
    test = ImageTextFolder(args.run / "data" / "test", 64)
    rows = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.n].sort().values.tolist()
    counts = {k: 0 for k in KINDS}
    for i in rows:
        counts["overall"] += 1
        counts[parse_caption(test.captions[i]).kind] += 1
    results = {}
    for name, overrides in arms:
        arm = train_arm(recipe, args.run, name, overrides, args.steps)
        out = arm / "score.json"
        if not out.is_file():
            clip = ClipEncoder.load(arm / "model" / "clip")
            result = {"overrides": overrides, "n": args.n, "steps": args.steps,
                      **score(load_decoder(arm), test, rows, clip, shapes=True)}
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(out)  # a score.json is whole or absent
        results[name] = json.loads(out.read_text())
    print(f"| arm | {' | '.join(KINDS)} | FD |\n|---|{'---|' * (len(KINDS) + 1)}")
    for name, r in results.items():
        cells = [f"{r[k]:.3f} ± {math.sqrt(r[k] * (1 - r[k]) / counts[k]):.3f}" for k in KINDS]
        print(f"| {name} | {' | '.join(cells)} | {r['fd_clip']:.4f} |")
    print(f"(n per kind: {counts}; ± is one binomial standard error)")


if __name__ == "__main__":
    main()
