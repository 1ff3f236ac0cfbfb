"""Morph one picture into another through their CLIP image embeddings.

    python examples/image_morph.py cat.png dog.png --frames 10 -o morph.gif
"""

import argparse

import torch

import unclip
from unclip.images import save_gif


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--model", default="emoji")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", default="morph.gif")
    args = parser.parse_args(argv)

    pipe = unclip.UnCLIPPipeline.from_pretrained(args.model)
    ends = pipe.encode_image([args.first, args.second])                    # [2, D]
    path = unclip.slerp(ends[0], ends[1], torch.linspace(0, 1, args.frames))
    frames = pipe.decode(path, seeds=[args.seed] * args.frames)
    save_gif(frames.images + frames.images[::-1], args.out, duration_ms=120)  # there and back
    print(args.out)


if __name__ == "__main__":
    main()
