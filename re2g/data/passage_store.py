"""The passage store: ``pid -> (title, text, wikipedia_id)`` from memory-mapped, read-only files that
every process on a node opens without copying (Serve replicas, shard actors, training workers,
mining and prediction actors).

A passages artifact (:mod:`re2g.data.passage_files`) is Parquet, which has to be decoded into each
process's own memory before a passage can be looked up by pid: ~0.7 KB per passage, ~15 GB at 21M
passages, in every process. The store is the same passages in a layout the OS page cache shares::

    PASSAGES/_store/
      passages.arrow   Arrow IPC file (Feather v2), uncompressed: pid, title, text, wikipedia_id (string),
                       corpus order, record batches of <= 65,536 rows; read through ``pyarrow.memory_map``
      pids.npy         (U,) ``S{w}``: the unique pids as UTF-8, sorted bytewise, NUL-padded to the longest
      rows.npy         (U,) int64: the row of ``passages.arrow`` holding each pid of ``pids.npy``
                       (a pid given twice: its first row)
      _store.json      kind ``passage-store`` of :mod:`re2g.artifacts`: counts, the Parquet's fingerprint
                       (:func:`passages_fingerprint`), file sizes, sha256 checksums

A lookup is a binary search (``np.searchsorted``) over the memory-mapped ``pids.npy``, then the row's
strings from the memory-mapped Arrow batches: nothing is read into the process but the pages touched,
and those pages are the page cache's, shared by every process that maps the same files.

**Where.** The writers of passages (:func:`re2g.data.passage_files.write_passages`,
:func:`re2g.data.passages.split_knowledge_source`) build the store inside the artifact
(``PASSAGES/_store``, which Parquet readers skip). For passages without one (written before the store
existed, or a single Parquet file, a remote URI, a read-only directory) :func:`open_passage_store`
builds it once, with a warning, in ``PASSAGES/_store`` when the directory is writable, else in
``$RE2G_CACHE/passage_stores/``; concurrent openers wait on a lock instead of building twice.

**Checks.** Opening checks the manifest, the file sizes and ends (:mod:`re2g.file_checks`), that the
Arrow file and the pid index belong to this manifest, and that the passages' Parquet fingerprint (its files' names, sizes and footers) is the
one the store was built from (else the store is rebuilt). The sha256 checksums are verified on demand
(``re2g index verify``, :func:`re2g.index.verify.verify_artifacts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from re2g.artifacts import Manifest, read_manifest, sha256_file, staged_dir, write_manifest
from re2g.errors import ArtifactError, DataFormatError
from re2g.file_checks import ENDS_BYTES, ends_sha256, file_records

log = logging.getLogger(__name__)

KIND = "passage-store"
STORE_DIR = "_store"
ARROW_FILE = "passages.arrow"
PIDS_FILE = "pids.npy"
ROWS_FILE = "rows.npy"
STORE_FILES = (ARROW_FILE, PIDS_FILE, ROWS_FILE)
MANIFEST_FILE = "_store.json"  # re2g.artifacts.KINDS["passage-store"].file
BATCH_ROWS = 65_536
FINGERPRINT_KEY = b"re2g.passages_fingerprint"

PassageInfo = tuple[str, str, "str | None"]  # (title, text, wikipedia_id)


# --------------------------------------------------------------------------- where, and which passages


def passages_fingerprint(path: str) -> str:
    """A fingerprint of a passages Parquet (file or directory, path or URI) that is cheap to take at
    every open: sha256 over each Parquet file's name, size and footer (the footer holds the row
    groups' byte offsets, sizes and column statistics, so rewritten content changes it)."""
    from re2g.data.passage_files import _passage_files

    fs, files = _passage_files(path)
    h = hashlib.sha256()
    for f in files:
        size = int(fs.size(f))
        with fs.open(f, "rb") as fh:
            if size < 12:
                raise DataFormatError(str(f), f"not a Parquet file ({size} bytes)")
            fh.seek(size - 8)
            tail = fh.read(8)
            footer_len = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or footer_len + 8 > size:
                raise DataFormatError(str(f), "not a Parquet file (no Parquet footer)")
            fh.seek(size - 8 - footer_len)
            footer = fh.read(footer_len)
        h.update(f"{f.rsplit('/', 1)[-1]}\0{size}\0".encode())
        h.update(footer)
    return h.hexdigest()


def _cache_root() -> Path:
    from re2g.storage import default_cache_root

    return default_cache_root() / "passage_stores"


def _local_dir(path: str) -> Path | None:
    """``path`` as a local directory, or None (a file, a remote URI, missing)."""
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if "://" in s:
        return None
    p = Path(s)
    return p if p.is_dir() else None


