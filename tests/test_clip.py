"""CLIP wrapper: output shapes, preprocessing, save/load, contrastive training, the `train clip` command."""

import dataclasses
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli
from conftest import SHAPES_WORDS, tiny_clip_config
from unclip.clip import CLIP_PRESETS, ClipEncoder, WordTokenizer
from unclip.captions import paraphrase
from unclip.clip_training import (_Tokenised, caption_twins, clip_loss_fn, exchange_words, reorder_caption, swap_words,
                                   train_clip)
from unclip.data.shapes import build_shapes
from unclip.images import pil_to_tensor
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


def test_swap_words_swaps_whole_words_both_ways():
    swaps = [("left", "right"), ("two", "three")]
    assert swap_words("a red circle to the left of a blue square", swaps) == \
        "a red circle to the right of a blue square"
    assert swap_words("three red circles on the right", swaps) == "two red circles on the left"
    assert swap_words("a lefty circle", swaps) == "a lefty circle"


def _side_pairs():
    """Squares on the left or right half; colour alone tells these four captions apart."""
    sides = {"red": "left", "blue": "right", "green": "left", "yellow": "right"}
    rgb = {"red": (220, 30, 30), "blue": (30, 70, 220), "green": (30, 160, 50), "yellow": (235, 200, 20)}
    pairs = []
    for color, side in sides.items():
        image = Image.new("RGB", (16, 16), "white")
        image.paste(rgb[color], (1 if side == "left" else 9, 5, 7 if side == "left" else 15, 11))
        pairs.append({"image": pil_to_tensor(image)[0], "caption": f"a {color} square on the {side}"})
    return pairs


def test_hard_negative_targets_count_a_twin_that_describes_another_image():
    torch.manual_seed(0)
    clip = ClipEncoder.from_config(tiny_clip_config(), sorted(set(SHAPES_WORDS)))
    captions = ["a red square on the left", "a red square on the right", "a blue circle"]
    images = torch.randn(3, 3, 16, 16)
    items = _Tokenised([{"image": im, "caption": c} for im, c in zip(images, captions)], clip, [("left", "right")])
    batch = torch.utils.data.default_collate([items[i] for i in range(3)])
    assert batch["negative"] == [captions[1], captions[0], ""]  # no twin for a caption without the words
    loss = clip_loss_fn(clip, batch)[0]
    # by hand: columns [3 captions, 2 twins]; twin 0 is caption 1 (a positive for image 1) and vice versa
    image, text, scale = clip(batch["pixels"], torch.cat([batch["tokens"], batch["negative_tokens"][:2]]))
    logits_image = scale * image @ text.T
    targets = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float)
    expected = (torch.nn.functional.cross_entropy(logits_image, targets / targets.sum(1, keepdim=True))
                + torch.nn.functional.cross_entropy(scale * text[:3] @ image.T, torch.eye(3))) / 2
    assert torch.allclose(loss, expected, atol=1e-6)


def test_mirror_pairs_join_the_batch_with_swapped_captions():
    torch.manual_seed(0)
    clip = ClipEncoder.from_config(tiny_clip_config(), sorted(set(SHAPES_WORDS)))
    captions = ["a red square on the left", "a red square above a blue circle", "a blue circle"]
    mirrors = {"horizontal": [("left", "right")], "vertical": [("above", "below")]}
    items = _Tokenised([{"image": torch.randn(3, 16, 16), "caption": c} for c in captions], clip, (), mirrors)
    batch = torch.utils.data.default_collate([items[i] for i in range(3)])
    assert batch["mirror"] == ["a red square on the right", "a red square below a blue circle", ""]
    assert torch.equal(batch["mirror_pixels"][0], batch["pixels"][0].flip(-1))   # left <-> right: mirrored in x
    assert torch.equal(batch["mirror_pixels"][1], batch["pixels"][1].flip(-2))   # above <-> below: flipped in y
    loss = clip_loss_fn(clip, batch)[0]
    # by hand: an ordinary batch of 5 pairs, the two mirrors after the three originals
    pixels = torch.cat([batch["pixels"], batch["mirror_pixels"][:2]])
    image, text, scale = clip(pixels, torch.cat([batch["tokens"], batch["mirror_tokens"][:2]]))
    eye = torch.eye(5)
    expected = (torch.nn.functional.cross_entropy(scale * image @ text.T, eye)
                + torch.nn.functional.cross_entropy(scale * text @ image.T, eye)) / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    with pytest.raises(ValueError, match="axes"):
        train_clip("unused", "unused", TrainConfig(steps=1), mirror_swaps={"diagonal": [("left", "right")]})


