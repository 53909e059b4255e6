"""Run directories on object stores (``s3://``, ``gs://``, any fsspec URI) for jobs that need local files.

Faiss shard files, Lucene indexes and Hugging Face model directories are read and written as local
files. A job whose run directory is remote therefore works on a local mirror:

1. :meth:`RunDirMirror.pull` copies the remote run directory into a local cache (files already there
   with the same size are kept, so a second job on the same node downloads nothing); the files it
   downloads into a dense index or a passage store are checked against their manifest's sha256, so
   loads from the mirror check sizes only;
2. the job runs on the mirror (every path under the remote run directory is mapped to the mirror
   by :meth:`RunDirMirror.localize`);
3. :meth:`RunDirMirror.push` uploads what is new or changed, commit markers (every artifact's
   manifest file, :data:`re2g.artifacts.MANIFEST_FILES`, and ``config.yaml``, ``eval.json``) last, so
   a crash mid-upload never leaves an artifact whose marker says it is complete; temporary build
   directories and files (:data:`re2g.artifacts.TEMP_NAME`) are never uploaded.

``file://`` URIs are plain local paths and need no mirror (:func:`to_local_path`).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from re2g.artifacts import MANIFEST_FILES, TEMP_NAME, replace_dir  # noqa: F401  (replace_dir: re-exported)

# Files that say "this artifact is complete"; uploaded after everything else.
COMMIT_MARKERS = MANIFEST_FILES | {"eval.json", "config.yaml"}


def is_remote(uri: str) -> bool:
    """True for URIs other than local paths and ``file://``."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def to_local_path(uri: str) -> str:
    """``file:///a/b`` -> ``/a/b``; local paths unchanged."""
    s = str(uri)
    return s[len("file://"):] if s.startswith("file://") else s


def default_cache_root() -> Path:
    """``$RE2G_CACHE`` or ``~/.cache/re2g``."""
    return Path(os.environ.get("RE2G_CACHE", Path.home() / ".cache" / "re2g"))


class RunDirMirror:
    """A local mirror of a remote run directory (see the module docstring)."""

    def __init__(self, remote: str, cache_root: str | Path | None = None):
        import fsspec

        self.remote = str(remote).rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.remote)
        digest = hashlib.sha256(self.remote.encode()).hexdigest()[:12]
        self.local = str(Path(cache_root or default_cache_root()) / "runs" / digest)
        self._pulled_at = 0.0  # files modified after this were written by the job

    def localize(self, path: str | None) -> str | None:
        """Map a path under the remote run directory to the mirror; ``file://`` to a path; others unchanged."""
        if path is None:
            return None
        s = str(path)
        if s == self.remote or s.startswith(self.remote + "/"):
            return self.local + s[len(self.remote):]
        return to_local_path(s)

    def _remote_files(self) -> dict[str, int]:
        if not self.fs.exists(self._root):
            return {}
        out = {}
        for p, info in self.fs.find(self._root, detail=True).items():
            if info.get("type", "file") == "file":
                out[p[len(self._root.rstrip("/")) + 1:]] = int(info.get("size") or 0)
        return out

    def pull(self, *, verify: bool = True) -> int:
        """Download what the mirror lacks; returns the number of files downloaded.

        ``verify``: the downloaded files of a dense index or a passage store are checked against the
        sha256 their manifest recorded (:func:`re2g.index.verify.verify_artifact`; loads then check
        sizes only); a file that does not match is deleted from the mirror and is an
        :class:`~re2g.errors.ArtifactError` naming it."""
        n = 0
        fetched: dict[Path, list[str]] = {}
        for rel, size in self._remote_files().items():
            dst = Path(self.local, rel)
            if dst.exists() and dst.stat().st_size == size:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.part")
            self.fs.get_file(f"{self._root.rstrip('/')}/{rel}", str(tmp))
            tmp.replace(dst)
            fetched.setdefault(dst.parent, []).append(dst.name)
            n += 1
        Path(self.local).mkdir(parents=True, exist_ok=True)
        if verify:
            self._verify(fetched)
        self._pulled_at = time.time()
        return n

    def _verify(self, fetched: dict[Path, list[str]]) -> None:
        """sha256 of the files just downloaded into checksummed artifacts (dense indexes, passage stores)."""
        from re2g.errors import ArtifactError
        from re2g.index.verify import CHECKED_KINDS, verify_artifact

        for d, names in fetched.items():
            if not any((d / f).is_file() for f in CHECKED_KINDS):
                continue
            try:
                checks = verify_artifact(d, names)
            except ArtifactError:
                continue  # a manifest with no checksums (or not one of those kinds): nothing to check
            bad = [c for c in checks if not c.ok]
            for c in bad:
                Path(c.artifact, c.file).unlink(missing_ok=True)  # the next pull downloads it again
            if bad:
                raise ArtifactError(f"{self.remote}: downloaded {Path(bad[0].artifact, bad[0].file)} does not match its "
                                    f"manifest ({bad[0].status}: {bad[0].detail}); removed from the mirror"
                                    + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))

    def push(self) -> int:
        """Upload new or changed files of the mirror, commit markers last; returns the number uploaded."""
        remote = self._remote_files()
        changed = []
        for p in sorted(Path(self.local).rglob("*")):
            if not p.is_file() or p.name.endswith(".part"):
                continue
            rel = p.relative_to(self.local).as_posix()
            parts = rel.split("/")
            if any(TEMP_NAME.match(part) for part in parts) or (parts[0].startswith(".") and parts[0] != ".quickstart"):
                continue  # temporary build directories and files
            st = p.stat()
            if remote.get(rel) == st.st_size and st.st_mtime <= self._pulled_at:
                continue
            changed.append(rel)
        changed.sort(key=lambda r: (Path(r).name in COMMIT_MARKERS, r))
        for rel in changed:
            dst = f"{self._root.rstrip('/')}/{rel}"
            self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(Path(self.local, rel)), dst)
        return len(changed)

