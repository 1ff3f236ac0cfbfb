"""Roofline line for the decoder: FLOPs per sampling step and per training step (torch.utils.flop_counter), the
GFLOP/s unclip achieves on them, against this CPU's measured fp32 and bf16 matmul peaks.

    python benchmarks/roofline.py            # writes the "roofline" section of docs/BENCHMARKS.md
    python benchmarks/roofline.py --quick    # tiny sizes (checks that it runs)

Also separates the training loop's overhead: the raw forward + backward + AdamW rate of the same decoder and
batch, next to what `unclip.training.train` achieves (W1, measured by run.py / levers.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import report  # noqa: E402


def matmul_peak(n: int, dtype, seconds: float = 2.0) -> float:
    """GFLOP/s of an n x n @ n x n matmul loop (best of ~`seconds` worth of repeats)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        took = (time.perf_counter() - start) / 4
        best, spent = min(best, took), spent + took * 4
    return 2 * n ** 3 / best / 1e9


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def autocast(bf16: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def decoder_numbers(s: dict, repeats: int) -> dict:
    """FLOPs and seconds per sampling step (W3 batch: images x 2 CFG branches) and per training step (W1 batch)."""
    import torch

    import impl_unclip
    from decoder.model import Decoder

    model = impl_unclip.randomise(Decoder(impl_unclip.decoder_config(s)))
    out = {}
    # sampling: one batched CFG forward of 2 x images under inference_mode
    n = 2 * s["w3_images"]
    b = next(iter(torch.utils.data.DataLoader(common.random_pairs(n, s), batch_size=n)))
    x, t = torch.randn(n, 3, s["image_size"], s["image_size"]), torch.full((n,), 500)
    model.eval()

    def sample_step(bf16: bool = False):
        with torch.inference_mode(), autocast(bf16):
            model(x, t, b["image_emb"], b["text_tokens"], b["mask"])

    out["sample_flops"] = count_flops(sample_step)
    for bf16 in (False, True):
        out[f"sample_s_{'bf16' if bf16 else 'fp32'}"] = timed(lambda: sample_step(bf16), repeats)
    # training: forward + backward + AdamW step at the W1 batch
    n = s["w1_batch"]
    b = next(iter(torch.utils.data.DataLoader(common.random_pairs(n, s), batch_size=n)))
    x, t = torch.randn(n, 3, s["image_size"], s["image_size"]), torch.randint(0, 1000, (n,))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step(bf16: bool = False):
        with autocast(bf16):
            loss = (model(x, t, b["image_emb"], b["text_tokens"], b["mask"]).float() - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out["train_flops"] = count_flops(train_step)
    for bf16 in (False, True):
        out[f"train_s_{'bf16' if bf16 else 'fp32'}"] = timed(lambda: train_step(bf16), max(2, repeats // 4))
    out["train_batch"] = n
    return out


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 2048 (256 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed decoder forwards (default 20; 2 quick)")
    parser.add_argument("--markdown", type=Path, default=None, help="default docs/BENCHMARKS.md (not with --quick)")
    return parser.parse_args()


def main() -> None:
    import torch

    args = parse_args()
    common.quiet_warnings()
    s = common.sizes(args.quick)
    size = args.matmul_size or (256 if args.quick else 2048)
    machine = report.machine()
    peak = {"fp32": matmul_peak(size, torch.float32, 0.2 if args.quick else 2.0),
            "bf16": matmul_peak(size, torch.bfloat16, 0.2 if args.quick else 2.0)}
    d = decoder_numbers(s, args.repeats or (2 if args.quick else 20))
    rows = []
    for what, flops in ((f"sampling step (W3: {s['w3_images']} images x 2 CFG branches)", d["sample_flops"]),
                        (f"training step (W1: batch {d['train_batch']}, fwd + bwd + AdamW)", d["train_flops"])):
        key = "sample" if what.startswith("sampling") else "train"
        for dtype in ("fp32", "bf16"):
            sec = d[f"{key}_s_{dtype}"]
            rate = flops / sec / 1e9
            rows.append([what, dtype, f"{flops / 1e9:.2f}", f"{sec * 1e3:.1f}", f"{rate:.1f}",
                         f"{peak[dtype]:.0f}", f"{100 * rate / peak[dtype]:.0f}%"])
    raw_rate = {dtype: d["train_batch"] / d[f"train_s_{dtype}"] for dtype in ("fp32", "bf16")}
    text = "\n".join([
        "## Roofline (unclip decoder)" + (" (--quick: meaningless)" if args.quick else ""),
        report.machine_markdown(machine),
        f"- matmul peaks ({size}x{size}, torch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s ({peak['bf16'] / peak['fp32']:.1f}x)",
        "",
        report.table(["decoder", "dtype", "GFLOP", "ms", "achieved GFLOP/s", "matmul peak", "of peak"], rows),
        "",
        f"Raw forward + backward + AdamW of the W1 decoder (no data loader, EMA, clipping or per-sample draws): "
        f"{raw_rate['fp32']:.0f} images/s fp32, {raw_rate['bf16']:.0f} images/s bf16 — compare with W1 "
        "(`unclip.training.train`) in the results above: the difference is the loop's overhead.",
    ])
    print(text)
    if args.markdown or not args.quick:
        print(f"wrote {report.update_section('roofline', text, args.markdown)}", file=sys.stderr)


if __name__ == "__main__":
    main()
