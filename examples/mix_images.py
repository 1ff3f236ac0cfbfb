"""Mix several pictures (or prompts) by weight and decode the blend.

    python examples/mix_images.py a.png b.png "a red apple" --weights 1 1 2 -n 4 -o mix.png
"""

import argparse

import torch

import unclip
from unclip.images import make_grid, save_png


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="picture paths or prompts")
    parser.add_argument("--weights", type=float, nargs="+", default=None)
    parser.add_argument("--model", default="emoji")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", default="mix.png")
    args = parser.parse_args(argv)

    pipe = unclip.UnCLIPPipeline.from_pretrained(args.model)
    embs = torch.stack([pipe.embed(item) for item in args.inputs])          # [K, D]
    blend = unclip.mix(embs, args.weights or [1.0] * len(args.inputs))     # [D]
    out = pipe.decode(blend.expand(args.n, -1), seeds=range(args.seed, args.seed + args.n))
    save_png(make_grid(out.images), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
