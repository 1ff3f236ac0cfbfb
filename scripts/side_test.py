"""Does the decoder put an object on the side its condition names? (docs/MODELS.md, "left" and "right")

For held-out "... on the left / right / top / bottom" captions, the decoder alone draws from
  true       the picture's CLIP image embedding and its caption's tokens,
  mirrored   the embedding of the picture mirrored across the named axis, with the caption's tokens,
  no text    the picture's embedding and no caption (the decoder's null text),
  text only  the caption's tokens and no image embedding (the decoder's null image, `prior_free`),
and the shapes oracle reports how often one object of the right colour and shape is drawn ("object"), and of
those how often it lies on the named side ("side"; 0.5 is chance, and a decoder that follows the mirrored
embedding scores near 0 there).

    python scripts/side_test.py --model unclip/models/shapes --data runs/shapes/data/test --n 80
"""

import argparse
import json
from pathlib import Path

import torch

from decoder.model import Decoder, decoder_text
from decoder.sample import sample_decoder
from unclip.clip import ClipEncoder
from unclip.clip_training import swap_words
from unclip.data.datasets import ImageTextFolder
from unclip.data.shapes import parse_caption
from unclip.eval.shapes import _matches, _placed, detect_objects


def decode(decoder, clip, image_emb, captions, seed: int = 0):
    """captions None: no caption (the decoder's null text); image_emb None: no image embedding (text only)."""
    tokens, mask = decoder_text(clip, decoder.config, captions) if captions else (None, None)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return sample_decoder(decoder, image_emb, tokens, mask, num_steps=25, progress=False,
                              guidance_interval=(0.0, 1.0),  # every step, as in the recorded figures
                              prior_free=image_emb is None,
                              generator=torch.Generator().manual_seed(seed))["images"].float()


def side_scores(images, captions) -> dict:
    drawn = sided = 0
    for image, caption in zip(images, captions):
        req = parse_caption(caption)
        objects = detect_objects(image)
        if len(objects) == 1 and _matches(objects[0], *req.objects[0]):
            drawn += 1
            sided += _placed(objects[0], req.position)
    return {"object": drawn / len(captions), "side": sided / max(drawn, 1), "n": len(captions)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder with clip/ and decoder/")
    parser.add_argument("--data", type=Path, required=True, help="held-out shapes pairs")
    parser.add_argument("--n", type=int, default=80)
    args = parser.parse_args(argv)
    clip = ClipEncoder.load(args.model / "clip").eval()
    decoder = Decoder.load(args.model / "decoder").eval()
    test = ImageTextFolder(args.data, 64)
    rows = [i for i, c in enumerate(test.captions) if parse_caption(c).kind == "placed"][: args.n]
    captions = [test.captions[i] for i in rows]
    real = torch.stack([test[i]["image"] for i in rows])                      # [n, 3, 64, 64] in [-1, 1]
    mirrored = torch.stack([x.flip(-1) if parse_caption(c).position in ("left", "right") else x.flip(-2)
                            for x, c in zip(real, captions)])
    image_emb, mirrored_emb = clip.encode_image(real), clip.encode_image(mirrored)
    swaps = [("left", "right"), ("top", "bottom")]
    text_emb, twin_emb = clip.encode_text(captions)[0], clip.encode_text([swap_words(c, swaps) for c in captions])[0]
    report = {
        "CLIP: image prefers its caption to the swapped one": float(
            ((image_emb * text_emb).sum(-1) > (image_emb * twin_emb).sum(-1)).float().mean()),
        "CLIP: cos(caption, swapped caption)": float((text_emb * twin_emb).sum(-1).mean()),
        "true": side_scores(decode(decoder, clip, image_emb, captions), captions),
        "mirrored": side_scores(decode(decoder, clip, mirrored_emb, captions), captions),
        "no text": side_scores(decode(decoder, clip, image_emb, None), captions),
        "text only": side_scores(decode(decoder, clip, None, captions), captions),
        "cos(image emb, mirrored)": float((image_emb * mirrored_emb).sum(-1).mean()),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
