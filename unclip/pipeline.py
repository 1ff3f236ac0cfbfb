"""UnCLIPPipeline: prompts or pictures in, PIL images out — generate, vary, interpolate, mix, edit.

Stages, each its own function: `sample_prior` (text -> image_emb), `sample_decoder` (image_emb [+ text]
-> base image), `upsample` (base -> 2x/4x). This class only wires them, seeds them and converts images.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from PIL import Image

from decoder.config import noise_schedule
from decoder.model import Decoder, decoder_text
from decoder.sample import GUIDANCE_INTERVAL, check_guidance_interval, sample_decoder, upsample
from decoder.upsampler import Upsampler
from prior.model import DiffusionPrior
from prior.sample import sample_prior

from .checkpoint import read_model_index, write_model_index
from .clip import ClipEncoder
from .captions import caption_twins, paraphrase
from .images import load_image, pil_to_tensor, tensor_to_pil
from .interpolation import mix, slerp, text_diff
from .hub import DEFAULT_MODEL, resolve_model
from .sampling import denoise, guided
from .precision import native_bf16
from .schedulers import make_scheduler, scheduler_names
from .verifier import Verifier

RERANK = ("image", "text", "both")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SamplingSettings:
    """Per-stage samplers, step counts and guidance; everything that, with the seed, fixes an image."""
    prior_sampler: str = "ddim"
    # 10 DDIM prior steps match 25 on the prior's cosine and FD to the true embeddings, the shapes oracle and the emoji
    # R-precision and FD (docs/BENCHMARKS.md, "Prior steps"), and save a tenth of a warm image's time
    prior_steps: int = 10
    prior_guidance: float = 2.0           # measured best for cos(pred, true) on shapes (1-2 > 4)
    candidates: int = 2                   # prior samples per prompt; keep the one closest to the text
    # 20 DDIM decoder steps match 25 on the shapes oracle, the emoji R-precision and the CLIP-space FD; UniPC and
    # DPM-Solver++ at 15-20 steps lose 2-4 points of emoji R-precision (docs/BENCHMARKS.md, "Default samplers")
    decoder_sampler: str = "ddim"
    decoder_steps: int = 20
    decoder_guidance: float = 3.0         # image-embedding guidance
    text_guidance: float | None = None    # text guidance (None: the same as decoder_guidance)
    # (low, high) in t / T, decoder.sample.GUIDANCE_INTERVAL: 9 of 20 steps guided, the rest one unguided forward
    decoder_guidance_interval: tuple[float, float] = GUIDANCE_INTERVAL
    eta: float | None = None              # DDIM eta (0: deterministic)
    dynamic_threshold: float | None = None  # Imagen's dynamic thresholding percentile, e.g. 0.995
    upsampler_sampler: str = "unipc"      # UniPC (Zhao et al. 2023): 6 steps match 10 DDIM steps (PSNR, FD)
    upsampler_steps: int = 6
    aug_level: float = 0.0                # noise-augmentation level given to the upsamplers
    image_candidates: int = 1             # decoder samples per image; keep the one CLIP ranks best (`rerank`)
    # what best-of-k ranks the candidates' CLIP image embeddings against: "image" the embedding the decoder was given
    # (the prior already picked it closest to the text), "text" the prompt's text embedding, "both" the sum of the two
    # cosines. On the shapes oracle at k = 4 (scripts/rerank_study.py) "both" kept relations 0.61 and counts 0.84
    # against the text's 0.60 and 0.78 (a random pick: 0.51, 0.80); docs/MODELS.md, "What best of 4 ranks by"
    rerank: str = "both"
    # whether best-of-k's candidates decode one prior sample (True) or each its own (False). On the shapes oracle at
    # k = 4 their own samples raised the share of groups of 4 holding a right relation image from 0.71 to 0.79 (240
    # groups each), and the judge kept a right one 0.63 of the time instead of 0.57; docs/MODELS.md, "A judge for
    # best of 4" (scripts/rerank_study.py --own-priors)
    share_prior: bool = False
    # word rules ("swaps", "reorders", "exchanges"; unclip.captions.caption_twins) that make each prompt's
    # hard-negative twins: the text term of best-of-k then adds log p(prompt | candidate) among the prompt and its
    # twins, at the ranking CLIP's own logit scale and divided by it. The shapes model gives its judge's training
    # negatives: relations kept at best of 8 went 0.61 -> 0.69 on captions naming a held-out colour-shape pair and
    # 0.90 -> 0.88 on the rest (docs/MODELS.md, "Asking the judge about the twins"). None or {}: the cosine alone
    rerank_twins: dict | None = None
    # with rerank_twins, the prior's guidance also pushes each sample away from one of its prompt's twins, the
    # prompt's samples taking the twins in turn: + prior_twin_guidance x (p(prompt) - p(twin)). The shapes model's 1
    # took relations from 0.70 to 0.79 at best of 8 over two 400-caption seeds; 2 overshoots and costs counts
    # (docs/MODELS.md, "The prior against the twins"). 0: off; a given negative prompt replaces it
    prior_twin_guidance: float = 0.0
    # where the model has a verifier (verifier/, a joint head on its judge's tokens, unclip.verifier), best-of-k adds
    # verify_weight x log sigmoid(its logit) to each candidate's score; 0 turns it off. Set by the model's own
    # sampling defaults (docs/MODELS.md, "A verifier for best of 8")
    verify_weight: float = 0.0
    # {relation phrase: its reverse} (unclip.captions.paraphrase): a prompt that holds one is also told from its other
    # side ("A to the left of B" -> "B to the right of A", the same scene), and best-of-k ranks by the mean of each
    # candidate's scores for the two. The shapes model's: relations +0.019 over 800 fresh relation captions, level
    # over the test split's four seeds; within noise (docs/MODELS.md, "Text guidance and the paraphrase").
    # None or {}: the prompt alone
    rerank_paraphrase: dict | None = None

    def __post_init__(self):
        for name in ("prior_sampler", "decoder_sampler", "upsampler_sampler"):
            make_scheduler(getattr(self, name))  # raises ValueError for unknown names
        for name in ("prior_steps", "decoder_steps", "upsampler_steps", "candidates", "image_candidates"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("prior_guidance", "decoder_guidance", "text_guidance", "eta", "dynamic_threshold", "aug_level",
                     "verify_weight", "prior_twin_guidance"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(torch.tensor(float(value))):
                raise ValueError(f"{name.replace('_', ' ')} must be a finite number, got {value}")
        self.decoder_guidance_interval = check_guidance_interval(self.decoder_guidance_interval)
        if self.rerank not in RERANK:
            raise ValueError(f"rerank must be one of {', '.join(RERANK)}, got {self.rerank!r}")
        if self.rerank_twins is not None:
            caption_twins("", self.rerank_twins)  # raises ValueError for unknown rules
        if self.rerank_paraphrase is not None and not (
                isinstance(self.rerank_paraphrase, dict)
                and all(isinstance(k, str) and isinstance(v, str) and k.strip() and v.strip()
                        for k, v in self.rerank_paraphrase.items())):
            raise ValueError("rerank paraphrase must map relation phrases to their reverses, e.g. "
                             f'{{"above": "below"}}, got {self.rerank_paraphrase!r}')
        if self.prior_twin_guidance < 0:
            raise ValueError(f"prior twin guidance must be at least 0, got {self.prior_twin_guidance}")
        if self.dynamic_threshold is not None and not 0.5 < self.dynamic_threshold <= 1.0:
            raise ValueError(f"dynamic threshold is a percentile in (0.5, 1], got {self.dynamic_threshold}")


def sampling_settings(values: dict) -> SamplingSettings:
    """SamplingSettings from a dict of some of its fields; ValueError for anything else or a bad value."""
    if not isinstance(values, dict):
        raise ValueError(f"sampling settings are an object of SamplingSettings fields, got {values!r}")
    known = [f.name for f in dataclasses.fields(SamplingSettings)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown sampling settings {unknown} (known: {', '.join(known)})")
    return SamplingSettings(**values)


@dataclass
class UnCLIPOutput:
    """PIL images plus every stage's output, so each stage can be re-run from the one before."""
    images: list[Image.Image]
    image_emb: torch.Tensor                   # [N, D] what the decoder was conditioned on
    base: torch.Tensor                        # [N, 3, s, s] decoder output in [-1, 1]
    latents: dict[str, torch.Tensor] = field(default_factory=dict)  # initial noise per stage
    text_emb: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class UnCLIPPipeline:
    """CLIP + prior + decoder + upsamplers, loaded from one model folder."""

    def __init__(self, clip: ClipEncoder, prior: DiffusionPrior | None, decoder: Decoder,
                 upsamplers: Sequence[Upsampler] = (), model_id: str = "", sampling: dict | None = None,
                 judge: ClipEncoder | None = None, verifier: Verifier | None = None):
        self.clip, self.prior, self.decoder = clip.eval(), prior.eval() if prior else None, decoder.eval()
        self.judge = judge.eval() if judge is not None else None  # a second CLIP that best-of-k asks about the prompt
        if verifier is not None and verifier.judge is not (judge or clip):
            raise ValueError("a verifier reads the model's judge (or its CLIP where it has none); load it onto that")
        self.verifier = verifier.eval() if verifier is not None else None  # a joint head on the judge's tokens
        self.upsamplers = sorted(upsamplers, key=lambda u: u.config.image_size)
        self.model_id = model_id
        sampling_settings(sampling or {})     # bad defaults fail here, not at the first image
        self.sampling = dict(sampling or {})  # this model's own sampling defaults (model_index.json "sampling")
        self.device, self._dtype = torch.device("cpu"), "auto"
        self.progress = True
        _check_sizes(self)

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, **karlo_options) -> "UnCLIPPipeline":
        """Load a model folder, a bundled model by name ("emoji", "shapes") or a hub id (with a network).

        Published unCLIP weights (Karlo, diffusers layout, or `unclip convert`ed) load through unclip.karlo;
        `karlo_options` (clip=, torch_dtype=) are for those only.
        """
        folder = resolve_model(path_or_name)
        from .karlo import is_karlo_folder, load_karlo  # local: unclip.karlo builds pipelines of this class
        if is_karlo_folder(folder):
            return load_karlo(cls, folder, model_id=str(path_or_name), **karlo_options)
        if karlo_options:
            raise ValueError(f"{', '.join(sorted(karlo_options))}: options for Karlo (diffusers-layout) folders only")
        index = read_model_index(folder)
        components = index.get("components", {})
        for needed in ("clip", "decoder"):
            if needed not in components:
                raise ValueError(f"model folder {folder} has no {needed}/ component "
                                 f"(found: {', '.join(components) or 'nothing'}); train it with `unclip train {needed}`")
        ups = [Upsampler.load(folder / name) for name, kind in components.items() if kind == "upsampler"]
        prior = DiffusionPrior.load(folder / "prior") if "prior" in components else None
        try:
            sampling_settings(index.get("sampling", {}))  # before any weights are read
        except ValueError as error:
            raise ValueError(f'{folder / "model_index.json"}, "sampling": {error}') from None
        judge = ClipEncoder.load(folder / "judge") if components.get("judge") == "clip" else None
        clip = ClipEncoder.load(folder / "clip")
        verifier = Verifier.load(folder / "verifier", judge or clip) if components.get("verifier") == "verifier" \
            else None
        return cls(clip, prior, Decoder.load(folder / "decoder"), ups,
                   model_id=str(path_or_name) if path_or_name is not None else DEFAULT_MODEL,
                   sampling=index.get("sampling"), judge=judge, verifier=verifier)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write every component folder and model_index.json (weights as safetensors, optionally fp16)."""
        path = Path(path)
        self.clip.save(path / "clip", dtype=dtype)
        if self.prior is not None:
            self.prior.save(path / "prior", dtype=dtype)
        if self.judge is not None:
            self.judge.save(path / "judge", dtype=dtype)
        if self.verifier is not None:
            self.verifier.save(path / "verifier", dtype=dtype)
        self.decoder.save(path / "decoder", dtype=dtype)
        for up in self.upsamplers:
            up.save(path / f"upsampler_{up.config.image_size}", dtype=dtype)
        components = {"clip": "clip", "decoder": "decoder", **({"prior": "prior"} if self.prior else {}),
                      **({"judge": "clip"} if self.judge is not None else {}),
                      **({"verifier": "verifier"} if self.verifier is not None else {}),
                      **{f"upsampler_{u.config.image_size}": "upsampler" for u in self.upsamplers}}
        write_model_index(path, components, clip=dataclasses.asdict(self.clip.config) | {"vision": {}, "text": {}},
                          **({"sampling": self.sampling} if self.sampling else {}))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None):
        """Move every component; `dtype` (auto / fp32 / bf16 / fp16) sets the autocast precision of the networks."""
        if device is not None:
            try:
                device = torch.device(device)
                for module in self.modules():
                    module.to(device)
            except (RuntimeError, AssertionError) as error:  # unknown device type, no driver, torch without CUDA
                raise ValueError(f"cannot use device {str(device)!r}: {str(error).strip().splitlines()[0]} "
                                 "(use cpu or an available GPU)") from None
            self.device = device
        if dtype is not None:
            if dtype != "auto":
                dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
                if dtype not in DTYPES.values():
                    raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype}")
            self._dtype = dtype
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The autocast precision; "auto" (the default) is bf16 where the device does bf16 math natively, else
        fp32 (unclip.precision: 1.3-1.4x faster batched sampling on a CPU with AMX, samples equal within noise)."""
        if self._dtype == "auto":
            return torch.bfloat16 if native_bf16(self.device) else torch.float32
        return self._dtype

    def compile(self, freeze: bool = True) -> "UnCLIPPipeline":
        """torch.compile the decoder's and the upsamplers' UNets for sampling, in place (weights, `save_pretrained`
        and results unchanged within rounding). Worth it in a long-lived process that makes many images.

        The first call at each batch size, image size and dtype compiles (about a minute per network on 2 CPU
        cores). With `freeze` (inductor's freezing), the weights become constants of the compiled graph: its
        convolutions get prepacked weights and fused bias and activations, the faster choice on the CPU
        (docs/BENCHMARKS.md), but the graph does not follow later changes to the weights and is not reused
        from inductor's disk cache by the next process. `freeze=False` compiles a graph that reads the weights
        and is cached on disk (a later process starts in seconds).
        """
        # diffusers' resamplers call an lru_cache'd version check, which dynamo traces through (harmlessly) with a
        # UserWarning at every first call
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
        for unet in (self.decoder.unet, *(up.unet for up in self.upsamplers)):
            unet.compile(dynamic=False, options={"freezing": freeze})
        return self

    def settings(self, **given) -> SamplingSettings:
        """The sampling settings of a call: SamplingSettings' defaults, overridden by this model's own (the
        "sampling" object of its model_index.json, e.g. {"image_candidates": 4}), overridden by `given`."""
        return sampling_settings({**self.sampling, **given})

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.clip, self.prior, self.decoder, *self.upsamplers, self.judge, self.verifier)
                if m is not None]

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    @property
    def image_size(self) -> int:
        return self.upsamplers[-1].config.image_size if self.upsamplers else self.decoder.config.image_size

    # ---------------------------------------------------------------- the building blocks (public)

    def encode_text(self, prompts: str | Sequence[str]):
        """Prompts -> (text_emb [B, D], text_tokens [B, L, W], mask [B, L])."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.clip.encode_text(prompts)

    def decoder_text(self, prompts: str | Sequence[str], text=None):
        """What the decoder reads of the prompts: encode_text's (text_emb, text_tokens, mask), with the decoder's
        own text_tokens (`decoder.model.decoder_text`: token ids, or states with CLIP's input embeddings) where
        its text_encoder is not "clip"."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text = text if text is not None else self.encode_text(prompts)
        if getattr(self.decoder.config, "text_encoder", "clip") == "clip":
            return text
        return (text[0], *decoder_text(self.clip, self.decoder.config, prompts))  # ids or [B, L, 2W] states

    def encode_image(self, images) -> torch.Tensor:
        """Paths, PIL images or a [B, 3, H, W] tensor in [-1, 1] -> image_emb [B, D] (unit length)."""
        return self.clip.encode_image(_as_images(images))

    def sample_image_emb(self, prompts, settings: SamplingSettings, seeds: Sequence[int] | None = None,
                         generator: torch.Generator | None = None, negative_prompt: str | None = None,
                         latents: torch.Tensor | None = None, text=None, per_prompt: int = 1):
        """The prior stage: prompts -> image_emb [B, D] (and the prior's initial latents [B, candidates, D]).

        per_prompt n > 1 draws n samples per prompt, each from `settings.candidates` of its own: image_emb
        [B, n, D] and latents [B, n * candidates, D]. Sample 0 is the one per_prompt=1 draws. Without a negative
        prompt, `settings.prior_twin_guidance` guides sample j of a prompt away from the prompt's twin j (mod their
        number; `caption_twins` by `settings.rerank_twins`)."""
        if self.prior is None:
            raise ValueError("this model has no prior/ component: use prior_free=True or train one "
                             "with `unclip train prior`")
        text = text or self.encode_text(prompts)
        b, c, d = text[0].shape[0], settings.candidates, self.prior.config.embed_dim
        if latents is None:
            latents = self._noise((per_prompt * c, d), b, seeds, generator, "prior")
        negative = self.encode_text([negative_prompt]) if negative_prompt else None
        negative_scale = None
        if negative is None and settings.prior_twin_guidance and settings.rerank_twins and prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            negative = self._twin_negatives(prompts, settings.rerank_twins, per_prompt)
            negative_scale = settings.prior_twin_guidance
        if per_prompt > 1:
            text = tuple(t.repeat_interleave(per_prompt, dim=0) if t is not None else None for t in text)
        with torch.inference_mode(), self._autocast():
            out = sample_prior(self.prior, *text, scheduler=settings.prior_sampler, num_steps=settings.prior_steps,
                               guidance_scale=settings.prior_guidance, candidates=c,
                               latents=latents.reshape(b * per_prompt, c, d).to(self.device), negative=negative,
                               negative_scale=negative_scale, eta=settings.eta,
                               generator=_step_generators(seeds, generator, "prior", per_prompt * c),
                               progress=self.progress)
        image_emb = out["image_emb"].float()
        return (image_emb.view(b, per_prompt, d) if per_prompt > 1 else image_emb), latents

    def decode(self, image_emb: torch.Tensor, text=None, settings: SamplingSettings | dict | None = None,
               seeds: Sequence[int] | None = None, generator: torch.Generator | None = None,
               latents: dict[str, torch.Tensor] | None = None, prior_free: bool = False,
               prompts: Sequence[str] | None = None) -> UnCLIPOutput:
        """Decoder + upsamplers: image_emb [B, D] (and optional text encodings, `decoder_text`) -> images.

        `latents` maps "decoder" and "upsampler_<size>" to initial noise; missing ones are drawn from
        `seeds` (one per image) or `generator`.

        With `settings.image_candidates` k > 1 (and no given decoder noise) the decoder draws k samples per image
        and keeps the one whose CLIP image embedding `rerank_scores` ranks first (by default the one closest to
        image_emb and the text embedding together): best-of-k reranking, k times the decoder's cost.
        `latents["decoder"]` is then the kept noise. image_emb [B, k, D] gives each of the k candidates its own
        embedding (`sample_image_emb(per_prompt=k)`); the output then holds the kept one's, and the kept one's
        `latents["prior"]` where those are [B, k * candidates, D]. Where the model has a judge (a second CLIP,
        trained on from the first with binding negatives) and the `prompts` (one per image) are given, the judge's
        image-text cosine replaces the CLIP's as the text term.
        """
        settings = self.settings(**settings) if isinstance(settings, dict) else settings or self.settings()
        latents = dict(latents or {})
        b = image_emb.shape[0]
        s = self.decoder.config.image_size
        own = image_emb.dim() == 3  # one embedding per candidate
        if own and "decoder" in latents:
            raise ValueError("one image embedding per candidate ([B, k, D]) needs fresh decoder noise, "
                             "not given latents['decoder']")
        k = image_emb.shape[1] if own else 1 if "decoder" in latents else settings.image_candidates
        noise = latents.get("decoder")
        if noise is None:
            noise = self._noise((k, 3, s, s), b, seeds, generator, "decoder").flatten(0, 1)  # [b * k, 3, s, s]
        tokens, mask = (text[1], text[2]) if text is not None else (None, None)
        repeat = (lambda x: x.repeat_interleave(k, dim=0) if x is not None else None)  # noqa: E731
        emb = image_emb.flatten(0, 1) if own else repeat(image_emb)
        with torch.inference_mode(), self._autocast():
            base = sample_decoder(self.decoder, emb.to(self.device), repeat(tokens), repeat(mask),
                                  scheduler=settings.decoder_sampler, num_steps=settings.decoder_steps,
                                  guidance_scale=settings.decoder_guidance, text_guidance_scale=settings.text_guidance,
                                  guidance_interval=settings.decoder_guidance_interval,
                                  eta=settings.eta, dynamic_threshold=settings.dynamic_threshold,
                                  generator=_step_generators(seeds, generator, "decoder", k),
                                  latents=noise.to(self.device),
                                  prior_free=prior_free, progress=self.progress)["images"].float()
            if k > 1:
                scores = self._rank(base.view(b, k, *base.shape[1:]), None if prior_free else image_emb, text,
                                    prompts, settings)  # prior-free: no image term (its embeddings are zeros)
                kept = scores.argmax(dim=1).cpu()
                best = kept + torch.arange(b) * k                                      # [b] rows of the keepers
                base, noise = base[best.to(base.device)], noise[best]
                if own:
                    image_emb = image_emb[torch.arange(b), kept.to(image_emb.device)]
                    prior = latents.get("prior")
                    if prior is not None and prior.shape[1] % k == 0:
                        latents["prior"] = prior.view(b, k, prior.shape[1] // k, -1)[torch.arange(b), kept]
            elif own:
                image_emb = image_emb[:, 0]
            latents["decoder"] = noise
            x = base
            for up in self.upsamplers:
                name = f"upsampler_{up.config.image_size}"
                size = up.config.image_size
                latents.setdefault(name, self._noise((3, size, size), b, seeds, generator, name))
                x = upsample(up, x, scheduler=settings.upsampler_sampler, num_steps=settings.upsampler_steps,
                             aug_level=settings.aug_level, generator=_step_generators(seeds, generator, name),
                             latents=latents[name].to(self.device), progress=self.progress).float()
        return UnCLIPOutput(images=tensor_to_pil(x), image_emb=image_emb, base=base, latents=latents,
                            text_emb=text[0] if text is not None else None)

    # ---------------------------------------------------------------- the uses

    def __call__(self, prompt, **kwargs) -> UnCLIPOutput:
        return self.generate(prompt, **kwargs)

    def generate(self, prompts: str | Sequence[str], num_images: int = 1, negative_prompt: str | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None, prior_free: bool = False,
                 image_emb: torch.Tensor | None = None, latents: dict | None = None, **settings) -> UnCLIPOutput:
        """Prompt(s) -> `num_images` images each (prior, then decoder, then upsamplers)."""
        settings = self.settings(**settings)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        prompts = [p for p in prompts for _ in range(num_images)]
        seeds = _seeds(seed, len(prompts), generator)
        text = self.encode_text(prompts)
        latents = dict(latents or {})
        if prior_free:
            image_emb = torch.zeros(len(prompts), self.clip.embed_dim, device=self.device)
        elif image_emb is None:  # best-of-k: each candidate its own prior sample unless shared or noise is given
            own = not settings.share_prior and not {"prior", "decoder"} & set(latents)
            image_emb, latents["prior"] = self.sample_image_emb(prompts, settings, seeds, generator,
                                                                negative_prompt, latents.get("prior"), text,
                                                                per_prompt=settings.image_candidates if own else 1)
        out = self.decode(image_emb, self.decoder_text(prompts, text), settings, seeds, generator, latents,
                          prior_free=prior_free, prompts=prompts)
        out.info = self._info("generate", settings, seed, prompts=prompts, negative_prompt=negative_prompt,
                              prior_free=prior_free)
        return out

    def vary(self, images, num_images: int = 1, seed: int | None = None, generator: torch.Generator | None = None,
             invert: bool = False, latents: dict | None = None, **settings) -> UnCLIPOutput:
        """Variations of pictures: decode their CLIP image embedding with fresh noise, or with the picture's
        DDIM-inverted noise (`invert=True`) to keep its layout."""
        settings = self.settings(**settings)
        pictures = _as_images(images)
        image_emb = self.encode_image(pictures).repeat_interleave(num_images, dim=0)
        latents = dict(latents or {})
        if invert:
            noise = self.invert(pictures, settings).repeat_interleave(num_images, dim=0)
            latents.setdefault("decoder", noise)
        seeds = _seeds(seed, image_emb.shape[0], generator)
        out = self.decode(image_emb, None, settings, seeds, generator, latents)
        out.info = self._info("vary", settings, seed, invert=invert)
        return out

    def invert(self, images, settings: SamplingSettings | None = None) -> torch.Tensor:
        """DDIM inversion (Song et al. 2021): the decoder noise [B, 3, s, s] that re-creates these pictures."""
        settings = settings or self.settings()
        pictures = _as_images(images)
        s = self.decoder.config.image_size
        x0 = pil_to_tensor(pictures, s).to(self.device)
        image_emb = self.encode_image(pictures)
        null = torch.ones(len(pictures), dtype=torch.bool, device=self.device)
        cond = {"image_emb": image_emb, "text_tokens": None, "mask": None, "force_drop_text": null}
        scheduler = make_scheduler("ddim-inverse", noise_schedule(self.decoder.config))
        with torch.inference_mode(), self._autocast():
            return denoise(guided(self.decoder, [cond], []), x0, scheduler, settings.decoder_steps,
                           progress=self.progress, desc="invert").float()

    def embed(self, item) -> torch.Tensor:
        """A prompt or a picture (path, PIL image) -> its image embedding [D] (prompts through the prior)."""
        if isinstance(item, str) and not Path(item).is_file():
            if Path(item).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"):
                raise ValueError(f"image not found: {item} (a prompt is text without a file extension)")
            emb, _ = self.sample_image_emb([item], self.settings(), seeds=[0])
            return emb[0]
        return self.encode_image([item])[0]

    def interpolate(self, a, b, frames: int = 8, seed: int | None = 0, generator=None,
                    **settings) -> UnCLIPOutput:
        """Frames along the great circle between two prompts or pictures, with the decoder noise held fixed."""
        if frames < 2:
            raise ValueError(f"interpolation needs at least 2 frames, got {frames}")
        path = slerp(self.embed(a), self.embed(b), torch.linspace(0, 1, frames))   # [T, D]
        out = self._decode_fixed_noise(path, seed, generator, self.settings(**settings))
        out.info = self._info("interpolate", out.info["settings"], seed, a=str(a), b=str(b), frames=frames)
        return out

    def mix(self, items: Sequence, weights: Sequence[float] | None = None, num_images: int = 1,
            seed: int | None = 0, generator=None, **settings) -> UnCLIPOutput:
        """Images from a weighted mix of several prompts' / pictures' embeddings."""
        weights = weights or [1.0] * len(items)
        emb = mix(torch.stack([self.embed(item) for item in items]), weights)
        seeds = _seeds(seed, num_images, generator)
        settings = self.settings(**settings)
        out = self.decode(emb[None].repeat(num_images, 1), None, settings, seeds, generator)
        out.info = self._info("mix", settings, seed, items=[str(i) for i in items],
                              weights=list(weights))
        return out

    def edit(self, image, from_text: str, to_text: str, amount: float | Sequence[float] = 0.3,
             seed: int | None = 0, generator=None, invert: bool = True, **settings) -> UnCLIPOutput:
        """DALL-E 2 text diffs: move the picture's embedding toward norm(text(to) - text(from)).

        `amount` (θ in [0, 1]; the paper shows 0–0.5) may be a list for a sweep. The decoder noise is held
        fixed across amounts: the picture's DDIM-inverted noise when `invert`, else seeded noise.
        """
        settings = self.settings(**settings)
        picture = _as_images([image])
        (from_emb, to_emb) = self.encode_text([from_text, to_text])[0]
        amounts = [amount] if isinstance(amount, (int, float)) else list(amount)
        path = text_diff(self.encode_image(picture)[0], from_emb, to_emb, amounts)   # [T, D]
        noise = self.invert(picture, settings) if invert else None
        out = self._decode_fixed_noise(path, seed, generator, settings, noise)
        out.info = self._info("edit", settings, seed, from_text=from_text, to_text=to_text, amount=amounts,
                              invert=invert)
        return out

    # ---------------------------------------------------------------- helpers

    def _decode_fixed_noise(self, image_emb, seed, generator, settings, noise=None) -> UnCLIPOutput:
        """Decode each row of image_emb [T, D] from the same decoder (and upsampler) noise."""
        t = image_emb.shape[0]
        seeds = [seed if seed is not None else 0] * t
        latents = {"decoder": noise.expand(t, -1, -1, -1)} if noise is not None else None
        out = self.decode(image_emb, None, settings, seeds, generator, latents)
        out.info = {"settings": settings}
        return out

    def _rank(self, candidates: torch.Tensor, image_emb: torch.Tensor | None, text, prompts, settings) -> torch.Tensor:
        """`rerank_scores` [B, k] of decoded candidates [B, k, 3, S, S]: the CLIP's image term, and the text term from
        the judge where the model has one and the prompts are given (else from the CLIP and `text`), with the
        prompts' twins where the settings name rules; plus verify_weight x log sigmoid of the verifier's logit where
        the model has a verifier. Where `settings.rerank_paraphrase` tells a prompt from its other side, the mean of
        the scores for the prompt and for its paraphrase."""
        scores = self._rank_once(candidates, image_emb, text, prompts, settings)
        if not settings.rerank_paraphrase or prompts is None or settings.rerank == "image":
            return scores
        told = [paraphrase(p, settings.rerank_paraphrase) for p in prompts]
        rows = [i for i, (p, q) in enumerate(zip(prompts, told)) if p != q]
        if rows:
            other = [told[i] for i in rows]
            scores[rows] = (scores[rows] + self._rank_once(
                candidates[rows], image_emb[rows] if image_emb is not None else None, self.encode_text(other),
                other, settings)) / 2
        return scores

    def _rank_once(self, candidates, image_emb, text, prompts, settings) -> torch.Tensor:
        """`_rank` for the prompts as given."""
        b, k = candidates.shape[:2]
        flat = candidates.flatten(0, 1)
        text_emb, judged, twins = text[0].to(self.device) if text is not None else None, None, None
        ranker = self.judge if self.judge is not None and prompts is not None else self.clip
        if ranker is self.judge and settings.rerank != "image":
            judged = self.judge.encode_image(flat).view(b, k, -1)
            text_emb = self.judge.encode_text(list(prompts))[0]
        if settings.rerank_twins and prompts is not None and settings.rerank != "image":
            twins = self._twins(list(prompts), settings.rerank_twins, ranker)
        scores = rerank_scores(self.clip.encode_image(flat).view(b, k, -1),
                               image_emb.to(self.device) if image_emb is not None else None,
                               text_emb, settings.rerank, text_candidates=judged, twins=twins)
        if self.verifier is not None and prompts is not None and settings.rerank != "image" and settings.verify_weight:
            logits = self.verifier.score(flat, [p for p in prompts for _ in range(k)]).view(b, k)
            scores = scores + settings.verify_weight * F.logsigmoid(logits)
        return scores

    def _twins(self, prompts: list[str], rules: dict, ranker: ClipEncoder):
        """Each prompt's twins (`caption_twins`) in the ranker's text space: (embeddings [B, m, D], mask [B, m],
        the ranker's logit scale), or None when no prompt has one."""
        twins = [caption_twins(p, rules) for p in prompts]
        m = max(map(len, twins))
        if m == 0:
            return None
        sizes = [len(group) for group in twins]
        emb = ranker.encode_text([t for group in twins for t in group])[0].split(sizes)
        mask = torch.arange(m, device=emb[0].device) < torch.tensor(sizes, device=emb[0].device)[:, None]
        return pad_sequence(emb, batch_first=True), mask, ranker.logit_scale

    def _twin_negatives(self, prompts: list[str], rules: dict, per_prompt: int):
        """The prior's negative per sample (`encode_text` of B * per_prompt prompts): sample j of a prompt gets its
        twin j mod their number, or the prompt itself where it has none (which makes the push zero); None where no
        prompt has a twin."""
        twins = [caption_twins(p, rules) for p in prompts]
        if not any(twins):
            return None
        return self.encode_text([group[j % len(group)] if group else p
                                 for p, group in zip(prompts, twins) for j in range(per_prompt)])

    def _noise(self, shape: tuple, batch: int, seeds, generator, stage: str) -> torch.Tensor:
        """[B, *shape] unit Gaussian noise on the CPU: per-image seeds make image i independent of the batch."""
        if seeds is not None:
            offset = {"prior": 0, "decoder": 1}.get(stage, 2 + len(stage))
            return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s * 1000 + offset))
                                for s in seeds])
        return torch.randn((batch, *shape), generator=generator)

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _info(self, command: str, settings: SamplingSettings, seed, **inputs) -> dict:
        return {"command": command, "model": self.model_id, "seed": seed, "dtype": str(self.dtype).split(".")[-1],
                "settings": dataclasses.asdict(settings), **inputs}


