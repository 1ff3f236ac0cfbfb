"""One resumable command per bundled model: data -> CLIP -> embeddings -> prior -> decoder -> upsampler -> export.

A recipe is a JSON file under configs/. Each stage runs the ordinary training entry point with resume on,
writes `OUT/stages/<stage>.json` (wall time, metrics) when it completes, and is skipped after that, so
`unclip train recipe configs/shapes.json --out runs/shapes` can be killed and re-run at any point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import update_model_index
from .config import config_from_dict, read_json, write_json
from .training import TrainConfig

STAGES = ("data", "clip", "embeddings", "prior", "decoder", "upsampler", "export")
# a clip finetune or judge phase may override them
CLIP_OPTIONS = ("negative_swaps", "mirror_swaps", "negative_reorders", "negative_exchanges")
SECTION_KEYS = {"clip": {"preset", "heldout", *CLIP_OPTIONS, "train", "finetune", "judge", "verifier"}, "embeddings": {"options"},
                "prior": {"preset", "train"},
                "decoder": {"preset", "config", "train", "oversample", "finetune"}, "upsampler": {"size", "preset", "config", "train"},
                "export": {"path", "bundle", "sampling"}}  # the "data" section passes its keys to the builder


def load_recipe(path: str | os.PathLike) -> dict:
    """Read and check a recipe JSON (stage sections must be known; train settings must fit TrainConfig)."""
    recipe = read_json(path)
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a JSON object of stage sections, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(STAGES) - {"name", "threads", "description"})
    if unknown:
        raise ValueError(f"{path}: unknown recipe sections {unknown} (known: {', '.join(STAGES)})")
    bad = [stage for stage in STAGES if stage in recipe and not isinstance(recipe[stage], dict)]
    if bad:
        raise ValueError(f"{path}: recipe sections {bad} must be JSON objects")
    for stage, keys in SECTION_KEYS.items():
        unknown = sorted(set(recipe.get(stage, {})) - keys)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} in section {stage!r} (known: {sorted(keys)})")
    from decoder.config import decoder_preset, upsampler_preset  # local: checked before hours of training
    for stage in ("clip", "prior", "decoder", "upsampler"):
        section = recipe.get(stage)
        try:
            if section is not None:
                config_from_dict(TrainConfig, section.get("train", {}))
                if stage == "decoder":
                    _decoder_phases(section)
                if stage == "clip":
                    for phase in ("finetune", "judge"):
                        if phase in section:
                            _check_clip_phase(section[phase], phase)
                    if "verifier" in section:
                        _check_verifier(section["verifier"])
            if stage == "decoder" and section is not None:
                decoder_preset(section.get("preset", "tiny"), **section.get("config", {}))
            if stage == "upsampler" and section is not None:
                upsampler_preset(section.get("preset", "tiny-64"), **section.get("config", {}))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} ({stage}): {error}") from None
    from .pipeline import sampling_settings
    try:
        sampling_settings(recipe.get("export", {}).get("sampling", {}))
    except ValueError as error:
        raise ValueError(f"{path} (export sampling): {error}") from None
    return recipe


def run_recipe(recipe_path: str | os.PathLike, out: str | os.PathLike, progress: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Run (or continue) every stage of a recipe; returns {stage: record}."""
    recipe, out = load_recipe(recipe_path), Path(out)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    records = {}
    for stage in STAGES:
        done = out / "stages" / f"{stage}.json"
        if stage not in recipe:
            continue
        if not done.is_file():
            log(f"[{recipe.get('name', 'recipe')}] stage {stage} ...")
            # Each stage in its own process, as if run by hand one after another: a fresh accelerate state
            # (its mixed precision is per process) and the memory of the stage before given back.
            code = "import sys; from unclip.recipe import run_stage; run_stage(*sys.argv[1:4], sys.argv[4] == '1')"
            result = subprocess.run([sys.executable, "-c", code, str(recipe_path), str(out), stage,
                                     "1" if progress else "0"])
            if result.returncode != 0:
                raise ValueError(f"recipe stage {stage!r} failed (exit {result.returncode}); fix the cause and run "
                                 "the same command again to continue")
        records[stage] = read_json(done)
        log(f"[{recipe.get('name', 'recipe')}] stage {stage}: {records[stage]['wall_s']:.0f} s")
    return records