def store_location(passages: str) -> str:
    """Where the store of ``passages`` is, or is built: ``PASSAGES/_store`` for a local passages
    directory that has one or can be written, else ``$RE2G_CACHE/passage_stores/<digest>``."""
    d = _local_dir(passages)
    if d is not None and ((d / STORE_DIR).is_dir() or os.access(d, os.W_OK)):
        return str(d / STORE_DIR)
    return _cache_location(passages)


def _cache_location(passages: str) -> str:
    s = str(passages)
    if "://" not in s:
        s = str(Path(s).absolute())
    return str(_cache_root() / hashlib.sha256(s.encode()).hexdigest()[:16])


# --------------------------------------------------------------------------- building


def _keys(name: str, pids: pa.Array, row0: int) -> np.ndarray:
    """The pids of one batch as a fixed-width bytes array; an empty, null or NUL-holding pid is a
    :class:`DataFormatError` at its (1-based) row."""
    bad = pc.fill_null(pc.or_kleene(pc.equal(pc.utf8_length(pids), 0), pc.match_substring(pids, "\x00")), True)
    if len(pids) and pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise DataFormatError(name, "empty, missing or NUL-holding passage id", line=row0 + i + 1, field="pid")
    return pids.cast(pa.binary()).to_numpy(zero_copy_only=False).astype(np.bytes_)


def write_passage_store(passages: str, out: str | Path, *, fingerprint: str | None = None) -> Manifest:
    """Build the passage store of the passages Parquet ``passages`` (file or directory, path or URI)
    in the local directory ``out``, atomically (:func:`re2g.artifacts.staged_dir`; an existing store
    there is replaced). Streams the Parquet batch by batch into the Arrow file; holds only the pids
    (their fixed-width keys and one argsort) in memory. Returns the store's manifest."""
    from re2g.data.passage_files import PASSAGE_SCHEMA, iter_passage_batches

    t0 = time.perf_counter()
    fingerprint = fingerprint or passages_fingerprint(passages)
    schema = PASSAGE_SCHEMA.with_metadata({FINGERPRINT_KEY: fingerprint.encode()})
    with staged_dir(out, overwrite=True) as stage:
        d = stage.local
        keys: list[np.ndarray] = []
        n = 0
        with pa.OSFile(str(d / ARROW_FILE), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for name, t, row0 in iter_passage_batches(str(passages), batch_size=BATCH_ROWS):
                t = t.combine_chunks()
                keys.append(_keys(name, t.column("pid").chunk(0) if t.num_rows else pa.array([], pa.string()), row0))
                for b in t.to_batches(max_chunksize=BATCH_ROWS):
                    writer.write_batch(b)
                n += t.num_rows
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype="S1")  # (N,) S{w}
        del keys
        order = np.argsort(all_keys, kind="stable")  # (N,) a pid given twice: its first row first
        sorted_keys = all_keys[order]
        del all_keys
        first = np.ones(len(sorted_keys), dtype=bool)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        np.save(d / PIDS_FILE, np.ascontiguousarray(sorted_keys[first]))
        np.save(d / ROWS_FILE, order[first].astype(np.int64))
        unique, width = int(first.sum()), sorted_keys.dtype.itemsize
        del sorted_keys, order, first
        manifest = Manifest(
            kind=KIND, counts={"passages": unique, "rows": n, "duplicates": n - unique},
            fingerprints={"passages": fingerprint},
            checksums={f: sha256_file(d / f) for f in STORE_FILES},
            sizes=file_records(d, STORE_FILES)[0], ends_sha256=file_records(d, STORE_FILES)[1],
            format="arrow-ipc", batch_rows=BATCH_ROWS, key_width=width,
            source=str(passages), seconds=round(time.perf_counter() - t0, 3))
        write_manifest(d, manifest)
    return manifest


@contextlib.contextmanager
def _build_lock(store_dir: str) -> Iterator[None]:
    """An exclusive lock (``fcntl.flock``) per store location, outside the artifact (in the cache)."""
    import fcntl

    locks = _cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / (hashlib.sha256(str(Path(store_dir).absolute()).encode()).hexdigest()[:16] + ".lock")
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class StaleStore(ArtifactError):
    """A passage store that does not belong to the passages it is opened for (or is incomplete)."""