def _step_generators(seeds, generator, stage: str, repeats: int = 1):
    """Where a stochastic sampler (ddpm, dpm++sde, DDIM with eta > 0) draws its per-step noise: one CPU generator
    per image (`repeats` per image for prior candidates), seeded from the image's seed and the stage, so image i
    stays independent of the batch; without seeds, the caller's `generator` (draws then depend on the batch)."""
    if seeds is None:
        return generator
    offset = {"prior": 0, "decoder": 1}.get(stage, 2 + len(stage))
    return [torch.Generator().manual_seed((s * 1000 + offset) * 64 + 32 + k) for s in seeds for k in range(repeats)]


def rerank_scores(candidates: torch.Tensor, image_emb: torch.Tensor | None, text_emb: torch.Tensor | None,
                  rerank: str = "both", text_candidates: torch.Tensor | None = None, twins=None) -> torch.Tensor:
    """Best-of-k scores [B, k] of candidates' CLIP image embeddings [B, k, D]: cosine to the image embedding [B, D]
    they were decoded from ("image"), to the prompt's text embedding ("text"), or the sum ("both"). Where the named
    one is missing, the other stands in: without a prompt (variations) every mode ranks by the image embedding, and
    without an image embedding (prior-free) by the text. image_emb may be [B, k, D], one per candidate (each
    decoded from its own). `text_candidates` [B, k, D'] are the candidates in the space of `text_emb` [B, D'] where
    that is another CLIP's (a judge's); by default `candidates`.

    `twins` (embeddings [B, m, D'] in the text space, mask [B, m], logit scale s) add to the text term
    log p(prompt | candidate) / s, the softmax at scale s over the prompt and its twins: how much better the
    candidate fits the prompt than the captions it could be mistaken for (a colour or shape exchanged, the relation
    reversed), in the direction the CLIP's hard negatives trained."""
    given = {"image": (candidates, image_emb), "text": (candidates if text_candidates is None else text_candidates,
                                                         text_emb)}
    names = [name for name in ("image", "text") if rerank in (name, "both") and given[name][1] is not None]
    names = names or [name for name in ("image", "text") if given[name][1] is not None]

    def cosine(features, target):  # target [B, D] for every candidate, or [B, k, D] one per candidate
        target = F.normalize(target.float(), dim=-1)
        return (F.normalize(features.float(), dim=-1) * (target[:, None] if target.dim() == 2 else target)).sum(-1)

    cosines = {name: cosine(*given[name]) for name in names}                                   # [B, k] each
    score = sum(cosines.values())
    if twins is not None and "text" in names:
        twin_emb, mask, scale = twins
        features = F.normalize(given["text"][0].float(), dim=-1)                             # [B, k, D']
        own = cosines["text"][..., None]                                                     # [B, k, 1]
        other = torch.einsum("bkd,bmd->bkm", features, F.normalize(twin_emb.float(), dim=-1))
        other = other.masked_fill(~mask[:, None], float("-inf"))
        scale = float(scale)
        score = score + (own - torch.logsumexp(torch.cat([own, other], -1) * scale, -1, keepdim=True) / scale)[..., 0]
    return score


