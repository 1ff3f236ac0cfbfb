"""diffusers' unCLIP (Karlo) classes on the benchmark workloads.

    python benchmarks/impl_diffusers.py --workload W4 [--quick]      # the main env's diffusers has them

diffusers ships models, schedulers and an inference pipeline but no unCLIP training loop, so W1/W2 use the
loop a diffusers user writes from its training examples (accelerate, AdamW, DDPMScheduler.add_noise, MSE,
grad clipping, diffusers.training_utils.EMAModel every step). W3 is UnCLIPPipeline's decoder loop (text_proj,
batched CFG, UnCLIPScheduler with the learned variance: the UNet has 6 output channels as in Karlo); W4 is
`UnCLIPPipeline.__call__` itself with prompt encodings from a one-layer CLIPTextModelWithProjection (width 256)
passed as text_model_output. UnCLIPPipeline draws one prior sample per image (unclip and DALLE2-pytorch draw 2
candidates and keep the closer one) and has no guidance on the upsampler, like the others here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def decoder_unet(s: dict):
    """Karlo's decoder UNet (SimpleCrossAttn blocks, identity class embedding) at the workload sizes."""
    from diffusers import UNet2DConditionModel

    down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in s["attention"]]
    up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(s["attention"])]
    return UNet2DConditionModel(sample_size=s["image_size"], in_channels=3, out_channels=6,
                                block_out_channels=tuple(s["channels"]), layers_per_block=s["layers"],
                                down_block_types=tuple(down), up_block_types=tuple(up),
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=s["cross_dim"],
                                attention_head_dim=s["head_dim"], norm_num_groups=s["groups"],
                                class_embed_type="identity", resnet_time_scale_shift="scale_shift")


def text_proj(s: dict):
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    return UnCLIPTextProjModel(clip_extra_context_tokens=s["image_tokens"], clip_embeddings_dim=s["embed_dim"],
                               time_embed_dim=4 * s["channels"][0], cross_attention_dim=s["cross_dim"])


def super_res(s: dict):
    """Karlo's super-resolution UNet (ResnetDown/UpsampleBlock2D, no attention) on concat(x_t, upsampled)."""
    from diffusers import UNet2DModel

    n = len(s["up_channels"])
    return UNet2DModel(sample_size=s["up_size"], in_channels=6, out_channels=3,
                       block_out_channels=tuple(s["up_channels"]), layers_per_block=s["up_layers"],
                       down_block_types=("ResnetDownsampleBlock2D",) * n,
                       up_block_types=("ResnetUpsampleBlock2D",) * n, add_attention=False,
                       norm_num_groups=s["groups"], resnet_time_scale_shift="scale_shift")


def prior(s: dict):
    from diffusers import PriorTransformer

    return PriorTransformer(num_attention_heads=s["prior_heads"], attention_head_dim=s["embed_dim"] // s["prior_heads"],
                            num_layers=s["prior_depth"], embedding_dim=s["embed_dim"], num_embeddings=s["context"],
                            additional_embeddings=4, dropout=0.0)


class Decoder(torch.nn.Module):
    """text_proj + UNet, trained together (what UnCLIPPipeline calls in its decoder loop)."""

    def __init__(self, s: dict):
        super().__init__()
        self.text_proj, self.unet = text_proj(s), decoder_unet(s)

    def forward(self, x_t, t, image_emb, text_emb, text_tokens, mask):
        import torch.nn.functional as F

        context, time_offset = self.text_proj(image_embeddings=image_emb, prompt_embeds=text_emb,
                                              text_encoder_hidden_states=text_tokens, do_classifier_free_guidance=False)
        mask = F.pad(mask, (self.text_proj.clip_extra_context_tokens, 0), value=True)
        return self.unet(x_t, t, encoder_hidden_states=context, class_labels=time_offset, attention_mask=mask).sample


def train_loop(s: dict, model, loss_fn, batch: int, warmup: int, steps: int) -> float:
    """A diffusers-examples style loop: accelerate, AdamW, clip_grad_norm_ 1.0, EMAModel.step every step."""
    import torch
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ema = EMAModel(model.parameters(), decay=0.999)
    data = torch.utils.data.DataLoader(common.random_pairs(batch * 4, s), batch_size=batch, shuffle=True,
                                       drop_last=True)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    timer, done = common.StepTimer(), 0
    while done < warmup + steps + 1:
        for b in data:
            if done == warmup + steps + 1:
                break
            timer.tick()
            with accelerator.autocast():
                loss = loss_fn(model, b)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            done += 1
    return timer.rate(batch, warmup, steps)


