"""Karlo (diffusers-layout unCLIP weights) through unclip, checked against diffusers' own pipelines.

A tiny random Karlo folder is written with diffusers' and transformers' save_pretrained (the real layout:
prior/, decoder/ with a learned variance, text_proj/, super_res_first/ + super_res_last/, UnCLIPScheduler
configs as Karlo's, text_encoder/ + tokenizer/, image_encoder/ + feature_extractor/ as in the image-variations
repo). diffusers' UnCLIPPipeline / UnCLIPImageVariationPipeline, built from the same components, are the
reference; both sides get the same prompt and one generator seeded alike, from which both draw, in the same
order, each stage's initial noise (prior, decoder, super-resolution) and its per-step noise.
"""

import json
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("transformers")  # diffusers' unCLIP pipelines (the reference) need it

import unclip.pipeline as pipeline_module  # noqa: E402
from cli import main  # noqa: E402
from conftest import SHAPES_WORDS, tiny_clip_config  # noqa: E402
from unclip import UnCLIPPipeline, mix, slerp, text_diff  # noqa: E402
from unclip.clip import ClipEncoder  # noqa: E402
from unclip.karlo import KARLO_SETTINGS, enable_model_offload, is_karlo_folder  # noqa: E402

D = W = 32      # CLIP embedding and text width (Karlo's text_proj needs D == W, as ViT-L/14's 768)
L = 16          # text context
TOL = 1e-4      # max abs difference allowed per stage (images in [0, 1], embeddings raw)
STEPS = dict(prior_steps=3, decoder_steps=3, upsampler_steps=3)
SETTINGS = {**KARLO_SETTINGS, **STEPS}
PROMPT = "a red fox"

warnings.filterwarnings("ignore", message=".*deprecated.*")


# ---------------------------------------------------------------- the tiny Karlo folder


def tiny_tokenizer(folder):
    """A CLIPTokenizer over letters only (no merges): enough to tell prompts apart."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=L)


def tiny_components(folder) -> dict:
    """Random tiny versions of every Karlo component, with Karlo's scheduler settings."""
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=54, hidden_size=W, projection_dim=D, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=L, bos_token_id=52, eos_token_id=53, pad_token_id=53))
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=D,
                             num_embeddings=L)
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=D, time_embed_dim=64, cross_attention_dim=24)
    decoder = UNet2DConditionModel(  # 16 px, 6 output channels: eps and a learned variance
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=24, attention_head_dim=8,
        norm_num_groups=8, resnet_time_scale_shift="scale_shift", class_embed_type="identity")
    super_res = dict(sample_size=32, in_channels=6, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
                     norm_num_groups=8, resnet_time_scale_shift="scale_shift")
    first, last = UNet2DModel(**super_res), UNet2DModel(**super_res)
    with torch.no_grad():  # zero-initialised parts (null embedding, clip_mean/std) would hide mistakes
        for module in (prior, text_proj, decoder, first, last):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        prior.clip_std.copy_(torch.rand_like(prior.clip_std) + 0.5)
    return dict(
        prior=prior, decoder=decoder, text_encoder=text, tokenizer=tiny_tokenizer(folder), text_proj=text_proj,
        super_res_first=first, super_res_last=last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))


@pytest.fixture(scope="module")
def karlo_dir(tmp_path_factory):
    """karlo-v1-alpha's layout (+ the image-variations repo's image encoder), tiny and random."""
    from diffusers import UnCLIPPipeline as DiffusersUnCLIP
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("karlo")
    DiffusersUnCLIP(**tiny_components(folder)).save_pretrained(folder)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=D, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=8)).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")
    return folder


