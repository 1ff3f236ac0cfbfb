"""How long `unclip generate` takes for one 64x64 image: warm (model loaded) and cold (the whole command).

    python benchmarks/time_generate.py                    # the bundled default model (emoji)
    python benchmarks/time_generate.py --model PATH       # any model folder, bundled name or hub id
    python benchmarks/time_generate.py --quick            # 1 round, tiny step counts (checks that it runs)

warm: `UnCLIPPipeline.generate(prompt)` at the default settings after one warm-up call, per dtype (auto, fp32, bf16),
and after `pipe.compile()` (dtype auto; with the time of its first, compiling call).
cold: wall time of `unclip generate PROMPT --model M -o OUT.png --quiet` in a fresh process, split into Python
start + imports (`python -c "import cli, unclip.pipeline"`), and model loading (from_pretrained, in this process).
Writes the "generate" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import report  # noqa: E402


def command() -> list[str]:
    """The `unclip` console script, or `python -m cli` from the repository when it is not installed."""
    script = shutil.which("unclip")
    return [script] if script else [sys.executable, "-m", "cli"]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return took


def cold(model: str, prompt: str, rounds: int, extra: list[str]) -> dict:
    imports = [wall([sys.executable, "-c", "import cli, unclip.pipeline"]) for _ in range(rounds)]
    with tempfile.TemporaryDirectory() as out:
        runs = [wall(command() + ["generate", prompt, "--model", model, "-o", str(Path(out) / "x.png"), "--quiet"]
                     + extra) for _ in range(rounds)]
    return {"command_s": statistics.median(runs), "imports_s": statistics.median(imports), "rounds": rounds}


def median_generate(pipe, prompt: str, rounds: int, steps: dict) -> float:
    """Median seconds of `rounds` warm `pipe.generate` calls (seeds 0, 1, ...)."""
    times = []
    for i in range(rounds):
        start = time.perf_counter()
        pipe.generate(prompt, seed=i, **steps)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm(model: str, prompt: str, rounds: int, steps: dict, compile_too: bool) -> dict:
    import numpy as np
    import torch

    from unclip.pipeline import UnCLIPPipeline

    start = time.perf_counter()
    pipe = UnCLIPPipeline.from_pretrained(model)
    out = {"load_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
           "image_size": pipe.image_size}
    pipe.set_progress_bar_config(disable=True)
    for dtype in ("auto", "fp32", "bf16"):
        pipe.to(dtype=dtype)
        pipe.generate(prompt, seed=0, **steps)  # warm-up
        out[f"generate_s_{dtype}"] = median_generate(pipe, prompt, rounds, steps)
    if compile_too:  # last: compiling is in place
        pipe.to(dtype="auto")
        eager = np.asarray(pipe.generate(prompt, seed=0, **steps).images[0], dtype=np.int16)
        pipe.compile()
        start = time.perf_counter()
        first = np.asarray(pipe.generate(prompt, seed=0, **steps).images[0], dtype=np.int16)
        out["compile_s"] = time.perf_counter() - start
        out["compile_pixel_diff"] = (float(np.abs(first - eager).mean()), int(np.abs(first - eager).max()))
        out["generate_s_compiled"] = median_generate(pipe, prompt, rounds, steps)
    return out


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji", help="model folder, bundled name or hub id")
    parser.add_argument("--prompt", default="a red apple")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 steps per stage")
    parser.add_argument("--no-compile", action="store_true", help="skip the `pipe.compile()` rows (minutes)")
    parser.add_argument("--markdown", type=Path, default=None, help="default docs/BENCHMARKS.md (not with --quick)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    return args


def main() -> None:
    args = parse_args()
    machine = report.machine()
    steps = dict(prior_steps=2, decoder_steps=2, upsampler_steps=2) if args.quick else {}
    extra = ["--steps-prior", "2", "--steps-decoder", "2", "--steps-upsampler", "2"] if args.quick else []
    c = cold(args.model, args.prompt, args.rounds, extra)
    w = warm(args.model, args.prompt, args.rounds, steps, compile_too=not args.no_compile)
    rows = [["warm: `pipe.generate` (dtype auto, the default)", f"{w['generate_s_auto']:.2f}"],
            ["warm: `pipe.generate` with `pipe.to(dtype='fp32')`", f"{w['generate_s_fp32']:.2f}"],
            ["warm: `pipe.generate` with `pipe.to(dtype='bf16')`", f"{w['generate_s_bf16']:.2f}"],
            *([["warm: `pipe.generate` after `pipe.compile()` (dtype auto; `--compile` at the CLI)",
                 f"{w['generate_s_compiled']:.2f}"],
               ["  its first call, which compiles the decoder and the upsampler", f"{w['compile_s']:.1f}"],
               ["  its first image against the eager one: mean / max pixel difference (0-255)",
                "{:.2f} / {}".format(*w["compile_pixel_diff"])]] if "compile_s" in w else []),
            ["cold: `unclip generate ... -o x.png` (whole command)", f"{c['command_s']:.2f}"],
            ["  of which Python start + `import cli, unclip.pipeline`", f"{c['imports_s']:.2f}"],
            ["  of which `UnCLIPPipeline.from_pretrained` (in a warm process)", f"{w['load_s']:.2f}"]]
    text = "\n".join([
        f"## `unclip generate`: one {w['image_size']}x{w['image_size']} image, model `{args.model}`"
        + (" (--quick: 2 steps per stage)" if args.quick else ", default settings"),
        report.machine_markdown(machine), f"- median of {args.rounds} rounds, torch threads {w['threads']}",
        f"- command: `{' '.join(Path(x).name for x in command()[:1])} generate \"{args.prompt}\" --model {args.model}`",
        "", report.table(["what", "seconds"], rows)])
    print(text)
    if args.markdown or not args.quick:
        print(f"wrote {report.update_section('generate', text, args.markdown)}", file=sys.stderr)


if __name__ == "__main__":
    main()
