"""The decoder and the upsamplers: shapes, gradients, conditioning, save/load, samplers, corruption, training, CLI."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import Dataset

from decoder.config import TEXT_ENCODERS, DecoderConfig, UpsamplerConfig, decoder_preset, upsampler_preset
from decoder.loss import decoder_loss, min_snr_weight, upsampler_loss
from decoder.model import Decoder
from decoder.sample import GUIDANCE_INTERVAL, make_stage_scheduler, sample_decoder, upsample
from decoder.training import (encode_batch, encoded_once, make_decoder_config, oversample_rows, train_decoder,
                              train_upsampler)
from decoder.upsampler import Upsampler, corrupt, gaussian_blur
from unclip.pipeline import SamplingSettings
from unclip.sampling import denoise
from unclip.data.datasets import ShardDataset, write_shards
from unclip.data.encode import encode_captions
from unclip.training import RANDOM_KEY, SampleRandom, TrainConfig, collate, list_checkpoints, read_metrics

B, S, D, L, W, V = 3, 16, 16, 16, 32, 40
CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a large yellow circle"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_decoder_config(**fields) -> DecoderConfig:
    base = dict(image_size=S, block_out_channels=(16, 32), attention_levels=(False, True), layers_per_block=1,
                attention_head_dim=8, norm_num_groups=8, cross_attention_dim=16, embed_dim=D, text_width=W,
                context_length=L)
    return DecoderConfig(**{**base, **fields})


def tiny_upsampler_config(**fields) -> UpsamplerConfig:
    base = dict(image_size=S, low_res_size=S // 2, block_out_channels=(8, 16), attention_levels=(False, True),
                layers_per_block=1, attention_head_dim=8, norm_num_groups=8)
    return UpsamplerConfig(**{**base, **fields})


def perturbed(model):
    """Move zero-initialised parameters off zero so that every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def cond(batch: int = B, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, :6] = True
    return dict(image_emb=torch.randn(batch, D, generator=g), text_tokens=torch.randn(batch, L, W, generator=g),
                mask=mask)