def open_passage_store(passages: str, *, build: bool = True) -> "PassageStore":
    """The :class:`PassageStore` of a passages Parquet (file or directory, path or URI).

    A store that is missing, incomplete, or built from other passages (the fingerprint differs) is
    built (again) once, with a warning, when ``build`` (see the module docstring: where); otherwise
    that is an :class:`ArtifactError`."""
    fp = passages_fingerprint(passages)
    where = store_location(passages)
    try:
        return PassageStore(where, source=str(passages), expected_fingerprint=fp)
    except StaleStore as e:
        if not build:
            raise
        reason = str(e)
    parent = Path(where).parent
    if parent.exists() and not os.access(parent, os.W_OK):  # a stale store in a read-only artifact
        where = _cache_location(passages)
        try:
            return PassageStore(where, source=str(passages), expected_fingerprint=fp)
        except StaleStore:
            pass
    with _build_lock(where):
        try:  # another process may have built it while this one waited
            return PassageStore(where, source=str(passages), expected_fingerprint=fp)
        except StaleStore:
            pass
        log.warning("passages %s: %s; building the memory-mapped passage store once at %s", passages, reason, where)
        m = write_passage_store(passages, where, fingerprint=fp)
        log.warning("passage store %s: %d passages in %.1f s", where, m.counts["passages"], m.extra["seconds"])
    return PassageStore(where, source=str(passages), expected_fingerprint=fp)


def _reopen(store_dir: str, source: str | None) -> "PassageStore":
    """Unpickle: reopen the store's files in this process (the same node: the same page cache)."""
    if Path(store_dir, MANIFEST_FILE).is_file() or source is None:
        return PassageStore(store_dir, source=source)
    return open_passage_store(source)  # another node without the store's path: its own copy


# --------------------------------------------------------------------------- the lookup


