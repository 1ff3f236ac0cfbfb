"""Follow a decoder while it trains: each time MODEL/decoder is re-exported, score it on held-out captions.

Decodes held-out captions from their true CLIP image embeddings and text tokens (the decoder alone, no prior)
and appends (step, images seen, shapes-oracle accuracy, FD in CLIP space) to a CSV. Run it beside a recipe:

    nice -n 10 python scripts/learning_curve.py --run runs/shapes --data runs/shapes/data/test --out curve.csv

or afterwards, over the EMA weights of every checkpoint the run kept (`--checkpoints`).
"""

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from safetensors.torch import load_file

from decoder.model import Decoder, decoder_text
from decoder.sample import sample_decoder
from unclip.clip import ClipEncoder
from unclip.data.datasets import ImageTextFolder
from unclip.eval.metrics import frechet_distance
from unclip.training import list_checkpoints


def load_decoder(run: Path, checkpoint: Path | None = None) -> Decoder:
    """The exported decoder, or (with `checkpoint`) its architecture with that checkpoint's EMA weights."""
    decoder = Decoder.load(run / "model" / "decoder")
    if checkpoint is not None:
        decoder.load_state_dict({k: v.float() for k, v in load_file(str(checkpoint / "ema.safetensors")).items()})
    return decoder.eval()


def score(decoder: Decoder, test: ImageTextFolder, rows: list[int], clip: ClipEncoder, shapes: bool,
          chunk: int = 100) -> dict:
    """FD in CLIP space (and, on shapes data, the oracle's report) of the decoder's images for test[rows],
    decoded from their true image embeddings, `chunk` captions per sampling batch."""
    captions = [test.captions[i] for i in rows]
    real = torch.stack([test[i]["image"] for i in rows])
    image_emb = clip.encode_image(real)
    tokens, mask = decoder_text(clip, decoder.config, captions)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        images = torch.cat([sample_decoder(decoder, image_emb[i:i + chunk], tokens[i:i + chunk], mask[i:i + chunk],
                                           num_steps=25, progress=False, generator=generator,
                                           guidance_interval=(0.0, 1.0))["images"].float()  # as recorded: every step
                            for i in range(0, len(rows), chunk)])
    result = {"fd_clip": frechet_distance(clip.encode_image(images), image_emb)}
    if shapes:
        from unclip.eval.shapes import evaluate
        report = evaluate(list(images), captions)
        result.update({k: report[k] for k in ("overall", "single", "placed", "relation", "count")})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a recipe run folder (with model/ and runs/decoder)")
    parser.add_argument("--data", type=Path, required=True, help="held-out pairs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--poll", type=float, default=30.0)
    parser.add_argument("--until-step", type=int, default=10**9)
    parser.add_argument("--checkpoints", action="store_true",
                        help="score every kept checkpoint's EMA weights now, then stop (instead of following)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clip = ClipEncoder.load(args.run / "model" / "clip")
    test = ImageTextFolder(args.data, 64)
    rows = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.n].sort().values.tolist()
    shapes = (args.data.parent / "split.json").is_file()
    done = set()
    if args.out.is_file():
        done = {int(r["step"]) for r in csv.DictReader(args.out.open())}
    batch = json.loads((args.run / "runs" / "decoder" / "train_config.json").read_text())["train"]["batch_size"]

    def write(row):
        new = not args.out.is_file()
        with args.out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(row, flush=True)
        done.add(row["step"])

    if args.checkpoints:
        for step, path in list_checkpoints(args.run / "runs" / "decoder"):
            if step not in done:
                write({"step": step, "images_seen": step * batch,
                       **score(load_decoder(args.run, path), test, rows, clip, shapes)})
        return
    while True:
        cps = list_checkpoints(args.run / "runs" / "decoder")
        step = cps[-1][0] if cps else 0
        if step and step not in done:
            try:
                row = {"step": step, "images_seen": step * batch,
                       **score(load_decoder(args.run), test, rows, clip, shapes)}
            except (ValueError, OSError):  # caught the export mid-swap: try again at the next poll
                time.sleep(args.poll)
                continue
            write(row)
        if step >= args.until_step:
            return
        time.sleep(args.poll)


if __name__ == "__main__":
    main()
