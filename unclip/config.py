"""Dataclass configs <-> JSON: every field typed, unknown keys and wrong types raise ValueError."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def config_to_dict(config) -> dict[str, Any]:
    """A config dataclass as a plain JSON-able dict (tuples become lists)."""
    return dataclasses.asdict(config)


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Coerce JSON values to the annotated type where lossless (list -> tuple, int -> float); else raise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg)
            except ValueError:
                pass
        raise ValueError(f"config field {name!r}: {value!r} is not a {annotation}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {name!r}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_check_type(name, v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config field {name!r}: expected an object, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not (
            isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))):
        raise ValueError(f"config field {name!r}: expected {annotation.__name__}, got {value!r}")
    return value


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a dict; unknown keys or wrong types raise ValueError naming the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown} (known: {sorted(names)})")
    return cls(**{k: _check_type(k, v, hints[k]) for k, v in data.items()})


def atomic_write(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Call `save(tmp)` on a temporary sibling of `path`, then rename it into place (no half-written files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save(tmp)
        os.replace(tmp, path)
    except OSError as error:  # name the target, not the temp file
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising ValueError for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt JSON in {path}: {error}") from None
