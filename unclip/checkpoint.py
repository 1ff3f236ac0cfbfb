"""Save and load one component folder (config.json + model.safetensors) and a model folder's model_index.json.

Every write is atomic: a component is written into a temporary sibling folder and renamed into place, so a
reader (or a run killed half-way) never sees a half-written component.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import config_from_dict, config_to_dict, read_json, write_json

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SCHEDULER_NAME = "scheduler_config.json"
INDEX_NAME = "model_index.json"


def replace_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with `fill(tmp_dir)` next to `target`, then swap it in (atomic for readers)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_component(folder: str | os.PathLike, kind: str, config, state_dict: dict[str, torch.Tensor],
                   scheduler_config: dict | None = None, extra_json: dict[str, Any] | None = None,
                   dtype: torch.dtype | None = None) -> None:
    """Write `folder/{config.json, model.safetensors[, scheduler_config.json, extras]}` atomically.

    Args:
        kind: the component kind ("clip", "prior", "decoder", "upsampler") checked on load.
        dtype: cast floating-point weights to this dtype (e.g. torch.float16 for export).
    """
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    meta = {"_kind": kind, "_format_version": FORMAT_VERSION}

    def fill(tmp: Path) -> None:
        write_json(tmp / CONFIG_NAME, {**meta, **config_to_dict(config)})
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "kind": kind})
        if scheduler_config is not None:
            write_json(tmp / SCHEDULER_NAME, dict(scheduler_config))
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)

    replace_dir(Path(folder), fill)


def load_component_config(folder: str | os.PathLike, kind: str, config_cls):
    """Read and validate `folder/config.json` for a component of `kind`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"missing {kind} component: no folder {folder}")
    data = read_json(folder / CONFIG_NAME)
    if not isinstance(data, dict):
        raise ValueError(f"bad config in {folder / CONFIG_NAME}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    found_kind = data.pop("_kind", None)
    version = data.pop("_format_version", None)
    if found_kind != kind:
        raise ValueError(f"{folder} holds a {found_kind!r} component, expected {kind!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"{folder} has format version {version}; this unclip reads version {FORMAT_VERSION} "
                         "(re-export it with a matching unclip version)")
    try:
        return config_from_dict(config_cls, data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad config in {folder / CONFIG_NAME}: {error}") from None


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load `folder/model.safetensors` (never a pickle)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"corrupt weights file {path}: {error}") from None


def load_component(folder: str | os.PathLike, kind: str, config_cls) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (config, state_dict) of a component folder, with clear errors for anything missing or wrong."""
    config = load_component_config(folder, kind, config_cls)
    return config, load_state_dict(folder)


def load_weights_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """`model.load_state_dict(strict=True)` with a one-line error naming the folder."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0:3]
        raise ValueError(f"weights in {where} do not fit the config: {' '.join(first)}") from None


def load_scheduler_config(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / SCHEDULER_NAME
    return read_json(path) if path.is_file() else None


def write_model_index(model_dir: str | os.PathLike, components: dict[str, str], **info) -> None:
    """Write `model_index.json`: which component folders are present and what kind each is."""
    data = {"_format_version": FORMAT_VERSION, "_library": "unclip", "components": components, **info}
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(model_dir) / INDEX_NAME, data)


def read_model_index(model_dir: str | os.PathLike) -> dict:
    """Read `model_index.json`, or infer it from the component folders present."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model folder not found: {model_dir}")
    path = model_dir / INDEX_NAME
    if path.is_file():
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a model index (expected a JSON object, got {type(data).__name__})")
        if data.get("_format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {data.get('_format_version')}; "
                             f"this unclip reads version {FORMAT_VERSION}")
        return data
    return {"_format_version": FORMAT_VERSION, "components": scan_components(model_dir)}


def scan_components(model_dir: Path) -> dict[str, str]:
    """{folder name: kind} for every component folder (one with a config.json naming its kind)."""
    components = {}
    for sub in sorted(Path(model_dir).iterdir()):
        if (sub / CONFIG_NAME).is_file():
            data = read_json(sub / CONFIG_NAME)
            kind = data.get("_kind") if isinstance(data, dict) else None
            if kind:
                components[sub.name] = kind
    return components


def update_model_index(model_dir: str | os.PathLike) -> dict:
    """Re-scan the component folders of `model_dir` and rewrite model_index.json (keeping other keys)."""
    model_dir = Path(model_dir)
    old = read_model_index(model_dir) if model_dir.is_dir() else {"components": {}}
    components = scan_components(model_dir)
    info = {k: v for k, v in old.items() if not k.startswith("_") and k != "components"}
    write_model_index(model_dir, components, **info)
    return read_model_index(model_dir)
