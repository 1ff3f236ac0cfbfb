"""Precision "auto" (bf16 where native) for training and sampling, and the decoder's attention under CPU autocast."""

import json

import pytest
import torch
from click.testing import CliRunner

from cli import main
from conftest import make_tiny_pipeline
from unclip import precision
from decoder.attention import AddedKVAttention
from unclip.precision import resolve_precision


@pytest.fixture
def native(monkeypatch):
    """Pretend the CPU does (True) or does not (False) have native bf16."""
    def set_native(value: bool):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)
    return set_native


def test_auto_is_bf16_only_where_native(native):
    native(True)
    assert resolve_precision("auto", "cpu") == "bf16"
    native(False)
    assert resolve_precision("auto", "cpu") == "no"
    assert resolve_precision("fp16", "cpu") == "fp16" and resolve_precision("no", "cpu") == "no"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("float8", "cpu")


def test_cpu_flags_are_read_from_proc_cpuinfo():
    flags = open("/proc/cpuinfo").read()
    assert precision.cpu_has_native_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_pipeline_dtype_follows_the_device_unless_set(native):
    pipe = make_tiny_pipeline()
    native(True)
    assert pipe.dtype == torch.bfloat16
    native(False)
    assert pipe.dtype == torch.float32
    native(True)
    assert pipe.to(dtype="fp32").dtype == torch.float32       # an explicit choice sticks
    assert pipe.to(dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        pipe.to(dtype="int8")


def test_generate_records_its_dtype_and_bf16_stays_close_to_fp32():
    pipe = make_tiny_pipeline()
    settings = dict(prior_steps=2, decoder_steps=3, upsampler_steps=2)
    out32 = pipe.to(dtype="fp32").generate("a red circle", seed=0, **settings)
    out16 = pipe.to(dtype="bf16").generate("a red circle", seed=0, **settings)
    assert out32.info["dtype"] == "float32" and out16.info["dtype"] == "bfloat16"
    other_seed = pipe.to(dtype="fp32").generate("a red circle", seed=1, **settings)
    dtype_gap = float((out32.base - out16.base).abs().mean())
    seed_gap = float((out32.base - other_seed.base).abs().mean())
    assert 0 < dtype_gap < seed_gap / 5, (dtype_gap, seed_gap)


def test_decoder_attention_matches_diffusers_and_trains_with_bf16_math_under_autocast(monkeypatch):
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

    import decoder.attention

    decoder_net = make_tiny_pipeline().decoder
    unet = decoder_net.unet
    assert all(isinstance(p, AddedKVAttention) for p in unet.attn_processors.values())  # Decoder applies it
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    emb = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    text = torch.randn(2, decoder_net.config.context_length, decoder_net.config.text_width)
    mask = torch.ones(2, decoder_net.config.context_length, dtype=torch.bool)
    mask[:, 3:] = False  # padding: the context bias must reach the attention
    with torch.no_grad():
        with torch.autocast("cpu", enabled=False):
            ours = decoder_net(x, t, emb, text, mask)
        unet.set_attn_processor(AttnAddedKVProcessor2_0())
        theirs = decoder_net(x, t, emb, text, mask)
        unmasked = decoder_net(x, t, emb, text, torch.ones_like(mask))
        unet.set_attn_processor(AddedKVAttention())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(theirs, unmasked, atol=1e-4)  # the mask matters, so the match above checks it
    seen = []
    sdpa, math = decoder.attention.F.scaled_dot_product_attention, decoder.attention.bf16_attention

    def spy_sdpa(q, k, v, **kwargs):
        seen.append(("flash", q.dtype))
        return sdpa(q, k, v, **kwargs)

    def spy_math(q, k, v, bias=None):
        seen.append(("math", q.dtype))
        return math(q, k, v, bias)

    monkeypatch.setattr(decoder.attention.F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(decoder.attention, "bf16_attention", spy_math)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder_net(x, t, emb, text, mask)                      # training: bf16 math attention
        with torch.no_grad():
            out_sampling = decoder_net(x, t, emb, text, mask)         # sampling: the fp32 flash kernel
        monkeypatch.setattr(decoder.attention, "MATH_ATTENTION_MAX", 0)  # large score tensors: fp32 flash kernel
        out_large = decoder_net(x, t, emb, text, mask)
    n = len(unet.attn_processors)
    assert seen == [("math", torch.bfloat16)] * n + [("flash", torch.float32)] * 2 * n
    for o in (out, out_sampling, out_large):  # convolutions in bf16: fp32's result within bf16 rounding
        assert o.dtype == torch.bfloat16 and (o.float() - ours).abs().mean() < 0.05 * ours.abs().mean()
    out.float().sum().backward()  # the math path trains
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_bf16_attention_is_softmax_attention_with_the_bias():
    from decoder.attention import bf16_attention

    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 14, 8), torch.randn(2, 3, 14, 8)
    bias = torch.zeros(2, 1, 1, 14)
    bias[1, ..., :5] = torch.finfo(torch.float32).min  # masked keys of the second sample
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(bf16_attention(q, k, v, bias), want, atol=1e-5, rtol=1e-5)  # exact in fp32
    got = bf16_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.05
    # the masked keys get no weight: changing their values leaves the second sample's output unchanged
    v2 = v.clone()
    v2[1, :, :5] += 100
    torch.testing.assert_close(bf16_attention(q, k, v2, bias)[1], want[1], atol=1e-5, rtol=1e-5)

LINE = [{"x": torch.tensor([i / 8]), "y": torch.tensor([2.0 * i / 8])} for i in range(8)]  # y = 2x


def line_loss(model, batch):
    return (model(batch["x"]).float() - batch["y"]).pow(2).mean()


def test_training_records_the_resolved_precision(tmp_path, native):
    from unclip.training import TrainConfig, train

    native(False)
    train(torch.nn.Linear(1, 1), line_loss, LINE, tmp_path / "run", TrainConfig(steps=2, batch_size=4, cpu=True),
          progress=False)
    info = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert info["train"]["mixed_precision"] == "auto" and info["distributed"]["mixed_precision"] == "no"


def test_cli_from_png_reuses_the_recorded_dtype(tiny_model_dir, tmp_path):
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", str(tiny_model_dir), "--steps-prior", "2", "--steps-decoder", "2", "--steps-upsampler", "2",
              "--quiet"]
    result = CliRunner().invoke(main, ["generate", "a red circle", "-o", str(first), "--dtype", "bf16", *common])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["generate", "--from-png", str(first), "-o", str(again), "--quiet"])
    assert result.exit_code == 0, result.output
    assert first.read_bytes() == again.read_bytes()
    from unclip.images import read_png_metadata
    assert json.loads(read_png_metadata(again)["unclip"])["dtype"] == "bfloat16"