def _margins(pairs, twin_of, lr: float, **negatives) -> list[float]:
    """Train a tiny CLIP for 100 full-batch steps on `pairs` (with these hard negatives) and return, per image,
    cos(image, its caption) - cos(image, twin_of(caption))."""
    torch.manual_seed(0)
    clip = ClipEncoder.from_config(tiny_clip_config(), sorted(set(SHAPES_WORDS)))
    items = _Tokenised(pairs, clip, **negatives)
    batch = torch.utils.data.default_collate([items[i] for i in range(len(items))])
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr)
    for _ in range(100):
        loss = clip_loss_fn(clip, batch)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    twins = clip.tokenize([twin_of(c) for c in batch["caption"]])
    with torch.no_grad():
        image, text, _ = clip(batch["pixels"], batch["tokens"])
        twin = clip(batch["pixels"], twins)[1]
    return ((image * text).sum(-1) - (image * twin).sum(-1)).tolist()


def test_hard_negatives_teach_the_side_that_colour_alone_hides():
    """Each colour appears on one side only, so a plain contrastive loss needs no side; with "left"/"right"
    twins as negatives the CLIP must rank "on the left" above "on the right" for every image."""
    swaps = [("left", "right")]
    twin_of = lambda c: swap_words(c, swaps)  # noqa: E731
    without, with_twins = _margins(_side_pairs(), twin_of, 1e-2), _margins(_side_pairs(), twin_of, 1e-2,
                                                                            negative_swaps=swaps)
    assert min(with_twins) > 0.3 and max(abs(m) for m in without) < 0.1  # measured: >= 0.54 and <= 0.001


def test_paraphrase_tells_a_relation_from_its_other_side():
    reverses = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
                "below": "above"}
    assert paraphrase("a red circle to the left of a blue square", reverses) == \
        "a blue square to the right of a red circle"
    assert paraphrase("an orange triangle below a red circle", reverses) == "a red circle above an orange triangle"
    told = paraphrase("a red circle to the left of a blue square", reverses)
    assert paraphrase(told, reverses) == "a red circle to the left of a blue square"  # back again
    assert paraphrase("two red circles", reverses) == "two red circles"  # no relation: unchanged
    assert paraphrase("above a red circle", reverses) == "above a red circle"  # one side missing: unchanged


def test_reorder_caption_exchanges_the_sides_of_a_relation():
    phrases = ["to the left of", "above"]
    assert reorder_caption("a red circle to the left of a blue square", phrases) == \
        "a blue square to the left of a red circle"
    assert reorder_caption("a red circle above a blue square", phrases) == "a blue square above a red circle"
    assert reorder_caption("a red circle on the left", phrases) == "a red circle on the left"  # no relation
    assert reorder_caption("above a blue square", phrases) == "above a blue square"            # one side only


def _relation_pairs():
    """Two squares side by side; the colour pair alone tells these captions apart, never their order."""
    rgb = {"red": (220, 30, 30), "blue": (30, 70, 220), "green": (30, 160, 50), "yellow": (235, 200, 20)}
    pairs = []
    for left, right in [("red", "blue"), ("green", "yellow"), ("blue", "green"), ("yellow", "red")]:
        image = Image.new("RGB", (16, 16), "white")
        image.paste(rgb[left], (1, 5, 7, 11))
        image.paste(rgb[right], (9, 5, 15, 11))
        pairs.append({"image": pil_to_tensor(image)[0], "caption": f"a {left} square to the left of a {right} square"})
    return pairs