def load_reference(folder, variation: bool = False):
    """diffusers' pipeline built from the folder's components, each loaded by its own class.

    (diffusers 0.42.1's `UnCLIPPipeline.from_pretrained` cannot load this layout: `UnCLIPTextProjModel` is no
    longer exported at the package top level.)
    """
    import diffusers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)

    classes = dict(prior=diffusers.PriorTransformer, decoder=diffusers.UNet2DConditionModel,
                   text_encoder=CLIPTextModelWithProjection, tokenizer=CLIPTokenizer, text_proj=UnCLIPTextProjModel,
                   super_res_first=diffusers.UNet2DModel, super_res_last=diffusers.UNet2DModel,
                   prior_scheduler=diffusers.UnCLIPScheduler, decoder_scheduler=diffusers.UnCLIPScheduler,
                   super_res_scheduler=diffusers.UnCLIPScheduler)
    if variation:
        del classes["prior"], classes["prior_scheduler"]
        classes |= dict(image_encoder=CLIPVisionModelWithProjection, feature_extractor=CLIPImageProcessor)
    cls = diffusers.UnCLIPImageVariationPipeline if variation else diffusers.UnCLIPPipeline
    pipe = cls(**{name: c.from_pretrained(folder / name) for name, c in classes.items()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(karlo_dir):
    pipe = UnCLIPPipeline.from_pretrained(karlo_dir).to(dtype="fp32")  # parity is an fp32 statement ("auto": bf16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- running both sides, stage by stage


def upscaled(base: torch.Tensor) -> torch.Tensor:
    """The decoder image as the super-resolution stage sees it (both sides upscale the same way)."""
    return F.interpolate(base, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)


def run_reference(pipe, variation_image=None) -> dict:
    """Stage outputs of a diffusers pipeline: image_emb (prior), upscaled decoder image, final image in [0, 1]."""
    seen = {}

    def keep(name, value):
        seen.setdefault(name, value.detach().clone())

    hooks = [pipe.text_proj.register_forward_pre_hook(lambda m, a, kw: keep("image_emb", kw["image_embeddings"]),
                                                      with_kwargs=True),
             pipe.super_res_first.register_forward_pre_hook(lambda m, a, kw: keep("decoder", kw["sample"][:, 3:]),
                                                            with_kwargs=True)]
    common = dict(generator=torch.Generator().manual_seed(1), decoder_num_inference_steps=STEPS["decoder_steps"],
                  super_res_num_inference_steps=STEPS["upsampler_steps"], output_type="np")
    try:
        if variation_image is not None:
            out = pipe(variation_image, decoder_guidance_scale=8.0, **common)
        else:
            out = pipe(PROMPT, prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
                       prior_num_inference_steps=STEPS["prior_steps"], **common)
    finally:
        for hook in hooks:
            hook.remove()
    return {**seen, "image": torch.as_tensor(out.images).permute(0, 3, 1, 2)}


@contextmanager
def final_tensor():
    """Catch the float image unclip's pipeline turns into PIL images."""
    seen = {}
    original = pipeline_module.tensor_to_pil

    def catch(x):
        seen["image"] = (x.clamp(-1, 1) * 0.5 + 0.5).clone()
        return original(x)

    pipeline_module.tensor_to_pil = catch
    try:
        yield seen
    finally:
        pipeline_module.tensor_to_pil = original


def run_ours(pipe, variation_image=None, **overrides) -> dict:
    """Stage outputs of unclip's pipeline on the same inputs (no seed: every draw from the one generator)."""
    settings = {**SETTINGS, **overrides}
    common = dict(seed=None, generator=torch.Generator().manual_seed(1))
    with final_tensor() as seen:
        if variation_image is not None:
            out = pipe.vary(variation_image, **common, **settings)
        else:
            out = pipe.generate(PROMPT, **common, **settings)
    return {"image_emb": out.image_emb, "decoder": upscaled(out.base), "image": seen["image"]}


def differences(a: dict, b: dict) -> dict:
    diffs = {stage: float((a[stage] - b[stage]).abs().max()) for stage in a}
    print("max abs difference per stage:", {k: f"{v:.2e}" for k, v in diffs.items()})
    return diffs


# ---------------------------------------------------------------- parity


def test_layout_is_detected_and_diffusers_classes_import(karlo_dir, tiny_model_dir):
    from diffusers import PriorTransformer, UnCLIPImageVariationPipeline, UnCLIPPipeline as DiffusersUnCLIP  # noqa
    from diffusers import UnCLIPScheduler  # noqa: F401
    from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel  # noqa: F401

    assert is_karlo_folder(karlo_dir) and not is_karlo_folder(tiny_model_dir)
    assert json.loads((karlo_dir / "model_index.json").read_text())["_class_name"] == "UnCLIPPipeline"


def test_text_to_image_matches_diffusers(karlo_dir, ours):
    reference = run_reference(load_reference(karlo_dir))
    mine = run_ours(ours)
    diffs = differences(mine, reference)
    assert all(v < TOL for v in diffs.values()), diffs
    assert float(reference["image"].std()) > 0.05  # a real image, not a constant


def test_image_variation_matches_diffusers(karlo_dir, ours):
    picture = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8))
    reference = run_reference(load_reference(karlo_dir, variation=True), variation_image=picture)
    mine = run_ours(ours, variation_image=picture)
    diffs = differences(mine, reference)
    assert all(v < TOL for v in diffs.values()), diffs