def _seeds(seed: int | None, n: int, generator) -> list[int] | None:
    if seed is None:
        return None if generator is not None else _seeds(int(torch.randint(0, 2**31 - 1, ())), n, None)
    return [seed + i for i in range(n)]


def _as_images(images) -> list[Image.Image] | torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    return [load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in images]


def _check_sizes(pipe: UnCLIPPipeline) -> None:
    """Components trained against another CLIP (or stages that do not chain) fail here, not mid-sampling."""
    d = pipe.clip.embed_dim
    for name, module in (("prior", pipe.prior), ("decoder", pipe.decoder)):
        if module is not None and module.config.embed_dim != d:
            raise ValueError(f"the {name} expects {module.config.embed_dim}-d CLIP embeddings but the CLIP gives "
                             f"{d}-d: the components come from different models")
    c = pipe.decoder.config
    if getattr(c, "text_encoder", "clip") == "transformer" and (c.text_vocab_size, c.context_length) != (
            pipe.clip.vocab_size, pipe.clip.context_length):
        raise ValueError(f"the decoder reads {c.context_length} token ids of a {c.text_vocab_size}-word vocabulary "
                         f"but the CLIP's tokenizer gives {pipe.clip.context_length} of {pipe.clip.vocab_size}: "
                         "the components come from different models")
    size = c.image_size
    for up in pipe.upsamplers:
        if up.config.low_res_size != size:
            raise ValueError(f"upsampler_{up.config.image_size} expects {up.config.low_res_size} px input, "
                             f"but the stage before gives {size} px")
        size = up.config.image_size
