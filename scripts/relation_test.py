"""Does the CLIP tell a relation from its reverse? (docs/MODELS.md, "Teaching the CLIP word order")

For held-out relation captions ("a red circle to the left of a green triangle") and their pictures:
  prefers swapped    the image embedding is closer to its caption than to the caption with the relation word
                     swapped ("... to the right of ..."; it describes the mirrored picture)
  prefers reordered  ... than to the caption with the two objects exchanged ("a green triangle to the left of
                     a red circle": the same words in another order, which also describes the mirrored picture)
  cos(...)           cosine between the caption's text embedding and each twin's
0.5 is chance for the preferences. With --decode, the decoder alone also draws each picture from its true image
embedding and caption tokens, and the shapes oracle scores the relation (the decoder's relation score).

    python scripts/relation_test.py --model unclip/models/shapes --data runs/shapes/data/test --n 300
"""

import argparse
import json
from pathlib import Path

import torch

from unclip.clip import ClipEncoder
from unclip.clip_training import reorder_caption, swap_words
from unclip.data.datasets import ImageTextFolder
from unclip.data.shapes import RELATIONS, parse_caption

SWAPS = [("left", "right"), ("above", "below")]


def relation_report(clip: ClipEncoder, images: torch.Tensor, captions: list[str]) -> dict:
    """images [n, 3, S, S] in [-1, 1] with their relation captions -> the CLIP's preferences and cosines."""
    image_emb = clip.encode_image(images)
    text_emb = clip.encode_text(captions)[0]
    report = {"n": len(captions)}
    for name, twins in (("swapped", [swap_words(c, SWAPS) for c in captions]),
                        ("reordered", [reorder_caption(c, list(RELATIONS)) for c in captions])):
        twin_emb = clip.encode_text(twins)[0]
        report[f"prefers {name}"] = float(((image_emb * text_emb).sum(-1) > (image_emb * twin_emb).sum(-1))
                                          .float().mean())
        report[f"cos(caption, {name})"] = float((text_emb * twin_emb).sum(-1).mean())
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder with clip/ (and decoder/)")
    parser.add_argument("--clip", type=Path, default=None, help="another clip/ folder to test instead")
    parser.add_argument("--data", type=Path, required=True, help="held-out shapes pairs")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--decode", action="store_true", help="also score the decoder alone on the relations")
    args = parser.parse_args(argv)
    clip = ClipEncoder.load(args.clip or args.model / "clip").eval()
    test = ImageTextFolder(args.data, 64)
    rows = [i for i, c in enumerate(test.captions) if parse_caption(c).kind == "relation"][: args.n]
    captions = [test.captions[i] for i in rows]
    real = torch.stack([test[i]["image"] for i in rows])                      # [n, 3, 64, 64] in [-1, 1]
    report = relation_report(clip, real, captions)
    if args.decode:
        from decoder.model import Decoder, decoder_text
        from decoder.sample import sample_decoder
        from unclip.eval.shapes import evaluate

        decoder = Decoder.load(args.model / "decoder").eval()
        tokens, mask = decoder_text(clip, decoder.config, captions)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            images = sample_decoder(decoder, clip.encode_image(real), tokens, mask, num_steps=20, progress=False,
                                    generator=torch.Generator().manual_seed(0))["images"].float()
        report["decoder relation score"] = evaluate(list(images), captions)["relation"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
