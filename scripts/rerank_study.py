"""Which judge should best-of-k reranking use? Score every decoder sample with the shapes oracle and with each judge.

For held-out relation and count captions, one prior embedding per caption (or with --own-priors one per sample, as
best-of-k draws them by default) and K decoder samples from it; each sample
gets the oracle's verdict and its CLIP image embedding's cosine to the prompt's text embedding and to the image
embedding the decoder was given. Best of k (k divides K) is then read K / k times per caption for every judge
(`unclip.pipeline.rerank_scores`), next to a random pick (the first sample of each group) and the ceiling (the
share of groups holding a right sample: what a perfect judge would keep). Where the model has a
judge (judge/, a second CLIP), "judge text" and "judge both" take the text term from it, as the pipeline does. Where
the model names twin rules (`"rerank_twins"` in its sampling defaults), "... +twins" adds the twins term to the text
term (log p(prompt | sample) among the prompt and its twins, as `unclip generate` does by default). Relations are
also reported split by whether the caption names a held-out colour-shape pair (the test split's split.json). What
chose the default `rerank` (docs/MODELS.md, "What best of 4 ranks by", "A judge for best of 4", "Asking the judge
about the twins"):

    python scripts/rerank_study.py --model shapes --data runs/shapes/data/test --relations 80 --counts 60 --k 4 \\
        --samples 8 --json rerank.json
    python scripts/rerank_study.py --model shapes --data runs/shapes/data/test --relations 120 --counts 60 --k 4 \\
        --samples 8 --own-priors --json rerank-own.json
"""

import argparse
import json
import statistics

import torch

from pathlib import Path

from unclip.data.datasets import ImageTextFolder
from unclip.data.shapes import parse_caption
from unclip.eval.shapes import check, detect_objects
from unclip.pipeline import RERANK, UnCLIPPipeline, rerank_scores


def sample_captions(pipe, captions, samples, seed, own_priors=False):
    """Per caption: K samples' oracle verdicts and CLIP image embeddings, the prior's embedding and the text's."""
    rows = []
    settings = pipe.settings(image_candidates=1)
    rules = settings.rerank_twins
    for start in range(0, len(captions), 10):
        batch = captions[start:start + 10]
        seeds = list(range(seed + start, seed + start + len(batch)))
        text = pipe.encode_text(batch)
        # one prior sample per caption, or one per decoder sample (`share_prior` False): image_emb [b, K, D]
        image_emb, _ = pipe.sample_image_emb(batch, settings, seeds, text=text, per_prompt=samples if own_priors else 1)
        repeated = [c for c in batch for _ in range(samples)]
        flat = image_emb.flatten(0, 1) if own_priors else image_emb.repeat_interleave(samples, 0)
        out = pipe.decode(flat, pipe.decoder_text(repeated), settings,
                          seeds=[s * samples + j for s in seeds for j in range(samples)])
        with torch.inference_mode():
            features = pipe.clip.encode_image(out.base).view(len(batch), samples, -1)
            if pipe.judge is not None:
                judged = pipe.judge.encode_image(out.base).view(len(batch), samples, -1)
                judge_text = pipe.judge.encode_text(batch)[0]
            # each prompt's twins in the text space of its ranker: the judge's where there is one, as the pipeline
            twins = {name: pipe._twins(batch, rules, ranker) if rules else None
                     for name, ranker in (("clip", pipe.clip), ("judge", pipe.judge)) if ranker is not None}
        for i, caption in enumerate(batch):
            request = parse_caption(caption)
            ok = [check(detect_objects(image), request) for image in out.images[i * samples:(i + 1) * samples]]
            rows.append(dict(caption=caption, kind=request.kind, ok=ok, features=features[i],
                             image_emb=image_emb[i], text_emb=text[0][i]))
            if pipe.judge is not None:
                rows[-1].update(judged=judged[i], judge_text=judge_text[i])
            for name, found in twins.items():  # (emb [m, D], mask [m], scale) of this caption, or None
                rows[-1][f"twins_{name}"] = None if found is None else (found[0][i], found[1][i], found[2])
        print(f"{start + len(batch)} / {len(captions)} captions", flush=True)
    return rows


def best_of(rows, k, judge):
    """Oracle accuracy of the sample each judge keeps from each group of k ("random": the group's first)."""
    picks = []
    for row in rows:
        for group in range(0, len(row["ok"]), k):
            if judge in ("random", "ceiling"):  # the group's first; any right one (what a perfect judge keeps)
                picks.append(row["ok"][group] if judge == "random" else any(row["ok"][group:group + k]))
                continue
            window = slice(group, group + k)
            image_emb = row["image_emb"][None] if row["image_emb"].dim() == 1 else row["image_emb"][None, window]
            by_judge = judge.startswith("judge ")  # the judge's image-text cosine as the text term
            mode, _, plus = judge.split()[-1].partition("+")
            found = row["twins_judge" if by_judge else "twins_clip"] if plus else None
            twins = None if found is None else (found[0][None], found[1][None], found[2])
            scores = rerank_scores(row["features"][None, window], image_emb,
                                   row["judge_text" if by_judge else "text_emb"][None], mode,
                                   text_candidates=row["judged"][None, window] if by_judge else None, twins=twins)
            picks.append(row["ok"][group + int(scores.argmax())])
    return statistics.mean(picks), len(picks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--data", required=True, help="a shapes test split (unclip data shapes)")
    parser.add_argument("--relations", type=int, default=80)
    parser.add_argument("--counts", type=int, default=60)
    parser.add_argument("--samples", type=int, default=8, help="decoder samples per caption (K)")
    parser.add_argument("--k", type=int, default=4, help="best of k")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--own-priors", action="store_true",
                        help="each decoder sample from its own prior sample, as best-of-k does by default")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args(argv)
    if args.samples % args.k:
        raise SystemExit(f"--samples {args.samples} is not a multiple of --k {args.k}")
    pipe = UnCLIPPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    test = ImageTextFolder(args.data, pipe.image_size)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(7)).tolist()
    kinds = {i: parse_caption(test.captions[i]).kind for i in order}
    chosen = [i for i in order if kinds[i] == "relation"][:args.relations]
    chosen += [i for i in order if kinds[i] == "count"][:args.counts]
    rows = sample_captions(pipe, [test.captions[i] for i in chosen], args.samples, args.seed, args.own_priors)
    split = Path(args.data).parent / "split.json"
    held = {tuple(p) for p in json.loads(split.read_text())["held_out"]} if split.is_file() else set()
    judges = ["random", "ceiling", *RERANK] + (["judge text", "judge both"] if pipe.judge is not None else [])
    if pipe.settings().rerank_twins:
        judges += [f"{judge}+twins" for judge in judges if judge.split()[-1] in ("text", "both")]
    groups = {kind: [row for row in rows if row["kind"] == kind] for kind in ("relation", "count")}
    if held:
        groups["relation, held-out pair"] = [r for r in groups["relation"] if parse_caption(r["caption"]).pairs & held]
        groups["relation, seen pairs"] = [r for r in groups["relation"] if not parse_caption(r["caption"]).pairs & held]
    table = {}
    for kind, subset in groups.items():
        table[kind] = {judge: best_of(subset, args.k, judge) for judge in judges} if subset else {}
        print(kind, {judge: f"{acc:.3f} ({n} picks)" for judge, (acc, n) in table[kind].items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=str(args.model), k=args.k, samples=args.samples, own_priors=args.own_priors,
                           table=table), f, indent=2)


if __name__ == "__main__":
    main()