def test_reordered_negatives_teach_word_order_that_the_colour_pair_hides():
    """A plain contrastive loss needs no word order here (no caption is another's reordering); with the reordered
    captions as negatives the CLIP must rank "A to the left of B" above "B to the left of A" for every image."""
    phrases = ["to the left of"]
    twin_of = lambda c: reorder_caption(c, phrases)  # noqa: E731
    without = _margins(_relation_pairs(), twin_of, 3e-3)
    with_twins = _margins(_relation_pairs(), twin_of, 3e-3, negative_reorders=phrases)
    # without the twins the order is left to chance (measured: one image's margin -0.006); with them every image
    # ranks its own caption first (measured: >= 0.34)
    assert min(with_twins) > 0.3 and min(without) < 0.1


def test_caption_twins_follow_the_word_rules():
    rules = {"swaps": [["left", "right"], ["two", "three"]], "reorders": ["to the left of", "above"],
             "exchanges": [["red", "orange", "green"], ["circle", "square"]]}
    assert caption_twins("a red circle to the left of an orange square", rules) == [
        "a red circle to the right of an orange square",      # the swap
        "an orange square to the left of a red circle",       # the reorder
        "an orange circle to the left of a red square",       # the colours exchanged
        "a red square to the left of an orange circle"]       # the shapes exchanged
    assert caption_twins("two green circles", rules) == ["three green circles"]
    assert caption_twins("a red circle above a red square", rules) == [   # the colour exchange is no twin: dropped
        "a red square above a red circle"]                                # reorder and shape exchange agree
    assert caption_twins("a red apple", rules) == [] and caption_twins("a red apple", {}) == []
    with pytest.raises(ValueError, match="unknown twin rules"):
        caption_twins("a red circle", {"mirror": []})


def test_exchange_words_swaps_two_different_words_of_one_class():
    classes = [["red", "green", "blue"], ["circle", "square"]]
    caption = "a red circle above a green square"
    assert exchange_words(caption, classes, pick=0) == "a green circle above a red square"    # the colours
    assert exchange_words(caption, classes, pick=1) == "a red square above a green circle"    # the shapes
    assert exchange_words(caption, classes, pick=2) == exchange_words(caption, classes, pick=0)
    assert exchange_words("a red circle above a red square", classes) == "a red square above a red circle"
    assert exchange_words("a red circle", classes) == "a red circle"                          # nothing to exchange
    assert exchange_words("a reddish circle above a green squares", classes) == "a reddish circle above a green squares"
    # the articles follow the words: "a orange" would give the twin away by its grammar alone
    colours = [["red", "orange"]]
    assert exchange_words("an orange circle above a red square", colours) == "a red circle above an orange square"


def _binding_pairs():
    """A square above a bar, each its own colour and every colour in one picture only: any one colour tells these
    captions apart, never which colour is the square's."""
    rgb = {"red": (220, 30, 30), "blue": (30, 70, 220), "green": (30, 160, 50), "yellow": (235, 200, 20),
           "purple": (130, 50, 170), "orange": (240, 130, 20)}
    pairs = []
    for top, bottom in [("red", "blue"), ("green", "yellow"), ("purple", "orange")]:
        image = Image.new("RGB", (16, 16), "white")
        image.paste(rgb[top], (5, 1, 11, 7))      # the square
        image.paste(rgb[bottom], (2, 11, 14, 13))  # the bar, called a triangle
        pairs.append({"image": pil_to_tensor(image)[0], "caption": f"a {top} square above a {bottom} triangle"})
    return pairs


def test_exchanged_negatives_teach_which_colour_goes_with_which_shape():
    """With the colour-exchanged captions as negatives the CLIP must rank "a red square above a blue triangle" above
    "a blue square above a red triangle" for every image; without them nothing asks it to."""
    classes = [["red", "green", "blue", "yellow", "purple", "orange"]]
    twin_of = lambda c: exchange_words(c, classes)  # noqa: E731
    without = _margins(_binding_pairs(), twin_of, 3e-3)
    with_twins = _margins(_binding_pairs(), twin_of, 3e-3, negative_exchanges=classes)
    assert min(with_twins) > 0.3 and min(without) < 0.1


