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
