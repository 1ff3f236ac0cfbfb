"""Walk from one prompt to another: slerp between the prior's image embeddings, one decoder noise for all frames.

    python examples/prompt_walk.py "a red circle" "a blue square" --model shapes --frames 8 -o walk.gif
"""

import argparse

import torch

import unclip
from unclip.images import save_gif


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("start")
    parser.add_argument("end")
    parser.add_argument("--model", default="emoji")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", default="walk.gif")
    args = parser.parse_args(argv)

    pipe = unclip.UnCLIPPipeline.from_pretrained(args.model)
    a, b = pipe.embed(args.start), pipe.embed(args.end)             # [D] each, on the unit sphere
    path = unclip.slerp(a, b, torch.linspace(0, 1, args.frames))    # [T, D]
    frames = pipe.decode(path, seeds=[args.seed] * args.frames)     # the same seed: the same noise per frame
    save_gif(frames.images, args.out, duration_ms=150)
    print(args.out)


if __name__ == "__main__":
    main()