def test_train_clip_goes_on_from_a_clip_folder(shapes_dir, tmp_path):
    config = TrainConfig(steps=2, batch_size=8, warmup_steps=1, checkpoint_every=1)
    small = tiny_clip_config(image_size=16)
    train_clip(shapes_dir / "train", tmp_path / "a", config, config=small, heldout_fraction=0.2, progress=False)
    first = ClipEncoder.load(tmp_path / "a" / "clip")
    train_clip(shapes_dir / "train", tmp_path / "b", dataclasses.replace(config, lr=0.0), config=small,
               heldout_fraction=0.2, progress=False, init_from=tmp_path / "a" / "clip",
               negative_reorders=["to the left of"])
    second = ClipEncoder.load(tmp_path / "b" / "clip")
    assert second.tokenizer.words == first.tokenizer.words
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # lr 0: the start is the first CLIP's weights
    info = json.loads((tmp_path / "b" / "runs" / "clip" / "train_config.json").read_text())
    assert info["init_from"] == str(tmp_path / "a" / "clip") and info["negative_reorders"] == ["to the left of"]
    with pytest.raises(ValueError, match="relation phrases"):
        train_clip("unused", "unused", config, negative_reorders=[""])


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
    swaps = ["--negative-swap", "two,three", "--mirror-swap", "horizontal:left,right", "--negative-reorder", "above"]
    args = ["train", "clip", "--data", str(shapes_dir / "train"), "--out", str(out), *swaps, "--steps", "2",
            "--batch-size", "8", "--checkpoint-every", "1", "--quiet"]
    result = runner.invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "runs" / "clip" / "train_config.json").read_text())
    assert info["negative_swaps"] == [["two", "three"]] and info["mirror_swaps"] == {"horizontal": [["left", "right"]]}
    assert info["negative_reorders"] == ["above"] and info["init_from"] is None
    assert (out / "clip" / "model.safetensors").is_file() and "wrote" in result.output
    again = runner.invoke(cli.main, args)  # the run folder holds checkpoints: refuse without --resume
    assert again.exit_code != 0 and "--resume" in again.output
    resumed = runner.invoke(cli.main, args[:-4] + ["3", "--batch-size", "8", "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    bad = runner.invoke(cli.main, ["train", "clip", "--data", str(shapes_dir / "train"), "--out", str(out),
                                   "--preset", "huge"])
    assert bad.exit_code != 0 and "unknown CLIP preset" in bad.output and "Traceback" not in bad.output
    swap = runner.invoke(cli.main, ["train", "clip", "--data", str(shapes_dir / "train"), "--out", str(out),
                                    "--negative-swap", "left"])
    assert swap.exit_code != 0 and "left,right" in swap.output and "Traceback" not in swap.output
    axis = runner.invoke(cli.main, ["train", "clip", "--data", str(shapes_dir / "train"), "--out", str(out),
                                    "--mirror-swap", "sideways:left,right"])
    assert axis.exit_code != 0 and "horizontal:" in axis.output and "Traceback" not in axis.output
    judge = runner.invoke(cli.main, ["train", "clip", "--data", str(shapes_dir / "train"), "--out", str(out), "--judge",
                                     "--init-from", str(out / "clip"), "--negative-exchange", "red,green,blue",
                                     "--steps", "1", "--batch-size", "8", "--quiet"])
    assert judge.exit_code == 0 and f"wrote {out}/judge" in judge.output, judge.output
    info = json.loads((out / "runs" / "judge" / "train_config.json").read_text())
    assert info["component"] == "judge" and info["negative_exchanges"] == [["red", "green", "blue"]]
    assert json.loads((out / "model_index.json").read_text())["components"] == {"clip": "clip", "judge": "clip"}
    one = runner.invoke(cli.main, ["train", "clip", "--data", str(shapes_dir / "train"), "--out", str(out),
                                   "--negative-exchange", "red"])
    assert one.exit_code != 0 and "red,green,blue" in one.output and "Traceback" not in one.output


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
