"""What every benchmark implementation shares: the workload sizes, timers, peak memory and the JSON it prints.

Kept free of unclip, DALLE2-pytorch and diffusers imports: each `impl_*.py` runs inside its own virtual
environment and imports this file by path.

Workloads (random weights, the same sizes for every implementation):
    W1  decoder training: 32 px UNet (channels 32/64/128, 2 layers per level, cross-attention at the lower
        levels), 256-d image embedding + 32 text tokens, batch 32, AdamW; images/s over 10 steps after 2 warm-up
    W2  prior training: depth 6, width 256, 256-d embeddings, 32 text tokens, batch 64; samples/s
    W3  decoder sampling: 8 images at 32 px, 50 steps, guidance 3; s/image
    W4  text -> 64 px: prior 25 steps + decoder 25 steps + upsampler 32->64 10 steps, 8 images; s/image, peak RSS
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager

FULL = dict(
    # decoder (W1, W3, W4)
    image_size=32, channels=(32, 64, 128), layers=2, attention=(False, True, True), head_dim=32, groups=32,
    cross_dim=128, embed_dim=256, text_width=256, context=32, image_tokens=4,
    # W1
    w1_batch=32, w1_warmup=2, w1_steps=10,  # the brief asks for >= 5 timed steps; 10 halve the noise here
    # prior (W2, W4); its width is the embedding size (DALLE2-pytorch requires that)
    prior_depth=6, prior_heads=8, w2_batch=64, w2_warmup=2, w2_steps=10,
    # W3
    w3_images=8, w3_steps=50, guidance=3.0,
    # W4
    w4_images=8, prior_steps=25, decoder_steps=25, up_steps=10, prior_guidance=2.0, candidates=2,
    up_size=64, up_channels=(32, 64, 64), up_layers=1,
    # the tiny CLIP text encoder of W4 (one layer; the same in every implementation)
    clip_layers=1, clip_heads=4, vocab=64,
)

QUICK = dict(
    FULL, image_size=16, channels=(16, 32), layers=1, attention=(False, True), head_dim=8, groups=8, cross_dim=16,
    embed_dim=32, text_width=32, context=8,
    w1_batch=4, w1_warmup=1, w1_steps=2,
    prior_depth=1, prior_heads=2, w2_batch=4, w2_warmup=1, w2_steps=2,
    w3_images=2, w3_steps=3,
    w4_images=2, prior_steps=2, decoder_steps=2, up_steps=2, up_size=32, up_channels=(16, 32), up_layers=1,
    clip_heads=2,
)

WORKLOADS = ("W1", "W2", "W3", "W4")
METRICS = {"W1": "images_per_s", "W2": "samples_per_s", "W3": "s_per_image", "W4": "s_per_image"}
HIGHER_IS_BETTER = {"images_per_s": True, "samples_per_s": True, "s_per_image": False, "peak_rss_mib": False}
PROMPTS = ["a large red circle", "a blue square on the left", "two yellow squares",
           "a green triangle above a red circle", "three blue circles", "a small purple square",
           "an orange triangle on the right", "a red square below a blue circle"]


def sizes(quick: bool) -> dict:
    return dict(QUICK if quick else FULL)


def parse_args(levers: tuple[str, ...] = ()) -> argparse.Namespace:
    """The command line every impl_*.py takes: --workload W1..W4 [--quick] [--lever NAME ...]."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the code runs")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    if levers:
        parser.add_argument("--lever", action="append", default=[], choices=levers,
                            help="turn a speed lever on (or, for default-on levers, 'no-...' turns it off)")
    return parser.parse_args()


def setup_torch(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer:
    """Timestamps at the start of each training step; rate over the steps after the warm-up ones."""

    def __init__(self):
        self.stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def rate(self, batch: int, warmup: int, steps: int) -> float:
        """Samples/s over steps [warmup, warmup + steps): needs warmup + steps + 1 stamps."""
        if len(self.stamps) < warmup + steps + 1:
            raise RuntimeError(f"timer saw {len(self.stamps)} steps, needs {warmup + steps + 1}")
        return batch * steps / (self.stamps[warmup + steps] - self.stamps[warmup])


@contextmanager
def stopwatch(out: dict, key: str = "seconds"):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


def random_pairs(n: int, s: dict, seed: int = 0, image_range=(-1.0, 1.0)):
    """A map-style data set of n random training items (the same for every implementation).

    Items: image [3, S, S], image_emb [D] and text_emb [D] (unit length), text_tokens [L, W], mask [L] (a random
    caption length of at least 3 tokens, the rest padding).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    S, D, L, W = s["image_size"], s["embed_dim"], s["context"], s["text_width"]
    lo, hi = image_range
    images = torch.rand(n, 3, S, S, generator=g) * (hi - lo) + lo
    image_emb = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]                                  # [N, L]
    tokens = torch.randn(n, L, W, generator=g) * mask[..., None]                     # padding tokens are 0

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"image": images[i], "image_emb": image_emb[i], "text_emb": text_emb[i],
                    "text_tokens": tokens[i], "mask": mask[i]}

    return Pairs()


def n_params(module) -> float:
    """Parameters in millions."""
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", *names):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def record(impl: str, workload: str, metrics: dict, info: dict | None = None, **extra) -> dict:
    """One measurement as run.py stores it."""
    import torch

    return {"impl": impl, "workload": workload, "metrics": metrics, "info": info or {},
            "threads": torch.get_num_threads(), "peak_rss_mib": round(peak_rss_mib(), 1), **extra}


def emit(impl: str, workload: str, metrics: dict, info: dict | None = None, **extra) -> None:
    """Print the one JSON line run.py reads (the last line of stdout)."""
    rec = record(impl, workload, metrics, info, **extra)
    sys.stdout.flush()
    print(json.dumps(rec), flush=True)


def quiet_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
