"""Run by tests/test_distributed.py under `accelerate launch --cpu --num_processes 2`: every distributed check
in one launch (each launch costs seconds of imports). Also imported by the test for the tiny models and data.

    accelerate launch --cpu --num_processes 2 ... tests/distributed_driver.py WORK_DIR [--fsdp]

WORK_DIR holds what the test prepared (shards/, model/ with clip/, runs/resume/ with a step-2 checkpoint);
this writes runs/{prior,decoder,clip}-2p/, runs/resume/, stream_keys_rank{r}.json, emb/ and the exported
model/prior (via the CLI, as `accelerate launch -m cli ...` would).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

D, W, L = 16, 32, 16  # tests/conftest.py tiny_clip: embed_dim, text width, context length
STEPS = 4


def train_config(batch_size: int, steps: int = STEPS, **kw):
    from unclip.training import TrainConfig
    # fp32 ("no"): the equivalence is exact up to summation order, which bf16 autocast ("auto" on AMX CPUs)
    # would amplify to bf16's rounding steps
    return TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, warmup_steps=1, grad_clip=1.0, ema_decay=0.9,
                       checkpoint_every=2, log_every=1, seed=0, mixed_precision="no", **kw)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised output layers would give most parameters zero gradients at first (conftest does the same)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _text(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randn(n, L, W, generator=g)                                  # [N, L, W]
    mask = torch.arange(L)[None] < torch.randint(2, L + 1, (n, 1), generator=g)  # [N, L], a few real tokens
    return tokens, mask


def prior_data(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    image_emb = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    text_emb = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    tokens, mask = _text(g, n)
    return [{"image_emb": image_emb[i], "text_emb": text_emb[i], "text_tokens": tokens[i], "mask": mask[i]}
            for i in range(n)]


def make_prior():
    from prior.config import PriorConfig
    from prior.model import DiffusionPrior
    torch.manual_seed(0)
    model = _perturb(DiffusionPrior(PriorConfig(width=32, depth=1, heads=2, embed_dim=D, text_width=W,
                                                context_length=L)))
    model.set_image_statistics(torch.stack([item["image_emb"] for item in prior_data()]))
    return model


def decoder_data(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    images = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    image_emb = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    tokens, mask = _text(g, n)
    return [{"image": images[i], "image_emb": image_emb[i], "text_tokens": tokens[i], "mask": mask[i]}
            for i in range(n)]


def make_decoder():
    from decoder.config import DecoderConfig
    from decoder.model import Decoder
    torch.manual_seed(0)
    return _perturb(Decoder(DecoderConfig(image_size=8, block_out_channels=(16, 32), attention_levels=(False, True),
                                          attention_head_dim=8, norm_num_groups=8, cross_attention_dim=16,
                                          embed_dim=D, text_width=W, context_length=L)))


def make_clip():
    from conftest import SHAPES_WORDS, tiny_clip_config
    from unclip.clip import ClipEncoder
    torch.manual_seed(0)
    return ClipEncoder.from_config(tiny_clip_config(), sorted(set(SHAPES_WORDS)))


def clip_data(clip, n: int = 32):
    from unclip.clip_training import _Tokenised
    g = torch.Generator().manual_seed(3)
    words = ["red circle", "blue square", "green triangle", "two yellow squares", "a large purple circle"]
    pairs = [{"image": torch.rand(3, 16, 16, generator=g) * 2 - 1, "caption": words[i % len(words)]}
             for i in range(n)]
    return _Tokenised(pairs, clip)


def recording_shards(loss_fn, work: Path, run: str):
    """loss_fn that also writes shards_{run}_rank{r}.json: {local elements, whole elements, DTensors} of the
    model it is given (the prepared one)."""
    def fn(model, batch):
        from torch.distributed.tensor import DTensor
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        path = work / f"shards_{run}_rank{rank}.json"
        params = list(model.parameters())
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        path.write_text(json.dumps({"local": local, "whole": sum(p.numel() for p in params),
                                    "dtensors": sum(isinstance(p, DTensor) for p in params)}))
        return loss_fn(model, batch)
    return fn


def run_equivalence(work: Path, batch_size: int, suffix: str, setup=lambda: None, clip: bool = True) -> None:
    """The prior, decoder and CLIP runs (1 process with batch 8, or 2 processes with batch 4 each);
    `setup()` runs before each. Each process records how much of each model it holds (shards_*.json)."""
    from decoder.loss import decoder_loss
    from prior.loss import prior_loss

    prior_loss = recording_shards(prior_loss, work, f"prior-{suffix}")
    decoder_loss = recording_shards(decoder_loss, work, f"decoder-{suffix}")
    from unclip.clip_training import clip_loss_fn
    from unclip.training import train

    setup()
    train(make_prior(), prior_loss, prior_data(), work / "runs" / f"prior-{suffix}", train_config(batch_size),
          progress=False)
    setup()
    train(make_decoder(), decoder_loss, decoder_data(), work / "runs" / f"decoder-{suffix}",
          train_config(batch_size), progress=False)
    if not clip:
        return
    setup()
    clip = make_clip()
    train(clip, clip_loss_fn, clip_data(clip), work / "runs" / f"clip-{suffix}", train_config(batch_size),
          progress=False)


def run_stream(work: Path, rank: int) -> None:
    """One epoch of webdataset shards through the training loop: 2 DataLoader workers, batch 2 per process."""
    from unclip.data.datasets import ShardDataset
    from unclip.training import train

    seen: list[str] = []

    def loss_fn(model, batch):
        seen.extend(batch["key"])
        return model(batch["image"].mean(dim=(1, 2, 3))[:, None]).pow(2).mean()

    shards = sorted(str(p) for p in (work / "shards").glob("*.tar"))
    torch.manual_seed(0)
    train(torch.nn.Linear(1, 1), loss_fn, ShardDataset(shards, image_size=4), work / "runs" / "stream",
          train_config(2, steps=4, num_workers=2), progress=False)
    (work / f"stream_keys_rank{rank}.json").write_text(json.dumps(seen))


def use_fsdp2_on_cpu() -> None:
    """Put accelerate's process state where `accelerate launch --use_fsdp --fsdp_version 2` puts it on GPUs.

    accelerate selects FSDP only on accelerators (CUDA, XPU, NPU, ...): on CPU processes it keeps MULTI_CPU
    and ignores ACCELERATE_USE_FSDP. torch's FSDP2 itself runs on CPUs over gloo, so this sets the state
    that the launcher's environment (ACCELERATE_USE_FSDP, FSDP_VERSION, FSDP_* read by the plugin) would
    select on GPUs; everything after it, `prepare` included, is accelerate's own FSDP2 code. A fresh plugin
    per run: accelerate's plugin keeps the first model's wrap classes (one model per launch is the norm).
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    state = Accelerator().state  # MULTI_CPU; the process-wide state every later Accelerator() shares
    for shared in (PartialState(), state):  # each AcceleratorState() starts from PartialState's shared dict
        shared.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment the test sets


