"""Every script in examples/ runs on the tiny model (they use only the public pipeline API)."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).parents[1] / "examples"


def run_example(name: str, argv: list[str]):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(a) for a in argv])


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for i, color in enumerate([(220, 30, 30), (30, 70, 220), (30, 160, 50)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (16, 16), color).save(paths[-1])
    return paths


def test_prompt_walk(tiny_model_dir, tmp_path):
    run_example("prompt_walk", ["a red circle", "a blue square", "--model", tiny_model_dir, "--frames", 3,
                                "-o", tmp_path / "w.gif"])
    assert Image.open(tmp_path / "w.gif").n_frames >= 2


def test_image_morph(tiny_model_dir, tmp_path, pictures):
    run_example("image_morph", [pictures[0], pictures[1], "--model", tiny_model_dir, "--frames", 3,
                                "-o", tmp_path / "m.gif"])
    assert Image.open(tmp_path / "m.gif").n_frames >= 2


def test_text_diff_sweep(tiny_model_dir, tmp_path, pictures):
    run_example("text_diff_sweep", [pictures[0], "--from", "a red circle", "--to", "a blue circle", "--steps", 3,
                                    "--model", tiny_model_dir, "-o", tmp_path / "s.png"])
    assert Image.open(tmp_path / "s.png").size[0] > 3 * 16


def test_mix_images(tiny_model_dir, tmp_path, pictures):
    run_example("mix_images", [pictures[0], pictures[1], "a red circle", "--weights", 1, 1, 2, "-n", 2,
                               "--model", tiny_model_dir, "-o", tmp_path / "x.png"])
    assert Image.open(tmp_path / "x.png").size[0] > 2 * 16
