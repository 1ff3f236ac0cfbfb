"""The shapes-world oracle: true renderings pass, mismatched pairs, noise and blank images fail."""

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.data.shapes import KINDS, Scene, ShapeObject, render_scene, sample_scene
from unclip.eval.shapes import detect_objects, evaluate, label_components, score
from unclip.images import pil_to_tensor


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, KINDS[i % 4]) for i in range(800)]  # 200 of each kind
    return scenes, [render_scene(s) for s in scenes]


def test_true_renderings_pass(scenes):
    scenes, images = scenes
    report = evaluate(images, [s.caption for s in scenes])
    assert report["n"]["single"] == 200 and report["n"]["held_out"] > 0
    for name in ("overall", *KINDS, "held_out"):
        assert report[name] >= 0.98, (name, report)


def test_mismatched_pairs_fail(scenes):
    scenes, images = scenes
    order = np.random.default_rng(1).permutation(len(scenes))
    report = evaluate(images, [scenes[i].caption for i in order])
    assert report["overall"] <= 0.10


def test_noise_and_blank_images_score_zero():
    captions = ["a large red circle", "a blue square on the left", "two yellow squares",
                "a red circle to the left of a green triangle"]
    generator = torch.Generator().manual_seed(0)
    for caption in captions:
        assert score(Image.new("RGB", (64, 64), "white"), caption) == 0.0
        for _ in range(5):
            assert score(torch.randn(3, 64, 64, generator=generator), caption) == 0.0
            assert score(torch.rand(3, 64, 64, generator=generator) * 2 - 1, caption) == 0.0


def test_any_size_and_tensor_input(scenes):
    scenes, images = scenes
    for scene, image in list(zip(scenes, images))[:40]:
        assert score(pil_to_tensor(image)[0], scene.caption) == 1.0
        assert score(image.resize((256, 256), Image.BICUBIC), scene.caption) == 1.0
        assert score(image.resize((128, 128), Image.NEAREST), scene.caption) == 1.0


def _scene(kind, *objects, position=None):
    return Scene(kind, [ShapeObject(*o) for o in objects], position)


def test_requirements_are_checked_one_by_one():
    pair = render_scene(_scene("relation", ("red", "circle", "large", 16, 30), ("green", "triangle", "small", 48, 34)))
    assert score(pair, "a red circle to the left of a green triangle") == 1.0
    assert score(pair, "a green triangle to the right of a red circle") == 1.0
    assert score(pair, "a red circle to the right of a green triangle") == 0.0
    assert score(pair, "a red circle above a green triangle") == 0.0
    assert score(pair, "a red circle on the left") == 0.0          # an extra object
    assert score(pair, "a large red circle") == 0.0
    three = render_scene(_scene("count", ("blue", "circle", "small", 10, 10), ("blue", "circle", "large", 40, 40),
                                ("blue", "circle", "small", 50, 10)))
    assert score(three, "three blue circles") == 1.0
    assert score(three, "two blue circles") == 0.0
    assert score(three, "three blue squares") == 0.0
    unseen = render_scene(_scene("single", ("purple", "triangle", "small", 20, 20)))  # a held-out pair
    assert score(unseen, "a small purple triangle") == 1.0
    assert score(unseen, "a large purple triangle") == 0.0
    assert score(unseen, "a small orange triangle") == 0.0
    assert score(unseen, "a purple triangle on the top") == 1.0
    assert score(unseen, "a purple triangle on the bottom") == 0.0


def test_detect_objects_reads_shape_size_and_position():
    objects = ("orange", "square", "large", 16, 16), ("yellow", "triangle", "large", 48, 48)
    image = render_scene(_scene("relation", *objects))
    found = {o.color: o for o in detect_objects(image)}
    assert (found["orange"].shape, found["orange"].size) == ("square", "large")
    assert (found["yellow"].shape, found["yellow"].size) == ("triangle", "large")
    assert abs(found["orange"].cx - 16) < 0.6 and abs(found["orange"].cy - 16) < 0.6


def test_label_components_separates_colours_and_regions():
    colors = np.array([[0, 0, -1, 1],
                       [-1, 0, -1, 1],
                       [2, -1, 0, 0],
                       [2, 2, -1, 0]])
    labels = label_components(colors)
    assert len(np.unique(labels[labels >= 0])) == 4
    assert labels[0, 0] == labels[1, 1] and labels[2, 2] == labels[3, 3] and labels[0, 0] != labels[2, 2]


def test_evaluate_rejects_bad_input():
    blank = Image.new("RGB", (64, 64), "white")
    with pytest.raises(ValueError, match="grammar"):
        evaluate([blank], ["a photo of a cat"])
    with pytest.raises(ValueError, match="captions"):
        evaluate([blank], [])
    report = evaluate([blank], ["a small purple triangle"])
    assert report["held_out"] == 0.0 and report["relation"] is None and report["n"]["held_out"] == 1
