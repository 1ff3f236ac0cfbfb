"""The models shipped inside the package: present, intact, loadable, and the default of every command."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import cli
from decoder.sample import upsample
from decoder.upsampler import downsample
from unclip import SamplingSettings, UnCLIPPipeline
from unclip.clip_training import caption_twins, exchange_words
from unclip.data.shapes import PALETTE, SHAPES, caption, render_scene, sample_scene
from unclip.eval.metrics import psnr
from unclip.images import pil_to_tensor
from unclip.hub import BUNDLED_DIR, DEFAULT_MODEL, bundled_models, file_checksums, resolve_model

EXPECTED = ["emoji", "shapes"]
FAST = dict(prior_steps=2, decoder_steps=2, upsampler_steps=2)


def test_the_bundled_models_are_installed():
    assert bundled_models() == EXPECTED
    assert resolve_model(None) == BUNDLED_DIR / DEFAULT_MODEL


@pytest.mark.parametrize("name", EXPECTED)
def test_weights_match_recorded_checksums(name):
    folder = BUNDLED_DIR / name
    recorded = json.loads((folder / "checksums.json").read_text())
    assert recorded == file_checksums(folder)
    assert sum((folder / f).stat().st_size for f in recorded) <= 20 * 2**20  # at most 20 MB per model


@pytest.mark.parametrize("name", EXPECTED)
def test_bundled_model_generates_a_64px_image(name):
    pipe = UnCLIPPipeline.from_pretrained(name)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle" if name == "shapes" else "red apple", seed=0, **FAST).images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)


@pytest.mark.parametrize("name", EXPECTED)
def test_bundled_upsampler_restores_downsampled_pictures(name):
    """Shapes scenes downsampled to 32 px and upsampled back: the upsampler alone lands near the real picture
    (the first, epsilon-prediction upsamplers came out at 6 dB: wrong colours), and with the pipeline's
    low-frequency matching it beats bicubic upsampling."""
    rng = np.random.default_rng(0)
    real = pil_to_tensor([render_scene(sample_scene(rng, kind)) for kind in ("single", "placed", "relation", "count")])
    up = UnCLIPPipeline.from_pretrained(name).upsamplers[0]
    low = downsample(real, up.config.low_res_size)
    bicubic = F.interpolate(low, size=64, mode="bicubic", align_corners=False).clamp(-1, 1)
    alone, matched = (upsample(up, low, num_steps=10, match_low_res=match, progress=False,
                               generator=torch.Generator().manual_seed(0)) for match in (False, True))
    assert up.config.prediction_type == "v_prediction"
    assert psnr(alone, real) > 15  # dB; 20-23 for the v-prediction upsamplers
    assert psnr(matched, real) > psnr(bicubic, real)
    # the pipeline's default sampler and step count (UniPC, 6 steps) keeps 10 DDIM steps' gain
    d = SamplingSettings()
    fast = upsample(up, low, scheduler=d.upsampler_sampler, num_steps=d.upsampler_steps, progress=False,
                    generator=torch.Generator().manual_seed(0))
    assert psnr(fast, real) > psnr(matched, real) - 1.0 and psnr(fast, real) > psnr(bicubic, real)


def test_the_shapes_judge_tells_which_colour_goes_with_which_shape():
    """The bundled shapes model ranks its 8 candidates, each from its own prior sample, with its judge CLIP; on
    rendered relation scenes the judge prefers the caption to its twin with the two colours (or shapes) exchanged
    (measured: 55 of 55 and 34 of 42)."""
    pipe = UnCLIPPipeline.from_pretrained("shapes")
    settings = pipe.settings()
    assert pipe.judge is not None and settings.image_candidates == 8 and not settings.share_prior
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, "relation") for _ in range(60)]
    captions = [caption(scene) for scene in scenes]
    for words, least in ((list(PALETTE), 0.95), (list(SHAPES), 0.7)):
        twins = [exchange_words(c, [words]) for c in captions]
        keep = [i for i, (c, t) in enumerate(zip(captions, twins)) if c != t]
        with torch.inference_mode():
            image = pipe.judge.encode_image([render_scene(scenes[i]) for i in keep])
            right, wrong = (pipe.judge.encode_text([texts[i] for i in keep])[0] for texts in (captions, twins))
        assert len(keep) > 30 and ((image * right).sum(-1) > (image * wrong).sum(-1)).float().mean() >= least


def test_the_shapes_model_samples_as_its_recipe_says():
    """The bundled sampling defaults are the recipe's (configs/shapes.json), twins included: every relation and
    count caption of the grammar has twins for the judge to be asked about (docs/MODELS.md)."""
    from pathlib import Path

    recipe = json.loads((Path(__file__).parent.parent / "configs" / "shapes.json").read_text())
    pipe = UnCLIPPipeline.from_pretrained("shapes")
    assert pipe.sampling == recipe["export"]["sampling"] and pipe.settings().rerank_twins
    rng = np.random.default_rng(2)
    for kind in ("relation", "count"):
        for scene in (sample_scene(rng, kind) for _ in range(20)):
            assert caption_twins(caption(scene), pipe.settings().rerank_twins), caption(scene)


def test_the_shapes_prior_is_guided_away_from_each_prompts_twins():
    """The shapes model's prior samples are pushed away from the prompts' twins (prior_twin_guidance 1): each
    sample's CLIP embedding leans further from its twin towards its prompt (measured: a margin of 0.48 against 0.29
    unguided, 16 relation captions x 4 samples)."""
    import dataclasses

    import torch.nn.functional as F

    pipe = UnCLIPPipeline.from_pretrained("shapes")
    settings = pipe.settings()
    assert settings.prior_twin_guidance == 1.0
    rng = np.random.default_rng(4)
    captions = [caption(sample_scene(rng, "relation")) for _ in range(16)]
    text = pipe.encode_text(captions)[0].float().repeat_interleave(4, dim=0)
    twins = pipe._twin_negatives(captions, settings.rerank_twins, per_prompt=4)[0].float()
    margins = {}
    for scale in (0.0, 1.0):
        emb, _ = pipe.sample_image_emb(captions, dataclasses.replace(settings, prior_twin_guidance=scale),
                                       seeds=list(range(16)), per_prompt=4)
        emb = emb.flatten(0, 1)
        margins[scale] = F.cosine_similarity(emb, text) - F.cosine_similarity(emb, twins)
    assert margins[1.0].mean() > margins[0.0].mean() + 0.1 and (margins[1.0] > 0).all()


def test_generate_uses_the_default_model_without_model_option(tmp_path):
    out = tmp_path / "apple.png"
    result = CliRunner().invoke(cli.main, ["generate", "a red apple", "-o", str(out), "--steps-prior", "2",
                                           "--steps-decoder", "2", "--steps-upsampler", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(out).text["unclip"])["model"] == DEFAULT_MODEL
    assert Image.open(out).size == (64, 64)


def test_the_shapes_verifier_rejects_wrong_counts_and_corrupted_scenes():
    """The bundled shapes model's verifier (a head on its judge, with a scene parser) ranks its candidates at the
    recipe's weight; on rendered scenes it prefers the caption to the same caption with the other number (measured
    58 of 60), and the scene to its corrupted re-rendering (`corrupt_scene`: 80 of 80), and its parser reads
    the object cells' colours and shapes (0.999 of the object cells)."""
    from unclip.captions import swap_words
    from unclip.data.shapes import ALL_PAIRS, DEFAULT_HELD_OUT, corrupt_scene, scene_labels
    from unclip.verifier import parser_loss

    pipe = UnCLIPPipeline.from_pretrained("shapes")
    assert pipe.verifier is not None and pipe.verifier.judge is pipe.judge and pipe.settings().verify_weight == 10
    rng = np.random.default_rng(3)
    allowed = [p for p in ALL_PAIRS if p not in DEFAULT_HELD_OUT]
    counts = [sample_scene(rng, "count", allowed) for _ in range(60)]
    pictures = pil_to_tensor([render_scene(s) for s in counts], 32)
    right = pipe.verifier.score(pictures, [caption(s) for s in counts])
    wrong = pipe.verifier.score(pictures, [swap_words(caption(s), [("two", "three")]) for s in counts])
    assert (right > wrong).float().mean() >= 0.9
    scenes = [sample_scene(rng, kind, allowed) for kind in ("single", "placed", "relation", "count") for _ in range(20)]
    corrupted = [corrupt_scene(s, rng, allowed) for s in scenes]
    captions = [caption(s) for s in scenes]
    pictures = pil_to_tensor([render_scene(s) for s in scenes], 32)
    real = pipe.verifier.score(pictures, captions)
    fake = pipe.verifier.score(pil_to_tensor([render_scene(s) for s in corrupted], 32), captions)
    assert (real > fake).float().mean() >= 0.9
    # its scene parser names the colour and the shape of the scenes' object cells
    with torch.no_grad():
        _, info = parser_loss(pipe.verifier.parser(pictures, pipe.verifier.grid)[1],
                              torch.stack([torch.from_numpy(scene_labels(s, 16)) for s in scenes]))
    assert info["parser_color_acc"] >= 0.95 and info["parser_shape_acc"] >= 0.95