class PassageStore(Mapping):
    """``pid -> (title, text, wikipedia_id)`` over a memory-mapped passage store (the module
    docstring): a read-only ``Mapping`` (``store[pid]``, ``get``, ``in``, ``len``, iteration in corpus
    order) plus :meth:`get_many` for a batch. Pickles as its path: an actor reopens the files."""

    def __init__(self, store_dir: str | Path, *, source: str | None = None, expected_fingerprint: str | None = None):
        self.path = str(store_dir)
        self.source = source
        d = Path(store_dir)
        if not (d / MANIFEST_FILE).is_file():
            raise StaleStore("no passage store yet (passages written before re2g built one, a single Parquet "
                             "file, a remote URI or a read-only directory)")
        try:
            m = read_manifest(d, KIND)
        except ArtifactError as e:
            raise StaleStore(f"no complete passage store at {d} ({e})") from None
        if expected_fingerprint is not None and m.fingerprints["passages"] != expected_fingerprint:
            raise StaleStore(f"the passage store at {d} was built from other passages (fingerprint "
                             f"{m.fingerprints['passages'][:12]}…, the passages' is {expected_fingerprint[:12]}…)")
        for f in STORE_FILES:
            p = d / f
            if not p.is_file():
                raise StaleStore(f"{p}: missing from the passage store")
            want, size = int(m.extra["sizes"].get(f, -1)), p.stat().st_size
            if size != want:
                raise ArtifactError(f"{p}: {size} bytes, the store's manifest says {want} "
                                    f"(truncated or replaced; `re2g index verify {d}` checks every file, "
                                    f"`rm -r {d}` and reopening rebuilds it)")
            ends = (m.extra.get("ends_sha256") or {}).get(f)
            if ends is not None and ends_sha256(p, size) != ends:
                raise ArtifactError(f"{p}: changed on disk: its first/last {ENDS_BYTES // 1024} KiB differ from the "
                                    f"build's (another store's file?); `rm -r {d}` and reopening rebuilds it")
        self.manifest = m
        self._mmap = pa.memory_map(str(d / ARROW_FILE), "r")
        try:
            reader = pa.ipc.open_file(self._mmap)
        except pa.ArrowInvalid as e:
            raise ArtifactError(f"{d / ARROW_FILE}: not a readable Arrow IPC file ({e})") from None
        got = (reader.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode()
        if got != m.fingerprints["passages"]:
            raise ArtifactError(f"{d / ARROW_FILE}: built from passages {got[:12] or 'unknown'}…, the store's "
                                f"manifest says {m.fingerprints['passages'][:12]}… (files of two stores mixed?)")
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches]).astype(np.int64)  # (n_batches + 1,)
        self._col_views: list = [None] * len(self._batches)
        self._keys = np.load(d / PIDS_FILE, mmap_mode="r")  # (U,) S{w}, sorted
        self._rows = np.load(d / ROWS_FILE, mmap_mode="r")  # (U,) int64
        if int(self._starts[-1]) != m.counts["rows"] or len(self._keys) != m.counts["passages"] \
                or len(self._rows) != len(self._keys):
            raise ArtifactError(f"{d}: holds {int(self._starts[-1])} rows and {len(self._keys)} pids, the manifest "
                                f"says {m.counts['rows']} and {m.counts['passages']}")
        self._width = self._keys.dtype.itemsize

    def __reduce__(self):
        return (_reopen, (self.path, self.source))

    # ---------------------------------------------------------------- pid -> row

    def rows_of(self, pids: Sequence[object]) -> np.ndarray:
        """The corpus row of each pid, ``-1`` where it is not in the store: (len(pids),) int64."""
        out = np.full(len(pids), -1, dtype=np.int64)
        ok = [i for i, p in enumerate(pids) if isinstance(p, str)]
        if not ok or not len(self._keys):
            return out
        raw = [pids[i].encode("utf-8") for i in ok]
        fits = np.array([0 < len(r) <= self._width and b"\0" not in r for r in raw], dtype=bool)
        if not fits.any():
            return out
        idx_in = np.asarray(ok)[fits]
        needles = np.array([r for r, f in zip(raw, fits) if f], dtype=self._keys.dtype)  # (B,) S{w}
        j = np.searchsorted(self._keys, needles)
        jc = np.minimum(j, len(self._keys) - 1)
        hit = (j < len(self._keys)) & (self._keys[jc] == needles)
        out[idx_in[hit]] = self._rows[jc[hit]]
        return out

    def _views(self, k: int) -> list[tuple[np.ndarray, memoryview, np.ndarray | None]]:
        """Zero-copy views of batch ``k``'s title, text and wikipedia_id columns: offsets (n+1,)
        int32, the UTF-8 bytes, the validity bitmap (or None: no nulls). Strings are cut from these
        directly: no Arrow compute kernel runs in a lookup (the first one costs a process ~26 MB)."""
        views = self._col_views[k]
        if views is None:
            views = []
            for c in (1, 2, 3):
                arr = self._batches[k].column(c)
                valid, offs, data = arr.buffers()
                o = np.frombuffer(offs, dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
                bits = None
                if arr.null_count:
                    bits = np.unpackbits(np.frombuffer(valid, dtype=np.uint8), bitorder="little")[
                        arr.offset:arr.offset + len(arr)]
                views.append((o, memoryview(data) if data is not None else memoryview(b""), bits))
            self._col_views[k] = views
        return views

    def fetch_rows(self, rows: np.ndarray) -> list[PassageInfo]:
        """``(title, text, wikipedia_id)`` of corpus rows (every one in range), in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        b = np.searchsorted(self._starts, rows, side="right") - 1  # (B,) batch of each row
        local = rows - self._starts[b]  # (B,) row inside its batch
        out: list = []
        for k, i in zip(b.tolist(), local.tolist()):
            fields = []
            for o, data, bits in self._views(k):
                if bits is not None and not bits[i]:
                    fields.append(None)
                else:
                    fields.append(str(data[o[i]:o[i + 1]], "utf-8"))
            t, x, w = fields
            out.append((t or "", x or "", w))
        return out

    def get_many(self, pids: Sequence[str]) -> list[PassageInfo | None]:
        """A batch of lookups: ``(title, text, wikipedia_id)`` per pid, ``None`` where it is unknown."""
        pids = list(pids)
        rows = self.rows_of(pids)
        found = np.flatnonzero(rows >= 0)
        out: list = [None] * len(pids)
        for i, info in zip(found.tolist(), self.fetch_rows(rows[found])):
            out[i] = info
        return out

    # ---------------------------------------------------------------- Mapping

    def __getitem__(self, pid: str) -> PassageInfo:
        info = self.get_many([pid])[0]
        if info is None:
            raise KeyError(pid)
        return info

    def __contains__(self, pid: object) -> bool:
        return bool(self.rows_of([pid])[0] >= 0)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        """The pids in corpus order (a pid given twice: once, at its first row)."""
        keep = None
        if self.manifest.counts.get("duplicates"):
            keep = np.zeros(int(self._starts[-1]), dtype=bool)
            keep[np.asarray(self._rows)] = True
        for k, batch in enumerate(self._batches):
            pids = batch.column(0).to_pylist()
            if keep is None:
                yield from pids
            else:
                mask = keep[self._starts[k]:self._starts[k + 1]]
                yield from (p for p, m in zip(pids, mask) if m)

    def __repr__(self) -> str:
        return f"PassageStore({self.path!r}, {len(self)} passages)"

    def nbytes_on_disk(self) -> int:
        """Bytes of the store's files (what the page cache holds once, for every process on the node)."""
        return sum(int(v) for v in self.manifest.extra["sizes"].values())