def run_stage(recipe_path: str | os.PathLike, out: str | os.PathLike, stage: str, progress: bool = True) -> dict:
    """Run one stage and record its wall time and metrics in OUT/stages/<stage>.json."""
    recipe, out = load_recipe(recipe_path), Path(out)
    if recipe.get("threads"):
        torch.set_num_threads(int(recipe["threads"]))
    runners = {"data": _data, "clip": _clip, "embeddings": _embeddings, "prior": _prior, "decoder": _decoder,
               "upsampler": _upsampler, "export": _export}
    start = time.perf_counter()
    metrics = runners[stage](recipe, out, progress) or {}
    record = {"wall_s": round(time.perf_counter() - start, 1), "metrics": metrics}
    (out / "stages").mkdir(parents=True, exist_ok=True)
    write_json(out / "stages" / f"{stage}.json", record)
    return record


def _train_config(recipe: dict, stage: str) -> TrainConfig:
    return config_from_dict(TrainConfig, recipe[stage].get("train", {}))


def _data_dir(out: Path) -> Path:
    return out / "data"


def _train_data(recipe: dict, out: Path) -> Path:
    section = recipe["data"]
    if section.get("path"):
        return Path(section["path"])
    return _data_dir(out) / "train" if section["builder"] == "shapes" else _data_dir(out)


def _data(recipe: dict, out: Path, progress: bool) -> dict:
    section = dict(recipe["data"])
    if section.get("path"):
        return {"path": section["path"]}
    target = _data_dir(out)
    if target.exists():  # an interrupted build: builders write from scratch, and they are fast
        shutil.rmtree(target)
    builder = section.pop("builder")
    if builder == "shapes":
        from .data.shapes import build_shapes
        return build_shapes(target, progress=progress, **section)
    if builder == "emoji":
        from .data.emoji import build_emoji
        return build_emoji(target, progress=progress, **section)
    raise ValueError(f"unknown data builder {builder!r} (shapes, emoji)")


def _check_clip_phase(phase, name: str) -> None:
    """A clip "finetune" or "judge" phase: {"train": {...TrainConfig...}, and any of CLIP_OPTIONS to override}."""
    if not isinstance(phase, dict) or "train" not in phase:
        raise ValueError(f'"{name}" must be an object with its own "train" settings')
    unknown = sorted(set(phase) - {"train", *CLIP_OPTIONS})
    if unknown:
        raise ValueError(f"unknown keys {unknown} in clip {name} (known: train, {', '.join(CLIP_OPTIONS)})")
    config_from_dict(TrainConfig, phase["train"])


VERIFIER_KEYS = {"train", "config", "classes", "rules", "oversample", "finetune"}
VERIFIER_FINETUNE_KEYS = {"train", "config", "oversample"}


