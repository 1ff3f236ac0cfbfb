"""UnCLIPPipeline end to end on a tiny random model: every use, determinism, save/load, errors."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_tiny_pipeline
from unclip import UnCLIPPipeline, mix, slerp, text_diff
from unclip.clip_training import caption_twins
from unclip.pipeline import rerank_scores

FAST = dict(prior_steps=2, decoder_steps=2, upsampler_steps=2)


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def pixels(images):
    return np.stack([np.asarray(i) for i in images])


def test_generate_end_to_end(pipe):
    out = pipe("a red circle", num_images=2, seed=0, **FAST)
    assert len(out.images) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in out.images)
    assert out.base.shape == (2, 3, 8, 8) and out.image_emb.shape == (2, 16)
    assert torch.allclose(out.image_emb.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert set(out.latents) == {"prior", "decoder", "upsampler_16"}
    assert out.info["command"] == "generate" and out.info["settings"]["decoder_steps"] == 2


def test_same_seed_same_pixels_and_batch_invariance(pipe):
    a = pipe.generate(["a red circle", "two blue squares"], seed=3, **FAST)
    b = pipe.generate(["a red circle", "two blue squares"], seed=3, **FAST)
    assert np.array_equal(pixels(a.images), pixels(b.images))
    alone = pipe.generate("two blue squares", seed=4, **FAST)  # image i of a batch uses seed + i
    assert np.abs(pixels(alone.images)[0].astype(int) - pixels(a.images)[1].astype(int)).max() <= 1
    other = pipe.generate(["a red circle"], seed=5, **FAST)
    assert not np.array_equal(pixels(other.images)[0], pixels(a.images)[0])


def test_generator_and_stage_inputs_round_trip(pipe):
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **FAST)
    again = pipe("a red circle", image_emb=out.image_emb, latents=out.latents, **FAST)
    assert np.array_equal(pixels(out.images), pixels(again.images))


def test_negative_prompt_and_prior_free_change_the_result(pipe):
    plain = pipe("a red circle", seed=0, **FAST)
    negative = pipe("a red circle", seed=0, negative_prompt="a blue square", **FAST)
    assert not torch.allclose(plain.image_emb, negative.image_emb)
    free = pipe("a red circle", seed=0, prior_free=True, **FAST)
    assert not torch.equal(free.base, plain.base)


def test_save_load_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "m")
    loaded.set_progress_bar_config(disable=True)
    a, b = pipe("a red circle", seed=1, **FAST), loaded("a red circle", seed=1, **FAST)
    assert np.array_equal(pixels(a.images), pixels(b.images))


def test_vary_fresh_noise_and_inverted(pipe):
    picture = Image.new("RGB", (20, 20), (220, 30, 30))
    out = pipe.vary(picture, num_images=3, seed=0, **FAST)
    assert len(out.images) == 3 and not np.array_equal(pixels(out.images[:1]), pixels(out.images[1:2]))
    assert torch.allclose(out.image_emb[0], pipe.encode_image([picture])[0])
    inverted = pipe.vary([picture], num_images=2, invert=True, **FAST)
    assert torch.equal(inverted.latents["decoder"][0], inverted.latents["decoder"][1])


def test_interpolate_shares_noise_and_hits_both_ends(pipe):
    a, b = Image.new("RGB", (16, 16), (220, 30, 30)), Image.new("RGB", (16, 16), (30, 70, 220))
    out = pipe.interpolate(a, b, frames=4, seed=0, **FAST)
    assert len(out.images) == 4
    noise = out.latents["decoder"]
    assert all(torch.equal(noise[0], noise[i]) for i in range(4))
    ends = pipe.encode_image([a, b])
    assert torch.allclose(out.image_emb[0], ends[0], atol=1e-5) and torch.allclose(out.image_emb[-1], ends[1], atol=1e-5)
    words = pipe.interpolate("a red circle", "a blue square", frames=3, **FAST)
    assert len(words.images) == 3
    with pytest.raises(ValueError, match="at least 2 frames"):
        pipe.interpolate(a, b, frames=1)


def test_edit_amount_zero_reproduces_the_unedited_image(pipe):
    picture = Image.new("RGB", (16, 16), (220, 30, 30))
    out = pipe.edit(picture, "a red circle", "a blue circle", amount=[0.0, 0.5], invert=True, **FAST)
    noise = out.latents["decoder"][:1]
    unedited = pipe.decode(pipe.encode_image([picture]), latents={"decoder": noise}, seeds=[0],
                           settings=out.info["settings"])
    assert np.array_equal(pixels(out.images[:1]), pixels(unedited.images))
    assert not torch.allclose(out.image_emb[0], out.image_emb[1])
    with pytest.raises(ValueError, match="same embedding"):
        pipe.edit(picture, "a red circle", "a red circle", amount=0.3, **FAST)


def test_mix_of_inputs(pipe):
    out = pipe.mix(["a red circle", Image.new("RGB", (16, 16), (30, 70, 220))], weights=[1, 3], num_images=2, **FAST)
    assert len(out.images) == 2 and torch.allclose(out.image_emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_slerp_stays_on_the_sphere_and_hits_both_ends():
    a, b = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    path = slerp(a, b, torch.linspace(0, 1, 9))
    assert torch.allclose(path.norm(dim=-1), torch.ones(9), atol=1e-5)
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    angles = torch.arccos((path[:-1] * path[1:]).sum(-1).clamp(-1, 1))
    assert torch.allclose(angles, angles.mean().expand(8), atol=1e-4)  # constant speed along the great circle
    lerp_mid = torch.nn.functional.normalize((a + b) / 2, dim=-1)
    assert torch.allclose(slerp(a, b, 0.5), lerp_mid, atol=1e-5)  # the midpoint is the normalised mean
    assert torch.allclose(mix(torch.stack([a, b]), [1, 0]), a, atol=1e-6)
    edited = text_diff(a, a, b, 0.0)
    assert torch.allclose(edited, a, atol=1e-6)


def test_missing_component_and_mismatched_sizes(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "decoder")
    (tmp_path / "m" / "model_index.json").unlink()
    with pytest.raises(ValueError, match="no decoder/ component"):
        UnCLIPPipeline.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="no model folder"):
        UnCLIPPipeline.from_pretrained(tmp_path / "nowhere")
    from prior.config import PriorConfig
    from prior.model import DiffusionPrior
    wrong = DiffusionPrior(PriorConfig(embed_dim=8, text_width=32, context_length=16, width=32, depth=1, heads=2))
    with pytest.raises(ValueError, match="different models"):
        UnCLIPPipeline(pipe.clip, wrong, pipe.decoder, pipe.upsamplers)


def test_decoder_with_its_own_text_transformer(pipe, tmp_path):
    from decoder.model import Decoder

    config = dataclasses.replace(pipe.decoder.config, text_encoder="transformer", text_layers=1, text_heads=2,
                                 text_vocab_size=pipe.clip.vocab_size)
    decoder = Decoder(config).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    glide = UnCLIPPipeline(pipe.clip, pipe.prior, decoder, pipe.upsamplers)
    glide.set_progress_bar_config(disable=True)
    _, ids, mask = glide.decoder_text(["a red circle"])
    assert ids.dtype == torch.long and ids.shape == (1, 16) and torch.equal(mask, ids != 0)
    out = glide.generate(["a red circle", "a blue square"], seed=0, **FAST)
    assert [image.size for image in out.images] == [(16, 16)] * 2
    swapped = glide.generate(["a blue square", "a red circle"], image_emb=out.image_emb, latents=out.latents, **FAST)
    assert not torch.equal(swapped.base, out.base)      # same embeddings and noise: only the captions differ
    glide.save_pretrained(tmp_path / "m")
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "m")
    loaded.set_progress_bar_config(disable=True)
    again = loaded.generate(["a red circle", "a blue square"], seed=0, **FAST)
    assert np.array_equal(pixels(out.images), pixels(again.images))
    assert len(glide.vary(Image.new("RGB", (16, 16), (220, 30, 30)), seed=0, **FAST).images) == 1  # no caption
    wrong = Decoder(dataclasses.replace(config, text_vocab_size=config.text_vocab_size + 1))
    with pytest.raises(ValueError, match="different models"):
        UnCLIPPipeline(pipe.clip, pipe.prior, wrong, pipe.upsamplers)


@pytest.mark.parametrize("share_prior", [False, True])
@pytest.mark.parametrize("rerank", ["image", "text", "both"])
def test_image_candidates_keep_the_one_clip_ranks_first(pipe, rerank, share_prior):
    prompts = ["a red circle", "two blue squares"]
    one = pipe.generate(prompts, seed=0, **FAST)
    best = pipe.generate(prompts, seed=0, image_candidates=4, rerank=rerank, share_prior=share_prior, **FAST)
    assert best.base.shape == one.base.shape and best.latents["decoder"].shape == one.latents["decoder"].shape
    assert best.image_emb.shape == one.image_emb.shape and best.latents["prior"].shape == one.latents["prior"].shape
    if share_prior:  # the prior's pick is the same; only the decoder redraws
        assert torch.equal(best.image_emb, one.image_emb) and torch.equal(best.latents["prior"], one.latents["prior"])
    else:  # each candidate drew its own prior noise, candidate 0 the default's; the kept one's comes back
        _, noise = pipe.sample_image_emb(prompts, pipe.settings(), seeds=[0, 1], per_prompt=4)
        noise = noise.view(2, 4, *one.latents["prior"].shape[1:])
        assert torch.equal(noise[:, 0], one.latents["prior"])
        assert all(any(torch.equal(best.latents["prior"][i], n) for n in noise[i]) for i in range(2))
    text = pipe.encode_text(prompts)[0]

    def clip_score(out):  # each image against the embedding it was decoded from, and the prompt
        targets = {"image": [out.image_emb], "text": [text], "both": [out.image_emb, text]}[rerank]
        return sum(F.cosine_similarity(pipe.clip.encode_image(out.base), t) for t in targets)

    # candidate 0 draws the noise (prior and decoder) that image_candidates=1 draws, so best-of-4 never ranks below
    assert torch.all(clip_score(best) >= clip_score(one) - 1e-5)
    assert not torch.equal(best.base, one.base)  # 4 random candidates: some other one won somewhere
    # the kept prior noise re-creates the kept embedding (within bf16 rounding: the batch is 2 here, 8 above)
    again_emb, _ = pipe.sample_image_emb(prompts, pipe.settings(), latents=best.latents["prior"])
    torch.testing.assert_close(again_emb, best.image_emb, atol=2e-2, rtol=0)
    # the kept noise reproduces the kept image with one candidate
    again = pipe.generate(prompts, seed=0, image_emb=best.image_emb, latents=best.latents, **FAST)
    assert np.array_equal(pixels(again.images), pixels(best.images))
    with pytest.raises(ValueError, match="image candidates must be at least 1"):
        pipe("a red circle", image_candidates=0)
    with pytest.raises(ValueError, match="rerank must be one of image, text, both"):
        pipe("a red circle", image_candidates=2, rerank="oracle")


def test_several_prior_samples_per_prompt(pipe):
    prompts = ["a red circle", "two blue squares"]
    settings = pipe.settings()
    one, one_noise = pipe.sample_image_emb(prompts, settings, seeds=[5, 6])
    many, noise = pipe.sample_image_emb(prompts, settings, seeds=[5, 6], per_prompt=3)
    c = settings.candidates
    assert many.shape == (2, 3, one.shape[1]) and noise.shape == (2, 3 * c, one.shape[1])
    assert torch.equal(noise[:, :c], one_noise)       # sample 0 starts from the noise a single sample draws
    torch.testing.assert_close(many[:, 0], one, atol=2e-2, rtol=0)  # the same sample, within bf16 rounding
    assert len({tuple(row.flatten().tolist()) for row in noise.view(2, 3, -1)[0]}) == 3  # fresh noise each


def test_rerank_scores_rank_by_the_named_embeddings():
    image, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    candidates = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [1, 3, 2]: like the image, the text, both
    assert rerank_scores(candidates, image, text, "image").argmax().item() == 0
    assert rerank_scores(candidates, image, text, "text").argmax().item() == 1
    assert rerank_scores(candidates, image, text, "both").argmax().item() == 2  # cosines, so scale does not count
    assert torch.equal(rerank_scores(candidates, image, None, "text"), rerank_scores(candidates, image, None, "image"))
    assert torch.equal(rerank_scores(candidates, None, text, "image"), rerank_scores(candidates, image, text, "text"))
    own = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])  # one image embedding per candidate: only the third
    torch.testing.assert_close(rerank_scores(candidates, own, None, "image"), torch.tensor([[0.0, 0.0, 1.0]]))


def test_rerank_scores_take_the_text_term_in_a_judges_space():
    image, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])   # the judge's space is 3-d
    candidates = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.9, 0.1]]])
    judged = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # only candidate 2 fits the prompt
    assert rerank_scores(candidates, image, text, "text", text_candidates=judged).argmax().item() == 2
    assert rerank_scores(candidates, image, text, "image", text_candidates=judged).argmax().item() == 0
    expected = rerank_scores(candidates, image, None, "image") + rerank_scores(judged, None, text, "text")
    assert torch.equal(rerank_scores(candidates, image, text, "both", text_candidates=judged), expected)


def test_rerank_twins_prefer_the_candidate_that_only_the_prompt_describes():
    # candidate 0 is nearer the prompt, but as near its twin (a binding mistake fits both); candidate 1 fits the
    # prompt a little less and the twin not at all: log p(prompt | candidate) among the two keeps candidate 1
    text, twin = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[[0.0, 1.0, 0.0]]])
    candidates = torch.tensor([[[1.0, 1.0, 0.0], [0.69, 0.0, 0.72]]])
    plain = rerank_scores(candidates, None, text, "text")
    assert plain.argmax().item() == 0
    yes, no = torch.tensor([[True]]), torch.tensor([[False]])
    twinned = rerank_scores(candidates, None, text, "text", twins=(twin, yes, 20.0))
    assert twinned.argmax().item() == 1
    twin_cos = torch.tensor([[2 ** -0.5, 0.0]])  # each candidate's cosine to the twin
    log_p = 20 * plain - torch.logsumexp(torch.stack([20 * plain, 20 * twin_cos]), dim=0)
    torch.testing.assert_close(twinned, plain + log_p / 20)
    torch.testing.assert_close(rerank_scores(candidates, None, text, "text", twins=(twin, no, 20.0)), plain)  # masked
    image = torch.tensor([[0.0, 0.0, 1.0]])  # "image" ranks by the embedding alone: the twins do not enter
    assert torch.equal(rerank_scores(candidates, image, text, "image", twins=(twin, yes, 20.0)),
                       rerank_scores(candidates, image, text, "image"))


def test_best_of_k_asks_about_each_prompts_twins(pipe):
    rules = {"swaps": [["left", "right"]], "exchanges": [["red", "blue"], ["circle", "square"]]}
    prompts = ["a red circle on the left", "two blue squares", "a red circle above a blue square"]
    emb, mask, scale = pipe._twins(prompts, rules, pipe.clip)
    assert mask.tolist() == [[True, False], [False, False], [True, True]]
    want = [caption_twins(p, rules) for p in prompts]
    assert want[0] == ["a red circle on the right"] and want[1] == []
    torch.testing.assert_close(emb[2], pipe.clip.encode_text(want[2])[0])
    assert scale == pipe.clip.logit_scale and pipe._twins(["two blue squares"], rules, pipe.clip) is None
    best = pipe.generate(prompts, seed=0, image_candidates=4, **FAST)
    twinned = pipe.generate(prompts, seed=0, image_candidates=4, rerank_twins=rules, **FAST)
    assert twinned.info["settings"]["rerank_twins"] == rules
    assert torch.equal(best.base[1], twinned.base[1])  # no twins: the same pick
    with pytest.raises(ValueError, match="unknown twin rules"):
        pipe("a red circle", rerank_twins={"mirrors": []})


def test_best_of_k_ranks_by_the_mean_of_the_prompt_and_its_paraphrase(pipe):
    reverses = {"above": "below", "below": "above"}
    prompts = ["a red circle above a blue square", "two blue squares"]
    settings = pipe.settings(**FAST)
    size = pipe.image_size
    candidates = torch.rand(2, 3, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    emb = F.normalize(torch.randn(2, 3, pipe.clip.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.inference_mode():
        plain = pipe._rank(candidates, emb, pipe.encode_text(prompts), prompts, settings)
        told = pipe._rank(candidates[:1], emb[:1], pipe.encode_text(["a blue square below a red circle"]),
                          ["a blue square below a red circle"], settings)
        both = pipe._rank(candidates, emb, pipe.encode_text(prompts), prompts,
                          dataclasses.replace(settings, rerank_paraphrase=reverses))
    torch.testing.assert_close(both[0], (plain[0] + told[0]) / 2)   # the relation: the mean of the two
    torch.testing.assert_close(both[1], plain[1])                   # no relation: as before
    assert not torch.allclose(both[0], plain[0])
    out = pipe.generate(prompts[0], seed=0, image_candidates=3, rerank_paraphrase=reverses, **FAST)
    assert out.info["settings"]["rerank_paraphrase"] == reverses
    for bad in (["above", "below"], {"above": ""}, {"above": 1}):
        with pytest.raises(ValueError, match="rerank paraphrase"):
            pipe.settings(rerank_paraphrase=bad)


def test_prior_twin_guidance_guides_each_sample_away_from_one_twin(pipe):
    rules = {"swaps": [["left", "right"]], "exchanges": [["red", "blue"], ["circle", "square"]]}
    prompts = ["a red circle above a blue square", "two blue squares"]
    negative = pipe._twin_negatives(prompts, rules, per_prompt=3)  # sample j takes twin j mod their number
    twins = caption_twins(prompts[0], rules)
    want = [twins[0], twins[1 % len(twins)], twins[2 % len(twins)]] + ["two blue squares"] * 3  # none: itself
    torch.testing.assert_close(negative[0], pipe.encode_text(want)[0])
    assert pipe._twin_negatives(["two blue squares"], rules, per_prompt=2) is None
    settings = pipe.settings(**FAST, rerank_twins=rules)
    plain, _ = pipe.sample_image_emb(prompts, settings, seeds=[0, 1], per_prompt=3)
    pushed, _ = pipe.sample_image_emb(prompts, dataclasses.replace(settings, prior_twin_guidance=2.0),
                                      seeds=[0, 1], per_prompt=3)
    assert not torch.allclose(pushed[0], plain[0], atol=1e-4)         # every sample of the prompt with twins moves
    assert all(not torch.allclose(pushed[0, j], plain[0, j], atol=1e-4) for j in range(3))
    torch.testing.assert_close(pushed[1], plain[1], atol=1e-5, rtol=1e-5)  # no twins: as without
    with pytest.raises(ValueError, match="prior twin guidance"):
        pipe.settings(prior_twin_guidance=-1.0)
    # a given negative prompt replaces the twins
    given = pipe.generate(prompts[0], seed=0, negative_prompt="a green circle", rerank_twins=rules, **FAST)
    both = pipe.generate(prompts[0], seed=0, negative_prompt="a green circle", rerank_twins=rules,
                         prior_twin_guidance=2.0, **FAST)
    torch.testing.assert_close(given.image_emb, both.image_emb)


def test_a_judge_clip_ranks_the_candidates_against_the_prompt(pipe, tmp_path):
    """A model folder with judge/ (a second CLIP): best-of-k's text term is the judge's image-text cosine; the
    judge loads, saves and moves with the model, and variations (no prompt) do not use it."""
    torch.manual_seed(1)
    judged = UnCLIPPipeline(pipe.clip, pipe.prior, pipe.decoder, pipe.upsamplers, judge=make_tiny_pipeline(1).clip)
    judged.set_progress_bar_config(disable=True)
    judged.save_pretrained(tmp_path / "m")
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["components"]["judge"] == "clip"
    for a, b in zip(judged.judge.state_dict().values(), loaded.judge.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.judge in loaded.modules()
    prompts = ["a red circle", "two blue squares"]
    one = loaded.generate(prompts, seed=0, **FAST)
    best = loaded.generate(prompts, seed=0, image_candidates=4, rerank="text", **FAST)
    plain = pipe.generate(prompts, seed=0, image_candidates=4, rerank="text", **FAST)
    text = loaded.judge.encode_text(prompts)[0]
    score = lambda out: F.cosine_similarity(loaded.judge.encode_image(out.base), text)  # noqa: E731
    assert torch.all(score(best) >= score(one) - 1e-5) and not torch.equal(best.base, one.base)
    assert not torch.equal(best.base, plain.base)  # the model's own CLIP keeps other candidates
    picture = Image.new("RGB", (16, 16), (220, 30, 30))
    assert torch.equal(loaded.vary(picture, seed=0, image_candidates=3, **FAST).base,
                       pipe.vary(picture, seed=0, image_candidates=3, **FAST).base)


def test_prior_free_best_of_k_ranks_by_the_prompt(pipe):
    # a prior-free image embedding is zeros: ranking by it would keep candidate 0 whatever the candidates are
    prompts = ["a red circle", "two blue squares"]
    text = pipe.encode_text(prompts)[0]
    one = pipe.generate(prompts, seed=0, prior_free=True, **FAST)
    best = pipe.generate(prompts, seed=0, prior_free=True, image_candidates=4, rerank="image", **FAST)
    score = lambda out: F.cosine_similarity(pipe.clip.encode_image(out.base), text)  # noqa: E731
    assert torch.all(score(best) >= score(one) - 1e-5) and not torch.equal(best.base, one.base)


def test_a_models_own_sampling_defaults(pipe, tmp_path):
    pipe.sampling = {"decoder_steps": 3, "image_candidates": 2}
    try:
        pipe.save_pretrained(tmp_path / "m")
    finally:
        pipe.sampling = {}
    own = UnCLIPPipeline.from_pretrained(tmp_path / "m")
    assert own.sampling == {"decoder_steps": 3, "image_candidates": 2}
    used = own.generate("a red circle", seed=0, prior_steps=2, upsampler_steps=2).info["settings"]
    assert used["decoder_steps"] == 3 and used["image_candidates"] == 2 and used["prior_steps"] == 2
    assert own.generate("a red circle", seed=0, image_candidates=1, **FAST).info["settings"]["image_candidates"] == 1
    assert own.vary(Image.new("RGB", (16, 16)), **FAST).info["settings"]["image_candidates"] == 2
    index = tmp_path / "m" / "model_index.json"
    data = json.loads(index.read_text())
    for bad, message in [({"decoder_stepz": 3}, "unknown sampling settings"), ({"decoder_steps": 0}, "at least 1"),
                         ([4], "object of SamplingSettings fields")]:
        index.write_text(json.dumps({**data, "sampling": bad}))
        with pytest.raises(ValueError, match=message) as error:
            UnCLIPPipeline.from_pretrained(tmp_path / "m")
        assert "model_index.json" in str(error.value)
    with pytest.raises(ValueError, match="unknown sampling settings"):
        pipe("a red circle", decoder_stepz=3)


def test_bad_settings_fail_loudly(pipe):
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe("a red circle", decoder_sampler="nope")
    with pytest.raises(ValueError, match="at least 1"):
        pipe("a red circle", prior_steps=0)
    with pytest.raises(ValueError, match="finite"):
        pipe("a red circle", decoder_guidance=float("nan"))
    with pytest.raises(ValueError, match="empty prompt"):
        pipe("   ")
    with pytest.raises(ValueError, match="not found"):
        pipe.vary("/no/such/picture.png")


def test_compile_matches_eager_and_keeps_the_weights(tmp_path):
    # fp32 only: each dtype and batch size compiles again (about a minute on 2 cores); bf16 is measured in
    # benchmarks/time_generate.py (the images against eager's)
    eager, compiled = make_tiny_pipeline().to(dtype="fp32"), make_tiny_pipeline().to(dtype="fp32").compile()
    names = {k: v.clone() for k, v in eager.decoder.state_dict().items()}
    a, b = eager("a red circle", seed=1, **FAST), compiled("a red circle", seed=1, **FAST)
    assert type(compiled.decoder.unet).__name__ == "UNet2DConditionModel"  # compiled in place
    assert compiled.decoder.unet._compiled_call_impl is not None
    assert torch.allclose(a.base, b.base, atol=2e-4)
    assert np.abs(pixels(a.images).astype(int) - pixels(b.images).astype(int)).max() <= 1
    compiled.save_pretrained(tmp_path / "m")                       # same keys and weights as before compiling
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "m")
    assert loaded.decoder.state_dict().keys() == names.keys()
    assert all(torch.equal(loaded.decoder.state_dict()[k], v) for k, v in names.items())
