"""The one artifact layer: atomic writes and one manifest schema for every artifact re2g writes.

**Atomic writes.** A file is written under a temporary sibling name and renamed into place
(:func:`write_bytes_atomic`, :func:`write_text_atomic`, :func:`write_json_atomic`; :func:`open_atomic`
to stream a large file). A directory is
built under a temporary sibling name (``.NAME.tmp-PID-XXXXXXXX``) and renamed into place when the
build succeeds (:func:`staged_dir`); an existing directory is first renamed aside
(``.NAME.old-PID-XXXXXXXX``) and removed after (:func:`replace_dir`). A process killed mid-build
leaves only a temporary sibling, which no reader looks at and which the next build of the same
output removes (when its process is gone). Object-store URIs (``s3://``, ``memory://``, ...) are
staged the same way, with the manifest moved last.

**One manifest schema** (:class:`Manifest`): ``kind``, ``version``, ``config`` (the config that made
the artifact, or ``None``), ``fingerprints`` (``{"encoder": ...}``: what the artifact's vectors depend
on), ``counts``, ``checksums`` (``{file name: sha256}``), and kind-specific fields (``dim``,
``metric``, ``shards``, ...) beside them at the top level (``Manifest.extra``). Each kind
(:data:`KINDS`) has one manifest file name, the fields it requires, and the command that rebuilds it;
:func:`read_manifest` names all three when something is wrong.

**Older run directories.** Before this schema each artifact had its own manifest (version 1 of every
kind: ``format``/``format_version`` keys, fingerprints and counts at the top level, shard checksums
inside the shard entries, no version at all for embeddings and models). :func:`read_manifest` maps
those onto the schema (:data:`LEGACY`), so an old run directory loads unchanged; a manifest it
cannot map is refused with the command that rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from re2g.errors import ArtifactError

VERSION = 2  # manifests in this schema; version 1 was each artifact's own format before it

#: temporary names of :func:`staged_dir` and :func:`replace_dir` (and of the helpers before them)
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old|building)-(?:(?P<pid>\d+)-)?[0-9A-Za-z_]+$")


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """One kind of artifact: its manifest file, what its manifest must hold, how to rebuild it.

    ``required``: top-level fields, or ``section.key`` for keys of ``counts``/``fingerprints``.
    ``rebuild``: the command, with ``{dir}`` (the artifact) and ``{parent}`` (its parent directory)."""

    name: str
    what: str
    file: str
    rebuild: str
    required: tuple[str, ...] = ()
    version: int = VERSION


_MODEL_REBUILD = ("save the model again (save_pretrained writes re2g_model.json last; `re2g init-models` for a "
                  "run's initial models, or rerun the training stage that made {dir})")

KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("passages", "passages", "_manifest.json",
         "re2g passages KNOWLEDGE_SOURCE {dir} --overwrite", ("counts.passages",)),
    Kind("embeddings", "embeddings", "_embeddings.json",
         "re2g embed PASSAGES {dir} --model BIENCODER --overwrite",
         ("counts.vectors", "fingerprints.encoder", "dim")),
    Kind("dense-index", "dense index", "manifest.json",
         "re2g index --passages PASSAGES --embeddings EMBEDDINGS --out {parent} --no-bm25 --overwrite",
         ("counts.vectors", "fingerprints.encoder", "config", "dim", "metric", "transform", "shards")),
    Kind("bm25-index", "BM25 index", "re2g_bm25.json",
         "re2g index --passages PASSAGES --out {parent} --no-dense --overwrite",
         ("counts.passages", "k1", "b")),
    Kind("biencoder", "saved bi-encoder", "re2g_model.json", _MODEL_REBUILD),
    Kind("reranker", "saved reranker", "re2g_model.json", _MODEL_REBUILD),
    Kind("generator", "saved generator", "re2g_model.json", _MODEL_REBUILD),
    Kind("sample", "sample task", "sample.json", "re2g sample {dir} --overwrite", ("config", "summary", "files")),
    Kind("passage-store", "passage store", "_store.json",
         "rm -r {dir} (the next process that opens the passages builds it again)",
         ("counts.passages", "counts.rows", "fingerprints.passages", "sizes")),
)}
MODEL_KINDS = ("biencoder", "reranker", "generator")
#: every manifest file name: the files that say "this artifact is complete"
MANIFEST_FILES = frozenset(k.file for k in KINDS.values())


def rebuild_hint(kind: str, directory: str | Path) -> str:
    """The command that rebuilds an artifact of ``kind`` at ``directory``."""
    d = str(directory).rstrip("/")
    return KINDS[kind].rebuild.format(dir=d, parent=d.rsplit("/", 1)[0] if "/" in d else ".")


# --------------------------------------------------------------------------- the schema


class Manifest(BaseModel):
    """The manifest of one artifact (see the module docstring). Kind-specific fields are given as
    keyword arguments and stored beside the common ones (``extra``)."""

    model_config = ConfigDict(extra="allow")

    kind: str
    version: int = VERSION
    config: dict[str, Any] | None = None
    fingerprints: dict[str, str] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    checksums: dict[str, str] = Field(default_factory=dict)

    @property
    def extra(self) -> dict[str, Any]:
        """The kind-specific fields."""
        return dict(self.model_extra or {})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the common fields first, then the kind-specific ones."""
        return self.model_dump(mode="json")