def drop(values, prob: float, null):
    """CFG condition dropout: each sample's value replaced by `null` with probability prob."""
    import torch

    keep = torch.rand(values.shape[0], device=values.device) >= prob
    return torch.where(keep.reshape(-1, *[1] * (values.ndim - 1)), values, null)


def w1(s: dict) -> tuple[dict, dict]:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")

    def loss_fn(model, b):
        x0 = b["image"]
        eps = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],))
        x_t = scheduler.add_noise(x0, eps, t)
        proj = model.text_proj if hasattr(model, "text_proj") else model.module.text_proj
        image_emb = drop(b["image_emb"], 0.1, proj.learned_classifier_free_guidance_embeddings)
        tokens = drop(b["text_tokens"], 0.5, torch.zeros_like(b["text_tokens"][0]))
        pred = model(x_t, t, image_emb, b["text_emb"], tokens, b["mask"])
        return F.mse_loss(pred[:, :3].float(), eps)   # the epsilon part; Karlo adds a VLB term for the variance

    model = Decoder(s)
    rate = train_loop(s, model, loss_fn, s["w1_batch"], s["w1_warmup"], s["w1_steps"])
    return {"images_per_s": rate}, {"params_m": common.n_params(model)}


def w2(s: dict) -> tuple[dict, dict]:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample")

    def loss_fn(model, b):
        x0 = b["image_emb"]
        t = torch.randint(0, 1000, (x0.shape[0],))
        x_t = scheduler.add_noise(x0, torch.randn_like(x0), t)
        tokens = drop(b["text_tokens"], 0.1, torch.zeros_like(b["text_tokens"][0]))
        pred = model(x_t, t, proj_embedding=b["text_emb"], encoder_hidden_states=tokens,
                     attention_mask=b["mask"]).predicted_image_embedding
        return F.mse_loss(pred.float(), x0)

    model = prior(s)
    rate = train_loop(s, model, loss_fn, s["w2_batch"], s["w2_warmup"], s["w2_steps"])
    return {"samples_per_s": rate}, {"params_m": common.n_params(model)}


def decoder_scheduler():
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon", clip_sample=True)


@torch.no_grad()
def sample_decoder(model: Decoder, image_emb, text_emb, text_hidden, mask, steps: int, guidance: float, generator):
    """UnCLIPPipeline's decoder loop (its lines, with the null text encodings passed in)."""
    import torch
    import torch.nn.functional as F

    B = image_emb.shape[0]
    # the unconditional branch: CLIP's encoding of "" (here zeros and a one-token mask), then the batched CFG inputs
    null_hidden, null_mask = torch.zeros_like(text_hidden), torch.zeros_like(mask)
    null_mask[:, 0] = True
    prompt_embeds = torch.cat([torch.zeros_like(text_emb), text_emb])
    hidden, time_offset = model.text_proj(image_embeddings=image_emb, prompt_embeds=prompt_embeds,
                                          text_encoder_hidden_states=torch.cat([null_hidden, text_hidden]),
                                          do_classifier_free_guidance=True)
    mask = F.pad(torch.cat([null_mask, mask]), (model.text_proj.clip_extra_context_tokens, 0), value=True)
    scheduler = decoder_scheduler()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    size = model.unet.config.sample_size
    latents = torch.randn(B, 3, size, size, generator=generator) * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        noise_pred = model.unet(sample=torch.cat([latents] * 2), timestep=t, encoder_hidden_states=hidden,
                                class_labels=time_offset, attention_mask=mask).sample
        uncond, cond = noise_pred.chunk(2)
        uncond, _ = uncond.split(3, dim=1)
        cond, variance = cond.split(3, dim=1)
        noise_pred = torch.cat([uncond + guidance * (cond - uncond), variance], dim=1)
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        latents = scheduler.step(noise_pred, t, latents, prev_timestep=prev, generator=generator).prev_sample
    return latents.clamp(-1, 1)


