"""`unclip info`: a readable description of a model folder, read from its configs and weight headers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from .checkpoint import CONFIG_NAME, FORMAT_VERSION, SCHEDULER_NAME, WEIGHTS_NAME, read_model_index
from .config import read_json
from .hub import resolve_model


def count_parameters(weights: Path) -> tuple[int, str]:
    """(number of parameters, dtype) from a safetensors header, without loading the tensors."""
    total, dtypes = 0, set()
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            piece = f.get_slice(name)
            n = 1
            for d in piece.get_shape():
                n *= d
            total += n
            dtypes.add(piece.get_dtype())
    return total, "/".join(sorted(dtypes))


def check_config(folder: Path, kind: str) -> dict:
    """A component's config.json, validated as loading the component would (format version, keys, types)."""
    from decoder.config import DecoderConfig, UpsamplerConfig  # local: unclip core does not import the stages
    from prior.config import PriorConfig

    from .checkpoint import load_component_config
    from .clip import ClipConfig

    classes = {"clip": ClipConfig, "prior": PriorConfig, "decoder": DecoderConfig, "upsampler": UpsamplerConfig}
    config = read_json(folder / CONFIG_NAME)
    if isinstance(config, dict) and "architecture" not in config and kind in classes:  # Karlo's have their own
        load_component_config(folder, kind, classes[kind])
    elif not isinstance(config, dict) or config.get("_format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_NAME}: not a config of format version {FORMAT_VERSION}")
    return config


def describe(model: str | os.PathLike | None) -> str:
    """Multi-line summary: components, parameters, file sizes, key config fields, noise schedules."""
    folder = resolve_model(model)
    index = read_model_index(folder)
    if not index.get("components"):
        raise ValueError(f"{folder} is not a model folder: no component folders (clip/, prior/, decoder/, ...) "
                         "with a config.json; give the folder that holds them")
    lines = [f"model: {folder}"]
    for name, kind in index.get("components", {}).items():
        sub = folder / name
        config = check_config(sub, kind)
        weights = sub / WEIGHTS_NAME
        if weights.is_file():
            params, dtype = count_parameters(weights)
            size = f"{params / 1e6:.2f} M parameters ({dtype}, {weights.stat().st_size / 2**20:.1f} MiB)"
        else:
            size = f"open_clip {config.get('model_name')} / {config.get('pretrained') or 'random'} (no local weights)"
        lines.append(f"  {name} [{kind}]: {size}")
        keys = [k for k in ("image_size", "low_res_size", "embed_dim", "width", "depth", "block_out_channels",
                            "prediction_type", "text_drop_prob", "image_drop_prob") if k in config]
        keys += ["parser"] if config.get("parser") else []  # a verifier's scene parser (channels)
        if keys:
            lines.append("    " + ", ".join(f"{k}={json.dumps(config[k])}" for k in keys))
        if (sub / SCHEDULER_NAME).is_file():
            sched = read_json(sub / SCHEDULER_NAME)
            lines.append(f"    noise schedule: {sched.get('beta_schedule')}, {sched.get('num_train_timesteps')} steps, "
                         f"predicts {sched.get('prediction_type')}")
    return "\n".join(lines)
