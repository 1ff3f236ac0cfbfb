"""The models shipped inside the package: present, intact, loadable, and the default of every command."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from unclip import UnCLIPPipeline
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


def test_generate_uses_the_default_model_without_model_option(tmp_path):
    out = tmp_path / "apple.png"
    result = CliRunner().invoke(cli.main, ["generate", "a red apple", "-o", str(out), "--steps-prior", "2",
                                           "--steps-decoder", "2", "--steps-upsampler", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(out).text["unclip"])["model"] == DEFAULT_MODEL
    assert Image.open(out).size == (64, 64)