def w3(s: dict) -> tuple[dict, dict]:
    import torch

    n = s["w3_images"]
    b = next(iter(torch.utils.data.DataLoader(common.random_pairs(n, s), batch_size=n)))
    model = Decoder(s).eval()
    args = (b["image_emb"], b["text_emb"], b["text_tokens"], b["mask"])
    sample_decoder(model, *args, 2, s["guidance"], torch.Generator().manual_seed(0))  # warm-up
    start = time.perf_counter()
    images = sample_decoder(model, *args, s["w3_steps"], s["guidance"], torch.Generator().manual_seed(0))
    elapsed = time.perf_counter() - start
    assert images.shape == (n, 3, s["image_size"], s["image_size"])
    return {"s_per_image": elapsed / n}, {"params_m": common.n_params(model), "sampler": "UnCLIPScheduler"}


def text_encoder_and_tokenizer(s: dict, folder: str):
    """A random one-layer CLIPTextModelWithProjection and a CLIPTokenizer over a tiny vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"w{i}</w>": i for i in range(2, s["vocab"])}}
    Path(folder, "vocab.json").write_text(json.dumps(vocab))
    Path(folder, "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(Path(folder, "vocab.json")), str(Path(folder, "merges.txt")),
                              model_max_length=s["context"])
    config = CLIPTextConfig(vocab_size=s["vocab"], hidden_size=s["text_width"], intermediate_size=4 * s["text_width"],
                            num_hidden_layers=s["clip_layers"], num_attention_heads=s["clip_heads"],
                            max_position_embeddings=s["context"], projection_dim=s["embed_dim"],
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config).eval(), tokenizer


def w4(s: dict) -> tuple[dict, dict]:
    import torch
    from diffusers import UnCLIPPipeline, UnCLIPScheduler

    with tempfile.TemporaryDirectory() as folder:
        text_encoder, tokenizer = text_encoder_and_tokenizer(s, folder)
    model = Decoder(s)
    sr = super_res(s)
    pipe = UnCLIPPipeline(
        prior=prior(s), decoder=model.unet, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=model.text_proj,
        super_res_first=sr, super_res_last=sr,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=decoder_scheduler(),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))
    pipe.set_progress_bar_config(disable=True)
    n = s["w4_images"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, s["context"], (n,), generator=g)
    ids = torch.randint(2, s["vocab"], (n, s["context"]), generator=g)
    ids[torch.arange(n), lengths] = 1                                          # <|endoftext|>
    mask = torch.arange(s["context"]) <= lengths[:, None]

    def generate(prior_steps, decoder_steps, up_steps):
        with torch.no_grad():
            out = text_encoder(ids, attention_mask=mask)
        return pipe(text_model_output=(out.text_embeds, out.last_hidden_state), text_attention_mask=mask,
                    prior_num_inference_steps=prior_steps, decoder_num_inference_steps=decoder_steps,
                    super_res_num_inference_steps=up_steps, prior_guidance_scale=s["prior_guidance"],
                    decoder_guidance_scale=s["guidance"], generator=torch.Generator().manual_seed(0)).images

    generate(2, 2, 2)  # warm-up (UnCLIPScheduler needs at least 2 steps)
    start = time.perf_counter()
    images = generate(s["prior_steps"], s["decoder_steps"], s["up_steps"])
    elapsed = time.perf_counter() - start
    assert len(images) == n and images[0].size == (s["up_size"], s["up_size"])
    info = {"params_m": {"clip": common.n_params(text_encoder), "prior": common.n_params(pipe.prior),
                         "decoder": common.n_params(model), "upsampler": common.n_params(sr)}}
    return {"s_per_image": elapsed / n, "peak_rss_mib": common.peak_rss_mib()}, info


def main() -> None:
    args = common.parse_args()
    common.quiet_warnings()
    common.setup_torch(args)
    s = common.sizes(args.quick)
    metrics, info = {"W1": w1, "W2": w2, "W3": w3, "W4": w4}[args.workload](s)
    common.emit("diffusers", args.workload, metrics, info,
                versions=common.versions("diffusers", "transformers", "accelerate"))


if __name__ == "__main__":
    main()