def ids_cond(batch: int = B, seed: int = 0) -> dict:
    """cond() with token ids [B, L] (6 real tokens, then padding id 0) for a decoder with its own text transformer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, L, dtype=torch.long)
    ids[:, :6] = torch.randint(1, V, (batch, 6), generator=g)
    return dict(image_emb=torch.randn(batch, D, generator=g), text_tokens=ids, mask=ids != 0)


def transformer_config(**fields) -> DecoderConfig:
    return tiny_decoder_config(**{**dict(text_encoder="transformer", text_layers=1, text_heads=2, text_vocab_size=V),
                                  **fields})


@pytest.fixture
def decoder():
    return perturbed(Decoder(tiny_decoder_config())).eval()


@pytest.fixture
def transformer_decoder():
    return perturbed(Decoder(transformer_config())).eval()


@pytest.fixture
def upsampler():
    return Upsampler(tiny_upsampler_config()).eval()


# ---------------------------------------------------------------- the decoder network


def test_decoder_output_shape_and_channels_last(decoder):
    x = torch.randn(B, 3, S, S)
    out = decoder(x, torch.tensor([0, 500, 999]), **cond())
    assert out.shape == (B, 3, S, S)
    out_cl = decoder(x.contiguous(memory_format=torch.channels_last), torch.tensor([0, 500, 999]), **cond())
    torch.testing.assert_close(out, out_cl, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="image_emb must be"):
        decoder(x, 10, **{**cond(), "image_emb": torch.randn(B, D + 1)})


@pytest.mark.parametrize("text_encoder", ["clip", "transformer"])
def test_prepared_condition_equals_the_forward(text_encoder):
    """prepare_condition encodes the condition once; its network then matches the forward at every step."""
    model = perturbed(Decoder(transformer_config() if text_encoder == "transformer" else tiny_decoder_config()))
    c = ids_cond() if text_encoder == "transformer" else cond()
    drop = dict(force_drop_image=torch.tensor([True, False, False]), force_drop_text=torch.tensor([False, True, False]))
    with torch.inference_mode():
        network = model.eval().prepare_condition(**c, **drop)
        no_text = model.prepare_condition(c["image_emb"], None, None)
        for t in (900, 20):
            x = torch.randn(B, 3, S, S)
            torch.testing.assert_close(network(x, t), model(x, t, **c, **drop))
            torch.testing.assert_close(no_text(x, t), model(x, t, c["image_emb"], None, None))
    with pytest.raises(ValueError, match="x_t must be"):
        network(torch.randn(B + 1, 3, S, S), 10)


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", 5.0), ("v_prediction", 0.0)])
def test_decoder_loss_reaches_every_parameter(prediction_type, gamma):
    model = Decoder(tiny_decoder_config(prediction_type=prediction_type, min_snr_gamma=gamma,
                                        image_drop_prob=0.5, text_drop_prob=0.5)).train()
    batch = {"image": torch.rand(16, 3, S, S) * 2 - 1, **cond(16)}
    loss, logs = decoder_loss(model, batch)
    assert torch.isfinite(loss) and torch.isfinite(logs["mse"])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_conditioning_matters(decoder):
    x, t, c = torch.randn(B, 3, S, S), torch.full((B,), 400), cond()
    out = decoder(x, t, **c)
    assert not torch.allclose(out, decoder(x, t, **{**c, "image_emb": cond(seed=1)["image_emb"]}))
    tokens = c["text_tokens"].clone()
    tokens[:, 2] += 1.0                                   # a real (unmasked) token
    assert not torch.allclose(out, decoder(x, t, **{**c, "text_tokens": tokens}))
    tokens = c["text_tokens"].clone()
    tokens[:, 10:] += 5.0                                 # padding: masked out
    torch.testing.assert_close(out, decoder(x, t, **{**c, "text_tokens": tokens}))
    drop = torch.ones(B, dtype=torch.bool)                # a dropped image_emb no longer matters
    a = decoder(x, t, **c, force_drop_image=drop)
    b = decoder(x, t, **{**c, "image_emb": cond(seed=1)["image_emb"]}, force_drop_image=drop)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(decoder(x, t, c["image_emb"], None, None), decoder(x, t, **c, force_drop_text=drop))


def test_decoder_save_load_identical(decoder, tmp_path):
    decoder.save(tmp_path / "decoder")
    assert (tmp_path / "decoder" / "scheduler_config.json").is_file()
    loaded = Decoder.load(tmp_path / "decoder")
    x = torch.randn(B, 3, S, S)
    torch.testing.assert_close(decoder(x, 7, **cond()), loaded(x, 7, **cond()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected 'upsampler'"):
        Upsampler.load(tmp_path / "decoder")


def test_config_errors():
    with pytest.raises(ValueError, match="text_encoder must be one of"):
        tiny_decoder_config(text_encoder="bert")
    for bad in (dict(text_layers=0), dict(text_heads=0), dict(text_vocab_size=-1), dict(text_heads=3)):
        with pytest.raises(ValueError, match="text_layers|text_heads"):
            transformer_config(**bad)
    with pytest.raises(ValueError, match="text_vocab_size from the CLIP"):
        Decoder(transformer_config(text_vocab_size=0))
    with pytest.raises(ValueError, match="text_drop_prob"):
        tiny_decoder_config(text_drop_prob=1.5)
    with pytest.raises(ValueError, match="unknown decoder preset"):
        decoder_preset("huge")
    with pytest.raises(ValueError, match="unknown fields"):
        upsampler_preset("tiny-64", width=3)
    with pytest.raises(ValueError, match="multiple"):
        tiny_upsampler_config(low_res_size=5)


def test_preset_overrides_from_json_equal_the_saved_config(tmp_path):
    """A recipe's JSON lists become tuples, as in a config read back from disk, so warm_start accepts the folder."""
    config = decoder_preset("tiny", block_out_channels=[32, 32], attention_levels=[False, True], layers_per_block=1,
                            embed_dim=32, cross_attention_dim=32, text_width=32, context_length=8)
    assert config.block_out_channels == (32, 32) and config.attention_levels == (False, True)
    Decoder(config).save(tmp_path / "decoder")
    assert Decoder.load(tmp_path / "decoder").config == config
    Decoder(config).warm_start(tmp_path / "decoder")


def test_min_snr_weight():
    a = torch.tensor([0.999, 0.5, 0.001])                 # SNR 999, 1, ~0.001
    eps = min_snr_weight(a, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.tensor([5 / 999, 1.0, 1.0]), rtol=1e-3, atol=0)
    v = min_snr_weight(a, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.tensor([5 / 1000, 0.5, 0.001 / 0.999 / (1 + 0.001 / 0.999)]), rtol=1e-3,
                               atol=0)


# ---------------------------------------------------------------- text_encoder="transformer" (GLIDE's own)


def test_transformer_decoder_shapes_and_inputs(transformer_decoder):
    x, t = torch.randn(B, 3, S, S), torch.tensor([0, 500, 999])
    assert transformer_decoder(x, t, **ids_cond()).shape == (B, 3, S, S)
    assert transformer_decoder.text_encoder(ids_cond()["text_tokens"]).shape == (B, L, W)
    with pytest.raises(ValueError, match="token ids"):    # CLIP's token states are not what it reads
        transformer_decoder(x, t, **cond())
    with pytest.raises(ValueError, match="text_tokens must be"):
        Decoder(tiny_decoder_config()).eval()(x, t, **ids_cond())


