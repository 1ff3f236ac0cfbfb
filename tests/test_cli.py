"""The image-making commands through click's CliRunner on the tiny model, including bad input."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli

FAST = ["--steps-prior", "2", "--steps-decoder", "2", "--steps-upsampler", "2", "--quiet"]


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (24, 24), (220, 30, 30)).save(path)
    return path


def test_generate_png_provenance_and_from_png(tiny_model_dir, tmp_path):
    out = tmp_path / "a.png"
    result = run("generate", "a red circle", "--model", tiny_model_dir, "--seed", 7, "--image-candidates", 2,
                 "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    meta = json.loads(Image.open(out).text["unclip"])
    assert meta["prompt"] == "a red circle" and meta["seed"] == 7 and meta["settings"]["decoder_steps"] == 2
    assert meta["settings"]["image_candidates"] == 2 and meta["settings"]["rerank"] == "both"  # --from-png too
    again = tmp_path / "b.png"
    result = run("generate", "--from-png", out, "-o", again, "--quiet")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    # a PNG written before the guidance interval existed was guided at every step, and is re-created so
    # and one from before `rerank` ranked its candidates by the prompt, and one from before `share_prior` decoded
    # them all from one prior sample
    old = tmp_path / "old.png"
    result = run("generate", "a red circle", "--model", tiny_model_dir, "--seed", 7, "--guidance-interval-decoder",
                 0, 1, "--image-candidates", 3, "--rerank", "text", "--share-prior", "-o", old, *FAST)
    assert result.exit_code == 0, result.output
    meta = json.loads(Image.open(old).text["unclip"])
    assert meta["settings"]["share_prior"] is True and meta["settings"]["image_candidates"] == 3
    del meta["settings"]["decoder_guidance_interval"], meta["settings"]["rerank"], meta["settings"]["share_prior"]
    Image.open(old).save(old, pnginfo=_text_chunks({"unclip": json.dumps(meta)}))
    result = run("generate", "--from-png", old, "-o", tmp_path / "old-again.png", "--quiet")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(old)), np.asarray(Image.open(tmp_path / "old-again.png")))
    again = json.loads(Image.open(tmp_path / "old-again.png").text["unclip"])["settings"]
    assert again["decoder_guidance_interval"] == [0.0, 1.0] and again["rerank"] == "text" and again["share_prior"]


def test_options_left_at_their_default_give_way_to_the_models_own(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "own"
    shutil.copytree(tiny_model_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    twins = {"exchanges": [["red", "blue"], ["circle", "square"]]}
    (model / "model_index.json").write_text(json.dumps({**index, "sampling": {"decoder_steps": 3,
                                                                                "image_candidates": 2,
                                                                                "rerank_twins": twins,
                                                                                "prior_twin_guidance": 1.5,
                                                                                "text_guidance": 4.0,
                                                                                "rerank_paraphrase": {"above":
                                                                                                      "below"}}}))
    fast = ["--steps-prior", "2", "--steps-upsampler", "2", "--quiet"]
    result = run("generate", "a red circle", "--model", model, "-o", tmp_path / "a.png", *fast)
    assert result.exit_code == 0, result.output
    settings = json.loads(Image.open(tmp_path / "a.png").text["unclip"])["settings"]
    assert settings["decoder_steps"] == 3 and settings["image_candidates"] == 2 and settings["prior_steps"] == 2
    assert settings["rerank_twins"] == twins and settings["prior_twin_guidance"] == 1.5
    assert settings["text_guidance"] == 4.0 and settings["rerank_paraphrase"] == {"above": "below"}
    result = run("generate", "--from-png", tmp_path / "a.png", "-o", tmp_path / "a2.png", "--quiet")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "a2.png")))
    result = run("generate", "a red circle", "--model", model, "-o", tmp_path / "c.png", "--no-rerank-twins",
                 "--no-rerank-paraphrase", "--guidance-text", 2, *fast)
    assert result.exit_code == 0, result.output
    settings = json.loads(Image.open(tmp_path / "c.png").text["unclip"])["settings"]
    assert settings["rerank_twins"] == {} and settings["rerank_paraphrase"] == {} and settings["text_guidance"] == 2
    result = run("generate", "a red circle", "--model", model, "-o", tmp_path / "d.png", "--prior-twin-guidance", 0,
                 *fast)
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(tmp_path / "d.png").text["unclip"])["settings"]["prior_twin_guidance"] == 0
    result = run("generate", "a red circle", "--model", model, "-o", tmp_path / "b.png", "--steps-decoder", 2,
                 "--image-candidates", 1, *fast)
    assert result.exit_code == 0, result.output
    settings = json.loads(Image.open(tmp_path / "b.png").text["unclip"])["settings"]
    assert settings["decoder_steps"] == 2 and settings["image_candidates"] == 1  # given on the command line: kept


def _text_chunks(texts: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    return info


def test_generate_folder_grid_and_determinism(tiny_model_dir, tmp_path):
    result = run("generate", "two blue squares", "--model", tiny_model_dir, "-n", 3, "-o", tmp_path / "f", *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "f")) == ["0000.png", "0001.png", "0002.png"]
    run("generate", "two blue squares", "--model", tiny_model_dir, "-n", 3, "-o", tmp_path / "g", *FAST)
    assert (tmp_path / "f" / "0002.png").read_bytes() == (tmp_path / "g" / "0002.png").read_bytes()
    result = run("generate", "a red circle", "--model", tiny_model_dir, "-n", 4, "--grid", "-o",
                 tmp_path / "grid.png", *FAST)
    assert result.exit_code == 0 and Image.open(tmp_path / "grid.png").size == (2 * 16 + 3 * 2,) * 2


def test_vary_interpolate_edit_info(tiny_model_dir, tmp_path, picture):
    assert run("vary", picture, "--model", tiny_model_dir, "-n", 2, "-o", tmp_path / "v", *FAST).exit_code == 0
    assert len(os.listdir(tmp_path / "v")) == 2
    result = run("vary", picture, "--invert", "--model", tiny_model_dir, "-o", tmp_path / "inv.png", *FAST)
    assert result.exit_code == 0, result.output
    result = run("interpolate", "a red circle", picture, "--frames", 3, "--model", tiny_model_dir,
                 "-o", tmp_path / "m.gif", *FAST)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "m.gif").n_frames >= 2
    result = run("interpolate", "a red circle", "a blue square", "--frames", 3, "--model", tiny_model_dir,
                 "-o", tmp_path / "strip.png", *FAST)
    assert result.exit_code == 0 and Image.open(tmp_path / "strip.png").size[0] > 3 * 16
    result = run("edit", picture, "--from", "a red circle", "--to", "a blue circle", "--amount", 0,
                 "--amount", 0.5, "--model", tiny_model_dir, "-o", tmp_path / "e", *FAST)
    assert result.exit_code == 0, result.output
    assert len(os.listdir(tmp_path / "e")) == 2
    result = run("info", tiny_model_dir)
    assert result.exit_code == 0 and "decoder [decoder]" in result.output and "upsampler_16" in result.output


BAD = [
    (["generate", "", "--model", "{model}"], "PROMPT"),
    (["generate", "a red circle", "--model", "{tmp}/nope"], "no model folder"),
    (["generate", "a red circle", "--model", "{model}", "-n", "0"], "-n"),
    (["generate", "a red circle", "--model", "{model}", "-n", "2", "-o", "{tmp}/one.png"], "do not fit"),
    (["generate", "a red circle", "--model", "{model}", "--steps-decoder", "0"], "steps-decoder"),
    (["generate", "a red circle", "--model", "{model}", "--guidance-decoder", "nan"], "finite"),
    (["generate", "a red circle", "--model", "{model}", "--guidance-prior", "inf"], "finite"),
    (["generate", "a red circle", "--model", "{model}", "--guidance-interval-decoder", "0.8", "0.2"],
     "guidance interval"),
    (["generate", "a red circle", "--model", "{model}", "--sampler", "magic"], "magic"),
    (["generate", "a red circle", "--model", "{model}", "-o", "{tmp}/file.txt/x.png"], "is a file"),
    (["generate", "--from-png", "{tmp}/plain.png", "--model", "{model}"], "carries no unclip settings"),
    (["vary", "{tmp}/missing.png", "--model", "{model}"], "image not found"),
    (["vary", "{tmp}/file.txt", "--model", "{model}"], "not a readable image"),
    (["interpolate", "a red circle", "a blue square", "--frames", "1", "--model", "{model}"], "frames"),
    (["edit", "{tmp}/plain.png", "--from", "a", "--to", "a", "--model", "{model}"], "same embedding"),
    (["info", "{tmp}/nope"], "no model folder"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_gives_one_line_error(args, message, tiny_model_dir, tmp_path):
    (tmp_path / "file.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    args = [a.format(model=tiny_model_dir, tmp=tmp_path) for a in args]
    result = run(*(args[:1] + (FAST if args[0] != "info" else []) + args[1:]))
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("**/.*tmp*")) and not (tmp_path / "one.png").exists()


def test_unwritable_output_fails_cleanly(tiny_model_dir):
    """/proc refuses new files even to root: the write fails with one line and leaves nothing behind."""
    result = run("generate", "a red circle", "--model", tiny_model_dir, "-o", "/proc/unclip-test.png", *FAST)
    assert result.exit_code != 0 and "Traceback" not in result.output and "/proc" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_compile_flag_compiles_the_pipeline(tiny_model_dir, tmp_path, monkeypatch):
    # the compiled result itself is tested in test_pipeline.py; here: the flag reaches pipe.compile, once
    from unclip import UnCLIPPipeline

    calls = []
    monkeypatch.setattr(UnCLIPPipeline, "compile", lambda self, freeze=True: calls.append(freeze) or self)
    result = run("generate", "a red circle", "--model", tiny_model_dir, "-o", tmp_path / "c.png", "--compile", *FAST)
    assert result.exit_code == 0, result.output
    assert calls == [True] and (tmp_path / "c.png").exists()
    run("generate", "a red circle", "--model", tiny_model_dir, "-o", tmp_path / "d.png", *FAST)
    assert calls == [True]


def test_sampler_options_default_to_the_pipelines_and_set_each_stage(tiny_model_dir, tmp_path):
    from unclip.pipeline import RERANK, SamplingSettings
    from unclip.schedulers import scheduler_names

    defaults = SamplingSettings()
    assert cli.SAMPLING_DEFAULTS == {name: getattr(defaults, name) for name in cli.SAMPLING_DEFAULTS}
    assert set(cli.IMAGE_SAMPLERS) <= set(scheduler_names())
    assert tuple(cli.RERANK) == RERANK

    def settings(name, *args):
        result = run("generate", "a red circle", "--model", tiny_model_dir, "-o", tmp_path / name, *args, *FAST)
        assert result.exit_code == 0, result.output
        return json.loads(Image.open(tmp_path / name).text["unclip"])["settings"]

    assert [settings("a.png")[f"{s}_sampler"] for s in cli.STAGES] == [defaults.prior_sampler,
                                                                          defaults.decoder_sampler,
                                                                          defaults.upsampler_sampler]
    own = settings("b.png", "--sampler-decoder", "dpm++", "--sampler-upsampler", "ddpm")
    assert (own["prior_sampler"], own["decoder_sampler"], own["upsampler_sampler"]) == (defaults.prior_sampler,
                                                                                "dpm++", "ddpm")
    assert settings("d.png", "--guidance-interval-decoder", "0.3", "1")["decoder_guidance_interval"] == [0.3, 1.0]
    every = settings("c.png", "--sampler", "euler", "--sampler-decoder", "dpm++")
    assert {every[f"{s}_sampler"] for s in cli.STAGES} == {"euler"}
