"""Time to equal quality: few-step DPM-Solver++ against 50-step DDIM / DDPM on a trained model.

    python benchmarks/quality_vs_steps.py --model M --data D/test [--n 200] [--configs ddim:50,dpm++:10,...]

Each configuration sets the sampler and step count of the prior and the decoder (the upsampler keeps its
default, the same for all, unless --upsampler-too). For each: one image per test caption (caption i seeded
with seed + i, so every configuration sees the same prompts and seeds), the seconds per image, the Fréchet
distance between CLIP image embeddings of the generated and the real test images (`unclip.eval.metrics.
frechet_distance`) and, on shapes data, the oracle (`unclip.eval.shapes.evaluate`). A configuration "matches"
the reference (the first one, 50-step DDIM by default) when its oracle accuracy is within one binomial standard
error and its FD within --fd-tolerance of the reference's. Writes the "quality" section of docs/BENCHMARKS.md.
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


def parse_configs(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        sampler, _, steps = item.strip().partition(":")
        if not steps.isdigit():
            raise SystemExit(f"--configs items are SAMPLER:STEPS, got {item!r}")
        out.append((sampler, int(steps)))
    return out


def evaluate_config(pipe, captions, real_emb, sampler: str, steps: int, args) -> dict:
    import torch

    from unclip.eval.metrics import frechet_distance
    from unclip.eval.report import generate_for_captions

    settings = dict(prior_sampler=sampler, prior_steps=steps, decoder_sampler=sampler, decoder_steps=steps)
    if args.upsampler_too:
        settings.update(upsampler_sampler=sampler, upsampler_steps=steps)
    generate_for_captions(pipe, captions[:2], batch_size=2, seed=args.seed, **settings)  # warm-up
    start = time.perf_counter()
    images = generate_for_captions(pipe, captions, batch_size=args.batch_size, seed=args.seed, **settings)
    elapsed = time.perf_counter() - start
    with torch.inference_mode():
        gen_emb = pipe.clip.encode_image(images).cpu()
    out = {"sampler": sampler, "steps": steps, "s_per_image": elapsed / len(images),
           "fd": frechet_distance(gen_emb, real_emb)}
    if args.shapes:
        from unclip.eval.shapes import evaluate

        out["oracle"] = evaluate(images, captions)["overall"]
    return out


def matches(result: dict, ref: dict, n: int, fd_tolerance: float) -> bool:
    ok = result["fd"] <= ref["fd"] * (1 + fd_tolerance)
    if "oracle" in ref:
        p = ref["oracle"]
        ok = ok and result["oracle"] >= p - math.sqrt(max(p * (1 - p), 1e-9) / n)
    return ok


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or bundled name (e.g. the trained shapes model)")
    parser.add_argument("--data", required=True, type=Path, help="test folder of image-caption pairs")
    parser.add_argument("--n", type=int, default=200, help="test captions (one image each)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="SAMPLER:STEPS,...; the first is the reference")
    parser.add_argument("--upsampler-too", action="store_true", help="also set the upsampler's sampler and steps")
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
    for sampler, steps in parse_configs(args.configs):
        res = evaluate_config(pipe, captions, real_emb, sampler, steps, args)
        results.append(res)
        print(f"{sampler}:{steps}  {res['s_per_image']:.3f} s/image  FD {res['fd']:.4g}"
              + (f"  oracle {res['oracle']:.3f}" if "oracle" in res else ""), file=sys.stderr, flush=True)
    ref = results[0]
    rows = [[f"{r['sampler']} {r['steps']}", f"{r['s_per_image']:.3f}", f"{ref['s_per_image'] / r['s_per_image']:.2f}x",
             f"{r['fd']:.4g}", report.fmt(r.get("oracle")), "reference" if r is ref else
             ("yes" if matches(r, ref, len(captions), args.fd_tolerance) else "no")] for r in results]
    fastest = min((r for r in results if r is ref or matches(r, ref, len(captions), args.fd_tolerance)),
                  key=lambda r: r["s_per_image"])
    text = "\n".join([
        f"## Time to equal quality (model `{args.model}`, {len(captions)} test captions, {args.dtype})",
        report.machine_markdown(machine),
        "- prior and decoder samplers/steps per row; upsampler "
        + ("the same" if args.upsampler_too else "at its default"),
        "", report.table(["sampler / steps", "s/image", "speed-up", "FD (CLIP space)", "shapes oracle",
                          f"matches {ref['sampler']} {ref['steps']}"], rows), "",
        f"Fastest configuration that matches the reference: **{fastest['sampler']} {fastest['steps']} steps** "
        f"({ref['s_per_image'] / fastest['s_per_image']:.2f}x faster than {ref['sampler']} {ref['steps']}). "
        f"Matching: oracle within one binomial standard error, FD within {args.fd_tolerance:.0%}."])
    print(text)
    if not args.no_markdown:
        print(f"wrote {report.update_section(args.section, text, args.markdown)}", file=sys.stderr)


if __name__ == "__main__":
    main()