def test_transformer_decoder_loss_reaches_every_parameter():
    model = Decoder(transformer_config(image_drop_prob=0.5, text_drop_prob=0.5)).train()
    loss, logs = decoder_loss(model, {"image": torch.rand(16, 3, S, S) * 2 - 1, **ids_cond(16)})
    assert torch.isfinite(loss) and torch.isfinite(logs["mse"])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert any(n.startswith("text_encoder.") for n, _ in model.named_parameters())


def test_transformer_decoder_reads_the_caption(transformer_decoder):
    decoder, x, t, c = transformer_decoder, torch.randn(B, 3, S, S), torch.full((B,), 400), ids_cond()
    out = decoder(x, t, **c)
    other = ids_cond(seed=1)
    assert not torch.allclose(out, decoder(x, t, **{**c, "text_tokens": other["text_tokens"]}))
    ids = c["text_tokens"].clone()
    ids[:, 10:] = 7                                       # padding: masked out, and causal attention never sees it
    torch.testing.assert_close(out, decoder(x, t, **{**c, "text_tokens": ids}))
    drop = torch.ones(B, dtype=torch.bool)                # no caption = the learned null text
    torch.testing.assert_close(decoder(x, t, c["image_emb"], None, None), decoder(x, t, **c, force_drop_text=drop))
    images = sample_decoder(decoder, **ids_cond(2), num_steps=2, generator=torch.Generator().manual_seed(0),
                            progress=False)["images"]
    assert images.shape == (2, 3, S, S) and torch.isfinite(images).all()


def test_transformer_decoder_save_load_identical(transformer_decoder, tmp_path):
    transformer_decoder.save(tmp_path / "decoder")
    loaded = Decoder.load(tmp_path / "decoder")
    assert loaded.config == transformer_decoder.config
    x = torch.randn(B, 3, S, S)
    torch.testing.assert_close(transformer_decoder(x, 7, **ids_cond()), loaded(x, 7, **ids_cond()), rtol=0, atol=0)


def test_make_decoder_config_for_a_transformer(tiny_clip):
    free = dict(embed_dim=0, text_width=0, context_length=0, text_vocab_size=0)
    config = make_decoder_config(tiny_clip, config=transformer_config(**free))
    assert (config.text_width, config.context_length, config.text_vocab_size) == (W, L, tiny_clip.vocab_size)
    wide = make_decoder_config(tiny_clip, config=transformer_config(**{**free, "text_width": 48}))
    assert wide.text_width == 48                         # its own width; CLIP decoders must match the CLIP's
    with pytest.raises(ValueError, match="does not fit the CLIP"):
        make_decoder_config(tiny_clip, config=tiny_decoder_config(**{**free, "text_width": 48}))
    with pytest.raises(ValueError, match="does not fit the CLIP"):
        make_decoder_config(tiny_clip, config=transformer_config(**{**free, "text_vocab_size": 7}))


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("scheduler,eta", [("ddpm", None), ("ddim", 0.5), ("dpm++", None), ("unipc", None)])
def test_each_scheduler_samples(decoder, scheduler, eta):
    out = sample_decoder(decoder, **cond(2), scheduler=scheduler, num_steps=2, eta=eta,
                         generator=torch.Generator().manual_seed(0), progress=False)
    assert out["images"].shape == (2, 3, S, S) and out["latents"].shape == (2, 3, S, S)
    assert torch.isfinite(out["images"]).all() and out["images"].abs().max() <= 1


def test_latents_fix_the_sample_and_guidance_branches(decoder):
    c, every = cond(2), dict(guidance_interval=(0.0, 1.0))
    first = sample_decoder(decoder, **c, num_steps=2, generator=torch.Generator().manual_seed(0), progress=False,
                           **every)
    again = sample_decoder(decoder, **c, num_steps=2, latents=first["latents"], progress=False, **every)
    torch.testing.assert_close(first["images"], again["images"])
    other = sample_decoder(decoder, **c, num_steps=2, latents=first["latents"], text_guidance_scale=0.0,
                           progress=False, **every)
    assert not torch.allclose(first["images"], other["images"])
    # guidance only where t / T >= 0.5: of the 2 DDIM steps (t = 500, 0) the last one runs unguided
    half = sample_decoder(decoder, **c, num_steps=2, latents=first["latents"], guidance_interval=(0.5, 1.0),
                          progress=False)
    assert not torch.allclose(first["images"], half["images"])
    # the default interval, 0.3-0.7 (the pipeline's), also guides t = 500 alone
    assert GUIDANCE_INTERVAL == SamplingSettings().decoder_guidance_interval == (0.3, 0.7)
    default = sample_decoder(decoder, **c, num_steps=2, latents=first["latents"], progress=False)
    torch.testing.assert_close(default["images"], half["images"])
    unguided = sample_decoder(decoder, **c, num_steps=2, latents=first["latents"], guidance_interval=(0.9, 0.95),
                              progress=False)
    scale_one = sample_decoder(decoder, **c, num_steps=2, latents=first["latents"], guidance_scale=1.0,
                               progress=False)
    torch.testing.assert_close(unguided["images"], scale_one["images"])  # no step lies in [900, 950]
    with pytest.raises(ValueError, match="guidance interval"):
        sample_decoder(decoder, **c, num_steps=2, guidance_interval=(0.6, 0.2), progress=False)
    no_text = sample_decoder(decoder, c["image_emb"], None, None, num_steps=2, latents=first["latents"],
                             progress=False)
    assert no_text["images"].shape == (2, 3, S, S)