def write_manifest(directory: str | Path, manifest: Manifest) -> str:
    """Write ``manifest`` atomically as its kind's manifest file in ``directory`` (a path or URI);
    write it last, after the files it describes. Returns the file's path."""
    if manifest.kind not in KINDS:
        raise ValueError(f"unknown artifact kind {manifest.kind!r}: expected one of {', '.join(KINDS)}")
    path = f"{str(directory).rstrip('/')}/{KINDS[manifest.kind].file}"
    write_json_atomic(path, manifest.to_dict())
    return path


def read_manifest(directory: str | Path, kind: str | tuple[str, ...]) -> Manifest:
    """The manifest of the artifact at ``directory`` (a path or URI), checked: its kind is ``kind``
    (or one of them), its version one this re2g reads (version 1 manifests are mapped, see
    :data:`LEGACY`), the fields its kind requires are there. Anything else is an
    :class:`ArtifactError` naming the file, what is wrong and the command that rebuilds it."""
    from fsspec.core import url_to_fs

    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    first = KINDS[kinds[0]]
    d = str(directory).rstrip("/")
    path = f"{d}/{first.file}"

    def fail(problem: str) -> ArtifactError:
        return ArtifactError(f"{problem}; rebuild it: {rebuild_hint(kinds[0], d)}")

    fs, p = url_to_fs(d)
    if not fs.isdir(p):
        raise fail(f"{d}: {first.what} not found")
    try:
        with fs.open(f"{p}/{first.file}", "r") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise fail(f"{d}: not a complete {first.what}: {first.file} is missing (a build that did not "
                   f"finish, or not a {first.what})") from None
    except (OSError, ValueError) as e:
        raise fail(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(raw, dict):
        raise fail(f"{path}: not a re2g manifest (a JSON object expected)")
    current = raw.get("kind") in KINDS and raw.get("version") == KINDS[raw["kind"]].version
    if not current and isinstance(raw.get("version"), int) and raw.get("kind") in KINDS \
            and raw["version"] > KINDS[raw["kind"]].version:
        raise ArtifactError(f"{path}: {first.what} manifest version {raw['version']}, this re2g reads up to "
                            f"{KINDS[raw['kind']].version} (made by a newer re2g); upgrade re2g, or rebuild it: "
                            f"{rebuild_hint(kinds[0], d)}")
    if not current:
        mapped = LEGACY[first.file](raw)
        if mapped is None:
            found = {k: raw.get(k) for k in ("kind", "format", "version", "format_version") if k in raw}
            raise fail(f"{path}: not a {first.what} manifest this re2g reads ({found or 'no kind or version'})")
        raw = mapped
    if raw.get("kind") not in kinds:
        found = KINDS[raw["kind"]].what if raw.get("kind") in KINDS else repr(raw.get("kind"))
        raise ArtifactError(f"{path}: a {found}, not a {first.what}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        raise fail(f"{path}: malformed manifest: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    for need in KINDS[manifest.kind].required:
        section, _, key = need.partition(".")
        value = getattr(manifest, section).get(key) if key else manifest.model_dump().get(section)
        if value is None:
            raise fail(f"{path}: the manifest lacks {need!r}")
    return manifest


# --------------------------------------------------------------------------- version 1 manifests

# Each maps one artifact's manifest as re2g wrote it before this schema onto the schema, or returns
# None when the dict is not that format. The formats, exactly as they were written:
#   passages/_manifest.json     {"format": "re2g.passages", "version": 1, "source", "config"?,
#                                "source_format"?, "stats"?, "passages"?}
#   embeddings/_embeddings.json {"out", "passages", "dim", "seconds", "fingerprint", "actors",
#                                "batch_size", "device", "passages_per_s", "passages_path",
#                                "model_dir", "encoder_settings"}  (no kind, no version)
#   index/dense/manifest.json   {"kind": "re2g-dense-index", "format_version": 1, ..., "shards":
#                                [{..., "sha256", "pid_sha256", "vectors_sha256"?}], "total_count",
#                                "encoder_fingerprint", "config"}
#   index/bm25/re2g_bm25.json   {"format": "re2g-bm25", "format_version": 1, "count",
#                                "skipped_empty", ..., "config"}
#   re2g_model.json             {"kind": "biencoder" | "reranker" | "generator", ..., "fingerprint"?}
#   sample/sample.json          {"format": "re2g-sample/1", "config", ..., "summary", "files"}


def _legacy_passages(raw: dict) -> dict | None:
    if raw.get("format") != "re2g.passages" or raw.get("version") != 1:
        return None
    rest = {k: v for k, v in raw.items() if k not in ("format", "version", "config", "passages")}
    n = raw.get("passages", (raw.get("stats") or {}).get("passages"))
    return {"kind": "passages", "config": raw.get("config"), "counts": {} if n is None else {"passages": n}, **rest}


def _legacy_embeddings(raw: dict) -> dict | None:
    if "kind" in raw or not {"passages", "dim", "fingerprint"} <= set(raw):
        return None
    rest = {k: v for k, v in raw.items() if k not in ("passages", "fingerprint")}
    return {"kind": "embeddings", "counts": {"vectors": raw["passages"]},
            "fingerprints": {"encoder": raw["fingerprint"]}, **rest}


_SHARD_SHA = {"file": "sha256", "pid_file": "pid_sha256", "vectors_file": "vectors_sha256"}


def _legacy_dense(raw: dict) -> dict | None:
    if raw.get("kind") != "re2g-dense-index" or raw.get("format_version") != 1:
        return None
    checksums, shards = {}, []
    for entry in raw.get("shards") or []:
        for name_key, sha_key in _SHARD_SHA.items():
            if entry.get(name_key) and entry.get(sha_key):
                checksums[entry[name_key]] = entry[sha_key]
        shards.append({k: v for k, v in entry.items() if k not in _SHARD_SHA.values()})
    rest = {k: v for k, v in raw.items()
            if k not in ("kind", "format_version", "config", "shards", "total_count", "encoder_fingerprint")}
    return {"kind": "dense-index", "config": raw.get("config"), "counts": {"vectors": raw.get("total_count")},
            "fingerprints": {"encoder": raw.get("encoder_fingerprint")}, "checksums": checksums,
            "shards": shards, **rest}


def _legacy_bm25(raw: dict) -> dict | None:
    if raw.get("format") != "re2g-bm25" or raw.get("format_version") != 1:
        return None
    rest = {k: v for k, v in raw.items() if k not in ("format", "format_version", "config", "count", "skipped_empty")}
    return {"kind": "bm25-index", "config": raw.get("config"),
            "counts": {"passages": raw.get("count"), "skipped_empty": raw.get("skipped_empty", 0)}, **rest}


def _legacy_model(raw: dict) -> dict | None:
    if raw.get("kind") not in MODEL_KINDS or "version" in raw:
        return None
    rest = {k: v for k, v in raw.items() if k != "fingerprint"}
    return {**rest, "fingerprints": {"encoder": raw["fingerprint"]} if raw.get("fingerprint") else {}}


def _legacy_sample(raw: dict) -> dict | None:
    if raw.get("format") != "re2g-sample/1":
        return None
    return {"kind": "sample", **{k: v for k, v in raw.items() if k != "format"}}


#: manifest file name -> the mapping of its version 1 format
LEGACY: dict[str, Callable[[dict], dict | None]] = {
    "_manifest.json": _legacy_passages, "_embeddings.json": _legacy_embeddings, "manifest.json": _legacy_dense,
    "re2g_bm25.json": _legacy_bm25, "re2g_model.json": _legacy_model, "sample.json": _legacy_sample,
    "_store.json": lambda raw: None,  # the passage store had no version 1
}


# --------------------------------------------------------------------------- atomic files


def _is_local_fs(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _temp_name(name: str, tag: str = "tmp") -> str:
    return f".{name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes_atomic(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` (a path or URI) whole or not at all: a temporary sibling, flushed to
    disk, renamed into place (an object store's single put is already all or nothing)."""
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(str(path))
    parent, _, name = p.rpartition("/")
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not _is_local_fs(fs):
        fs.pipe_file(p, data)
        return str(path)
    tmp = f"{parent}/{_temp_name(name)}" if parent else _temp_name(name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return str(path)


@contextlib.contextmanager
def open_atomic(path: str | Path) -> Iterator[Any]:
    """A binary file to stream into, that appears at ``path`` (a path or URI) whole or not at all.

    The block writes a temporary sibling (compressed by the suffix of ``path``: ``.gz``, ``.bz2``…);
    when it ends without error the file is flushed to disk (local) and renamed into place, otherwise
    it is removed and the error goes on. For one whole ``bytes`` value use :func:`write_bytes_atomic`."""
    from fsspec.core import url_to_fs
    from fsspec.utils import infer_compression

    fs, p = url_to_fs(str(path))
    parent, _, name = p.rpartition("/")
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/{_temp_name(name)}" if parent else _temp_name(name)
    local = _is_local_fs(fs)
    try:
        with fs.open(tmp, "wb", compression=infer_compression(str(path))) as f:
            yield f
        if local:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, p)
        else:
            fs.mv(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> str:
    """:func:`write_bytes_atomic` for text (UTF-8)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2, **dump_kw: Any) -> str:
    """:func:`write_bytes_atomic` for JSON (a trailing newline; ``dump_kw`` go to ``json.dumps``)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, **dump_kw) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file (path or URI); ``None`` when it is missing or not valid JSON (a marker cut short)."""
    import fsspec

    try:
        with fsspec.open(str(path), "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a local file, read in chunks (the checksums of manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- atomic directories


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Move a finished local directory ``tmp`` to ``out``: renamed into place, an existing ``out``
    first renamed aside and removed after, so a reader never sees a half-written directory at
    ``out`` (for a moment it sees none)."""
    import shutil

    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.parent / _temp_name(out.name, "old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of the local directory ``out`` left by builds that were killed
    (their process is gone, or they predate process ids in the name). Returns what was removed."""
    import shutil

    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = TEMP_NAME.match(p.name)
        if m is None or m["name"] != out.name or (m["pid"] and _alive(int(m["pid"]))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@dataclass(frozen=True)
class Staging:
    """A temporary output directory: ``fs`` (fsspec), ``path`` (without protocol), ``uri``."""

    fs: Any
    path: str

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    @property
    def is_local(self) -> bool:
        return _is_local_fs(self.fs)

    @property
    def local(self) -> Path:
        """The directory as a local :class:`Path` (local outputs only)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local directory")
        return Path(self.path)

    def arrow_filesystem(self):
        """A pyarrow filesystem for writers that need one (``None`` for local paths)."""
        if self.is_local:
            return None
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs))


def _nonempty(fs, path: str) -> bool:
    return fs.exists(path) and (fs.isfile(path) or bool(fs.ls(path)))


def _move_in_remote(fs, tmp: str, p: str) -> None:
    """Object stores have no directory rename: an old ``p`` is removed, then the files are moved
    one by one, manifests last (a reader sees the artifact complete only once its manifest is there)."""
    if fs.exists(p):
        fs.rm(p, recursive=True)
    files = sorted(fs.find(tmp), key=lambda f: (f.rsplit("/", 1)[-1] in MANIFEST_FILES, f))
    for f in files:
        fs.mv(f, p + f[len(tmp):])
    with contextlib.suppress(FileNotFoundError):
        fs.rm(tmp, recursive=True)


@contextlib.contextmanager
def staged_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Staging]:
    """Build a directory artifact atomically: yields a temporary sibling of ``out`` (a path or URI)
    to write into; when the block ends without error it replaces ``out`` (see :func:`replace_dir`),
    otherwise it is removed. An existing non-empty ``out`` is refused unless ``overwrite``; an
    existing empty one is fine. Temporaries of killed earlier builds of ``out`` are removed first."""
    from fsspec.core import url_to_fs

    out_s = str(out).rstrip("/")
    fs, p = url_to_fs(out_s)
    if fs.exists(p) and fs.isfile(p):
        raise ArtifactError(f"{out_s}: exists and is a file; expected a directory")
    if _nonempty(fs, p) and not overwrite:
        raise ArtifactError(f"{out_s}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    parent, _, name = p.rpartition("/")
    local = _is_local_fs(fs)
    if local:
        remove_stale_temporaries(p)
    tmp = f"{parent}/{_temp_name(name)}" if parent else _temp_name(name)
    fs.makedirs(tmp, exist_ok=True)
    try:
        yield Staging(fs, tmp)
        if local:
            replace_dir(tmp, p)
        else:
            _move_in_remote(fs, tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
        raise
