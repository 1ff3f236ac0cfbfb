"""The model recipe (data -> CLIP -> embeddings -> prior -> decoder -> upsampler -> export) and the report."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from unclip.eval.report import markdown, update_markdown
from unclip.recipe import describe_stages, load_recipe

TINY_TRAIN = {"steps": 2, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1}
RECIPE = {
    "name": "tiny",
    "threads": 1,
    "data": {"builder": "shapes", "n": 80, "seed": 0},
    "clip": {"preset": "tiny-32", "heldout": 0.1, "negative_swaps": [["left", "right"]], "train": TINY_TRAIN,
             "finetune": {"train": {**TINY_TRAIN, "lr_schedule": "cosine"}, "negative_reorders": ["to the left of"]},
             "judge": {"train": TINY_TRAIN, "negative_exchanges": [["red", "green", "blue"]]},
             "verifier": {"train": TINY_TRAIN, "config": {"width": 16, "depth": 1, "heads": 2},
                          "classes": [["two", "three"]], "oversample": [[" above ", 2]],
                          "finetune": {"train": TINY_TRAIN, "config": {"parser": 8}}}},
    "embeddings": {},
    "prior": {"preset": "tiny", "train": TINY_TRAIN},
    "decoder": {"preset": "tiny", "config": {"block_out_channels": [32, 32], "attention_levels": [False, True],
                                            "layers_per_block": 1}, "train": TINY_TRAIN,
                "finetune": [{**TINY_TRAIN, "lr_schedule": "cosine", "seed": 1},
                             {**TINY_TRAIN, "oversample": [[" (to the left of|to the right of|above|below) ", 3]]}]},
    "upsampler": {"size": 64, "preset": "tiny-64", "config": {"block_out_channels": [32, 32],
                                                              "attention_levels": [False, False]},
                  "train": TINY_TRAIN},
    "export": {"sampling": {"image_candidates": 2, "rerank_twins": {"exchanges": [["red", "green", "blue"]]}}},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(the recipe's path, its folder) after `unclip train recipe` ran it once."""
    tmp_path = tmp_path_factory.mktemp("recipe")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(RECIPE))
    result = CliRunner().invoke(cli.main, ["train", "recipe", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return path, tmp_path / "run"


def test_recipe_runs_every_stage_resumes_and_reports(tiny_run, tmp_path):
    path, run = tiny_run
    runner = CliRunner()
    stages = [s["stage"] for s in describe_stages(run)]
    assert stages == ["data", "clip", "embeddings", "prior", "decoder", "upsampler", "export"]
    export = run / "export"
    index = json.loads((export / "model_index.json").read_text())
    assert index["components"] == {"clip": "clip", "judge": "clip", "prior": "prior", "decoder": "decoder",
                                   "upsampler_64": "upsampler", "verifier": "verifier"}
    # the recipe's sampling defaults travel with the model
    assert index["sampling"] == {"image_candidates": 2, "rerank_twins": {"exchanges": [["red", "green", "blue"]]}}
    finetune = json.loads((run / "runs" / "decoder-finetune" / "train_config.json").read_text())
    assert finetune["init_from"] == str(run / "model" / "decoder") and finetune["train"]["lr_schedule"] == "cosine"
    assert (run / "runs" / "decoder-finetune" / "checkpoints").is_dir()
    second = json.loads((run / "runs" / "decoder-finetune-2" / "train_config.json").read_text())
    assert second["init_from"] == str(run / "model" / "decoder") and second["oversample"][0][1] == 3
    assert second["epoch_samples"] == second["train_samples"] + 2 * second["oversample"][0][2]
    clip_info = json.loads((run / "runs" / "clip" / "train_config.json").read_text())
    assert clip_info["negative_swaps"] == [["left", "right"]] and clip_info["negative_reorders"] == []
    clip_finetune = json.loads((run / "runs" / "clip-finetune" / "train_config.json").read_text())
    assert clip_finetune["init_from"] == str(run / "model" / "clip")
    assert clip_finetune["negative_swaps"] == [["left", "right"]]  # the section's, kept
    assert clip_finetune["negative_reorders"] == ["to the left of"] and clip_finetune["train"]["lr_schedule"] == "cosine"
    judge = json.loads((run / "runs" / "clip-judge" / "train_config.json").read_text())
    assert judge["init_from"] == str(run / "model" / "clip") and judge["component"] == "judge"
    assert judge["negative_exchanges"] == [["red", "green", "blue"]]
    assert judge["negative_reorders"] == ["to the left of"]  # the finetune phase's, kept
    verifier = json.loads((run / "runs" / "verifier" / "train_config.json").read_text())
    assert verifier["judge"] == str(run / "model" / "judge") and verifier["classes"] == [["two", "three"]]
    assert verifier["rules"] == {"exchanges": [["red", "green", "blue"]]}  # the export's rerank_twins
    assert verifier["oversample"][0][:2] == [" above ", 2]
    finetune = json.loads((run / "runs" / "verifier-finetune" / "train_config.json").read_text())
    assert finetune["init_from"] == str(run / "model" / "verifier") and finetune["verifier"]["parser"] == 8
    assert finetune["verifier"]["width"] == 16 and finetune["oversample"][0][:2] == [" above ", 2]  # kept
    assert json.loads((run / "model" / "verifier" / "config.json").read_text())["parser"] == 8
    again = runner.invoke(cli.main, ["train", "recipe", str(path), "--out", str(run), "--quiet"])
    assert again.exit_code == 0 and " ..." not in again.output  # every stage is done: nothing re-runs

    report_md = tmp_path / "MODELS.md"
    result = runner.invoke(cli.main, ["eval", "model", "--model", str(export), "--data",
                                      str(run / "data" / "test"), "--train-data",
                                      str(run / "data" / "train"), "--n", "4", "--markdown",
                                      str(report_md), "--name", "tiny", "--grid", str(tmp_path / "grid.png"),
                                      "--prior-twin-guidance", "0.5", "--fresh", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["settings"] == {"prior_twin_guidance": 0.5}
    assert set(report["shapes"]) >= {"overall", "single", "placed", "relation", "count", "held_out"}
    assert 0 <= report["images"]["r_precision"]["top1"] <= 1 and report["images"]["fd_generated"] >= 0
    fresh = report["shapes_fresh"]  # 5 captions drawn afresh: kinds in turn, every second with a held-out pair
    assert fresh["n"]["overall"] == 5 and fresh["n"]["held_out"] >= 3 and 0 <= fresh["unlisted"] <= 5
    assert 0 <= fresh["overall"] <= 1
    text = report_md.read_text()
    assert "## tiny" in text and "drawn afresh" in text and (tmp_path / "grid.png").is_file()
    plain = tmp_path / "plain"  # not shapes data: no split.json beside it
    plain.mkdir()
    for item in sorted((run / "data" / "test").glob("0000[0-3].*")):
        (plain / item.name).write_bytes(item.read_bytes())
    refused = runner.invoke(cli.main, ["eval", "model", "--model", str(export), "--data", str(plain), "--train-data",
                                       str(plain), "--n", "2", "--fresh", "2"])
    assert refused.exit_code != 0 and "shapes grammar" in refused.output


def test_decoder_ablation_trains_and_scores_each_arm(tiny_run, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from ablate_decoder import main as ablate

    path, run = tiny_run
    arms = ["drop0.5:text_drop_prob=0.5", "transformer:text_encoder=transformer,text_drop_prob=0.2"]
    ablate(["--recipe", str(path), "--run", str(run), "--steps", "2", "--n", "6", "--threads", "1",
            *[a for arm in arms for a in ("--arm", arm)]])
    table = capsys.readouterr().out
    for name, overrides in [("drop0.5", {"text_drop_prob": 0.5}),
                            ("transformer", {"text_encoder": "transformer", "text_drop_prob": 0.2})]:
        arm = run / "ablation" / name
        assert json.loads((arm / "runs" / "decoder" / "train_config.json").read_text())["decoder"].items() \
            >= overrides.items()
        score = json.loads((arm / "score.json").read_text())
        assert score["overrides"] == overrides and 0 <= score["relation"] <= 1 and score["fd_clip"] >= 0
        assert f"| {name} | " in table
    with pytest.raises(SystemExit, match="no field 'text_dropp'"):
        ablate(["--recipe", str(path), "--run", str(run), "--steps", "2", "--arm", "x:text_dropp=0.5"])


def test_rerank_study_reads_every_judge_against_the_ceiling(tiny_run, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from rerank_study import main as study

    path, run = tiny_run
    out = tmp_path / "study.json"
    for own in ([], ["--own-priors"]):
        study(["--model", str(run / "export"), "--data", str(run / "data" / "test"), "--relations", "2", "--counts",
               "2", "--samples", "4", "--k", "2", "--json", str(out), *own])
        table = json.loads(out.read_text())["table"]
        for kind in ("relation", "count"):  # the export has a judge (the recipe's clip.judge phase) and twin rules
            assert set(table[kind]) == {"random", "ceiling", "image", "text", "both", "judge text", "judge both",
                                        "text+twins", "both+twins", "judge text+twins", "judge both+twins"}
            ceiling, n = table[kind]["ceiling"]
            assert n == 4 and all(acc <= ceiling for acc, _ in table[kind].values())  # no judge beats any-right
        # relations also split by whether the caption names a held-out colour-shape pair (the data's split.json)
        parts = [table[f"relation, {part}"] for part in ("held-out pair", "seen pairs")]
        assert sum(part["random"][1] for part in parts if part) == table["relation"]["random"][1]


def test_candidate_study_reads_the_pick_against_the_candidates(tiny_run, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from candidate_study import main as study

    path, run = tiny_run
    common = ["--model", str(run / "export"), "--split", str(run / "data" / "split.json"), "--relations", "4",
              "--counts", "2", "--seed", "3"]
    plain = study([*common, "--settings", '{"rerank_paraphrase": {}}', "--json", str(tmp_path / "a.json")])
    told = study([*common, "--settings", '{"rerank_paraphrase": {"above": "below", "below": "above"}}'])
    groups = ("relation, held-out pair", "relation, seen pairs", "count")
    assert sum(plain[g]["captions"] for g in groups) == 6 and plain["relation"]["captions"] == 4
    for g in groups:
        if plain[g]["captions"]:
            assert 0 <= plain[g]["per sample"] <= plain[g]["ceiling"] <= 1 and plain[g]["pick"] <= plain[g]["ceiling"]
            # ranking settings leave the candidates alone: the same draws, the same verdicts
            assert (told[g]["per sample"], told[g]["ceiling"]) == (plain[g]["per sample"], plain[g]["ceiling"])
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert len(rows) == 6 and all(len(r["ok"]) == 2 and 0 <= r["pick"] < 2 for r in rows)


def test_recipe_validation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "decoderr": {}}))
    with pytest.raises(ValueError, match="unknown recipe sections"):
        load_recipe(bad)
    bad.write_text(json.dumps({"name": "x", "clip": {"train": {"stepz": 3}}}))
    with pytest.raises(ValueError, match="unknown config keys"):
        load_recipe(bad)
    bad.write_text(json.dumps({"name": "x", "clip": {"finetune": {"steps": 3}}}))
    with pytest.raises(ValueError, match='own "train" settings'):
        load_recipe(bad)
    bad.write_text(json.dumps({"name": "x", "clip": {"finetune": {"train": {}, "negative_reorder": ["above"]}}}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_recipe(bad)
    bad.write_text(json.dumps({"name": "x", "clip": {"judge": {"negative_exchanges": [["red", "green"]]}}}))
    with pytest.raises(ValueError, match='"judge" must be an object with its own "train" settings'):
        load_recipe(bad)
    for decoder, message in [({"finetune": [{"steps": 2, "oversample": [["(", 2]]}]}, "not a regular expression"),
                             ({"oversample": [["above", 0]]}, "whole number"),
                             ({"finetune": [{"stepz": 2}]}, "unknown config keys"),
                             ({"finetune": "long"}, "list of them")]:
        bad.write_text(json.dumps({"name": "x", "decoder": decoder}))
        with pytest.raises(ValueError, match=message):
            load_recipe(bad)
    for verifier, message in [({"classes": []}, 'own "train" settings'),
                              ({"train": {}, "clases": []}, "unknown keys"),
                              ({"train": {}, "classes": [["red"]]}, "two or more different words"),
                              ({"train": {}, "config": {"widht": 8}}, "unknown config keys"),
                              ({"train": {}, "oversample": [["above", 0]]}, "whole number"),
                              ({"train": {}, "finetune": {"config": {}}}, '"finetune" must be an object'),
                              ({"train": {}, "finetune": {"train": {}, "config": {"parsr": 8}}}, "unknown config"),
                              ({"train": {}, "finetune": {"train": {}, "seed": 1}}, "unknown keys")]:
        bad.write_text(json.dumps({"name": "x", "clip": {"verifier": verifier}}))
        with pytest.raises(ValueError, match=message):
            load_recipe(bad)
    bad.write_text(json.dumps({"name": "x", "export": {"sampling": {"image_candidatez": 4}}}))
    with pytest.raises(ValueError, match="unknown sampling settings"):
        load_recipe(bad)


def test_markdown_sections_are_replaced(tmp_path):
    path = tmp_path / "M.md"
    update_markdown(path, "a", "## a\n\nfirst\n")
    update_markdown(path, "b", "## b\n\nother\n")
    update_markdown(path, "a", "## a\n\nsecond\n")
    text = path.read_text()
    assert "second" in text and "first" not in text and text.index("## b") < text.index("## a")