def main_fsdp(work: Path) -> None:
    """The prior and decoder runs under FSDP2, the CLIP's refusal, and the 1-process step-2 checkpoint resumed
    under FSDP2."""
    from prior.loss import prior_loss
    from unclip.clip_training import clip_loss_fn
    from unclip.training import Hooks
    from unclip.training import train

    run_equivalence(work, 4, "fsdp", setup=use_fsdp2_on_cpu, clip=False)
    use_fsdp2_on_cpu()
    clip = make_clip()  # open_clip's scalar logit_scale: refused with a one-line error before anything runs
    try:
        train(clip, clip_loss_fn, clip_data(clip), work / "runs" / "clip-fsdp", train_config(4), progress=False)
    except ValueError as error:
        (work / f"clip_fsdp_error_rank{torch.distributed.get_rank()}.txt").write_text(str(error))
    use_fsdp2_on_cpu()
    # an evaluate hook (main process) sees the gathered, whole EMA weights: their sum goes to metrics.csv
    def ema_sum(ema, step):
        return {"ema_sum": float(sum(v.double().sum() for v in ema.state_dict().values())),
                "ema_dtensors": float(sum(type(p).__name__ == "DTensor" for p in ema.parameters()))}
    train(make_prior(), prior_loss, prior_data(), work / "runs" / "resume-fsdp", train_config(4), resume=True,
          progress=False, hooks=Hooks(evaluate=ema_sum))


def main(work: Path) -> None:
    import cli
    from prior.loss import prior_loss
    from unclip.training import train

    # The CLI unchanged (first: nothing has set up the processes yet): parallel embedding of the shards ...
    cli.main(["embed", "--data", str(work / "shards"), "--clip", str(work / "model"), "--out", str(work / "emb"),
              "--batch-size", "3", "--quiet"], standalone_mode=False)
    run_equivalence(work, 4, "2p")
    # (b) a 1-process checkpoint at step 2 resumed with 2 processes (same global batch 8)
    train(make_prior(), prior_loss, prior_data(), work / "runs" / "resume", train_config(4), resume=True,
          progress=False)
    rank = int(torch.distributed.get_rank())
    run_stream(work, rank)
    # ... and prior training on the embeddings
    cli.main(["train", "prior", "--model", str(work / "model"), "--embeddings", str(work / "emb"), "--steps", "2",
              "--batch-size", "4", "--heldout", "0", "--warmup", "1", "--checkpoint-every", "1", "--quiet"],
             standalone_mode=False)
    # the training command left the process group on its way out (`unclip train`'s result callback)
    (work / f"group_after_cli_rank{rank}.txt").write_text(str(torch.distributed.is_initialized()))


if __name__ == "__main__":
    (main_fsdp if "--fsdp" in sys.argv[2:] else main)(Path(sys.argv[1]))
    if torch.distributed.is_initialized():
        # Shut the group down while both processes are alive: left to interpreter teardown, gloo's threads can be
        # destroyed while joinable, and a rank then aborts with "terminate called without an active exception".
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