def test_dynamic_thresholding_bounds_x0(decoder):
    scheduler = make_stage_scheduler("ddim", decoder.config, dynamic_threshold=0.9)
    assert scheduler.config.thresholding and scheduler.config.dynamic_thresholding_ratio == 0.9
    x_T = torch.randn(2, 3, S, S)
    huge = lambda x, t: -50 * torch.ones_like(x)  # noqa: E731  (an eps whose x0 is far outside [-1, 1])
    assert denoise(huge, x_T, make_stage_scheduler("ddim", decoder.config), 1, progress=False).abs().max() > 2
    assert denoise(huge, x_T, scheduler, 1, progress=False).abs().max() <= 1 + 1e-5
    out = sample_decoder(decoder, **cond(2), num_steps=2, guidance_scale=8.0, dynamic_threshold=0.9, progress=False)
    assert out["images"].abs().max() <= 1
    with pytest.raises(ValueError, match="percentile"):
        make_stage_scheduler("ddim", decoder.config, dynamic_threshold=1.5)


def test_prior_free_ignores_the_image_embedding(decoder):
    c = cond(2)
    x_T = torch.randn(2, 3, S, S)
    a = sample_decoder(decoder, None, c["text_tokens"], c["mask"], num_steps=2, latents=x_T, prior_free=True,
                       progress=False)
    b = sample_decoder(decoder, c["image_emb"], c["text_tokens"], c["mask"], num_steps=2, latents=x_T,
                       prior_free=True, progress=False)
    torch.testing.assert_close(a["images"], b["images"])
    with pytest.raises(ValueError, match="image_emb is required"):
        sample_decoder(decoder, None, c["text_tokens"], c["mask"], num_steps=2, progress=False)


# ---------------------------------------------------------------- upsampler


def test_corruption_levels():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(corrupt(x, 0.0), x)
    assert torch.equal(corrupt(x, torch.zeros(4), blur_sigma=torch.zeros(4)), x)
    for level in (0.1, 0.5):
        noise = corrupt(x, level) - (1 - level ** 2) ** 0.5 * x
        assert abs(noise.std().item() - level) < 0.05 * level and abs(noise.mean().item()) < 0.02
    blurred = gaussian_blur(x, torch.full((4,), 0.6))
    assert blurred.std() < x.std()
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.6])), flat)
    with pytest.raises(ValueError, match="aug_level"):
        corrupt(x, 1.5)


