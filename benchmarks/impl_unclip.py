"""unclip on the benchmark workloads, through its public entry points, at unclip's defaults.

    python benchmarks/impl_unclip.py --workload W3 [--quick] [--lever bf16 --lever channels-last ...]

W1/W2 run the one training loop (`unclip.training.train`: accelerate, AdamW, grad clipping, EMA every step) with
decoder_loss / prior_loss; W3 is `decoder.sample.sample_decoder`; W4 is `UnCLIPPipeline.generate`.

Levers (off unless named; the defaults are what a user gets):
    bf16            bf16 autocast: TrainConfig(mixed_precision="bf16") / pipe.to(dtype="bf16")
    channels-last   UNets (decoder, upsampler) and their inputs in channels_last memory format
    compile         torch.compile the UNets (nn.Module.compile: state_dict keys unchanged)
    unbatched-cfg   CFG branches as separate forwards (unclip batches them by default: this turns that off)
    no-grad         torch.no_grad instead of torch.inference_mode while sampling (inference_mode is the default)
    cache-text      memoise CLIP text encodings per prompt list (W4)
    one-candidate   one prior sample per prompt instead of the default 2 (W4; what diffusers' UnCLIPPipeline does)
    threads-1       torch.set_num_threads(1)
    diffusers-attention   diffusers' AttnAddedKVProcessor2_0 in the decoder instead of decoder.attention's
    flash-attention       train with decoder.attention's product in the fp32 flash kernel under bf16 autocast (as
                          before 2026-12-01's change) instead of bf16 math attention (sampling uses flash either way)
    full-guidance   guide every decoder step (guidance_interval (0, 1)) instead of the default 0.3-0.7 interval
                    (decoder.sample.GUIDANCE_INTERVAL; W3, W4)
    per-step-condition    encode the condition at every sampling step (no prepare_condition: the prior runs
                          its whole sequence, the decoder re-projects its context tokens)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))          # common.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository (unclip, prior, decoder)

import common  # noqa: E402

# Defaults that a lever turns off: "fp32" (unclip's precision "auto" is bf16 on CPUs with native bf16),
# "diffusers-attention" (diffusers' own attention processor instead of decoder.attention), "flash-attention"
# (training with decoder.attention's fp32 flash kernel, not its bf16 math attention), "per-step-condition"
# (no prepare_condition), "unbatched-cfg", "no-grad" (inference_mode), "full-guidance" (the guidance interval).
# Levers that a user turns on: "bf16" (force it where auto says fp32), "channels-last", "compile",
# "cache-text", "one-candidate", "threads-1".
LEVERS = ("fp32", "bf16", "diffusers-attention", "flash-attention", "per-step-condition", "full-guidance",
          "channels-last", "compile",
          "unbatched-cfg", "no-grad", "cache-text", "one-candidate", "threads-1")


# ---------------------------------------------------------------- models at the workload sizes


def decoder_config(s: dict):
    from decoder.config import DecoderConfig

    return DecoderConfig(image_size=s["image_size"], block_out_channels=tuple(s["channels"]),
                         layers_per_block=s["layers"], attention_levels=tuple(s["attention"]),
                         attention_head_dim=s["head_dim"], norm_num_groups=s["groups"],
                         cross_attention_dim=s["cross_dim"], embed_dim=s["embed_dim"], text_width=s["text_width"],
                         context_length=s["context"], num_image_tokens=s["image_tokens"])


def prior_config(s: dict):
    from prior.config import PriorConfig

    return PriorConfig(embed_dim=s["embed_dim"], text_width=s["text_width"], context_length=s["context"],
                       width=s["embed_dim"], depth=s["prior_depth"], heads=s["prior_heads"])


def upsampler_config(s: dict):
    from decoder.config import UpsamplerConfig

    n = len(s["up_channels"])
    return UpsamplerConfig(image_size=s["up_size"], low_res_size=s["image_size"],
                           block_out_channels=tuple(s["up_channels"]), layers_per_block=s["up_layers"],
                           attention_levels=(False,) * n, norm_num_groups=s["groups"], attention_head_dim=s["head_dim"])


def clip_encoder(s: dict):
    """A random CLIP whose text tower is one transformer layer of width W (the same in every implementation)."""
    from unclip.clip import ClipConfig, ClipEncoder, split_words

    words = sorted({w for p in common.PROMPTS for w in split_words(p)})
    config = ClipConfig(embed_dim=s["embed_dim"],
                        vision=dict(image_size=s["image_size"], patch_size=8, width=64, layers=1, head_width=32),
                        text=dict(context_length=s["context"], width=s["text_width"], heads=s["clip_heads"],
                                  layers=s["clip_layers"]))
    return ClipEncoder.from_config(config, words).eval()


def randomise(module, std: float = 0.02):
    """Perturb every weight (zero-initialised output layers would make a random model predict constants)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def apply_unet_levers(unets, levers, compile_unets: bool = True) -> None:
    import torch

    if "flash-attention" in levers:
        import decoder.attention

        decoder.attention.MATH_ATTENTION_MAX = 0
    for unet in unets:
        if "diffusers-attention" in levers and getattr(unet, "attn_processors", None):
            from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

            unet.set_attn_processor(AttnAddedKVProcessor2_0())
        if "channels-last" in levers:
            unet.to(memory_format=torch.channels_last)
        if "compile" in levers and compile_unets:
            unet.compile()


