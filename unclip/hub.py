"""Find a model folder: a local path, a model bundled with the package, or a hub id (needs a network)."""

from __future__ import annotations

import os
import re
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "emoji"


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "model_index.json").is_file())


def resolve_model(path_or_name: str | os.PathLike | None) -> Path:
    """A model folder for a path, a bundled name ("emoji", "shapes"), or a Hugging Face hub id ("org/name")."""
    name = str(path_or_name) if path_or_name is not None else DEFAULT_MODEL
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; a model is a folder with model_index.json and component folders")
        return path
    if name in bundled_models():
        return BUNDLED_DIR / name
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        return _download(name)
    available = ", ".join(bundled_models()) or "none installed"
    raise ValueError(f"no model folder {name!r} (bundled models: {available}; or give a path or a hub id)")


def _download(repo_id: str) -> Path:
    """Fetch a model folder from the Hugging Face hub (only when a hub id is asked for)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as error:  # network errors, missing repos, gated repos: all one message
        raise ValueError(f"could not download {repo_id!r} from the hub ({error.__class__.__name__}); "
                         "check the name and your network, or give a local folder") from None


def file_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every weight and config file in a model folder, by relative path."""
    import hashlib

    folder = Path(folder)
    sums = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json") and path.name != "checksums.json":
            sums[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def bundle_model(export_dir: str | os.PathLike, name: str, target_root: str | os.PathLike | None = None) -> Path:
    """Copy an exported model folder into the package (unclip/models/NAME) with a checksums.json."""
    import shutil

    from .checkpoint import replace_dir
    from .config import write_json

    target = Path(target_root or BUNDLED_DIR) / name

    def fill(tmp: Path) -> None:
        for path in Path(export_dir).iterdir():
            if path.is_dir() and (path / "config.json").is_file():
                shutil.copytree(path, tmp / path.name)
            elif path.name == "model_index.json":
                shutil.copy2(path, tmp / path.name)
        write_json(tmp / "checksums.json", file_checksums(tmp))

    replace_dir(target, fill)
    return target
