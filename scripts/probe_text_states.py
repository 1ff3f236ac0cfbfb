"""How well a CLIP's text tower keeps apart captions that differ in one word, layer by layer.

For each pair of captions that differ in one word, the cosine between the two captions' states at that word,
after each layer of the text transformer (layer 0: the token + position embeddings), each passed through the
final LayerNorm as the decoder sees them. A decoder reading only the final states gets words the CLIP
learned to ignore as near-duplicates (docs/MODELS.md, "What the decoder reads of the caption"):

    python scripts/probe_text_states.py --model shapes
"""

import argparse

import torch
import torch.nn.functional as F

from unclip.pipeline import UnCLIPPipeline

PAIRS = [("a blue square on the left", "a blue square on the right"),
         ("a blue square on the top", "a blue square on the bottom"),
         ("a red circle to the left of a green triangle", "a red circle above a green triangle"),
         ("two yellow squares", "three yellow squares"),
         ("a large red circle", "a small red circle"),
         ("a large red circle", "a large blue circle")]


@torch.inference_mode()
def layer_states(clip, prompts: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[final-LayerNorm'd states [B, L, W] after each layer, layer 0 = input embeddings], token ids [B, L]."""
    m = clip.model
    ids, _ = clip.token_ids(prompts)
    x = m.token_embedding(ids) + m.positional_embedding  # [B, L, W]
    states = [m.ln_final(x)]
    for block in m.transformer.resblocks:
        x = block(x, attn_mask=m.attn_mask)
        states.append(m.ln_final(x))
    return states, ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="a model folder or bundled name")
    args = parser.parse_args(argv)
    clip = UnCLIPPipeline.from_pretrained(args.model).clip
    rows = []
    for a, b in PAIRS:
        states, ids = layer_states(clip, [a, b])
        word = int((ids[0] != ids[1]).nonzero()[0])  # the first position where the captions differ
        rows.append((a, b, [float(F.cosine_similarity(s[0, word], s[1, word], dim=0)) for s in states]))
    layers = len(rows[0][2])
    print(f"| caption pair (cosine at the first differing word) | {' | '.join(f'layer {i}' for i in range(layers))} |")
    print(f"|---|{'---|' * layers}")
    for a, b, cos in rows:
        print(f"| {a} / {b} | {' | '.join(f'{c:.2f}' for c in cos)} |")


if __name__ == "__main__":
    main()