@contextmanager
def swapped_super_res(pipe):
    up = pipe.upsamplers[0]
    up.first, up.last = up.last, up.first
    try:
        yield
    finally:
        up.first, up.last = up.last, up.first


def test_wrong_wiring_breaks_parity(ours, monkeypatch):
    """Each of these mistakes moves some stage far beyond the tolerance: the parity test would catch it."""
    import decoder.sample
    from diffusers import UnCLIPScheduler
    from unclip.schedulers import SCHEDULERS

    right = run_ours(ours)
    with swapped_super_res(ours):  # super_res_last on every step but the last
        diffs = differences(run_ours(ours), right)
    assert diffs["image_emb"] == 0 and diffs["decoder"] == 0 and diffs["image"] > 1e-2
    with monkeypatch.context() as m:  # the decoder guided on all 6 channels (variance too)
        m.setattr(decoder.sample, "guided", lambda model, conds, scales, guide_channels=None, interval=None:
                  pipeline_module.guided(model, conds, scales, interval=interval))
        assert differences(run_ours(ours), right)["decoder"] > 1e-2
    with monkeypatch.context() as m:  # the decoder's variance ignored (scheduler setting not read)
        m.setitem(ours.decoder.config.scheduler_config, "variance_type", "fixed_small_log")
        assert differences(run_ours(ours), right)["decoder"] > 1e-2
    with monkeypatch.context() as m:  # diffusers' UnCLIPScheduler alone steps to t - 1, not the next timestep
        m.setitem(SCHEDULERS, "unclip", (UnCLIPScheduler, {}))
        assert differences(run_ours(ours), right)["image_emb"] > 1e-2
    null = ours.prior.null_text.tokens.clone()
    try:  # a zero unconditional text instead of the encoding of ""
        ours.prior.null_text.tokens.zero_()
        assert differences(run_ours(ours), right)["image_emb"] > 1e-2
    finally:
        ours.prior.null_text.tokens.copy_(null)


# ---------------------------------------------------------------- convert, CLI, other paths


