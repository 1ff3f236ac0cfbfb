"""DALL-E 2 text diffs: push a picture's embedding toward "to" and away from "from", in steps.

    python examples/text_diff_sweep.py apple.png --from "red apple" --to "green apple" --steps 5 -o sweep.png
"""

import argparse

import torch

import unclip
from unclip.images import make_grid, save_png


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--from", dest="from_text", required=True)
    parser.add_argument("--to", dest="to_text", required=True)
    parser.add_argument("--model", default="emoji")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-amount", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", default="sweep.png")
    args = parser.parse_args(argv)

    pipe = unclip.UnCLIPPipeline.from_pretrained(args.model)
    image_emb = pipe.encode_image([args.image])[0]                     # [D]
    text_emb = pipe.encode_text([args.from_text, args.to_text])[0]     # [2, D]
    amounts = torch.linspace(0, args.max_amount, args.steps)
    path = unclip.text_diff(image_emb, text_emb[0], text_emb[1], amounts)  # [T, D]
    out = pipe.decode(path, seeds=[args.seed] * args.steps)
    save_png(make_grid(out.images, cols=args.steps), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
