"""The emoji data set: 64x64 emoji PNGs with captions from their Unicode names, from the emoji-datasource npm packages.

Fetched with `npm pack emoji-datasource-<style>@EMOJI_VERSION` into a cache folder, or read from local tarballs.
Tarballs are read member by member in memory: nothing is extracted to disk, and a tarball holding an absolute
path, a `..` component, a link or a device file is refused as a whole.

Kept: every emoji in emoji.json with an image for the style (base emoji only: skin-tone variations live under
each entry's `skin_variations` and are not used, so each picture is captioned once and the skin-tone
modifier swatches of the "Component" category are skipped as they are colour patches, not pictures).
Caption: the lower-cased name ("GRINNING FACE" -> "grinning face"); the .json keeps alternatives.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

from PIL import Image
from tqdm.auto import tqdm

from unclip.config import write_json
from unclip.images import to_rgb

EMOJI_VERSION = "16.0.0"  # verified: package/emoji.json and package/img/{google,twitter}/64/*.png (1911 base emoji)
PACKAGES = {"google": "emoji-datasource-google", "twitter": "emoji-datasource-twitter"}
IMAGE_LICENSES = {
    "google": "Noto Emoji images: Apache License 2.0 (https://github.com/googlefonts/noto-emoji)",
    "twitter": "Twemoji images: CC-BY 4.0 (https://github.com/jdecked/twemoji), attribution required",
}
IMAGE_SIZE = 64
SKIPPED_CATEGORIES = ("Component",)  # skin-tone modifier swatches


@dataclass
class EmojiPackage:
    """What the build needs from one tarball: metadata, licence text and the 64 px PNG bytes per style."""
    source: str
    name: str = ""
    version: str = ""
    sha256: str = ""
    emoji: list = field(default_factory=list)
    license_text: str = ""
    images: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (style, file name) -> PNG bytes

    @property
    def styles(self) -> set[str]:
        """Styles with 64 px images in this tarball."""
        return {style for style, _ in self.images}


def cache_dir() -> Path:
    """Where npm tarballs are kept: $UNCLIP_CACHE/emoji or ~/.cache/unclip/emoji."""
    base = os.environ.get("UNCLIP_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "unclip") / "emoji"


def fetch_package(style: str, version: str = EMOJI_VERSION, cache: Path | None = None) -> Path:
    """`npm pack` the package for `style` into the cache (once) and return the tarball's path."""
    if style not in PACKAGES:
        raise ValueError(f"unknown emoji style {style!r} (known: {sorted(PACKAGES)})")
    cache = Path(cache or cache_dir())
    target = cache / f"{PACKAGES[style]}-{version}.tgz"
    if target.is_file():
        return target
    if shutil.which("npm") is None:
        raise ValueError("npm not found: install Node.js/npm, or pass local tarballs (--from-tarball)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            result = subprocess.run(["npm", "pack", f"{PACKAGES[style]}@{version}", "--silent"], cwd=tmp,
                                    capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ValueError(f"npm pack {PACKAGES[style]}@{version} timed out (npm registry unreachable?)") from None
        packed = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(packed) != 1:
            reason = (result.stderr.strip().splitlines() or ["no tarball produced"])[-1]
            raise ValueError(f"npm pack {PACKAGES[style]}@{version} failed: {reason}")
        os.replace(packed[0], target)
    return target


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse absolute paths, `..` components, links and special files (ValueError)."""
    name = member.name
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"unsafe tar member (absolute path): {name!r}")
    if ".." in PurePosixPath(name).parts or "\\" in name:
        raise ValueError(f"unsafe tar member (path escapes the package): {name!r}")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"unsafe tar member (link or special file): {member.name!r}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wanted_image(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(style, file name) for package/img/<style>/64/<file>.png, else None."""
    if len(parts) == 5 and parts[1] == "img" and parts[3] == str(IMAGE_SIZE) and parts[4].endswith(".png"):
        return parts[2], parts[4]
    return None


def read_package(tarball: str | os.PathLike) -> EmojiPackage:
    """Read emoji.json, package.json, LICENSE and the 64 px PNGs from an npm tarball, refusing unsafe members."""
    tarball = Path(tarball)
    if not tarball.is_file():
        raise ValueError(f"tarball not found: {tarball}")
    package = EmojiPackage(source=str(tarball), sha256=_sha256(tarball))
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                check_member(member)
                if member.isfile():
                    _keep_member(package, PurePosixPath(member.name).parts, tar, member)
    except tarfile.TarError as error:
        reason = str(error).strip().splitlines()[0].rstrip(":")  # "file could not be opened successfully:\n- ..."
        raise ValueError(f"not a readable tarball: {tarball} ({reason}); delete it if it is a partial download") \
            from None
    if not package.emoji:
        raise ValueError(f"{tarball} has no package/emoji.json (is it an emoji-datasource npm tarball?)")
    return package


def _keep_member(package: EmojiPackage, parts: tuple[str, ...], tar: tarfile.TarFile, member) -> None:
    """Store the member's bytes in `package` when the build needs it."""
    if len(parts) < 2 or parts[0] != "package":
        return
    image = _wanted_image(parts)
    if image is not None:
        package.images[image] = tar.extractfile(member).read()
    elif parts[1:] == ("emoji.json",):
        try:
            package.emoji = json.loads(tar.extractfile(member).read())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"corrupt emoji.json in {package.source}: {error}") from None
    elif parts[1:] == ("LICENSE",):
        package.license_text = tar.extractfile(member).read().decode("utf-8", errors="replace")
    elif parts[1:] == ("package.json",):
        meta = json.loads(tar.extractfile(member).read())
        package.name, package.version = meta.get("name", ""), meta.get("version", "")