def per_step_condition(models, levers) -> None:
    """The per-step-condition lever: hide prepare_condition, so unclip.sampling.guided calls the whole model."""
    if "per-step-condition" in levers:
        for model in models:
            model.prepare_condition = None


class ChannelsLastInput(object):
    """Wrap a model so its image input arrives in channels_last (for the sampling workloads)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def __call__(self, x, t, *args, **kwargs):
        import torch

        return self.model(x.contiguous(memory_format=torch.channels_last), t, *args, **kwargs)


class UnbatchedCFG(object):
    """Run each CFG branch of a batched call as its own forward (to measure what batching CFG saves)."""

    def __init__(self, model, batch: int):
        self.model, self.config, self.batch = model, model.config, batch

    def __call__(self, x, t, **cond):
        import torch

        k = x.shape[0] // self.batch
        outs = []
        for i in range(k):
            part = slice(i * self.batch, (i + 1) * self.batch)
            sub = {key: (v[part] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == x.shape[0] else v)
                   for key, v in cond.items()}
            outs.append(self.model(x[part], t[part] if t.ndim else t, **sub))
        return torch.cat(outs)


def precision(levers) -> str:
    """unclip's precision for these levers: its default "auto" resolved on this CPU, or forced."""
    from unclip.precision import resolve_precision

    return "no" if "fp32" in levers else "bf16" if "bf16" in levers else resolve_precision("auto", "cpu")


def autocast(levers):
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision(levers) == "bf16" else contextlib.nullcontext()


# ---------------------------------------------------------------- workloads


def train_rate(model, loss_fn, dataset, batch: int, warmup: int, steps: int, levers) -> float:
    """Run unclip.training.train for warmup + steps + 1 steps; samples/s over the timed ones."""
    from unclip.training import TrainConfig, train

    timer = common.StepTimer()

    def timed_loss(m, b):
        timer.tick()
        return loss_fn(m, b)

    config = TrainConfig(steps=warmup + steps + 1, batch_size=batch, checkpoint_every=10**9, log_every=10**9,
                         mixed_precision=precision(levers), compile="compile" in levers, cpu=True)
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, timed_loss, dataset, Path(run_dir) / "run", config, progress=False)
    return timer.rate(batch, warmup, steps)


def w1(s: dict, levers) -> tuple[dict, dict]:
    from decoder.loss import decoder_loss
    from decoder.model import Decoder

    model = Decoder(decoder_config(s))
    apply_unet_levers([model.unet], levers, compile_unets=False)  # the compile lever: TrainConfig.compile
    data = common.random_pairs(s["w1_batch"] * 4, s)
    rate = train_rate(model, decoder_loss, data, s["w1_batch"], s["w1_warmup"], s["w1_steps"], levers)
    return {"images_per_s": rate}, {"params_m": common.n_params(model)}


def w2(s: dict, levers) -> tuple[dict, dict]:
    from prior.loss import prior_loss
    from prior.model import DiffusionPrior

    model = DiffusionPrior(prior_config(s))
    data = common.random_pairs(s["w2_batch"] * 4, s)
    rate = train_rate(model, prior_loss, data, s["w2_batch"], s["w2_warmup"], s["w2_steps"], levers)
    return {"samples_per_s": rate}, {"params_m": common.n_params(model)}