def test_compile_option_trains_and_keeps_checkpoint_keys(tmp_path):
    from safetensors.torch import load_file

    from unclip.training import TrainConfig, list_checkpoints, train

    model = torch.nn.Linear(1, 1)
    config = TrainConfig(steps=3, batch_size=4, lr=0.1, warmup_steps=1, compile=True, mixed_precision="no", cpu=True)
    train(model, line_loss, LINE, tmp_path / "run", config, progress=False)
    assert model._compiled_call_impl is not None  # nn.Module.compile(): compiled in place
    weights = load_file(str(list_checkpoints(tmp_path / "run")[-1][1] / "model.safetensors"))
    assert set(weights) == {"weight", "bias"}  # no "_orig_mod." prefix: loads into an uncompiled model


def test_runs_with_different_precisions_share_one_process(tmp_path):
    """accelerate's process-wide state fixes its mixed precision; bf16 runs must not lock later fp32 runs out."""
    from unclip.training import TrainConfig, train

    for precision in ("bf16", "no", "bf16"):
        run = tmp_path / f"run-{precision}-{len(list(tmp_path.iterdir()))}"
        train(torch.nn.Linear(1, 1), line_loss, LINE, run, TrainConfig(steps=1, batch_size=4, mixed_precision=precision,
                                                                        cpu=True), progress=False)
        assert json.loads((run / "train_config.json").read_text())["distributed"]["mixed_precision"] == precision
