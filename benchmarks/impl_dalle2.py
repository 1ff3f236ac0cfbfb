"""DALLE2-pytorch 1.15.6 on the benchmark workloads (run with benchmarks/envs/dalle2/bin/python).

    benchmarks/envs/dalle2/bin/python benchmarks/impl_dalle2.py --workload W1 [--quick]

Built as its README shows, at its defaults, with the workload sizes where its API takes them:
    W1  Unet(dim=32, dim_mults=(1, 2, 4), num_resnet_blocks=2, cond_dim=128, text/image conditioning) in a
        Decoder (learned variance, the default) trained with DecoderTrainer (accelerate, AdamW, EMA, clipping)
    W2  DiffusionPriorNetwork(dim=256, depth=6, heads=8, dim_head=32) + DiffusionPrior trained with
        DiffusionPriorTrainer
    W3  Decoder.sample(image_embed, text_encodings, cond_scale=3) with sample_timesteps=50 (its DDIM)
    W4  DALLE2(prior, decoder)(text tokens): prior 25 DDIM steps x 2 candidates, base Unet 25 steps, a second
        Unet 32->64 with 10 steps; text through a one-layer x-clip CLIP (width 256)
Known differences from unclip (see docs/BENCHMARKS.md): each level has one more ResnetBlock than
num_resnet_blocks, the cross-attention sits inside the ResnetBlocks with 8 heads x 64 (not configurable from
Unet), CFG runs the conditional and unconditional forwards one after the other, images are in [0, 1].
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def unet(s: dict, base: bool = True):
    from dalle2_pytorch import Unet

    if base:
        channels = s["channels"]
        return Unet(dim=channels[0], dim_mults=tuple(c // channels[0] for c in channels), num_resnet_blocks=s["layers"],
                    image_embed_dim=s["embed_dim"], text_embed_dim=s["text_width"], cond_dim=s["cross_dim"],
                    num_image_tokens=s["image_tokens"], max_text_len=s["context"], cond_on_text_encodings=True,
                    cond_on_image_embeds=True, attn_dim_head=s["head_dim"],
                    attn_heads=channels[-1] // s["head_dim"], resnet_groups=s["groups"], channels=3)
    channels = s["up_channels"]
    return Unet(dim=channels[0], dim_mults=tuple(c // channels[0] for c in channels), num_resnet_blocks=s["up_layers"],
                image_embed_dim=s["embed_dim"], cond_dim=s["cross_dim"], cond_on_text_encodings=False,
                attend_at_middle=False, resnet_groups=s["groups"], channels=3, lowres_cond=True)


def decoder(s: dict, upsampler: bool = False, sample_timesteps=None, clip=None):
    from dalle2_pytorch import Decoder

    unets = (unet(s), unet(s, base=False)) if upsampler else unet(s)
    sizes = dict(image_sizes=(s["image_size"], s["up_size"])) if upsampler else dict(image_size=s["image_size"])
    return Decoder(unet=unets, clip=clip, timesteps=1000, sample_timesteps=sample_timesteps,
                   image_cond_drop_prob=0.1, text_cond_drop_prob=0.5, **sizes)


def prior(s: dict, sample_timesteps=None, clip=None):
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    net = DiffusionPriorNetwork(dim=s["embed_dim"], depth=s["prior_depth"], heads=s["prior_heads"],
                                dim_head=s["embed_dim"] // s["prior_heads"], max_text_len=s["context"],
                                num_timesteps=1000)
    extra = dict(clip=clip) if clip is not None else dict(image_embed_dim=s["embed_dim"])
    return DiffusionPrior(net, timesteps=1000, sample_timesteps=sample_timesteps, cond_drop_prob=0.1,
                          condition_on_text_encodings=True, **extra)


def loader(s: dict, batch: int, image_range=(0.0, 1.0)):
    import torch

    data = common.random_pairs(batch * 4, s, image_range=image_range)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)


def infinite(loader):
    while True:
        yield from loader


def w1(s: dict) -> tuple[dict, dict]:
    from dalle2_pytorch import DecoderTrainer

    model = decoder(s)
    trainer = DecoderTrainer(model, lr=3e-4)  # AdamW, wd 1e-2, grad clip 0.5, EMA: its defaults
    timer, batches = common.StepTimer(), infinite(loader(s, s["w1_batch"]))
    for _ in range(s["w1_warmup"] + s["w1_steps"] + 1):
        timer.tick()
        b = next(batches)
        trainer(b["image"], image_embed=b["image_emb"], text_encodings=b["text_tokens"], unet_number=1)
        trainer.update(1)
    rate = timer.rate(s["w1_batch"], s["w1_warmup"], s["w1_steps"])
    return {"images_per_s": rate}, {"params_m": common.n_params(model.unets[0])}


def w2(s: dict) -> tuple[dict, dict]:
    from dalle2_pytorch import DiffusionPriorTrainer

    model = prior(s)
    trainer = DiffusionPriorTrainer(model, lr=3e-4)  # AdamW, wd 1e-2, EMA: its defaults
    timer, batches = common.StepTimer(), infinite(loader(s, s["w2_batch"]))
    for _ in range(s["w2_warmup"] + s["w2_steps"] + 1):
        timer.tick()
        b = next(batches)
        trainer(text_embed=b["text_emb"], image_embed=b["image_emb"].clone(), text_encodings=b["text_tokens"])
        trainer.update()
    rate = timer.rate(s["w2_batch"], s["w2_warmup"], s["w2_steps"])
    return {"samples_per_s": rate}, {"params_m": common.n_params(model.net)}


def w3(s: dict) -> tuple[dict, dict]:
    import torch

    n = s["w3_images"]
    b = next(iter(torch.utils.data.DataLoader(common.random_pairs(n, s), batch_size=n)))
    model = decoder(s, sample_timesteps=2).eval()
    model.sample(image_embed=b["image_emb"], text_encodings=b["text_tokens"], cond_scale=s["guidance"])  # warm-up
    model.sample_timesteps = (s["w3_steps"],)
    start = time.perf_counter()
    images = model.sample(image_embed=b["image_emb"], text_encodings=b["text_tokens"], cond_scale=s["guidance"])
    elapsed = time.perf_counter() - start
    assert images.shape == (n, 3, s["image_size"], s["image_size"])
    return {"s_per_image": elapsed / n}, {"params_m": common.n_params(model.unets[0]), "sampler": "its DDIM"}


def x_clip(s: dict):
    """A random x-clip CLIP whose text tower is one layer of width W (the same in every implementation)."""
    from x_clip import CLIP

    return CLIP(dim_text=s["text_width"], dim_image=64, dim_latent=s["embed_dim"], num_text_tokens=s["vocab"],
                text_enc_depth=s["clip_layers"], text_seq_len=s["context"], text_heads=s["clip_heads"],
                text_dim_head=s["text_width"] // s["clip_heads"], visual_enc_depth=1, visual_heads=2,
                visual_dim_head=32, visual_image_size=s["image_size"], visual_patch_size=8)


def w4(s: dict) -> tuple[dict, dict]:
    import torch
    from dalle2_pytorch import DALLE2

    clip = x_clip(s)
    pri = prior(s, sample_timesteps=1, clip=clip)
    dec = decoder(s, upsampler=True, sample_timesteps=(1, 1), clip=clip)
    dalle2 = DALLE2(prior=pri, decoder=dec, prior_num_samples=s["candidates"])
    n = s["w4_images"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, s["context"], (n,), generator=g)
    text = torch.randint(1, s["vocab"], (n, s["context"]), generator=g)
    text = text * (torch.arange(s["context"]) < lengths[:, None])                # token id 0 is padding
    scales = dict(cond_scale=(s["guidance"], 1.0), prior_cond_scale=s["prior_guidance"])  # no CFG on the upsampler
    dalle2(text, **scales)  # warm-up
    pri.sample_timesteps = s["prior_steps"]
    dec.sample_timesteps = (s["decoder_steps"], s["up_steps"])
    start = time.perf_counter()
    images = dalle2(text, **scales, return_pil_images=True)
    elapsed = time.perf_counter() - start
    assert len(images) == n and images[0].size == (s["up_size"], s["up_size"])
    info = {"params_m": {"clip": common.n_params(clip), "prior": common.n_params(pri.net),
                         "decoder": common.n_params(dec.unets[0]), "upsampler": common.n_params(dec.unets[1])}}
    return {"s_per_image": elapsed / n, "peak_rss_mib": common.peak_rss_mib()}, info


def main() -> None:
    args = common.parse_args()
    common.quiet_warnings()
    common.setup_torch(args)
    s = common.sizes(args.quick)
    metrics, info = {"W1": w1, "W2": w2, "W3": w3, "W4": w4}[args.workload](s)
    common.emit("dalle2-pytorch", args.workload, metrics, info,
                versions=common.versions("dalle2-pytorch", "open-clip-torch", "x-clip", "accelerate"))


if __name__ == "__main__":
    main()
