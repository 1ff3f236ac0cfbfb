"""Compare a model's upsampler with bicubic upsampling on held-out images: PSNR against the real image.

Downsamples real images to the upsampler's input size, upsamples them back (bicubic; the upsampler alone;
the upsampler with its low frequencies matched to the input, the pipeline's default for unclip's own
upsamplers), and prints the PSNR of each against the original. `--grid` writes those rows and the real
images. `--samplers` also times and scores the pipeline's path (low frequencies matched) per sampler and step count,
each from the same noise:

    python scripts/compare_upsampler.py --model shapes --data runs/shapes/data/test --n 64 --grid up.png
    python scripts/compare_upsampler.py --model emoji --data data/emoji --n 400 --samplers ddim:10,unipc:5
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decoder.sample import upsample
from decoder.upsampler import downsample
from unclip.data.datasets import ImageTextFolder
from unclip.eval.metrics import psnr
from unclip.images import make_grid, tensor_to_pil
from unclip.pipeline import UnCLIPPipeline


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emoji", help="a model name or folder")
    parser.add_argument("--data", type=Path, required=True, help="held-out images (a folder of pairs)")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--samplers", default=None, help="SAMPLER:STEPS,... to compare on the pipeline's path")
    parser.add_argument("--grid", type=Path, default=None,
                        help="write a PNG: 8 columns, rows bicubic, upsampler alone, matched, real")
    args = parser.parse_args(argv)
    pipe = UnCLIPPipeline.from_pretrained(args.model)
    up = pipe.upsamplers[0]
    size, low_size = up.config.image_size, up.config.low_res_size
    data = ImageTextFolder(args.data, size)
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: args.n].tolist()
    real = torch.stack([data[i]["image"] for i in rows])
    low = downsample(real, low_size)
    bicubic = F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    outputs = {}
    for name, match in (("upsampler alone", False), ("upsampler, low frequencies matched", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=pipe.dtype == torch.bfloat16):
            outputs[name] = upsample(up, low, num_steps=args.steps, match_low_res=match, progress=False,
                                     generator=torch.Generator().manual_seed(0)).float()
    report = {"model": args.model, "prediction_type": up.config.prediction_type, "n": len(rows),
              "steps": args.steps, "psnr_db": {"bicubic": psnr(bicubic, real),
                                               **{k: psnr(v, real) for k, v in outputs.items()}}}
    if args.samplers:
        report["samplers"] = {}
        for item in args.samplers.split(","):
            sampler, _, steps = item.strip().partition(":")
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=pipe.dtype == torch.bfloat16):
                out = upsample(up, low, scheduler=sampler, num_steps=int(steps), progress=False,
                               generator=torch.Generator().manual_seed(0)).float()
            report["samplers"][item.strip()] = {"psnr_db": psnr(out, real), "s_per_image": (time.perf_counter() - start)
                                                / len(rows)}
    print(json.dumps(report, indent=2))
    if args.grid:
        k = min(8, len(rows))
        shown = [bicubic, outputs["upsampler alone"], outputs["upsampler, low frequencies matched"], real]
        tiles = [tile for row in shown for tile in tensor_to_pil(row[:k])]
        make_grid(tiles, cols=k).quantize(256).save(args.grid, optimize=True)


if __name__ == "__main__":
    main()
