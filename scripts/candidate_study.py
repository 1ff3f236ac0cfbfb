"""Where best of k stands on prompts drawn afresh: every candidate judged by the shapes oracle.

Draws relation and count captions from the shapes grammar (every second one naming a held-out colour-shape pair), has
the model draw its best-of-k candidates for each exactly as `unclip generate` does (one prior sample per candidate,
the model's sampling defaults overridden by --settings), and reports per group (relations naming a held-out pair,
relations of seen pairs, counts): the share of captions whose pick the oracle passes ("pick"), the share of all
candidates it passes ("per sample") and the share of captions with a passing candidate among the k ("ceiling": what
a perfect ranker would keep). Two runs with the same --seed draw the same captions and noise, so settings that only
rank (rerank_paraphrase, verify_weight) leave the per-sample and ceiling columns alone and move the pick. What chose
the shapes model's text guidance and paraphrase (docs/MODELS.md, "Text guidance and the paraphrase"):

    python scripts/candidate_study.py --model shapes --split runs/shapes/data/split.json --seed 71 \\
        --settings '{"rerank_paraphrase": {}}'
    python scripts/candidate_study.py --model shapes --split runs/shapes/data/split.json --seed 71
    python scripts/candidate_study.py --model shapes --split runs/shapes/data/split.json --seed 71 \\
        --settings '{"text_guidance": 5, "rerank_paraphrase": {}}'
"""

import argparse
import json
import statistics

import numpy as np
import torch

from unclip.data.shapes import ALL_PAIRS, DEFAULT_HELD_OUT, caption, parse_caption, sample_scene
from unclip.eval.shapes import check, detect_objects
from unclip.pipeline import UnCLIPPipeline


def draw(seed: int, relations: int, counts: int, held: list[tuple[str, str]]) -> list[str]:
    rng = np.random.default_rng(seed)
    allowed = [p for p in ALL_PAIRS if p not in held]
    return [caption(sample_scene(rng, kind, ALL_PAIRS, require_any=held) if i % 2 == 0
                    else sample_scene(rng, kind, allowed))
            for kind, n in (("relation", relations), ("count", counts)) for i in range(n)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--split", help="the data's split.json, for its held-out pairs (default: the builder's)")
    parser.add_argument("--settings", default="{}", help="JSON sampling settings over the model's own")
    parser.add_argument("--relations", type=int, default=150)
    parser.add_argument("--counts", type=int, default=40)
    parser.add_argument("--seed", type=int, default=71)
    parser.add_argument("--json", help="write the per-caption verdicts here")
    args = parser.parse_args(argv)

    held = [tuple(p) for p in json.load(open(args.split))["held_out"]] if args.split else list(DEFAULT_HELD_OUT)
    pipe = UnCLIPPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    settings = pipe.settings(**json.loads(args.settings))
    one, k = pipe.settings(**{**json.loads(args.settings), "image_candidates": 1}), settings.image_candidates
    captions = draw(args.seed, args.relations, args.counts, held)
    rows = []
    for start in range(0, len(captions), 5):
        batch = captions[start:start + 5]
        seeds = [args.seed * 100000 + start + j for j in range(len(batch))]
        text = pipe.encode_text(batch)
        emb, _ = pipe.sample_image_emb(batch, settings, seeds, text=text, per_prompt=k)      # [b, k, D]
        flat = [c for c in batch for _ in range(k)]
        out = pipe.decode(emb.flatten(0, 1), pipe.decoder_text(flat), one,
                          seeds=[s * k + j for s in seeds for j in range(k)])
        with torch.inference_mode():
            scores = pipe._rank(out.base.view(len(batch), k, *out.base.shape[1:]), emb, text, batch, settings)
        for i, c in enumerate(batch):
            want = parse_caption(c)
            ok = [bool(check(detect_objects(im), want)) for im in out.images[i * k:(i + 1) * k]]
            group = "count" if want.kind == "count" else "relation, held-out pair" if want.pairs & set(held) \
                else "relation, seen pairs"
            rows.append({"caption": c, "group": group, "ok": ok, "pick": int(scores[i].argmax())})
        print(f"{start + len(batch)} / {len(captions)}", flush=True)
    report = {}
    for group in ("relation, held-out pair", "relation, seen pairs", "count"):
        g = [r for r in rows if r["group"] == group]
        report[group] = {"captions": len(g), "pick": statistics.mean(r["ok"][r["pick"]] for r in g),
                         "per sample": statistics.mean(o for r in g for o in r["ok"]),
                         "ceiling": statistics.mean(any(r["ok"]) for r in g)}
    rel = [r for r in rows if r["group"] != "count"]
    report["relation"] = {"captions": len(rel), "pick": statistics.mean(r["ok"][r["pick"]] for r in rel)}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": json.loads(args.settings), "report": report, "rows": rows}, f, indent=1)
    return report


if __name__ == "__main__":
    main()
