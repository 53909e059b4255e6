"""Checksums on demand: every file of a dense index or a passage store against the sha256 its
manifest recorded at build time (``re2g index verify RUN_DIR|INDEX_DIR``; after a download into a
local mirror, :meth:`re2g.storage.RunDirMirror.pull`).

A normal load checks the manifest, each file's size and ends and the fingerprint chain only
(:func:`re2g.index.dense_format.checked_file`, :class:`re2g.data.passage_store.PassageStore`), so it
stays fast at 60 GB; a file corrupted in the middle with its size unchanged is what this finds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from re2g.artifacts import KINDS, TEMP_NAME, sha256_file
from re2g.errors import ArtifactError

#: manifest file -> the artifact kind whose files carry checksums
CHECKED_KINDS = {KINDS["dense-index"].file: "dense-index", KINDS["passage-store"].file: "passage-store"}


@dataclass(frozen=True)
class FileCheck:
    """One file's verdict: ``status`` is ``ok``, ``missing``, ``size`` (not the recorded size) or
    ``mismatch`` (not the recorded sha256); ``detail`` says what was found."""

    artifact: str  # the artifact directory
    kind: str
    file: str  # the file's name inside it
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self, root: str | Path | None = None) -> str:
        """``ok       index/dense/shard_00000.faiss`` (relative to ``root`` when given) + detail."""
        path = Path(self.artifact, self.file)
        if root is not None:
            try:
                path = path.relative_to(Path(root))
            except ValueError:
                pass
        return f"{self.status:<9}{path}" + (f"  ({self.detail})" if self.detail else "")


def _manifest_of(directory: Path, manifest_file: str) -> tuple[str, dict] | None:
    """``(kind, raw manifest)`` when ``directory/manifest_file`` is a manifest of a checked kind."""
    try:
        raw = json.loads((directory / manifest_file).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    kind = CHECKED_KINDS[manifest_file]
    if raw.get("kind") == kind:
        return kind, raw
    if kind == "dense-index" and raw.get("kind") == "re2g-dense-index":  # version 1: read through the mapping
        from re2g.index.dense_format import read_manifest

        return kind, read_manifest(directory)
    return None


def verify_artifact(directory: str | Path, names: Iterable[str] | None = None) -> list[FileCheck]:
    """Check the files of one dense index or passage store directory (``names``: only those) against
    its manifest's sizes and sha256 checksums. :class:`ArtifactError` when the directory holds
    neither artifact, or its manifest records no checksums."""
    d = Path(directory)
    found = next((m for f in CHECKED_KINDS if (m := _manifest_of(d, f)) is not None), None)
    if found is None:
        raise ArtifactError(f"{d}: neither a dense index (manifest.json) nor a passage store (_store.json)")
    kind, raw = found
    sums, sizes = raw.get("checksums") or {}, raw.get("sizes") or {}
    if not sums:
        raise ArtifactError(f"{d}: the {kind} manifest records no checksums; rebuild it to verify it")
    wanted = set(sums) if names is None else set(names) & set(sums)
    out = []
    for name in sorted(wanted):
        p = d / name
        if not p.is_file():
            out.append(FileCheck(str(d), kind, name, "missing", "not on disk"))
            continue
        size = p.stat().st_size
        if name in sizes and size != int(sizes[name]):
            out.append(FileCheck(str(d), kind, name, "size", f"{size} bytes, manifest says {sizes[name]}"))
            continue
        got = sha256_file(p)
        if got != sums[name]:
            out.append(FileCheck(str(d), kind, name, "mismatch", f"sha256 {got}, manifest says {sums[name]}"))
        else:
            out.append(FileCheck(str(d), kind, name, "ok"))
    return out


def find_artifacts(path: str | Path) -> list[Path]:
    """The dense indexes and passage stores at or under ``path`` (a run directory, a passages
    directory, an index directory), temporary build directories skipped."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory (expected a run directory or an index directory)")
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not TEMP_NAME.match(x) and not x.startswith("."))
        if any(f in files and _manifest_of(Path(d), f) is not None for f in CHECKED_KINDS):
            found.append(Path(d))
    return found


def verify_artifacts(path: str | Path) -> list[FileCheck]:
    """:func:`verify_artifact` for every dense index and passage store under ``path``;
    :class:`ArtifactError` when there is none."""
    dirs = find_artifacts(path)
    if not dirs:
        raise ArtifactError(f"{path}: no dense index (manifest.json) or passage store (_store.json) found in it")
    return [c for d in dirs for c in verify_artifact(d)]
