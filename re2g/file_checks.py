"""What a normal load checks of an artifact's large files without reading them whole: each file's
size and a sha256 of its size and first/last :data:`ENDS_BYTES` bytes, recorded in the manifest at
build time (``sizes``, ``ends_sha256``) beside the full ``checksums`` that ``re2g index verify``
checks (:mod:`re2g.index.verify`). Used by the dense index and the passage store.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

ENDS_BYTES = 1 << 16  # bytes hashed at each end of a file by ends_sha256


def ends_sha256(path: str | Path, size: int | None = None) -> str:
    """sha256 of a file's size, its first and its last :data:`ENDS_BYTES` bytes (the whole file when
    it is smaller): what a normal load checks, in microseconds, to refuse a file truncated, swapped
    with another shard's or rewritten at either end. Every byte is checked by ``re2g index verify``."""
    p = Path(path)
    size = p.stat().st_size if size is None else size
    h = hashlib.sha256(str(size).encode() + b"\0")
    with open(p, "rb") as f:
        h.update(f.read(ENDS_BYTES))
        if size > ENDS_BYTES:
            f.seek(max(ENDS_BYTES, size - ENDS_BYTES))
            h.update(f.read(ENDS_BYTES))
    return h.hexdigest()


def file_records(directory: str | Path, names: Sequence[str]) -> tuple[dict[str, int], dict[str, str]]:
    """``(sizes, ends)`` of files in ``directory``: bytes and :func:`ends_sha256` by file name (the
    manifest's ``sizes`` and ``ends_sha256``, written at build time beside ``checksums``)."""
    d = Path(directory)
    sizes = {n: (d / n).stat().st_size for n in names}
    return sizes, {n: ends_sha256(d / n, sizes[n]) for n in names}
