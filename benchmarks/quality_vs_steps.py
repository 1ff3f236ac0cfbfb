"""Time to equal quality: fewer sampling steps (DPM-Solver++, UniPC) against 50-step DDIM / DDPM on a trained model.

    python benchmarks/quality_vs_steps.py --model M --data D/test [--n 200] [--configs ddim:50,dpm++:10,...]
    python benchmarks/quality_vs_steps.py --model M --data D/test --stages decoder \
        --configs "ddim:25/upsampler=ddim:10,unipc:15"      # decoder (and upsampler) samplers only

Each configuration is SAMPLER:STEPS for the --stages (default: the prior and the decoder), optionally followed
by /STAGE=SAMPLER:STEPS parts for single stages (stages it does not name keep the pipeline's defaults) and a
/guide=LOW-HIGH part for the decoder's guidance interval (t / T; e.g. ddim:20/guide=0.3-1). For each:
one image per test caption (caption i seeded with seed + i, so every configuration sees the same prompts and
seeds), the seconds per image, the Fréchet distance between CLIP image embeddings of the generated and the real
test images (`unclip.eval.metrics.frechet_distance`) and a per-caption score: on shapes data the oracle
(`unclip.eval.shapes`), elsewhere CLIP R-precision top-5 (the caption among the model's CLIP's five nearest of all
test captions to the image), with its paired difference to the reference (same prompts and seeds; ± one standard
error of that difference). A configuration "matches" the reference (the first one, 50-step DDIM by default) when
its score is within one binomial standard error and its FD within --fd-tolerance of the reference's. Writes the
"quality" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import report  # noqa: E402

DEFAULT_CONFIGS = "ddim:50,ddpm:50,dpm++:10,dpm++:15,dpm++:25,ddim:25"


STAGES = ("prior", "decoder", "upsampler")


def parse_configs(text: str, stages: list[str]) -> list[tuple[str, dict]]:
    """"ddim:25/upsampler=ddim:10,..." -> [(label, SamplingSettings fields), ...]."""
    out = []
    for item in text.split(","):
        settings = {}
        for part in item.strip().split("/"):
            stage, _, spec = part.rpartition("=")
            if stage == "guide":  # the decoder's guidance interval, LOW-HIGH in t / T
                low, _, high = spec.partition("-")
                try:
                    settings["decoder_guidance_interval"] = (float(low), float(high))
                except ValueError:
                    raise SystemExit(f"--configs: guide=LOW-HIGH takes two numbers, got {part!r}") from None
                continue
            sampler, _, steps = spec.partition(":")
            if not steps.isdigit() or (stage and stage not in STAGES):
                raise SystemExit(f"--configs items are SAMPLER:STEPS[/STAGE=SAMPLER:STEPS...][/guide=LOW-HIGH], "
                                 f"got {item!r}")
            for name in ([stage] if stage else stages):
                settings.update({f"{name}_sampler": sampler, f"{name}_steps": int(steps)})
        out.append((item.strip(), settings))
    return out


def evaluate_config(pipe, captions, real_emb, label: str, settings: dict, args) -> dict:
    import torch

    from unclip.eval.metrics import frechet_distance
    from unclip.eval.report import generate_for_captions

    generate_for_captions(pipe, captions[:2], batch_size=2, seed=args.seed, **settings)  # warm-up
    start = time.perf_counter()
    images = generate_for_captions(pipe, captions, batch_size=args.batch_size, seed=args.seed, **settings)
    elapsed = time.perf_counter() - start
    with torch.inference_mode():
        gen_emb = pipe.clip.encode_image(images).cpu()
    out = {"config": label, "settings": settings, "s_per_image": elapsed / len(images),
           "fd": frechet_distance(gen_emb, real_emb)}
    if args.shapes:
        from unclip.eval.shapes import check, detect_objects, parse_caption

        out["correct"] = [bool(check(detect_objects(im), parse_caption(c))) for im, c in zip(images, captions)]
    else:
        from unclip.eval.metrics import caption_ranks

        unique = sorted(set(captions))
        with torch.inference_mode():
            text_emb = pipe.clip.encode_text(unique)[0].cpu()
        out["correct"] = (caption_ranks(gen_emb, text_emb, [unique.index(c) for c in captions]) < 5).tolist()
    out["score"] = sum(out["correct"]) / len(images)
    return out


def pipeline_defaults() -> str:
    from unclip.pipeline import SamplingSettings

    d = SamplingSettings()
    return ", ".join(f"{stage} {getattr(d, stage + '_sampler')}:{getattr(d, stage + '_steps')}" for stage in STAGES)


def paired_difference(result: dict, ref: dict) -> str:
    """Score difference to the reference on the same prompts and seeds, ± one standard error."""
    diff = [float(a) - float(b) for a, b in zip(result["correct"], ref["correct"])]
    mean = sum(diff) / len(diff)
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / max(len(diff) - 1, 1) / len(diff))
    return f"{mean:+.3f} ± {se:.3f}"


def matches(result: dict, ref: dict, n: int, fd_tolerance: float) -> bool:
    ok = result["fd"] <= ref["fd"] * (1 + fd_tolerance)
    p = ref["score"]
    ok = ok and result["score"] >= p - math.sqrt(max(p * (1 - p), 1e-9) / n)
    return ok


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or bundled name (e.g. the trained shapes model)")
    parser.add_argument("--data", required=True, type=Path, help="test folder of image-caption pairs")
    parser.add_argument("--n", type=int, default=200, help="test captions (one image each)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="SAMPLER:STEPS,...; the first is the reference")
    parser.add_argument("--stages", default="prior,decoder",
                        help="stages a plain SAMPLER:STEPS sets (comma-separated from prior, decoder, upsampler)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="as the pipeline's (auto: bf16 where native)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", action=argparse.BooleanOptionalAction, default=None,
                        help="score with the shapes oracle (default: when DATA/../split.json exists)")
    parser.add_argument("--fd-tolerance", type=float, default=0.05, help="relative FD slack for 'matches'")
    parser.add_argument("--markdown", type=Path, default=None, help="default docs/BENCHMARKS.md")
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--section", default="quality",
                        help="BENCHMARKS.md section to write (one per model: quality, quality-emoji, ...)")
    args = parser.parse_args()
    args.stages = [s.strip() for s in args.stages.split(",")]
    if not set(args.stages) <= set(STAGES):
        parser.error(f"--stages takes {', '.join(STAGES)}")
    if args.shapes is None:
        args.shapes = (args.data.parent / "split.json").is_file()
    return args


def main() -> None:
    import torch

    from unclip.data.datasets import ImageTextFolder
    from unclip.pipeline import UnCLIPPipeline

    args = parse_args()
    machine = report.machine()
    pipe = UnCLIPPipeline.from_pretrained(args.model).to(dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    test = ImageTextFolder(args.data, pipe.image_size)
    rows_idx = sorted(torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[:args.n].tolist())
    captions = [test.captions[i] for i in rows_idx]
    with torch.inference_mode():
        real_emb = pipe.clip.encode_image(torch.stack([test[i]["image"] for i in rows_idx])).cpu()
    results = []
    for label, settings in parse_configs(args.configs, args.stages):
        res = evaluate_config(pipe, captions, real_emb, label, settings, args)
        results.append(res)
        print(f"{label}  {res['s_per_image']:.3f} s/image  FD {res['fd']:.4g}  score {res['score']:.3f}",
              file=sys.stderr, flush=True)
    ref = results[0]
    metric = "shapes oracle" if args.shapes else "R-precision top-5"
    rows = [[r["config"], f"{r['s_per_image']:.3f}", f"{ref['s_per_image'] / r['s_per_image']:.2f}x",
             f"{r['fd']:.4g}", report.fmt(r["score"]), "" if r is ref else paired_difference(r, ref),
             "reference" if r is ref else ("yes" if matches(r, ref, len(captions), args.fd_tolerance) else "no")]
            for r in results]
    fastest = min((r for r in results if r is ref or matches(r, ref, len(captions), args.fd_tolerance)),
                  key=lambda r: r["s_per_image"])
    text = "\n".join([
        f"## Time to equal quality (model `{args.model}`, {len(captions)} test captions, {args.dtype})",
        report.machine_markdown(machine),
        f"- a plain SAMPLER:STEPS sets the {' and '.join(args.stages)}; stages a row does not name keep the defaults "
        f"({pipeline_defaults()})",
        "", report.table(["sampler:steps", "s/image", "speed-up", "FD (CLIP space)", metric,
                          f"{metric} vs reference (paired)", f"matches {ref['config']}"], rows), "",
        f"Fastest configuration that matches the reference: **{fastest['config']}** "
        f"({ref['s_per_image'] / fastest['s_per_image']:.2f}x faster than {ref['config']}). "
        f"Matching: {metric} within one binomial standard error, FD within {args.fd_tolerance:.0%}."])
    print(text)
    if not args.no_markdown:
        print(f"wrote {report.update_section(args.section, text, args.markdown)}", file=sys.stderr)


if __name__ == "__main__":
    main()
