"""unclip's speed levers, one at a time, on W1-W4, and whether bf16 changes the numbers (losses and samples
against fp32).

    python benchmarks/levers.py                       # 3 rounds, writes the "levers" section of docs/BENCHMARKS.md
    python benchmarks/levers.py --quick               # tiny sizes, 1 round: checks that it runs
    python benchmarks/levers.py --model shapes        # the accuracy check also on a trained model folder

Each configuration is a fresh `impl_unclip.py` process with some `--lever`s; configurations alternate within a
round. "speed-up" is median(baseline time) / median(lever time). Levers that are on by default in unclip (bf16
autocast where the CPU has native bf16, the decoder's attention processor and its bf16 math attention, conditions
encoded once per sampling run, decoder guidance in the 0.3-0.7 interval, batched CFG, inference_mode) are measured
by turning them off (fp32, diffusers-attention, flash-attention, per-step-condition, full-guidance, unbatched-cfg,
no-grad): a speed-up below 1 there means the default pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import report  # noqa: E402

CONFIGS = {
    "W1": [(), ("fp32",), ("diffusers-attention",), ("flash-attention",), ("channels-last",), ("compile",),
           ("threads-1",)],
    "W2": [(), ("fp32",), ("compile",)],
    "W3": [(), ("fp32",), ("full-guidance",), ("diffusers-attention",), ("per-step-condition",), ("channels-last",),
           ("compile",),
           ("unbatched-cfg",), ("no-grad",), ("threads-1",)],
    "W4": [(), ("fp32",), ("full-guidance",), ("per-step-condition",), ("one-candidate",), ("cache-text",)],
}
METRIC = {"W1": "images_per_s", "W2": "samples_per_s", "W3": "s_per_image", "W4": "s_per_image"}


def run_config(workload: str, levers: tuple, quick: bool, timeout: int) -> float | str:
    cmd = [sys.executable, str(HERE / "impl_unclip.py"), "--workload", workload] + (["--quick"] if quick else [])
    for lever in levers:
        cmd += ["--lever", lever]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return "failed: " + " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
    return json.loads(lines[-1])["metrics"][METRIC[workload]]


def seconds(value: float, workload: str) -> float:
    """Time per unit of work (lower is better) from either metric."""
    return 1.0 / value if METRIC[workload] in ("images_per_s", "samples_per_s") else value


def speed_rows(results: dict) -> list[list]:
    rows = []
    for workload, by_config in results.items():
        base = by_config.get(())
        base_s = statistics.median(seconds(v, workload) for v in base) if base else None
        for levers, values in by_config.items():
            name = "+".join(levers) or "defaults"
            if not values:
                rows.append([workload, name, "failed", "", ""])
                continue
            med = statistics.median(values)
            speedup = base_s / seconds(med, workload) if base_s else None
            rows.append([workload, name, report.fmt(med), f"{report.fmt(min(values))}–{report.fmt(max(values))}",
                         f"{speedup:.2f}x" if speedup else "–"])
    return rows


# ---------------------------------------------------------------- does bf16 change the numbers?


def loss_pair(model, loss_fn, batch: dict, seed: int):
    """(fp32 loss, bf16-autocast loss) on one batch with the same per-sample draws."""
    import torch

    from unclip.training import RANDOM_KEY, SampleRandom

    out = []
    for dtype in (None, torch.bfloat16):
        b = dict(batch)
        b[RANDOM_KEY] = SampleRandom.at_positions(seed, 0, len(batch["image"]))
        # autograd on, as in training: the decoder's attention takes its training path (bf16 math attention)
        with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            loss = loss_fn(model, b)
        out.append(float((loss[0] if isinstance(loss, tuple) else loss).detach().float()))
    return out


def loss_check(quick: bool) -> list[list]:
    """Relative |bf16 - fp32| loss difference against the loss's own batch-to-batch spread (random weights)."""
    import torch

    import common
    import impl_unclip
    from decoder.loss import decoder_loss
    from decoder.model import Decoder
    from prior.loss import prior_loss
    from prior.model import DiffusionPrior

    s = common.sizes(quick)
    torch.manual_seed(0)
    rows = []
    decoder = impl_unclip.randomise(Decoder(impl_unclip.decoder_config(s)))
    prior = impl_unclip.randomise(DiffusionPrior(impl_unclip.prior_config(s)))
    for name, model, loss_fn, batch_size in (("decoder loss", decoder, decoder_loss, s["w1_batch"]),
                                             ("prior loss", prior, prior_loss, s["w2_batch"])):
        model.train()
        data = common.random_pairs(batch_size * 8, s)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
        pairs = [loss_pair(model, loss_fn, b, seed) for seed, b in enumerate(loader)]
        fp32 = torch.tensor([p[0] for p in pairs])
        rel = torch.tensor([abs(p[1] - p[0]) / abs(p[0]) for p in pairs])
        noise = float(fp32.std() / fp32.mean())
        rows.append([name, f"{float(rel.mean()):.2e}", f"{noise:.2e}", "yes" if rel.mean() < noise / 3 else "NO"])
    return rows