def test_upsampler_shapes_loss_and_level(upsampler):
    low = torch.rand(B, 3, S // 2, S // 2) * 2 - 1
    x = torch.randn(B, 3, S, S)
    out = upsampler(x, torch.tensor([1, 2, 3]), low, 0.0)
    assert out.shape == (B, 3, S, S)
    assert not torch.allclose(out, upsampler(x, torch.tensor([1, 2, 3]), low, 0.5))   # the level is a condition
    assert not torch.allclose(out, upsampler(x, torch.tensor([1, 2, 3]), -low, 0.0))  # so is low_res
    model = upsampler.train()
    loss, _ = upsampler_loss(model, {"image": torch.rand(4, 3, S + 8, S + 8) * 2 - 1})  # larger: random crops
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="smaller than the training crop"):
        upsampler_loss(model, {"image": torch.rand(2, 3, S // 2, S // 2)})


def test_upsample_and_save_load(upsampler, tmp_path):
    low = torch.rand(2, 3, S // 2, S // 2) * 2 - 1
    out = upsample(upsampler, low, scheduler="dpm++", num_steps=2, aug_level=0.1,
                   generator=torch.Generator().manual_seed(0), progress=False)
    assert out.shape == (2, 3, S, S) and out.abs().max() <= 1
    upsampler.save(tmp_path / "upsampler_16")
    loaded = Upsampler.load(tmp_path / "upsampler_16")
    x = torch.randn(2, 3, S, S)
    torch.testing.assert_close(upsampler(x, 5, low, 0.2), loaded(x, 5, low, 0.2), rtol=0, atol=0)


# ---------------------------------------------------------------- training and CLI


class Pairs(Dataset):
    """A tiny in-memory data set in the datasets.py item format."""

    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": self.captions[i], "key": f"{i:05d}"}


@pytest.fixture
def model_dir(tmp_path, tiny_clip):
    tiny_clip.save(tmp_path / "model" / "clip")
    return tmp_path / "model"


def test_train_decoder_resumes_from_saved_step(model_dir):
    config = dataclasses.replace(tiny_decoder_config(), embed_dim=0, text_width=0, context_length=0)
    train_config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1, log_every=1)
    run = dict(config=config, heldout=2, sample_steps=1, progress=False)
    train_decoder(model_dir, Pairs(12, 32), train_config=train_config, **run)
    assert [s for s, _ in list_checkpoints(model_dir / "runs" / "decoder")] == [1, 2]
    ema = train_decoder(model_dir, Pairs(12, 32), train_config=dataclasses.replace(train_config, steps=3),
                        resume=True, **run)
    steps = [r["step"] for r in read_metrics(model_dir / "runs" / "decoder" / "metrics.csv") if r["name"] == "loss"]
    assert steps == [1, 2, 3]
    assert (model_dir / "runs" / "decoder" / "samples" / "step-00000003.png").is_file()
    loaded = Decoder.load(model_dir / "decoder")
    assert loaded.config == ema.config and loaded.config.embed_dim == D
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_decoder(model_dir, Pairs(12, 32), train_config=train_config, **run)


def test_oversample_repeats_matching_captions():
    captions = ["a red circle", "two red circles", "a red circle above a blue square", "three blue squares"]
    rows, matched = oversample_rows(torch.arange(4), captions, [(" above ", 3), ("^(two|three) ", 2)])
    assert rows.tolist() == [0, 1, 1, 2, 2, 2, 3, 3]
    assert matched == [[" above ", 3, 1], ["^(two|three) ", 2, 2]]
    rows, _ = oversample_rows(torch.tensor([2, 0]), captions, [("red", 2), (" above ", 4)])
    assert rows.tolist() == [2, 2, 2, 2, 0, 0]  # the largest factor of the patterns a caption matches
    for bad, message in [([("(", 2)], "not a regular expression"), ([("red", 0)], "whole number"),
                         ([("red", 1.5)], "whole number"), ([("green", 2)], "matches none"), (["red"], "pairs")]:
        with pytest.raises(ValueError, match=message):
            oversample_rows(torch.arange(4), captions, bad)


def test_train_decoder_oversamples_and_records_it(model_dir, tiny_clip):
    config = make_decoder_config(tiny_clip, config=tiny_decoder_config(embed_dim=0, text_width=0, context_length=0))
    pairs = Pairs(12, 32)
    train_set, _, info, _ = encoded_once(tiny_clip, config, pairs, heldout=0, seed=0, progress=False,
                                         oversample=[("^two ", 3)])
    seen = [pairs.captions[int(r)] for r in train_set.rows]
    assert seen.count("two green triangles") == 3 * pairs.captions.count("two green triangles")
    assert len(seen) == info["epoch_samples"] == 12 + 2 * 3 and info["oversample"] == [["^two ", 3, 3]]
    train_config = TrainConfig(steps=1, batch_size=4, warmup_steps=1, checkpoint_every=1)
    train_decoder(model_dir, pairs, train_config=train_config, config=config, heldout=2, sample_steps=1,
                  progress=False, oversample=[("^two ", 3)])
    recorded = json.loads((model_dir / "runs" / "decoder" / "train_config.json").read_text())
    assert recorded["oversample"][0][:2] == ["^two ", 3] and recorded["epoch_samples"] > recorded["train_samples"]
    with pytest.raises(ValueError, match="not a regular expression"):  # checked before any encoding
        train_decoder(model_dir, pairs, train_config=train_config, config=config, run_dir=model_dir / "r2",
                      progress=False, oversample=[("[", 2)])


def test_train_transformer_decoder_then_generate(model_dir):
    from conftest import make_tiny_pipeline
    from unclip.clip import ClipEncoder
    from unclip.pipeline import UnCLIPPipeline

    config = transformer_config(image_size=8, embed_dim=0, text_width=0, context_length=0, text_vocab_size=0)
    train_config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2)
    train_decoder(model_dir, Pairs(8, 32), train_config=train_config, config=config, heldout=2, sample_steps=1,
                  progress=False)
    clip, decoder = ClipEncoder.load(model_dir / "clip"), Decoder.load(model_dir / "decoder")
    assert decoder.config.text_vocab_size == clip.vocab_size and decoder.text_encoder is not None
    tiny = make_tiny_pipeline()                           # its prior and 8 -> 16 px upsampler fit this CLIP's sizes
    pipe = UnCLIPPipeline(clip, tiny.prior, decoder, tiny.upsamplers)
    pipe.set_progress_bar_config(disable=True)
    out = pipe.generate(["a red circle", "a blue square"], seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=2)
    assert [image.size for image in out.images] == [(16, 16)] * 2 and out.base.shape == (2, 3, 8, 8)


def test_position_channels_are_pixel_centres():
    from decoder.model import position_channels
    grid = position_channels(torch.zeros(2, 3, 4, 8))
    assert grid.shape == (2, 2, 4, 8)
    assert torch.allclose(grid[0, 0, 0], (torch.arange(8) + 0.5) / 8 * 2 - 1)      # x grows to the right
    assert torch.allclose(grid[0, 1, :, 0], (torch.arange(4) + 0.5) / 4 * 2 - 1)   # y grows downwards
    assert torch.equal(grid[0, 0, 0], grid[0, 0, 3]) and torch.equal(grid[0], grid[1])


def test_image_map_feeds_a_coarse_layout_of_the_embedding():
    torch.manual_seed(0)
    model = perturbed(Decoder(tiny_decoder_config(image_map_channels=2, image_map_size=4))).eval()
    seen = []
    model.unet.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x, t, c = torch.randn(B, 3, S, S), torch.full((B,), 500), cond()
    model(x, t, **c)
    inputs = seen[-1]                                                     # [B, 3 + 2, S, S]
    assert inputs.shape == (B, 5, S, S) and torch.equal(inputs[:, :3], x)
    cells = model.text_proj.image_map(c["image_emb"]).reshape(B, 2, 4, 4)  # one value per 4x4-pixel cell
    torch.testing.assert_close(inputs[:, 3:], cells.repeat_interleave(4, 2).repeat_interleave(4, 3))
    drop = torch.ones(B, dtype=torch.bool)                                # a dropped embedding: the null one's map
    model(x, t, **c, force_drop_image=drop)
    model(x, t, **{**c, "image_emb": cond(seed=1)["image_emb"]}, force_drop_image=drop)
    torch.testing.assert_close(seen[-1], seen[-2])
    model.train()
    loss, _ = decoder_loss(model, {"image": torch.rand(B, 3, S, S) * 2 - 1, **c})
    loss.backward()
    assert model.text_proj.image_map.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="image_map_size"):
        tiny_decoder_config(image_map_channels=2, image_map_size=3)


def test_warm_start_adds_position_channels_without_changing_the_output(tmp_path):
    torch.manual_seed(0)
    source = perturbed(Decoder(tiny_decoder_config())).eval()
    source.save(tmp_path / "decoder")
    model = Decoder(tiny_decoder_config(position_channels=True)).warm_start(tmp_path / "decoder").eval()
    assert model.unet.conv_in.weight.shape[1] == 5
    x, t = torch.randn(B, 3, S, S), torch.full((B,), 500)
    torch.testing.assert_close(model(x, t, **cond()), source(x, t, **cond()), rtol=0, atol=0)
    model.train()
    loss, _ = decoder_loss(model, {"image": torch.rand(B, 3, S, S) * 2 - 1, **cond()})
    loss.backward()
    assert model.unet.conv_in.weight.grad[:, 3:].abs().sum() > 0  # the coordinates get weight from training
    with pytest.raises(ValueError, match="differs in layers_per_block"):
        Decoder(tiny_decoder_config(layers_per_block=2)).warm_start(tmp_path / "decoder")


def test_train_clip_input_decoder_then_generate(model_dir):
    """text_encoder="clip+input": trained on (and generating from) CLIP's final states with its input embeddings."""
    from conftest import make_tiny_pipeline
    from decoder.model import decoder_text
    from unclip.clip import ClipEncoder
    from unclip.pipeline import UnCLIPPipeline

    config = tiny_decoder_config(image_size=8, embed_dim=0, text_width=0, context_length=0, text_encoder="clip+input")
    train_config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2)
    train_decoder(model_dir, Pairs(8, 32), train_config=train_config, config=config, heldout=2, sample_steps=1,
                  progress=False)
    clip, decoder = ClipEncoder.load(model_dir / "clip"), Decoder.load(model_dir / "decoder")
    assert decoder.config.text_width == 2 * clip.text_width
    tokens, mask = decoder_text(clip, decoder.config, ["a red circle", "a blue square"])
    assert tokens.shape == (2, clip.context_length, 2 * clip.text_width) and mask.shape == (2, clip.context_length)
    tiny = make_tiny_pipeline()
    pipe = UnCLIPPipeline(clip, tiny.prior, decoder, tiny.upsamplers)
    pipe.set_progress_bar_config(disable=True)
    out = pipe.generate(["a red circle", "a blue square"], seed=0, prior_steps=2, decoder_steps=2, upsampler_steps=2)
    assert [image.size for image in out.images] == [(16, 16)] * 2 and out.base.shape == (2, 3, 8, 8)