def w3(s: dict, levers) -> tuple[dict, dict]:
    import torch

    from decoder.model import Decoder
    from decoder.sample import GUIDANCE_INTERVAL, sample_decoder

    decoder = randomise(Decoder(decoder_config(s))).eval()
    apply_unet_levers([decoder.unet], levers)
    per_step_condition([decoder], levers)
    n = s["w3_images"]
    batch = next(iter(torch.utils.data.DataLoader(common.random_pairs(n, s), batch_size=n)))
    model = decoder
    if "channels-last" in levers:
        model = ChannelsLastInput(model)
    if "unbatched-cfg" in levers:
        model = UnbatchedCFG(model, n)
    sample = sample_decoder.__wrapped__ if "no-grad" in levers else sample_decoder  # without inference_mode
    grad = torch.no_grad() if "no-grad" in levers else torch.inference_mode()
    interval = dict(guidance_interval=(0.0, 1.0)) if "full-guidance" in levers else {}  # else the default

    def run(steps):
        with grad, autocast(levers):
            return sample(model, batch["image_emb"], batch["text_tokens"], batch["mask"], num_steps=steps,
                          guidance_scale=s["guidance"], generator=torch.Generator().manual_seed(0),
                          progress=False, **interval)["images"]

    run(2)  # warm-up (and compilation with the compile lever)
    start = time.perf_counter()
    run(s["w3_steps"])
    elapsed = time.perf_counter() - start
    return {"s_per_image": elapsed / n}, {"params_m": common.n_params(decoder), "sampler": "ddim (default)",
                                          "guidance_interval": interval.get("guidance_interval", GUIDANCE_INTERVAL)}


def make_pipeline(s: dict, levers):
    from decoder.model import Decoder
    from decoder.upsampler import Upsampler
    from prior.model import DiffusionPrior
    from unclip.pipeline import UnCLIPPipeline

    prior = randomise(DiffusionPrior(prior_config(s)))
    decoder = randomise(Decoder(decoder_config(s)))
    upsampler = randomise(Upsampler(upsampler_config(s)))
    apply_unet_levers([decoder.unet, upsampler.unet], levers)
    per_step_condition([prior, decoder], levers)
    pipe = UnCLIPPipeline(clip_encoder(s), prior, decoder, [upsampler], model_id="benchmark")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype={"no": "fp32", "bf16": "bf16"}[precision(levers)])  # the same as "auto" without a lever
    if "cache-text" in levers:
        pipe.encode_text = memoised(pipe.encode_text)
    return pipe


def memoised(encode):
    cache = {}

    def encode_text(prompts):
        key = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        if key not in cache:
            cache[key] = encode(prompts)
        return cache[key]

    return encode_text


def w4(s: dict, levers) -> tuple[dict, dict]:
    pipe = make_pipeline(s, levers)
    n = s["w4_images"]
    prompts = (common.PROMPTS * n)[:n]
    steps = dict(prior_steps=s["prior_steps"], decoder_steps=s["decoder_steps"], upsampler_steps=s["up_steps"])
    if "one-candidate" in levers:
        steps["candidates"] = 1
    if "full-guidance" in levers:
        steps["decoder_guidance_interval"] = (0.0, 1.0)
    pipe.generate(prompts, seed=0, prior_steps=1, decoder_steps=1, upsampler_steps=1)  # warm-up
    start = time.perf_counter()
    out = pipe.generate(prompts, seed=0, **steps)  # guidance, candidates, samplers: unclip's defaults
    elapsed = time.perf_counter() - start
    assert len(out.images) == n and out.images[0].size == (s["up_size"], s["up_size"])
    info = {"params_m": {"clip": common.n_params(pipe.clip), "prior": common.n_params(pipe.prior),
                         "decoder": common.n_params(pipe.decoder), "upsampler": common.n_params(pipe.upsamplers[0])},
            "settings": out.info["settings"]}
    return {"s_per_image": elapsed / n, "peak_rss_mib": common.peak_rss_mib()}, info


WORKLOAD_FNS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4}


def run(workload: str, quick: bool = False, levers=(), threads: int = 0, seed: int = 0) -> dict:
    """One measurement in this process (run.py --inprocess, tests); returns the record main() prints."""
    import torch

    levers = set(levers)
    if threads or "threads-1" in levers:
        torch.set_num_threads(1 if "threads-1" in levers else threads)
    torch.manual_seed(seed)
    metrics, info = WORKLOAD_FNS[workload](common.sizes(quick), levers)
    info["precision"] = precision(levers)
    return common.record("unclip", workload, metrics, info, levers=sorted(levers),
                         versions=common.versions("unclip", "diffusers", "x-transformers", "accelerate"))


def main() -> None:
    args = common.parse_args(LEVERS)
    common.quiet_warnings()
    rec = run(args.workload, args.quick, args.lever, args.threads, args.seed)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
