"""CLIP wrapper: output shapes, preprocessing, save/load, contrastive training, the `train clip` command."""

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli
from conftest import SHAPES_WORDS, tiny_clip_config
from unclip.clip import CLIP_PRESETS, ClipEncoder, WordTokenizer
from unclip.clip_training import clip_loss_fn, train_clip
from unclip.data.shapes import build_shapes
from unclip.training import TrainConfig, read_metrics


def test_encoder_output_shapes(tiny_clip):
    text_emb, tokens, mask = tiny_clip.encode_text(["a red circle", "two blue squares on the left"])
    assert text_emb.shape == (2, 16) and tokens.shape == (2, 16, 32) and mask.shape == (2, 16)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert mask.sum(1).tolist() == [5, 8]  # <sot> + words + <eot>
    image_emb = tiny_clip.encode_image(torch.rand(3, 3, 20, 20) * 2 - 1)
    assert image_emb.shape == (3, 16) and torch.allclose(image_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not image_emb.requires_grad


def test_pil_and_tensor_inputs_agree(tiny_clip):
    image = Image.new("RGB", (16, 16), (220, 30, 30))
    from_pil = tiny_clip.encode_image([image])
    from_tensor = tiny_clip.encode_image(torch.tensor([220 / 127.5 - 1, 30 / 127.5 - 1, 30 / 127.5 - 1]).view(1, 3, 1, 1)
                                         .expand(1, 3, 16, 16))
    assert torch.allclose(from_pil, from_tensor, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_clip.encode_image(torch.zeros(1, 4, 8, 8))


def test_tokenizer_unknown_words_and_truncation(tiny_clip):
    tokenizer = WordTokenizer(["red", "circle"], context_length=5)
    ids = tokenizer(["a red circle", "red red red red red red"])
    assert ids[0].tolist() == [tokenizer.sot, tokenizer.index["<unk>"], 2 + 0, 2 + 1, tokenizer.eot]
    assert ids[1, -1] == tokenizer.eot  # truncated, still ends with <eot>
    with pytest.raises(ValueError, match="empty prompt"):
        tiny_clip.encode_text(["  "])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_clip.encode_text([" ".join(["red"] * 40)])
    assert any("truncated" in str(w.message) for w in caught)


def test_save_load_identical(tiny_clip, tmp_path):
    tiny_clip.save(tmp_path / "clip")
    loaded = ClipEncoder.load(tmp_path / "clip")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode_image(images), tiny_clip.encode_image(images))
    for a, b in zip(loaded.encode_text(["a red circle"]), tiny_clip.encode_text(["a red circle"])):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expected 'clip'"):
        from unclip.checkpoint import save_component
        save_component(tmp_path / "prior", "prior", tiny_clip.config, {})
        ClipEncoder.load(tmp_path / "prior")


def test_presets_build():
    for name in CLIP_PRESETS:
        clip = ClipEncoder.from_preset(name, ["red", "circle"])
        assert clip.embed_dim == CLIP_PRESETS[name].embed_dim
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        ClipEncoder.from_preset("huge", ["red"])
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipEncoder.from_open_clip("not-a-model")


def test_contrastive_steps_lower_the_loss(tiny_clip):
    torch.manual_seed(0)
    captions = ["a red circle", "a blue square", "a green triangle", "a red circle"]
    colors = {"red": (220, 30, 30), "blue": (30, 70, 220), "green": (30, 160, 50)}
    images = [Image.new("RGB", (16, 16), colors[c.split()[1]]) for c in captions]
    batch = {"pixels": tiny_clip.preprocess(images), "tokens": tiny_clip.tokenize(captions), "caption": captions}
    optimizer = torch.optim.AdamW(tiny_clip.parameters(), lr=3e-3)
    first = float(clip_loss_fn(tiny_clip, batch)[0])
    for _ in range(20):
        loss = clip_loss_fn(tiny_clip, batch)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < first * 0.7


@pytest.fixture
def shapes_dir(tmp_path):
    build_shapes(tmp_path / "shapes", n=120, seed=0, progress=False)
    return tmp_path / "shapes"


def test_train_clip_writes_component_and_retrieval_metrics(shapes_dir, tmp_path):
    config = TrainConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2, eval_every=2)
    small = tiny_clip_config(image_size=16)
    metrics = train_clip(shapes_dir / "train", tmp_path / "model", config, config=small, heldout_fraction=0.2,
                         progress=False)
    assert set(metrics) == {"retrieval_top1", "retrieval_top5"}
    loaded = ClipEncoder.load(tmp_path / "model" / "clip")
    assert loaded.embed_dim == 16 and "circle" in loaded.tokenizer.words
    rows = read_metrics(tmp_path / "model" / "runs" / "clip" / "metrics.csv")
    assert {r["name"] for r in rows} >= {"loss", "retrieval_top1", "retrieval_top5"}
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["components"] == {"clip": "clip"}


def test_train_clip_command(shapes_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "m"
    args = ["train", "clip", "--data", str(shapes_dir / "train"), "--out", str(out), "--steps", "2",
            "--batch-size", "8", "--checkpoint-every", "1", "--quiet"]
    result = runner.invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert (out / "clip" / "model.safetensors").is_file() and "wrote" in result.output
    again = runner.invoke(cli.main, args)  # the run folder holds checkpoints: refuse without --resume
    assert again.exit_code != 0 and "--resume" in again.output
    resumed = runner.invoke(cli.main, args[:-4] + ["3", "--batch-size", "8", "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    bad = runner.invoke(cli.main, ["train", "clip", "--data", str(shapes_dir / "train"), "--out", str(out),
                                   "--preset", "huge"])
    assert bad.exit_code != 0 and "unknown CLIP preset" in bad.output and "Traceback" not in bad.output


def test_text_states_with_input_embeddings(tiny_clip):
    """with_input appends the layer-normalised input embeddings: the final states are unchanged, and two
    captions that differ in one word differ there at that word, whatever the final states do."""
    prompts = ["a red circle on the left", "a red circle on the right"]
    emb, final, mask = tiny_clip.encode_text(prompts)
    emb2, both, mask2 = tiny_clip.encode_text(prompts, with_input=True)
    W = final.shape[-1]
    assert both.shape == (2, final.shape[1], 2 * W)
    torch.testing.assert_close(both[..., :W], final)
    torch.testing.assert_close(emb2, emb)
    assert torch.equal(mask2, mask)
    ids, _ = tiny_clip.token_ids(prompts)
    word = int((ids[0] != ids[1]).nonzero()[0])  # "left" / "right"
    inputs = both[..., W:]
    assert torch.allclose(inputs[0, :word], inputs[1, :word], atol=1e-6)  # the same words before it
    assert (inputs[0, word] - inputs[1, word]).abs().max() > 0.1
    torch.testing.assert_close(inputs.mean(-1), torch.zeros_like(inputs.mean(-1)), atol=1e-5, rtol=0)  # normalised
