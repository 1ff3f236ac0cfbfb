"""Data: shapes world builder, folder and shard datasets, emoji builder, `unclip data` commands."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from unclip.data import (DEFAULT_HELD_OUT, KINDS, PALETTE, ImageTextFolder, Scene, ShapeObject, ShardDataset,
                         build_emoji, build_shapes, open_dataset, parse_caption, render_scene, sample_scene,
                         write_shards)
from unclip.data.emoji import read_package
from unclip.data.shapes import (ALL_PAIRS, PLACE_MARGIN, RELATION_MIN, RELATIONS, _overlaps, fresh_captions,
                                scene_pairs)

# ---------------------------------------------------------------- shapes world


def test_captions_parse_back_to_the_scene():
    rng = np.random.default_rng(0)
    for kind in KINDS:
        for _ in range(25):
            scene = sample_scene(rng, kind)
            req = parse_caption(scene.caption)
            assert req.kind == kind
            assert req.pairs == scene_pairs(scene)
            if kind == "count":
                assert req.count == len(scene.objects)
            if kind in ("placed", "relation"):
                assert req.position == scene.position


def test_scene_geometry_follows_the_rules():
    rng = np.random.default_rng(1)
    for kind in KINDS:
        for _ in range(100):
            scene = sample_scene(rng, kind)
            objs = scene.objects
            assert all(0 <= v <= 64 for o in objs for v in o.bbox)
            assert not any(_overlaps(a, b) for i, a in enumerate(objs) for b in objs[i + 1:])
            if kind == "placed":
                axis_value = objs[0].cx if scene.position in ("left", "right") else objs[0].cy
                assert abs(axis_value - 32) >= PLACE_MARGIN
                assert (axis_value < 32) == (scene.position in ("left", "top"))
            if kind == "relation":
                axis, sign = RELATIONS[scene.position]
                a, b = (objs[0].cx, objs[0].cy), (objs[1].cx, objs[1].cy)
                along = sign * (a[axis] - b[axis])
                assert along >= RELATION_MIN and abs(a[1 - axis] - b[1 - axis]) <= along / 2
            if kind == "count":
                assert len(objs) in (2, 3) and len(scene_pairs(scene)) == 1


def test_render_uses_only_palette_colours():
    objects = [ShapeObject("red", "circle", "large", 16, 32), ShapeObject("green", "triangle", "small", 48, 32)]
    scene = Scene("relation", objects, "to the left of")
    pixels = np.asarray(render_scene(scene)).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    assert colours == {(255, 255, 255), PALETTE["red"], PALETTE["green"]}
    assert scene.caption == "a red circle to the left of a green triangle"


def test_sample_scene_respects_allowed_pairs():
    rng = np.random.default_rng(2)
    allowed = [p for p in ALL_PAIRS if p not in DEFAULT_HELD_OUT]
    for i in range(200):
        assert not scene_pairs(sample_scene(rng, KINDS[i % 4], allowed)) & set(DEFAULT_HELD_OUT)
    with pytest.raises(ValueError, match="unknown scene kind"):
        sample_scene(rng, "crowd")
    with pytest.raises(ValueError, match="unknown colour-shape"):
        sample_scene(rng, "single", [("pink", "circle")])


@pytest.mark.parametrize("text", ["", "a red hexagon", "four red circles", "a red circle next to a blue square",
                                  "a huge red circle", "two red circle"])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="grammar"):
        parse_caption(text)


def test_parse_caption_accepts_unlisted_prompts():
    req = parse_caption("  An Orange circle   ABOVE a purple triangle. ")
    assert req.kind == "relation" and req.position == "above"
    assert req.objects == (("orange", "circle", None), ("purple", "triangle", None))


def test_build_shapes_round_trip_and_split(tmp_path):
    info = build_shapes(tmp_path / "s", 40, seed=3, test_fraction=0.25, progress=False)
    assert info["counts"]["train"]["total"] == 30 and info["counts"]["test"]["total"] == 10
    assert info["counts"]["test"]["held_out"] == 5
    assert json.loads((tmp_path / "s" / "split.json").read_text())["seed"] == 3
    held = set(DEFAULT_HELD_OUT)
    for split in ("train", "test"):
        ds = ImageTextFolder(tmp_path / "s" / split)
        metas = [ds.metadata(i) for i in range(len(ds))]
        assert ds.captions == [m["caption"] for m in metas]
        uses_held = [bool(scene_pairs(Scene.from_dict(m)) & held) for m in metas]
        assert (not any(uses_held)) if split == "train" else sum(uses_held) == 5
        item = ds[0]
        assert item["image"].shape == (3, 64, 64) and item["key"] == "00000"
        assert torch.allclose(item["image"], torch.from_numpy(
            np.array(render_scene(Scene.from_dict(metas[0])))).permute(2, 0, 1).float() / 127.5 - 1)
    again = build_shapes(tmp_path / "t", 40, seed=3, test_fraction=0.25, progress=False)
    assert again == info
    for name in ("00007.txt", "00007.json", "00007.png"):
        assert (tmp_path / "s/train" / name).read_bytes() == (tmp_path / "t/train" / name).read_bytes()
    with pytest.raises(ValueError, match="already holds files"):
        build_shapes(tmp_path / "s", 4, seed=0, progress=False)


def test_fresh_captions_are_drawn_like_the_test_split_from_their_own_stream(tmp_path):
    build_shapes(tmp_path / "s", 40, seed=3, test_fraction=0.5, progress=False)
    test = ImageTextFolder(tmp_path / "s" / "test").captions
    drawn = fresh_captions(20, seed=3)
    assert drawn == fresh_captions(20, seed=3) and drawn != fresh_captions(20, seed=4)
    assert drawn != test  # same seed, another stream than the test split's
    requests = [parse_caption(c) for c in drawn]  # every one inside the grammar
    assert [r.kind for r in requests] == [KINDS[(i // 2) % len(KINDS)] for i in range(20)]  # in turn, as the split
    assert all(bool(r.pairs & set(DEFAULT_HELD_OUT)) for r in requests[::2])  # every second names a held-out pair
    own = fresh_captions(6, 0, [("red", "square")])
    assert all(parse_caption(c).pairs & {("red", "square")} for c in own[::2])
    with pytest.raises(ValueError, match="colour"):
        fresh_captions(4, 0, [("pink", "circle")])


# ---------------------------------------------------------------- folder dataset

def _pair(folder, key, caption="a red circle", ext="png", size=8):
    Image.new("RGB", (size, size), (200, 10, 10)).save(folder / f"{key}.{ext}")
    if caption is not None:
        (folder / f"{key}.txt").write_text(caption)


def test_image_text_folder_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ImageTextFolder(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="files' layout"):
        ImageTextFolder(tmp_path)


def test_image_text_folder_skips_uncaptioned_and_names_corrupt_files(tmp_path):
    _pair(tmp_path, "00000")
    _pair(tmp_path, "00001", caption=None)
    _pair(tmp_path, "00002", caption="a blue square", ext="jpg", size=12)
    (tmp_path / "00003.png").write_bytes(b"not a png")
    (tmp_path / "00003.txt").write_text("broken")
    ds = ImageTextFolder(tmp_path, image_size=4)
    assert ds.keys == ["00000", "00002", "00003"] and ds.skipped_missing_caption == 1
    assert ds.captions == ["a red circle", "a blue square", "broken"]
    assert ds[1]["image"].shape == (3, 4, 4) and ds[1]["image"].min() >= -1
    with pytest.raises(ValueError, match="00003.png"):
        ds[2]


# ---------------------------------------------------------------- shards

@pytest.fixture
def folder_of_pairs(tmp_path):
    root = tmp_path / "pairs"
    root.mkdir()
    for i in range(7):
        _pair(root, f"{i:05d}", caption=f"caption {i}")
    (root / "00003.json").write_text('{"k": 3}')
    return root


def test_write_shards_then_shard_dataset_yields_each_sample_once(folder_of_pairs, tmp_path):
    paths = write_shards(folder_of_pairs, tmp_path / "shards", shard_size=3)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(paths[1]) as tar:
        assert sorted(tar.getnames()) == ["00003.json", "00003.png", "00003.txt", "00004.png", "00004.txt",
                                          "00005.png", "00005.txt"]
    items = list(ShardDataset(paths, image_size=4))
    assert sorted(x["key"] for x in items) == [f"{i:05d}" for i in range(7)]
    assert {x["caption"] for x in items} == {f"caption {i}" for i in range(7)}
    assert items[0]["image"].shape == (3, 4, 4)
    loader = torch.utils.data.DataLoader(ShardDataset(paths, 4), batch_size=None, num_workers=2)
    assert sorted(x["key"] for x in loader) == [f"{i:05d}" for i in range(7)]
    with pytest.raises(ValueError, match="already holds"):
        write_shards(folder_of_pairs, tmp_path / "shards")


def test_shard_dataset_skips_and_counts_corrupt_samples(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.png", _png_bytes()), ("a.txt", b"good"), ("b.png", b"junk"), ("b.txt", b"bad"),
                           ("c.png", _png_bytes())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = ShardDataset(str(path))
    with pytest.warns(UserWarning, match="skipping bad sample"):
        items = list(ds)
    assert [x["key"] for x in items] == ["a"] and ds.skipped == 2


def test_open_dataset_dispatches_on_path(folder_of_pairs, tmp_path):
    write_shards(folder_of_pairs, tmp_path / "shards", shard_size=4)
    assert isinstance(open_dataset(folder_of_pairs), ImageTextFolder)
    assert isinstance(open_dataset(tmp_path / "shards"), ShardDataset)
    single = open_dataset(tmp_path / "shards" / "00001.tar")
    assert [x["key"] for x in single] == ["00004", "00005", "00006"]
    pattern = open_dataset(str(tmp_path / "shards" / "{00000..00001}.tar"))
    assert len(list(pattern)) == 7
    assert isinstance(open_dataset("pipe:cat x.tar"), ShardDataset)
    with pytest.raises(ValueError, match="not found"):
        open_dataset(str(tmp_path / "shards" / "{00000..00005}.tar"))
    with pytest.raises(ValueError, match="not found"):
        open_dataset(tmp_path / "nothing")


# ---------------------------------------------------------------- emoji

def _png_bytes(colour=(255, 0, 0, 128), size=64):
    buffer = io.BytesIO()
    Image.new("RGBA", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar, name, data=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


EMOJI_JSON = [
    {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "short_names": ["apple"],
     "category": "Food & Drink", "subcategory": "food-fruit", "sort_order": 2, "has_img_google": True,
     "has_img_twitter": True},
    {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "short_names": ["grinning"],
     "category": "Smileys & Emotion", "subcategory": "face-smiling", "sort_order": 1, "has_img_google": True,
     "has_img_twitter": False,
     "skin_variations": {"1F3FB": {"unified": "1F600-1F3FB", "image": "1f600-1f3fb.png", "has_img_google": True}}},
    {"name": "EMOJI MODIFIER FITZPATRICK TYPE-3", "unified": "1F3FC", "image": "1f3fc.png",
     "short_names": ["skin-tone-3"], "category": "Component", "subcategory": "skin-tone", "sort_order": 3,
     "has_img_google": True},
]


def _fake_tarball(path, style="google", extra=()):
    with tarfile.open(path, "w:gz") as tar:
        meta = {"name": f"emoji-datasource-{style}", "version": "9.9.9"}
        _add(tar, "package/package.json", json.dumps(meta).encode())
        _add(tar, "package/emoji.json", json.dumps(EMOJI_JSON).encode())
        _add(tar, "package/LICENSE", b"The MIT License (MIT)\n")
        for name in ("1f34e.png", "1f600.png", "1f600-1f3fb.png", "1f3fc.png"):
            _add(tar, f"package/img/{style}/64/{name}", _png_bytes())
        _add(tar, f"package/img/{style}/32/1f34e.png", _png_bytes(size=32))
        for args in extra:
            _add(tar, *args)
    return path


def test_build_emoji_from_fake_tarballs(tmp_path):
    tarballs = [_fake_tarball(tmp_path / "g.tgz", "google"), _fake_tarball(tmp_path / "t.tgz", "twitter")]
    info = build_emoji(tmp_path / "out", tarballs=tarballs, progress=False)
    assert info["counts"]["google"]["images"] == 2 and info["counts"]["twitter"]["images"] == 1
    assert info["packages"]["google"]["version"] == "9.9.9" and info["skipped"]["google"]["component"] == 1
    ds = ImageTextFolder(tmp_path / "out")
    assert ds.captions == ["grinning face", "red apple", "red apple"]
    meta = ds.metadata(1)
    assert meta["style"] == "google" and meta["unicode"] == "\U0001F34E" and meta["category"] == "Food & Drink"
    assert "red apple, food & drink" in meta["alt_captions"]
    pixel = np.asarray(Image.open(tmp_path / "out" / "00000.png"))[0, 0]
    assert np.abs(pixel.astype(int) - [255, 128, 128]).max() <= 1  # half-transparent red composited onto white
    assert sorted(p.name for p in (tmp_path / "out" / "licenses").iterdir()) == [
        "emoji-datasource-google.LICENSE", "emoji-datasource-twitter.LICENSE"]
    assert json.loads((tmp_path / "out" / "info.json").read_text())["total"] == 3
    with pytest.raises(ValueError, match="not empty"):
        build_emoji(tmp_path / "out", tarballs=tarballs)
    with pytest.raises(ValueError, match="img/twitter"):
        build_emoji(tmp_path / "other", styles=["twitter"], tarballs=tarballs[:1])


@pytest.mark.parametrize("extra, reason", [
    (("package/../../evil", b"x"), "escapes"),
    (("/etc/evil", b"x"), "absolute"),
    (("package/link", b"", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (("package/hard", b"", tarfile.LNKTYPE, "package/LICENSE"), "link"),
])
def test_unsafe_tarballs_are_refused(tmp_path, extra, reason):
    path = _fake_tarball(tmp_path / "evil.tgz", extra=[extra])
    with pytest.raises(ValueError, match=reason):
        read_package(path)
    assert not (tmp_path.parent / "evil").exists()


# ---------------------------------------------------------------- commands

def test_data_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["data", "shapes", "--out", str(tmp_path / "s"), "--n", "8", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 7 train + 1 test scenes" in result.output
    result = runner.invoke(main, ["data", "shapes", "--out", str(tmp_path / "s"), "--n", "0"])
    assert result.exit_code != 0 and "--n" in result.output
    result = runner.invoke(main, ["data", "shapes", "--out", str(tmp_path / "s"), "--n", "4"])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0 and "already holds" in result.output
    result = runner.invoke(main, ["data", "shapes", "--out", str(tmp_path / "h"), "--held-out", "pink-blob"])
    assert result.exit_code == 1 and "pink" in result.output
    result = runner.invoke(main, ["data", "shards", "--data", str(tmp_path / "s" / "train"), "--out",
                                  str(tmp_path / "sh"), "--shard-size", "3"])
    assert result.exit_code == 0 and "wrote 3 shards" in result.output
    tarball = _fake_tarball(tmp_path / "g.tgz")
    result = runner.invoke(main, ["data", "emoji", "--out", str(tmp_path / "e"), "--styles", "google",
                                  "--from-tarball", str(tarball)])
    assert result.exit_code == 0 and "wrote 2 emoji images (google 2)" in result.output
    result = runner.invoke(main, ["data", "emoji", "--out", str(tmp_path / "e2"), "--styles", "apple",
                                  "--from-tarball", str(tarball)])
    assert result.exit_code == 1 and "unknown emoji styles" in result.output