def emoji_caption(name: str) -> str:
    """Caption from a Unicode name: "GRINNING FACE" -> "grinning face"."""
    return " ".join(name.lower().split())


def _unicode(unified: str) -> str:
    return "".join(chr(int(code, 16)) for code in unified.split("-"))


def _metadata(entry: dict, style: str, package: EmojiPackage) -> dict:
    """The .json sidecar: name, category, style, the emoji itself, and alternative captions."""
    text = emoji_caption(entry["name"])
    category, sub = entry.get("category", ""), entry.get("subcategory", "")
    short = [s.replace("_", " ").replace("-", " ") for s in entry.get("short_names", [])]
    return {"name": entry["name"], "caption": text, "category": category, "subcategory": sub, "style": style,
            "unicode": _unicode(entry["unified"]), "unified": entry["unified"], "short_names": short,
            "alt_captions": [f"{text} emoji", f"{text}, {sub.replace('-', ' ')}", f"{text}, {category.lower()}",
                             *[s for s in short if s != text]],
            "package": f"{package.name or PACKAGES[style]}@{package.version}", "license": IMAGE_LICENSES[style]}


def _selected(package: EmojiPackage, style: str) -> tuple[list[dict], Counter]:
    """Entries with a 64 px image for `style`, and why the others were skipped."""
    keep, skipped = [], Counter()
    for entry in sorted(package.emoji, key=lambda e: (e.get("sort_order", 0), e["unified"])):
        if entry.get("category") in SKIPPED_CATEGORIES:
            skipped["component"] += 1
        elif not entry.get(f"has_img_{style}", False):
            skipped["no_image_for_style"] += 1
        elif (style, entry["image"]) not in package.images:
            skipped["image_missing_in_tarball"] += 1
        else:
            keep.append(entry)
    skipped["skin_tone_variations"] += sum(len(e.get("skin_variations", {})) for e in package.emoji)
    return keep, skipped


def _write_emoji(out_dir: Path, key: str, png: bytes, meta: dict) -> None:
    try:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            rgb = to_rgb(image)
    except OSError as error:
        raise ValueError(f"corrupt image {meta['unified']} in {meta['package']}: {error}") from None
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    rgb.save(out_dir / f"{key}.png", format="PNG")
    (out_dir / f"{key}.txt").write_text(meta["caption"], encoding="utf-8")
    write_json(out_dir / f"{key}.json", {"key": key, **meta})


def _packages_for(styles: Sequence[str], tarballs: Sequence[str | os.PathLike] | None) -> dict[str, EmojiPackage]:
    """One package per style: from the given tarballs (by the image folders they hold) or via npm."""
    if not tarballs:
        return {style: read_package(fetch_package(style)) for style in styles}
    packages = [read_package(t) for t in tarballs]
    chosen = {}
    for style in styles:
        found = [p for p in packages if style in p.styles]
        if not found:
            raise ValueError(f"none of the tarballs has package/img/{style}/{IMAGE_SIZE}/*.png")
        chosen[style] = found[0]
    return chosen


def build_emoji(out_dir: str | os.PathLike, styles: Sequence[str] = ("google", "twitter"),
                tarballs: Sequence[str | os.PathLike] | None = None, progress: bool = True) -> dict:
    """Write the emoji data set (files layout) plus licenses/ and info.json to out_dir; returns the info."""
    styles = list(dict.fromkeys(styles))
    unknown = [s for s in styles if s not in PACKAGES]
    if not styles or unknown:
        raise ValueError(f"unknown emoji styles {unknown or styles} (known: {sorted(PACKAGES)})")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; delete it or choose another output folder")
    packages = _packages_for(styles, tarballs)
    (out_dir / "licenses").mkdir(parents=True, exist_ok=True)
    info = {"source": "npm packages emoji-datasource-<style> (iamcal/emoji-data)", "image_size": IMAGE_SIZE,
            "caption": "lower-cased Unicode name", "packages": {}, "counts": {}, "skipped": {}, "total": 0}
    key = 0
    for style in styles:
        package = packages[style]
        entries, skipped = _selected(package, style)
        for entry in tqdm(entries, desc=f"emoji {style}", unit="img", disable=not progress):
            _write_emoji(out_dir, f"{key:05d}", package.images[style, entry["image"]], _metadata(entry, style, package))
            key += 1
        _write_license(out_dir / "licenses", style, package)
        info["packages"][style] = {"name": package.name or PACKAGES[style], "version": package.version,
                                   "tarball": Path(package.source).name, "sha256": package.sha256,
                                   "image_license": IMAGE_LICENSES[style]}
        categories = Counter(e.get("category", "") for e in entries)
        info["counts"][style] = {"images": len(entries), "captions": len({emoji_caption(e["name"]) for e in entries}),
                                 "categories": dict(sorted(categories.items()))}
        info["skipped"][style] = dict(skipped)
        info["total"] = key
    write_json(out_dir / "info.json", info)
    return info


def _write_license(folder: Path, style: str, package: EmojiPackage) -> None:
    """Copy the package LICENSE and note the image licence for the style."""
    name = package.name or PACKAGES[style]
    text = package.license_text or "(no LICENSE file in the package)\n"
    (folder / f"{name}.LICENSE").write_text(f"{text.rstrip()}\n\nImages ({style}): {IMAGE_LICENSES[style]}\n",
                                            encoding="utf-8")
