"""Bad input everywhere a user can give it: one `Error:` line, a non-zero exit, no traceback, nothing written.

BAD is the table of bad inputs over every command; docs/RELIABILITY.md lists what each prints
(`python tests/test_bad_inputs.py > table.md` regenerates that list). The other tests cover image modes,
--debug, long and foreign prompts, corrupt data met while training, a NaN loss, unsafe loading, tar shards,
network access and seeded determinism.
"""

import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

import cli
from conftest import SHAPES_WORDS, make_tiny_pipeline, tiny_clip_config

ROOT = Path(__file__).parents[1]
FAST = "--steps-prior 1 --steps-decoder 1 --steps-upsampler 1 --quiet"
CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a small yellow circle"]


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def error_lines(result) -> list[str]:
    """stderr without click's usage preamble; each line must be a one-line `Error:` or `Warning:`."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return [line for line in lines if not line.startswith(("Usage:", "Try '"))]


# ---------------------------------------------------------------- the files the table points at


def write_pairs(folder: Path, n: int = 12, size: int = 16) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _bad_models(model: Path, bad: Path) -> None:
    """Copies of a good model folder, each broken in one way."""
    from prior.config import PriorConfig
    from prior.model import DiffusionPrior

    breaks = {
        "format": lambda m: _edit_json(m / "clip" / "config.json", _format_version=99),
        "unknown_key": lambda m: _edit_json(m / "prior" / "config.json", flux_capacitor=3),
        "wrong_type": lambda m: _edit_json(m / "decoder" / "config.json", image_size="big"),
        "index_list": lambda m: (m / "model_index.json").write_text("[1, 2]"),
        "corrupt_weights": lambda m: (m / "decoder" / "model.safetensors").write_bytes(b"\0" * 64),
        "other_clip_prior": lambda m: DiffusionPrior(PriorConfig(embed_dim=32, text_width=32, context_length=16,
                                                                 width=32, depth=1, heads=2)).save(m / "prior"),
    }
    for name, fn in breaks.items():
        shutil.copytree(model, bad / name)
        fn(bad / name)


def _embeddings(clip, pairs: Path, root: Path) -> None:
    """A good embeddings folder, one holding NaN, one made by a CLIP of another width."""
    from unclip.data.datasets import ImageTextFolder
    from unclip.data.embeddings import write_embeddings

    write_embeddings(clip, ImageTextFolder(pairs, clip.image_size), root / "emb", progress=False)
    for name in ("emb_nan", "emb_d8"):
        shutil.copytree(root / "emb", root / name)
    image = np.load(root / "emb_nan" / "img_emb" / "img_emb_0.npy")
    image[0, 0] = np.nan
    np.save(root / "emb_nan" / "img_emb" / "img_emb_0.npy", image)
    for part in ("img_emb/img_emb_0.npy", "text_emb/text_emb_0.npy"):
        np.save(root / "emb_d8" / part, np.ones((len(image), 8), np.float16))


def _images(w: Path) -> None:
    (w / "file.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(w / "plain.png")
    Image.new("RGB", (24, 24), (200, 30, 30)).save(w / "whole.png")
    (w / "trunc.png").write_bytes((w / "whole.png").read_bytes()[:60])
    (w / "empty.png").write_bytes(b"")
    Image.new("L", (8200, 4)).save(w / "huge.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("unclip", json.dumps({"command": "generate", "seed": 0, "prompt": "x", "settings": {"warp": 9}}))
    Image.new("RGB", (8, 8)).save(w / "damaged.png", pnginfo=info)


def _recipes(w: Path) -> None:
    recipes = {"unknown_section": {"bogus": {}}, "wrong_type": {"prior": {"train": {"steps": "many"}}},
               "unknown_key": {"prior": {"preset": "tiny", "stepz": 3}}, "list": [],
               "decoder_field": {"decoder": {"config": {"warp_factor": 9}}}}
    for name, recipe in recipes.items():
        (w / f"recipe_{name}.json").write_text(json.dumps(recipe))
    (w / "recipe_corrupt.json").write_text("{")


def _tarballs(w: Path) -> None:
    with tarfile.open(w / "evil.tgz", "w:gz") as tar:
        data = b"owned"
        member = tarfile.TarInfo("package/../../evil.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))


def build_world(root: Path, model: Path) -> dict:
    """Every file and folder the BAD table refers to, under root; returns the placeholder values."""
    from unclip.clip import ClipEncoder
    from unclip.data.datasets import write_shards

    w = root / "w"
    w.mkdir(parents=True)
    _images(w)
    _recipes(w)
    _tarballs(w)
    (w / "afile").write_text("a file where a folder is expected")
    torch.manual_seed(0)
    clip = ClipEncoder.from_config(tiny_clip_config(), sorted(set(SHAPES_WORDS))).eval()
    clip.save(root / "clip" / "clip")
    write_pairs(root / "pairs")
    (root / "empty").mkdir()
    (root / "nocaps").mkdir()
    Image.new("RGB", (16, 16)).save(root / "nocaps" / "00000.png")
    (root / "badshards").mkdir()
    (root / "badshards" / "00000.tar").write_bytes(b"not a tar file " * 40)
    write_shards(root / "pairs", root / "shards", shard_size=6)
    _embeddings(clip, root / "pairs", root)
    _bad_models(model, root / "bad")
    return {"model": model, "clip": root / "clip", "pairs": root / "pairs", "empty": root / "empty",
            "nocaps": root / "nocaps", "badshards": root / "badshards", "shards": root / "shards",
            "bad": root / "bad", "w": w, "afile": w / "afile", "out": root / "out", "fast": FAST,
            "emb_nan": root / "emb_nan", "emb_d8": root / "emb_d8"}


# ---------------------------------------------------------------- the table: (arguments, message fragment)

TRAIN = "--steps 2 --batch-size 4 --quiet"
BAD = [
    # generate: prompt, counts, steps, guidance, sampler, seed, output, device, --from-png, model folders
    ('generate "" --model {model}', "PROMPT"),
    ('generate "a red circle" --model {w}/nope', "no model folder"),
    ('generate "a red circle" --model {model} -n 0', "-n"),
    ('generate "a red circle" --model {model} -n 2 -o {out}.png', "do not fit in one .png"),
    ('generate "a red circle" --model {model} --steps-decoder 0', "--steps-decoder"),
    ('generate "a red circle" --model {model} --steps-prior -3', "--steps-prior"),
    ('generate "a red circle" --model {model} --guidance-decoder nan', "finite"),
    ('generate "a red circle" --model {model} --guidance-prior inf', "finite"),
    ('generate "a red circle" --model {model} --dynamic-threshold nan', "finite"),
    ('generate "a red circle" --model {model} --sampler magic', "magic"),
    ('generate "a red circle" --model {model} --seed -1', "--seed"),
    ('generate "a red circle" --model {model} --dtype fp64', "fp64"),
    ('generate "a red circle" --model {model} --device nosuchdevice', "cannot use device"),
    ('generate "a red circle" --model {model} -o {afile}/x.png', "is a file, not a folder"),
    ('generate "a red circle" --model {model} -o {afile}', "is a file, not a folder"),
    ('generate "a red circle" --model {model} -o /proc/unclip-test.png', "cannot write to /proc"),
    ('generate "a red circle" --model {model} -o {out}.jpg', "cannot write .jpg files"),
    ("generate --from-png {w}/plain.png --model {model}", "carries no unclip settings"),
    ("generate --from-png {w}/damaged.png --model {model}", "damaged unclip settings"),
    ("generate --from-png {w}/missing.png --model {model}", "does not exist"),
    ('generate "a red circle" --model {afile}', "is a file"),
    ('generate "a red circle" --model {w}', "has no clip/ component"),
    ('generate "a red circle" --model {clip}', "has no decoder/ component"),
    ('generate "a red circle" --model {bad}/format', "format version 99"),
    ('generate "a red circle" --model {bad}/unknown_key', "unknown config keys ['flux_capacitor']"),
    ('generate "a red circle" --model {bad}/wrong_type', "'image_size': expected int"),
    ('generate "a red circle" --model {bad}/index_list', "not a model index"),
    ('generate "a red circle" --model {bad}/corrupt_weights', "corrupt weights file"),
    ('generate "a red circle" --model {bad}/other_clip_prior', "expects 32-d CLIP embeddings"),
    # vary: missing, non-image, truncated, empty and huge files, a folder, counts, output type
    ("vary {w}/missing.png --model {model}", "image not found"),
    ("vary {w}/file.txt --model {model}", "not a readable image"),
    ("vary {w}/trunc.png --model {model}", "truncated"),
    ("vary {w}/empty.png --model {model}", "not a readable image"),
    ("vary {w}/huge.png --model {model}", "image too large"),
    ("vary {w} --model {model}", "is a directory"),
    ("vary {w}/whole.png --model {model} -n 0", "-n"),
    ("vary {w}/whole.png --model {model} -o {out}.webp", "cannot write .webp files"),
    ("vary {w}/whole.png --model {model} --guidance-decoder -inf", "finite"),
    # interpolate
    ('interpolate {w}/missing.png "a red circle" --model {model}', "image not found"),
    ('interpolate {w}/trunc.png "a red circle" --model {model}', "truncated"),
    ('interpolate "a red circle" "a blue square" --frames 1 --model {model}', "--frames"),
    ('interpolate "" "a blue square" --model {model}', "empty prompt"),
    ('interpolate "a red circle" "a blue square" --model {model} -o /proc/unclip.gif', "cannot write to /proc"),
    ('interpolate "a red circle" "a blue square" --model {model} -o {out}.jpg', "cannot write .jpg"),
    # edit
    ('edit {w}/trunc.png --from "a red circle" --to "a blue circle" --model {model}', "truncated"),
    ('edit {w}/huge.png --from "a red circle" --to "a blue circle" --model {model}', "image too large"),
    ('edit {w}/whole.png --from "a red circle" --to "a blue circle" --amount nan --model {model}', "finite"),
    ('edit {w}/whole.png --from "a red circle" --to "a blue circle" --amount 2 --model {model}', "--amount"),
    ('edit {w}/whole.png --from "" --to "a blue circle" --model {model}', "empty prompt"),
    ('edit {w}/whole.png --from "a red circle" --to "a red circle" --model {model}', "same embedding"),
    # info
    ("info {w}/nope", "no model folder"),
    ("info {w}", "is not a model folder"),
    ("info {model}/decoder", "is not a model folder"),
    ("info {afile}", "is a file"),
    ("info {bad}/format", "format version 99"),
    ("info {bad}/unknown_key", "unknown config keys"),
    ("info {bad}/index_list", "not a model index"),
    # train clip
    ("train clip --data {empty} --out {out} " + TRAIN, "no image-caption pairs"),
    ("train clip --data {nocaps} --out {out} " + TRAIN, "no image-caption pairs"),
    ("train clip --data {badshards} --out {out} " + TRAIN, "not webdataset shards"),
    ("train clip --data {w}/nope --out {out} " + TRAIN, "does not exist"),
    ("train clip --data {pairs} --out {afile} " + TRAIN, "is a file"),
    ("train clip --data {pairs} --out {out} --steps 0", "--steps"),
    ("train clip --data {pairs} --out {out} --batch-size -1", "--batch-size"),
    ("train clip --data {pairs} --out {out} --lr nan", "finite"),
    ("train clip --data {pairs} --out {out} --lr 0", "--lr"),
    ("train clip --data {pairs} --out {out} --heldout nan", "finite"),
    ("train clip --data {pairs} --out {out} --preset huge", "unknown CLIP preset"),
    ("train clip --data {pairs} --out /proc/unclip-clip " + TRAIN, "/proc/unclip-clip"),
    # train prior
    ("train prior --model {clip} " + TRAIN, "give exactly one of data"),
    ("train prior --model {clip} --data {empty} " + TRAIN, "no image-caption pairs"),
    ("train prior --model {clip} --data {badshards} " + TRAIN, "no readable image-caption pairs"),
    ("train prior --model {clip} --embeddings {pairs} " + TRAIN, "is not an embeddings folder"),
    ("train prior --model {clip} --embeddings {w}/nope " + TRAIN, "does not exist"),
    ("train prior --model {clip} --embeddings {emb_nan} " + TRAIN, "NaN or infinite embeddings"),
    ("train prior --model {clip} --embeddings {emb_d8} " + TRAIN, "D=8 but the CLIP has D=16"),
    ("train prior --model {w} --data {pairs} " + TRAIN, "missing clip component"),
    ("train prior --model {bad}/format --data {pairs} " + TRAIN, "format version 99"),
    ("train prior --model {clip} --data {pairs} --steps 0", "--steps"),
    ("train prior --model {clip} --data {pairs} --batch-size 0", "--batch-size"),
    ("train prior --model {clip} --data {pairs} --ema nan", "finite"),
    ("train prior --model {clip} --data {pairs} --grad-clip inf", "finite"),
    ("train prior --model {clip} --data {pairs} --run-dir {afile} " + TRAIN, "is a file"),
    ("train prior --model {clip} --data {pairs} --preset huge", "huge"),
    ("train prior --model {clip} --data {pairs} --run-dir /proc/unclip-run " + TRAIN, "/proc/unclip-run"),
    # train decoder
    ("train decoder --model {clip} --data {empty} " + TRAIN, "no image-caption pairs"),
    ("train decoder --model {clip} --data {w}/nope " + TRAIN, "data not found"),
    ("train decoder --model {clip} --data {badshards} " + TRAIN, "no readable image-caption pairs"),
    ("train decoder --model {w} --data {pairs} " + TRAIN, "missing clip component"),
    ("train decoder --model {clip} --data {pairs} --min-snr nan", "finite"),
    ("train decoder --model {clip} --data {pairs} --text-drop 1.5", "--text-drop"),
    ("train decoder --model {clip} --data {pairs} --steps -5", "--steps"),
    ("train decoder --model {clip} --data {pairs} --sample-steps 0", "--sample-steps"),
    ("train decoder --model {clip} --data {pairs} --run-dir {afile}/run " + TRAIN, "Not a directory"),
    # train upsampler
    ("train upsampler --model {clip} --data {pairs} --size 0", "--size"),
    ("train upsampler --model {clip} --data {pairs} --size 48 " + TRAIN, "unknown upsampler preset"),
    ("train upsampler --model {clip} --data {pairs} --size 64 --preset tiny-256 " + TRAIN, "256 px"),
    ("train upsampler --model {clip} --data {pairs} --aug-max nan", "finite"),
    ("train upsampler --model {clip} --data {badshards} --size 64 " + TRAIN, "no readable images"),
    ("train upsampler --model {clip} --data {empty} --size 64 " + TRAIN, "no image-caption pairs"),
    # embed
    ("embed --data {empty} --clip {clip} --out {out} --quiet", "no image-caption pairs"),
    ("embed --data {w}/nope.tar --clip {clip} --out {out} --quiet", "data not found"),
    ("embed --data {pairs} --clip {w} --out {out} --quiet", "missing clip component"),
    ("embed --data {pairs} --clip {bad}/format --out {out} --quiet", "format version 99"),
    ("embed --data {pairs} --clip {clip} --out {afile} --quiet", "is a file"),
    ("embed --data {pairs} --clip {clip} --out /proc/unclip-emb --quiet", "/proc/unclip-emb"),
    ("embed --data {pairs} --clip {clip} --out {out} --shard-size 0", "--shard-size"),
    ("embed --data {pairs} --clip {clip} --out {out} --dtype int8", "int8"),
    # eval prior
    ("eval prior --model {clip} --data {pairs} --quiet", "missing prior component"),
    ("eval prior --model {model} --data {empty} --quiet", "no image-caption pairs"),
    ("eval prior --model {model} --data {pairs} --guidance nan --quiet", "finite"),
    ("eval prior --model {model} --data {pairs} --steps 0 --quiet", "--steps"),
    ("eval prior --model {model} --data {pairs} --sampler magic --quiet", "magic"),
    ("eval prior --model {model} --data {pairs} --steps 1 --out {afile}/r.json --quiet", "Not a directory"),
    # data shapes / emoji / shards
    ("data shapes --out {afile} --n 4", "is a file"),
    ("data shapes --out {out} --n 0", "--n"),
    ("data shapes --out {out} --n 4 --test-fraction nan", "finite"),
    ("data shapes --out {out} --n 4 --held-out pink-hexagon", "unknown colour-shape pairs"),
    ("data shapes --out {out} --n 4 --held-out nonsense", "COLOR-SHAPE"),
    ("data shapes --out /proc/unclip-shapes --n 4", "/proc/unclip-shapes"),
    ("data emoji --out {out} --from-tarball {w}/file.txt", "not a readable tarball"),
    ("data emoji --out {out} --from-tarball {w}/evil.tgz", "unsafe tar member"),
    ("data emoji --out {out} --from-tarball {w}/missing.tgz", "does not exist"),
    ("data emoji --out {out} --styles apple --from-tarball {w}/evil.tgz", "unknown emoji styles"),
    ("data shards --data {empty} --out {out}", "no image-caption pairs"),
    ("data shards --data {pairs} --out {afile}", "is a file"),
    ("data shards --data {pairs} --out /proc/unclip-shards", "/proc/unclip-shards"),
    ("data shards --data {pairs} --out {out} --shard-size 0", "--shard-size"),
    ("data shards --data {pairs} --out {shards}", "already holds .tar shards"),
    # train recipe
    ("train recipe {w}/recipe_unknown_section.json --out {out}", "unknown recipe sections ['bogus']"),
    ("train recipe {w}/recipe_wrong_type.json --out {out}", "'steps': expected int"),
    ("train recipe {w}/recipe_unknown_key.json --out {out}", "unknown keys ['stepz']"),
    ("train recipe {w}/recipe_decoder_field.json --out {out}", "warp_factor"),
    ("train recipe {w}/recipe_list.json --out {out}", "a recipe is a JSON object"),
    ("train recipe {w}/recipe_corrupt.json --out {out}", "corrupt JSON"),
    ("train recipe {w}/missing.json --out {out}", "does not exist"),
]


def expand(row: str, world: dict) -> list[str]:
    args = [a.format(**world) for a in shlex.split(row)]
    if args[0] in ("generate", "vary", "interpolate", "edit"):
        args = args[:1] + world["fast"].split() + args[1:]
    return args


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("bad-inputs")
    return build_world(root, tiny_model_dir)


@pytest.mark.parametrize("row,message", BAD, ids=[f"{i:03d}-" + r.split(" --")[0][:40] for i, (r, _) in enumerate(BAD)])
def test_bad_input_gives_one_line_and_writes_nothing(row, message, world):
    root = world["clip"].parent
    before = snapshot(root)
    result = run(*expand(row, world))
    assert result.exit_code != 0, result.output
    lines = error_lines(result)
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and all(line.startswith(("Error:", "Warning:")) for line in lines), result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert snapshot(root) == before  # no partial output, no temp files, no run folders


# ---------------------------------------------------------------- pictures in every mode are accepted


def _picture(mode: str, path: Path) -> Path:
    if mode == "I;16":
        Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16)).save(path)
    elif mode == "P+transparency":
        image = Image.new("P", (24, 24), 0)
        image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
        image.save(path, transparency=0)
    elif mode == "CMYK":
        path = path.with_suffix(".jpg")
        Image.new("CMYK", (24, 24), (0, 100, 100, 0)).save(path)
    else:
        Image.new("RGB", (24, 24), (200, 30, 30)).convert(mode).save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "I;16", "1", "CMYK"])
def test_vary_edit_interpolate_accept_every_image_mode(mode, tiny_model_dir, tmp_path):
    picture = _picture(mode, tmp_path / "in.png")
    fast = FAST.split() + ["--model", tiny_model_dir]
    results = {
        "vary": run("vary", picture, *fast, "-o", tmp_path / "vary.png"),
        "edit": run("edit", picture, "--from", "a red circle", "--to", "a blue circle", *fast,
                    "-o", tmp_path / "edit.png"),
        "interpolate": run("interpolate", picture, "a blue square", "--frames", 2, *fast,
                           "-o", tmp_path / "interpolate.png"),
    }
    for name, result in results.items():
        assert result.exit_code == 0, (name, result.output)
        with Image.open(tmp_path / f"{name}.png") as out:
            assert out.mode == "RGB"


# ---------------------------------------------------------------- --debug, warnings, prompts


def test_debug_shows_the_traceback_and_plain_runs_do_not(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cli", "info", str(tmp_path / "nope")]
    plain = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert plain.returncode == 1 and plain.stderr.strip().splitlines() == [
        f"Error: no model folder '{tmp_path / 'nope'}' (bundled models: "
        + plain.stderr.split("(bundled models: ")[1].strip()]
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True, cwd=ROOT, env=env)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "ValueError: no model folder" in debug.stderr


def test_over_long_prompt_warns_on_one_line_and_is_truncated(tiny_model_dir, tmp_path):
    prompt = " ".join(["a red circle"] * 8)  # 24 words > 16 tokens of context
    result = run("generate", prompt, *FAST.split(), "--model", tiny_model_dir, "-o", tmp_path / "long.png")
    assert result.exit_code == 0, result.output
    warnings = error_lines(result)
    assert len(warnings) == 1 and warnings[0].startswith("Warning: prompt is longer than the text context")
    assert "truncated" in warnings[0]


def test_control_characters_and_other_scripts_are_accepted(tiny_model_dir, tmp_path, tiny_clip):
    for i, prompt in enumerate(["a red\x00circle\x07\tleft", "赤い円 круг 🍎 دائرة"]):
        result = run("generate", prompt, *FAST.split(), "--model", tiny_model_dir, "-o", tmp_path / f"{i}.png")
        assert result.exit_code == 0, result.output
    tokenizer = tiny_clip.tokenizer
    ids = tiny_clip.tokenize(["круг 円 zebra"])[0].tolist()
    body = ids[1:ids.index(tokenizer.eot)]
    assert ids[0] == tokenizer.sot and len(body) == 6 and set(body) == {tokenizer.index["<unk>"]}


# ---------------------------------------------------------------- corrupt data met while training


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_corrupt_images_are_skipped_and_counted(stage, tmp_path, tiny_clip):
    tiny_clip.save(tmp_path / "model" / "clip")
    write_pairs(tmp_path / "pairs", n=12, size=32)
    (tmp_path / "pairs" / "00003.png").write_bytes(b"garbage")
    whole = (tmp_path / "pairs" / "00005.png").read_bytes()
    (tmp_path / "pairs" / "00005.png").write_bytes(whole[: len(whole) // 2])
    extra = ["--sample-steps", 1] if stage == "decoder" else []
    result = run("train", stage, "--model", tmp_path / "model", "--data", tmp_path / "pairs", "--steps", 2,
                 "--batch-size", 4, "--heldout", 0, "--warmup", 1, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    assert any("skipping sample 3" in line and "00003.png" in line for line in error_lines(result))
    rows = (tmp_path / "model" / "runs" / stage / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[-1] for r in rows if ",skipped_samples," in r] == ["2"]
    assert (tmp_path / "model" / stage / "model.safetensors").is_file()


def test_corrupt_shard_is_skipped_with_a_warning(tmp_path, tiny_clip):
    from unclip.data.datasets import write_shards

    tiny_clip.save(tmp_path / "model" / "clip")
    write_pairs(tmp_path / "pairs", n=12)
    write_shards(tmp_path / "pairs", tmp_path / "shards", shard_size=6)
    (tmp_path / "shards" / "00001.tar").write_bytes(b"\0corrupt" * 100)
    result = run("train", "prior", "--model", tmp_path / "model", "--data", tmp_path / "shards", "--steps", 1,
                 "--batch-size", 4, "--heldout", 0, "--quiet")
    assert result.exit_code == 0, result.output
    assert any(line.startswith("Warning: skipping the rest of corrupt shard") and "00001.tar" in line
               for line in error_lines(result))
    rows = (tmp_path / "model" / "runs" / "prior" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[-1] for r in rows if ",skipped_samples," in r] == ["1"]


def test_training_on_only_unreadable_images_stops_with_one_line(tmp_path):
    write_pairs(tmp_path / "pairs", n=12)
    for png in (tmp_path / "pairs").glob("*.png"):
        png.write_bytes(b"garbage")
    result = run("train", "clip", "--data", tmp_path / "pairs", "--out", tmp_path / "model", "--steps", 2,
                 "--batch-size", 4, "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert error_lines(result) == ["Error: 24 training samples in a row could not be read (corrupt images?); "
                                   "check the data"]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, tiny_clip):
    tiny_clip.save(tmp_path / "model" / "clip")
    write_pairs(tmp_path / "pairs")
    result = run("train", "prior", "--model", tmp_path / "model", "--data", tmp_path / "pairs", "--steps", 6,
                 "--batch-size", 4, "--heldout", 0, "--lr", "1e30", "--warmup", 0, "--grad-clip", 0,
                 "--checkpoint-every", 1, "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (error,) = error_lines(result)
    assert re.match(r"Error: the loss became (nan|inf) at step \d; the last good checkpoint is .*step-0000000\d ", error)
    kept = error.split("the last good checkpoint is ")[1].split(" ")[0]
    assert (Path(kept) / "training_state.pt").is_file() and (tmp_path / "model" / "prior").is_dir()


# ---------------------------------------------------------------- safety


UNSAFE = [(r"torch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True"),
          (r"\b(pickle|dill|joblib|marshal)\.|\b(import|from) (pickle|dill|joblib|marshal)\b", "pickle-style loading"),
          (r"(?<![\w.])(eval|exec)\(", "eval/exec"), (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
          (r"yaml\.load\(|yaml\.unsafe_load", "YAML loading"), (r"\.extractall\(", "tar extraction")]


def test_no_unsafe_loading_in_the_source():
    files = [ROOT / "cli.py", *[p for d in ("unclip", "prior", "decoder") for p in (ROOT / d).rglob("*.py")]]
    found = [f"{path.relative_to(ROOT)}:{n}: {why}" for path in files
             for n, line in enumerate(path.read_text().splitlines(), 1) for pattern, why in UNSAFE
             if re.search(pattern, line.split("#")[0])]
    assert not found, found


def test_reading_shards_extracts_nothing_to_disk(tmp_path, monkeypatch):
    """Member names that climb out of the folder only become sample keys: nothing is written anywhere."""
    from unclip.data.datasets import ShardDataset

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in (("../../escape.png", buffer.getvalue()), ("../../escape.txt", b"a red square"),
                           ("/abs/evil.txt", b"x")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    monkeypatch.chdir(shard.parent)
    before = snapshot(tmp_path)
    with pytest.warns(UserWarning):
        items = list(ShardDataset([str(shard)], image_size=8))
    assert [item["caption"] for item in items] == ["a red square"]
    assert snapshot(tmp_path) == before and not (tmp_path.parent / "escape.png").exists()


def test_no_network_unless_a_hub_id_is_asked_for(tiny_model_dir, tmp_path, monkeypatch):
    from unclip import hub

    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hub, "_download", refuse)
    result = run("generate", "a red circle", *FAST.split(), "--model", tiny_model_dir, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert run("info", tiny_model_dir).exit_code == 0
    assert run("info", tmp_path / "nope").exit_code == 1  # a path that looks local is never looked up online
    with pytest.raises(AssertionError, match="network"):
        hub.resolve_model("some-org/some-model")


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++sde"])
def test_stochastic_samplers_are_seeded_per_image(sampler):
    pipe = make_tiny_pipeline()
    settings = dict(prior_sampler=sampler, decoder_sampler=sampler, upsampler_sampler=sampler, prior_steps=3,
                    decoder_steps=3, upsampler_steps=3, aug_level=0.1)
    pixels = lambda out: np.stack([np.asarray(i) for i in out.images]).astype(int)  # noqa: E731
    pair = pipe.generate(["a red circle", "two blue squares"], seed=3, **settings)
    again = pipe.generate(["a red circle", "two blue squares"], seed=3, **settings)
    alone = pipe.generate("two blue squares", seed=4, **settings)  # image i of a batch uses seed + i
    assert np.array_equal(pixels(pair), pixels(again))
    assert np.abs(pixels(alone)[0] - pixels(pair)[1]).max() <= 1


# ---------------------------------------------------------------- docs/RELIABILITY.md's table


def markdown_table(world: dict) -> str:
    """Run every row of BAD and list what it prints, with the temporary paths replaced by placeholders."""
    root = str(world["clip"].parent)
    lines = ["| input | prints |", "|---|---|"]
    for row, _ in BAD:
        result = run(*expand(row, world))
        error = next(line for line in error_lines(result) if line.startswith("Error:"))
        error = error.replace(str(world["model"]), "{model}").replace(root + "/w", "{w}").replace(root, "{root}")
        cells = ["`` " + text.replace("|", "\\|") + " ``" for text in ("unclip " + row.replace(" " + TRAIN, " …"), error)]
        lines.append(f"| {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_pipeline().save_pretrained(Path(tmp) / "model")
        print(markdown_table(build_world(Path(tmp) / "world", Path(tmp) / "model")))