def test_convert_gives_the_same_images(karlo_dir, ours, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(karlo_dir), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert set(index["components"]) == {"clip", "prior", "decoder", "upsampler_32"}
    assert (tmp_path / "m" / "decoder" / "model.safetensors").is_file()
    converted = UnCLIPPipeline.from_pretrained(tmp_path / "m").to(dtype="fp32")
    converted.set_progress_bar_config(disable=True)
    diffs = differences(run_ours(converted), run_ours(ours))
    assert all(v < 1e-6 for v in diffs.values()), diffs
    result = CliRunner().invoke(main, ["convert", str(karlo_dir), "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and "not empty" in result.output


def test_convert_fp16_halves_the_weights(karlo_dir, tmp_path):
    from unclip.info import count_parameters

    result = CliRunner().invoke(main, ["convert", str(karlo_dir), "--out", str(tmp_path / "m"), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    _, dtype = count_parameters(tmp_path / "m" / "decoder" / "model.safetensors")
    assert "F16" in dtype
    pipe = UnCLIPPipeline.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    assert pipe.decoder.unet.dtype == torch.bfloat16
    out = pipe.generate(PROMPT, seed=0, **SETTINGS)
    assert out.images[0].size == (32, 32)


def test_cli_commands_take_a_karlo_folder(karlo_dir, tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (24, 24), (200, 40, 40)).save(picture)
    fast = ["--model", str(karlo_dir), "--steps-prior", "2", "--steps-decoder", "2", "--steps-upsampler", "2",
            "--quiet"]
    runs = [["generate", PROMPT, "-o", str(tmp_path / "g.png")],
            ["vary", str(picture), "-o", str(tmp_path / "v.png")],
            ["interpolate", "a red fox", "a blue cat", "--frames", "2", "-o", str(tmp_path / "i.png")],
            ["edit", str(picture), "--from", "a red box", "--to", "a blue box", "-o", str(tmp_path / "e.png")]]
    for args in runs:
        result = CliRunner().invoke(main, args + fast)
        assert result.exit_code == 0, (args[0], result.output)
        assert Image.open(args[args.index("-o") + 1]).size[1] >= 32  # interpolate writes a strip with a border


def test_open_clip_text_encoder_offload_and_raw_embeddings(karlo_dir, tmp_path):
    torch.manual_seed(0)
    clip = ClipEncoder.from_config(tiny_clip_config(embed_dim=D, width=W, context=L), sorted(set(SHAPES_WORDS)))
    pipe = UnCLIPPipeline.from_pretrained(karlo_dir, clip=clip.eval())
    pipe.set_progress_bar_config(disable=True)
    out = pipe.generate("a red circle", seed=0, **SETTINGS)
    assert not torch.allclose(out.image_emb.norm(dim=-1), torch.ones(1), atol=1e-2)  # raw, as Karlo predicts
    enable_model_offload(pipe, "cpu")
    again = pipe.generate("a red circle", seed=0, **SETTINGS)
    assert torch.equal(out.base, again.base)
    assert pipe.upsamplers[0].offload_active and not pipe.decoder.offload_active  # the last stage run stays
    pipe.save_pretrained(tmp_path / "m")  # clip/ is then a unclip ClipEncoder folder
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.generate("a red circle", seed=0, **SETTINGS).base, out.base)
    frames = pipe.interpolate("a red circle", Image.new("RGB", (16, 16), (30, 70, 220)), frames=3, **SETTINGS)
    assert len(frames.images) == 3


def test_moves_keep_the_length_of_raw_embeddings():
    a, b = torch.randn(2, 32) * torch.tensor([[3.0], [5.0]])
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    assert torch.allclose(path.norm(dim=-1), torch.lerp(a.norm(), b.norm(), torch.linspace(0, 1, 5)), atol=1e-4)
    assert torch.allclose(text_diff(a, a, b, 0.4).norm(), a.norm(), atol=1e-4)
    assert torch.allclose(mix(torch.stack([a, b]), [1, 1]).norm(), (a.norm() + b.norm()) / 2, atol=1e-4)


def test_bad_inputs_fail_loudly(karlo_dir, ours, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))
    with pytest.raises(ValueError, match="missing decoder/"):
        UnCLIPPipeline.from_pretrained(broken)
    with pytest.raises(ValueError, match="Karlo"):
        UnCLIPPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="torch_dtype"):
        UnCLIPPipeline.from_pretrained(karlo_dir, torch_dtype=torch.int8)
    with pytest.raises(ValueError, match="noise level"):
        ours.generate(PROMPT, seed=0, aug_level=0.1, **SETTINGS)
    result = CliRunner().invoke(main, ["convert", str(tiny_model_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "not a Karlo" in result.output