def sample_check(quick: bool, model: str | None) -> list[list]:
    """Image MSE between bf16 and fp32 samples from the same noise, against the MSE between two seeds (fp32)."""
    import numpy as np
    import torch

    import common
    import impl_unclip

    s = common.sizes(quick)
    rows = []
    sources = [("random weights (W4 pipeline)", lambda: impl_unclip.make_pipeline(s, set()))]
    if model:
        from unclip.pipeline import UnCLIPPipeline

        sources.append((f"model {model}", lambda: UnCLIPPipeline.from_pretrained(model)))
    prompts = common.PROMPTS[:2 if quick else 8]
    steps = dict(prior_steps=2, decoder_steps=2, upsampler_steps=2) if quick else {}
    for name, make in sources:
        pipe = make()
        pipe.set_progress_bar_config(disable=True)

        def images(seed, dtype):
            pipe.to(dtype=dtype)
            out = pipe.generate(prompts, seed=seed, **steps)
            return torch.stack([torch.from_numpy(np.array(i)).float() / 255 for i in out.images])

        a, b, c = images(0, "fp32"), images(0, "bf16"), images(1, "fp32")
        mse_dtype, mse_seed = float((a - b).pow(2).mean()), float((a - c).pow(2).mean())
        rows.append([name, f"{mse_dtype:.2e}", f"{mse_seed:.2e}", "yes" if mse_dtype < mse_seed / 10 else "NO"])
    return rows


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--workload", action="append", choices=sorted(CONFIGS), help="default: all")
    parser.add_argument("--model", default=None, help="also check bf16 vs fp32 samples of this model folder / name")
    parser.add_argument("--markdown", type=Path, default=None, help="default docs/BENCHMARKS.md (not with --quick)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the bf16-vs-fp32 check")
    parser.add_argument("--no-speed", action="store_true", help="only the bf16-vs-fp32 check")
    parser.add_argument("--only", default=None,
                        help="comma-separated levers: run only the configurations made of these (and the defaults)")
    parser.add_argument("--section", default="levers",
                        help="BENCHMARKS.md section to write (another name keeps an earlier run's section)")
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args()
    args.only = None if args.only is None else set(args.only.split(","))
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main() -> None:
    args = parse_args()
    machine = report.machine()
    workloads = [] if args.no_speed else args.workload or list(CONFIGS)
    configs_of = {w: [c for c in CONFIGS[w] if args.only is None or set(c) <= args.only] for w in workloads}
    results = {w: {levers: [] for levers in configs_of[w]} for w in workloads}
    start = time.perf_counter()
    for r in range(args.rounds):
        for w in workloads:
            mine = configs_of[w]
            configs = mine[r % len(mine):] + mine[:r % len(mine)]
            for levers in configs:
                value = run_config(w, levers, args.quick, args.timeout)
                print(f"round {r + 1} {w} {'+'.join(levers) or 'defaults':<22} {report.fmt(value)}", file=sys.stderr,
                      flush=True)
                if isinstance(value, float):
                    results[w][levers].append(value)
    rows = speed_rows(results)
    if not workloads:  # --no-speed: the accuracy check alone
        text = ["## bf16 autocast against fp32 (unclip)", report.machine_markdown(machine)]
    else:
        text = ["## Speed levers (unclip)" + (" (--quick: meaningless timings)" if args.quick else ""),
                report.machine_markdown(machine),
                f"- {args.rounds} rounds, {(time.perf_counter() - start) / 60:.1f} min",
                "", report.table(["workload", "levers", "median", "min–max", "speed-up vs defaults"], rows), "",
                "W1 in images/s, W2 in samples/s, W3/W4 in s/image. `fp32`, `diffusers-attention`, "
                "`flash-attention`, `per-step-condition`, `full-guidance`, `unbatched-cfg` and `no-grad` turn *off* "
                "defaults (bf16 autocast, the decoder's own attention processor, its bf16 math attention in training, "
                "conditions encoded once per sampling run, decoder guidance in the 0.3-0.7 interval, batched CFG, "
                "inference_mode): a speed-up below 1.00x is what the "
                "default saves. `compile` on W1/W2 is `TrainConfig.compile` (`--compile`), its start-up excluded "
                "(warm-up steps)."]
    print(report.table(["workload", "levers", "median", "min–max", "speed-up"], rows))
    if not args.no_accuracy:
        loss_rows, sample_rows = loss_check(args.quick), sample_check(args.quick, args.model)
        text += ["", "bf16 autocast vs fp32 (same batch, same draws / same noise):", "",
                 report.table(["loss", "mean relative difference", "batch-to-batch relative std (fp32)",
                               "within noise"], loss_rows), "",
                 report.table(["samples", "image MSE bf16 vs fp32 (same seed)", "image MSE seed 0 vs seed 1 (fp32)",
                               "within noise (< 1/10)"], sample_rows)]
        print(report.table(["loss", "rel diff", "noise", "ok"], loss_rows))
        print(report.table(["samples", "mse dtype", "mse seed", "ok"], sample_rows))
    if args.markdown or not args.quick:
        print(f"wrote {report.update_section(args.section, chr(10).join(text), args.markdown)}", file=sys.stderr)


if __name__ == "__main__":
    main()