def test_train_upsampler(model_dir):
    train_config = TrainConfig(steps=1, batch_size=2, warmup_steps=1, checkpoint_every=1)
    train_upsampler(model_dir, Pairs(4, S), size=S, train_config=train_config, config=tiny_upsampler_config(),
                    sample_steps=1, progress=False)
    assert Upsampler.load(model_dir / f"upsampler_{S}").config == tiny_upsampler_config()
    with pytest.raises(ValueError, match="not 64 px"):
        train_upsampler(model_dir, Pairs(4, S), size=64, train_config=train_config, config=tiny_upsampler_config())


def write_pairs(folder, n: int, size: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        colour = (40 * i % 255, 100, 200)
        Image.new("RGB", (size, size), colour).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])


def test_cli_train_decoder_and_upsampler(model_dir, tmp_path):
    from cli import main

    write_pairs(tmp_path / "pairs", 4, 64)
    runner = CliRunner()
    common = ["--model", str(model_dir), "--data", str(tmp_path / "pairs"), "--steps", "1", "--batch-size", "2",
              "--sample-steps", "1", "--quiet"]
    result = runner.invoke(main, ["train", "decoder", *common, "--text-drop", "0.3", "--image-map-channels", "2"])
    assert result.exit_code == 0, result.output
    config = Decoder.load(model_dir / "decoder").config
    assert config.text_drop_prob == 0.3 and config.image_map_channels == 2
    result = runner.invoke(main, ["train", "decoder", *common, "--text-encoder", "transformer",
                                  "--run-dir", str(tmp_path / "run-glide")])
    assert result.exit_code == 0, result.output
    assert Decoder.load(model_dir / "decoder").text_encoder is not None
    result = runner.invoke(main, ["train", "decoder", *common, "--text-encoder", "transformer", "--position-channels",
                                  "--init-from",
                                  str(model_dir / "decoder"), "--run-dir", str(tmp_path / "run-coords")])
    assert result.exit_code == 0, result.output
    assert Decoder.load(model_dir / "decoder").config.position_channels
    result = runner.invoke(main, ["train", "upsampler", *common, "--size", "64", "--aug-max", "0.2"])
    assert result.exit_code == 0, result.output
    assert (model_dir / "upsampler_64" / "model.safetensors").is_file()
    result = runner.invoke(main, ["train", "decoder", *common, "--oversample", "^two =2", "--run-dir",
                                  str(tmp_path / "run-over")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run-over" / "train_config.json").read_text())["oversample"] == [["^two ", 2, 1]]
    result = runner.invoke(main, ["train", "decoder", *common, "--oversample", "^two"])
    assert result.exit_code != 0 and "REGEX=N" in result.output
    result = runner.invoke(main, ["train", "decoder", *common[:4], "--text-drop", "1.5"])
    assert result.exit_code != 0 and "--text-drop" in result.output
    result = runner.invoke(main, ["train", "decoder", "--model", str(tmp_path), "--data", str(tmp_path / "pairs")])
    assert result.exit_code != 0 and "missing clip component" in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- streamed shards


def write_shard_files(root, n: int, shard_size: int, corrupt: tuple[int, ...] = ()) -> list[str]:
    """n pairs of 32 px images in root/pairs packed into root/shards; the images of `corrupt` are junk bytes."""
    write_pairs(root / "pairs", n, 32)
    for i in corrupt:
        (root / "pairs" / f"{i:05d}.png").write_bytes(b"not a png")
    return write_shards(root / "pairs", root / "shards", shard_size=shard_size)


class EmptyStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([])


def test_train_decoder_streams_shards_without_reading_them_whole(model_dir, tmp_path, monkeypatch):
    paths = write_shard_files(tmp_path, 16, 4, corrupt=(1,))
    decoded = []  # every sample any ShardDataset decodes (also copies of it, such as unsplit())
    decode = ShardDataset._decode
    monkeypatch.setattr(ShardDataset, "_decode", lambda self, sample: decoded.append(sample["__key__"])
                        or decode(self, sample))
    train_config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1)
    config = dataclasses.replace(tiny_decoder_config(), embed_dim=0, text_width=0, context_length=0)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        train_decoder(model_dir, ShardDataset(paths), train_config=train_config, config=config, sample_steps=1,
                      progress=False)
    assert len(decoded) < 16  # the grid's 4 items and 2 batches of 2 (~9 decodes); reading it whole decodes 16
    assert Decoder.load(model_dir / "decoder").config.image_size == S
    run = model_dir / "runs" / "decoder"
    assert (run / "samples" / "step-00000002.png").is_file()
    assert json.loads((run / "train_config.json").read_text())["streamed"] is True
    skipped = [r["value"] for r in read_metrics(run / "metrics.csv") if r["name"] == "skipped_samples"]
    assert skipped[-1] == 1  # the corrupt sample, counted as on map-style data
    with pytest.raises(ValueError, match="no readable image-caption pairs"):
        train_decoder(model_dir, EmptyStream(), train_config=train_config, config=config, run_dir=tmp_path / "empty",
                      progress=False)


def test_train_upsampler_streams_shards_and_counts_skipped_samples(model_dir, tmp_path):
    paths = write_shard_files(tmp_path, 8, 4, corrupt=(2,))
    train_config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        train_upsampler(model_dir, ShardDataset(paths), size=S, train_config=train_config, heldout=0,
                        config=tiny_upsampler_config(), sample_steps=1, progress=False)
    run = model_dir / "runs" / f"upsampler_{S}"
    assert (run / "samples" / "step-00000002.png").is_file()  # heldout=0 on a stream still makes its grid
    skipped = [r["value"] for r in read_metrics(run / "metrics.csv") if r["name"] == "skipped_samples"]
    assert skipped[-1] == 1
    with pytest.raises(ValueError, match="no readable images"):
        train_upsampler(model_dir, EmptyStream(), size=S, train_config=train_config, config=tiny_upsampler_config(),
                        run_dir=tmp_path / "empty", progress=False)


@pytest.mark.parametrize("text_encoder", ["clip", "clip+input", "transformer"])
def test_streamed_batches_match_the_encode_once_path(tiny_clip, tmp_path, text_encoder):
    """What the loss sees from a streamed batch equals the encode-once items of the same samples."""
    items = list(ShardDataset(write_shard_files(tmp_path, 6, 3), image_size=32))
    config = make_decoder_config(tiny_clip, config=dataclasses.replace(
        tiny_decoder_config(text_encoder=text_encoder), text_width=0, text_vocab_size=0))
    once_set, _, _, skipped = encoded_once(tiny_clip, config, items, heldout=0, seed=0, progress=False)
    once = collate([once_set[i] for i in range(len(once_set))])
    fly = encode_batch(tiny_clip, collate(items), config)
    assert skipped == 0 and once["image"].shape == fly["image"].shape == (6, 3, S, S)
    assert (once["image"] - fly["image"]).abs().max() <= 1e-6
    assert (once["image_emb"] - fly["image_emb"]).abs().max() <= 1e-5
    assert torch.equal(once["mask"], fly["mask"])
    if text_encoder == "transformer":
        assert torch.equal(once["text_tokens"], fly["text_tokens"])  # token ids [B, L]
    else:  # encode-once stores token states in fp16 to save memory; at full precision they agree to 1e-5
        full = encode_captions(tiny_clip, [item["caption"] for item in items], progress=False,
                               token_dtype=torch.float32)
        assert fly["text_tokens"].shape[-1] == {"clip": W, "clip+input": 2 * W}[text_encoder]
        assert (full["text_tokens"][full["index"]] - fly["text_tokens"][..., :W]).abs().max() <= 1e-5
        torch.testing.assert_close(once["text_tokens"], fly["text_tokens"], atol=1e-5, rtol=1e-3)
    model = Decoder(config).train()
    losses = [decoder_loss(model, {**batch, RANDOM_KEY: SampleRandom.at_positions(0, 0, 6)})[0]
              for batch in (once, fly)]  # the same t, noise and condition drops for both
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-3)


def test_cli_train_decoder_from_a_shard_pattern(model_dir, tmp_path):
    from cli import main

    write_shard_files(tmp_path, 4, 1)
    result = CliRunner().invoke(main, ["train", "decoder", "--model", str(model_dir), "--data",
                                       str(tmp_path / "shards" / "{00000..00003}.tar"), "--text-encoder", "transformer",
                                       "--steps", "1", "--batch-size", "2", "--sample-steps", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert Decoder.load(model_dir / "decoder").text_encoder is not None
    saved = json.loads((model_dir / "runs" / "decoder" / "train_config.json").read_text())
    assert saved["streamed"] is True and saved["data"].endswith("{00000..00003}.tar")


def test_cli_preset_lists_match_the_configs():
    import cli
    from decoder.config import DECODER_PRESETS, UPSAMPLER_PRESETS

    assert cli.DECODER_PRESET_NAMES == list(DECODER_PRESETS)
    assert cli.UPSAMPLER_PRESET_NAMES == list(UPSAMPLER_PRESETS)
    assert cli.DECODER_TEXT_ENCODERS == list(TEXT_ENCODERS)