def _check_verifier(section) -> None:
    """The clip "verifier" phase: {"train": {...}, "config": {...VerifierConfig...}, "classes": [[word, ...], ...],
    "rules": {...twin rules...} (default: the export's sampling rerank_twins), "oversample": [[regex, times], ...],
    "finetune": {"train": {...}, "config": {...}, "oversample": [...]}}; the finetune phase goes on from the
    verifier so far with its own schedule, its config keys replacing the phase's (a "parser" joins there)."""
    from .captions import caption_twins
    from .verifier import VerifierConfig
    if not isinstance(section, dict) or "train" not in section:
        raise ValueError('"verifier" must be an object with its own "train" settings')
    unknown = sorted(set(section) - VERIFIER_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in clip verifier (known: {', '.join(sorted(VERIFIER_KEYS))})")
    config_from_dict(TrainConfig, section["train"])
    config_from_dict(VerifierConfig, section.get("config", {}))
    classes = section.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, list) and len(set(c)) >= 2 for c in classes):
        raise ValueError('verifier "classes" is a list of word classes, each two or more different words')
    caption_twins("", section.get("rules", {}))
    from decoder.training import check_oversample
    check_oversample(section.get("oversample", []))
    finetune = section.get("finetune")
    if finetune is not None:
        if not isinstance(finetune, dict) or "train" not in finetune:
            raise ValueError('verifier "finetune" must be an object with its own "train" settings')
        unknown = sorted(set(finetune) - VERIFIER_FINETUNE_KEYS)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in clip verifier finetune "
                             f"(known: {', '.join(sorted(VERIFIER_FINETUNE_KEYS))})")
        config_from_dict(TrainConfig, finetune["train"])
        config_from_dict(VerifierConfig, {**section.get("config", {}), **finetune.get("config", {})})
        check_oversample(finetune.get("oversample", []))


def _clip(recipe: dict, out: Path, progress: bool) -> dict:
    from .clip_training import train_clip
    section, data = recipe["clip"], _train_data(recipe, out)
    options = {key: section[key] for key in CLIP_OPTIONS if key in section}
    common = dict(heldout_fraction=section.get("heldout", 0.05), progress=progress, resume=True)
    metrics = train_clip(data, out / "model", _train_config(recipe, "clip"), preset=section.get("preset", "tiny-32"),
                         run_dir=out / "runs" / "clip", **common, **options)
    # phases on from the CLIP so far (its EMA weights, a fresh optimizer, their own schedule and negatives): "finetune"
    # replaces the model's CLIP; "judge" writes the best-of-k judge, which the prior and the decoder never read
    for name, component in (("finetune", "clip"), ("judge", "judge")):
        phase = section.get(name)
        if not phase:
            continue
        options.update({key: phase[key] for key in CLIP_OPTIONS if key in phase})
        result = train_clip(data, out / "model", config_from_dict(TrainConfig, phase["train"]),
                            run_dir=out / "runs" / f"clip-{name}", init_from=out / "model" / "clip",
                            component=component, **common, **options)
        metrics = result if component == "clip" else {**metrics, "judge": result}
    verifier = section.get("verifier")
    if verifier:  # a joint head on the judge's tokens (on the CLIP's where there is no judge), for best-of-k
        from .verifier import VerifierConfig, train_verifier
        rules = verifier.get("rules", recipe.get("export", {}).get("sampling", {}).get("rerank_twins") or {})
        phases = [("verifier", verifier, {}, None)]
        if verifier.get("finetune"):  # on from the first phase's export, e.g. with a scene parser joining
            phases.append(("verifier-finetune", verifier["finetune"], verifier.get("config", {}),
                           out / "model" / "verifier"))
        for name, phase, base, init_from in phases:
            metrics["verifier"] = train_verifier(
                data, out / "model", config_from_dict(TrainConfig, phase["train"]), rules, verifier.get("classes", []),
                config=config_from_dict(VerifierConfig, {**base, **phase.get("config", {})}),
                run_dir=out / "runs" / name, resume=True, progress=progress, init_from=init_from,
                oversample=[tuple(o) for o in phase.get("oversample", verifier.get("oversample", []))])
    return metrics


def _embeddings(recipe: dict, out: Path, progress: bool) -> dict:
    from .clip import ClipEncoder
    from .data.datasets import open_dataset
    from .data.embeddings import write_embeddings
    clip = ClipEncoder.load(out / "model" / "clip")
    dataset = open_dataset(_train_data(recipe, out), clip.image_size)
    return write_embeddings(clip, dataset, out / "embeddings", progress=progress,
                            **recipe["embeddings"].get("options", {}))


def _prior(recipe: dict, out: Path, progress: bool) -> dict:
    from prior.training import train_prior
    source = {"embeddings": out / "embeddings"} if "embeddings" in recipe else {"data": _train_data(recipe, out)}
    train_prior(out / "model", train_config=_train_config(recipe, "prior"), preset=recipe["prior"].get("preset", "tiny"),
                run_dir=out / "runs" / "prior", resume=True, progress=progress, **source)
    return {}


def _decoder_phases(section: dict) -> list[tuple[str, TrainConfig, list]]:
    """The decoder stage's phases: (run folder name, train config, oversample) for the first phase and each
    fine-tuning phase ("finetune": one phase's settings, or a list of them, each with its own "oversample")."""
    from decoder.training import check_oversample
    finetune = section.get("finetune", [])
    finetune = [finetune] if isinstance(finetune, dict) else finetune
    if not isinstance(finetune, list) or not all(isinstance(p, dict) for p in finetune):
        raise ValueError('decoder "finetune" must be an object of train settings or a list of them')
    phases = []
    for i, settings in enumerate([{**section.get("train", {}), "oversample": section.get("oversample", [])},
                                  *finetune]):
        settings = dict(settings)
        oversample = settings.pop("oversample", [])  # [[regex, times], ...]: train_decoder takes JSON lists
        check_oversample(oversample)
        name = "decoder" if i == 0 else "decoder-finetune" if i == 1 else f"decoder-finetune-{i}"
        phases.append((name, config_from_dict(TrainConfig, settings), oversample))
    return phases


def _decoder(recipe: dict, out: Path, progress: bool) -> dict:
    from decoder.config import decoder_preset
    from decoder.training import train_decoder
    section = recipe["decoder"]
    config = decoder_preset(section.get("preset", "tiny"), **section.get("config", {}))
    data = _train_data(recipe, out)
    # later phases start from the phase before's EMA weights, with a fresh optimizer and their own schedule
    for i, (name, train_config, oversample) in enumerate(_decoder_phases(section)):
        train_decoder(out / "model", data, train_config=train_config, config=config, run_dir=out / "runs" / name,
                      resume=True, progress=progress, oversample=oversample,
                      init_from=None if i == 0 else out / "model" / "decoder")
    return {}


def _upsampler(recipe: dict, out: Path, progress: bool) -> dict:
    from decoder.config import upsampler_preset
    from decoder.training import train_upsampler
    section = recipe["upsampler"]
    size = section.get("size", 64)
    config = upsampler_preset(section.get("preset", "tiny-64"), **section.get("config", {}))
    train_upsampler(out / "model", _train_data(recipe, out), size, train_config=_train_config(recipe, "upsampler"),
                    config=config, run_dir=out / "runs" / f"upsampler_{size}", resume=True, progress=progress)
    return {}


def _export(recipe: dict, out: Path, progress: bool) -> dict:
    """Copy the exported (EMA) components as fp16 safetensors into OUT/export (a complete model folder)."""
    from .pipeline import UnCLIPPipeline
    pipe = UnCLIPPipeline.from_pretrained(out / "model")
    pipe.sampling = recipe["export"].get("sampling", {})  # the model's own sampling defaults, in its model_index
    target = Path(recipe["export"].get("path", out / "export"))
    pipe.save_pretrained(target, dtype=torch.float16)
    update_model_index(target)
    sizes = {p.parent.name: p.stat().st_size for p in target.glob("*/model.safetensors")}
    record = {"path": str(target), "bytes": sizes, "total_mib": round(sum(sizes.values()) / 2**20, 2)}
    if recipe["export"].get("bundle"):  # ship it inside the package, found by name
        from .hub import bundle_model
        record["bundled"] = str(bundle_model(target, recipe["export"]["bundle"]))
    return record


def describe_stages(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The completed stages of a recipe run with their wall times."""
    folder = Path(out) / "stages"
    return [{"stage": s, **read_json(folder / f"{s}.json")} for s in STAGES if (folder / f"{s}.json").is_file()]
