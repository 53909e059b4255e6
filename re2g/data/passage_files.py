"""The passages artifact: its schema (one check), writing, reading, counting, and a pid lookup.

A passages artifact is a Parquet file, or a directory of Parquet files with ``_manifest.json``
(kind ``passages``: counts, the config and the source that made it; Parquet readers skip files
starting with ``_``). Columns are strings ``pid, title, text`` and an optional ``wikipedia_id``
(null for corpora without pages). :func:`check_passage_schema` is the one check of that contract;
every reader of passages (here, :mod:`re2g.index.embed`, :mod:`re2g.index.bm25`, the lookup below)
goes through it. Splitting a knowledge source into passages is :mod:`re2g.data.passages`. The
writers also build the memory-mapped passage store (``_store/``, :mod:`re2g.data.passage_store`) that
:func:`load_passage_lookup` opens.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from re2g.artifacts import Manifest, read_manifest, staged_dir, write_manifest
from re2g.errors import DataFormatError
from re2g.types import Passage

PASSAGE_COLUMNS = ("pid", "title", "text", "wikipedia_id")
REQUIRED_COLUMNS = PASSAGE_COLUMNS[:3]
PASSAGE_SCHEMA = pa.schema([(c, pa.string()) for c in PASSAGE_COLUMNS])
MANIFEST = "_manifest.json"

PassageInfo = tuple[str, str, "str | None"]  # (title, text, wikipedia_id)

staged_output_dir = staged_dir  # the name this module's callers know


# --------------------------------------------------------------------------- the contract


def check_passage_schema(name: str, schema: pa.Schema) -> None:
    """The passages contract on a Parquet schema: string columns ``pid, title, text`` and, when
    present, ``wikipedia_id``. A missing column or a wrong type is a :class:`DataFormatError` naming
    ``name`` (the file or directory) and the column."""
    for c in PASSAGE_COLUMNS:
        if c not in schema.names:
            if c == "wikipedia_id":
                continue
            raise DataFormatError(name, f"missing column (expected columns {', '.join(PASSAGE_COLUMNS)}; "
                                        f"found {', '.join(schema.names) or 'none'})", field=c)
        typ = schema.field(c).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)):
            raise DataFormatError(name, f"expected a string column, got {typ}", field=c)


def open_passages_dataset(path: str):
    """A passages Parquet (file or directory, path or URI) as a ``pyarrow.dataset.Dataset``, its
    schema checked (:func:`check_passage_schema`)."""
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(str(path), format="parquet")
    except FileNotFoundError:
        raise DataFormatError(str(path), "passages not found (expected a Parquet file or directory)") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFormatError(str(path), f"not a readable passages Parquet: {e}") from None
    check_passage_schema(str(path), dataset.schema)
    return dataset


def passages_table(rows: Iterable[Passage | Mapping[str, Any]]) -> pa.Table:
    """Passages (records or dicts) as a table with the passages schema."""
    cols: dict[str, list] = {c: [] for c in PASSAGE_COLUMNS}
    for r in rows:
        get = r.get if isinstance(r, Mapping) else (lambda k, _r=r: getattr(_r, k))
        for c in PASSAGE_COLUMNS:
            cols[c].append(get(c))
    return pa.table(cols, schema=PASSAGE_SCHEMA)


def passages_manifest(count: int, *, config: dict | None = None, counts: Mapping[str, int] | None = None,
                      **details: Any) -> Manifest:
    """The manifest of a passages artifact of ``count`` rows (``details``: source, stats, ...)."""
    return Manifest(kind="passages", config=config, counts={"passages": count, **(counts or {})}, **details)


def read_passages_manifest(path: str) -> Manifest:
    """The manifest of a passages directory (older ``_manifest.json`` formats are mapped);
    :class:`~re2g.errors.ArtifactError` when there is none."""
    return read_manifest(path, "passages")


# --------------------------------------------------------------------------- writing


def _protocols(fs) -> tuple:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _name(fs, path: str) -> str:
    """How a file is named in messages and handed to workers: a plain path when local."""
    return path if "file" in _protocols(fs) else fs.unstrip_protocol(path)


def _parquet_files(fs, path: str) -> list[str]:
    if fs.isfile(path):
        return [path]
    return sorted(f for f in fs.ls(path, detail=False)
                  if f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith((".", "_")))


def write_passages(rows: Iterable[Passage | Mapping[str, Any]], out: str, *, overwrite: bool = False,
                   batch_rows: int = 100_000, manifest: dict | Callable[[int], dict] | None = None) -> int:
    """Write passages (one process, streaming in batches) as a passages Parquet directory,
    atomically, with its ``_manifest.json``; ``manifest`` (a dict, or a function of the row count
    called after the rows are written) gives its fields beyond the count (``config``, ``source``,
    ``stats``, ...). Does not check pids; :func:`read_passages` does. Returns the row count."""
    n = 0
    with staged_dir(out, overwrite=overwrite) as stage:
        with stage.fs.open(f"{stage.path}/part-00000.parquet", "wb") as f, \
                pq.ParquetWriter(f, PASSAGE_SCHEMA) as writer:
            batch: list = []
            for r in rows:
                batch.append(r)
                if len(batch) >= batch_rows:
                    writer.write_table(passages_table(batch))
                    n += len(batch)
                    batch = []
            if batch:
                writer.write_table(passages_table(batch))
                n += len(batch)
        fields = dict((manifest(n) if callable(manifest) else manifest) or {})
        fields.update(store_fields(stage))
        write_manifest(stage.uri, passages_manifest(n, **fields))
    return n


def store_fields(stage) -> dict:
    """Build the memory-mapped passage store (:mod:`re2g.data.passage_store`) inside a staged
    passages directory (local stages; a remote one gets its store where it is opened) and return the
    passages manifest's ``store`` field (its directory and fingerprint)."""
    if not stage.is_local:
        return {}
    from re2g.data.passage_store import STORE_DIR, write_passage_store

    m = write_passage_store(stage.path, stage.local / STORE_DIR)
    return {"store": {"dir": STORE_DIR, "passages_fingerprint": m.fingerprints["passages"]}}


# --------------------------------------------------------------------------- reading


def _passage_files(path: str) -> tuple[Any, list[str]]:
    fs, p = url_to_fs(str(path))
    if not fs.exists(p):
        raise DataFormatError(str(path), "passages not found (expected a Parquet file or directory)")
    files = _parquet_files(fs, p)
    if not files:
        raise DataFormatError(str(path), "no Parquet files in the directory (an interrupted write?)")
    return fs, files


def _read_file(fs, f: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(f, "rb") as fh:
        try:
            return pq.read_table(fh, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataFormatError(_name(fs, f), f"not a readable Parquet file: {e}") from None


def _normalize(t: pa.Table) -> pa.Table:
    if "wikipedia_id" not in t.column_names:
        t = t.append_column("wikipedia_id", pa.nulls(t.num_rows, pa.string()))
    return t.select(list(PASSAGE_COLUMNS)).cast(PASSAGE_SCHEMA)


def _check_rows(name: str, t: pa.Table, row0: int = 0) -> None:
    """Null/empty pid, null title, empty text -> DataFormatError at the (1-based) row."""
    checks = (
        ("pid", pc.or_kleene(pc.is_null(t["pid"]), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(t["pid"])), 0)),
         "empty or missing passage id"),
        ("title", pc.is_null(t["title"]), "missing title (expected a string, may be empty)"),
        ("text", pc.or_kleene(pc.is_null(t["text"]),
                              pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(t["text"])), 0)),
         "empty passage text"),
    )
    for col, bad, reason in checks:
        bad = pc.fill_null(bad, True)
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            pid = t["pid"][i].as_py()
            raise DataFormatError(name, f"{reason} (pid {pid!r})" if col != "pid" else reason,
                                  line=row0 + i + 1, field=col)


def _check_unique(names: list[str], tables: list[pa.Table]) -> None:
    """The first repeated pid (in file order) -> DataFormatError at its second row."""
    pids = pa.chunked_array([c for t in tables for c in t["pid"].chunks], type=pa.string())
    if len(pids) == 0:
        return
    counts = pc.value_counts(pids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup) == 0:
        return
    offsets = list(itertools.accumulate((t.num_rows for t in tables[:-1]), initial=0))

    def where(i: int) -> tuple[int, int]:  # (file index, 1-based row in the file)
        k = bisect.bisect_right(offsets, i) - 1
        return k, i - offsets[k] + 1

    seen: dict[str, int] = {}
    for i in pc.is_in(pids, value_set=dup).to_numpy(zero_copy_only=False).nonzero()[0].tolist():
        pid = pids[i].as_py()
        if pid not in seen:
            seen[pid] = i
            continue
        (k, row), (kf, first) = where(i), where(seen[pid])
        also = f" of {names[kf]}" if kf != k else ""
        raise DataFormatError(names[k], f"duplicate passage id {pid!r} (first at row {first}{also})",
                              line=row, field="pid")


def read_passages(path: str, *, validate: bool = True) -> pa.Table:
    """Read a passages Parquet (file or directory) as a table with string columns
    ``pid, title, text, wikipedia_id`` (``wikipedia_id`` added as nulls when absent).

    ``validate``: a missing column, a wrong type, an empty pid or text, or a duplicate pid raises
    :class:`DataFormatError` naming the file, the row (1-based) and the pid.
    """
    fs, files = _passage_files(path)
    names = [_name(fs, f) for f in files]
    tables = []
    for name, f in zip(names, files):
        t = _read_file(fs, f)
        check_passage_schema(name, t.schema)
        t = _normalize(t)
        if validate:
            _check_rows(name, t)
        tables.append(t)
    if validate:
        _check_unique(names, tables)
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def iter_passage_batches(path: str, *, batch_size: int = 10_000) -> Iterator[tuple[str, pa.Table, int]]:
    """``(file name, table, row0)`` for every batch of a passages Parquet, file by file: each file's
    schema checked (:func:`check_passage_schema`), the table normalized to :data:`PASSAGE_SCHEMA`,
    ``row0`` the batch's first row within its file (for error messages)."""
    fs, files = _passage_files(path)
    for f in files:
        name = _name(fs, f)
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            check_passage_schema(name, pf.schema_arrow)
            row0 = 0
            for batch in pf.iter_batches(batch_size=batch_size):
                t = _normalize(pa.Table.from_batches([batch]))
                yield name, t, row0
                row0 += t.num_rows


def iter_passages(path: str, *, batch_size: int = 10_000) -> Iterator[Passage]:
    """Stream the passages of a passages Parquet as :class:`~re2g.types.Passage`, file by file.
    Columns and empty texts are checked as it goes; duplicate pids are not (see :func:`read_passages`)."""
    for name, t, row0 in iter_passage_batches(path, batch_size=batch_size):
        _check_rows(name, t, row0)
        for r in t.to_pylist():
            yield Passage(pid=r["pid"], title=r["title"], text=r["text"], wikipedia_id=r["wikipedia_id"])


def count_passages(path: str) -> int:
    """Number of rows of a passages Parquet, from the file footers (reads no data)."""
    fs, files = _passage_files(path)
    n = 0
    for f in files:
        with fs.open(f, "rb") as fh:
            n += pq.ParquetFile(fh).metadata.num_rows
    return n


# --------------------------------------------------------------------------- lookup by pid


class PassageLookup(Mapping):
    """``pid -> (title, text, wikipedia_id)`` over Arrow columns: no Python object per passage.

    The texts stay in Arrow buffers and the pids in one sorted fixed-width bytes array searched by
    numpy (``np.searchsorted``), so a 21M-passage corpus costs about its raw text plus ~25 bytes per
    pid, where a ``dict`` of tuples of ``str`` costs several times that in every process holding it
    (each Serve replica, each training worker). A pid given twice keeps its first row.
    """

    def __init__(self, pids: pa.Array, titles: pa.Array, texts: pa.Array, wids: pa.Array | None = None):
        self._titles, self._texts, self._wids = titles, texts, wids
        keys = np.array([p.encode("utf-8") for p in pids.to_pylist()], dtype=np.bytes_)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        first = np.ones(len(keys), dtype=bool)  # a pid given twice: its first row (the sort is stable)
        first[1:] = keys[1:] != keys[:-1]
        self._keys, self._rows = keys[first], order[first].astype(np.int64)

    @classmethod
    def from_table(cls, table: pa.Table) -> "PassageLookup":
        """From a table with columns ``pid, title, text`` (+ optional ``wikipedia_id``); chunks are combined."""
        def col(name: str):
            return table.column(name).combine_chunks()

        return cls(col("pid"), col("title"), col("text"), col("wikipedia_id") if "wikipedia_id" in table.column_names else None)

    def _row(self, pid: str) -> int:
        if not isinstance(pid, str):
            raise KeyError(pid)
        key = np.bytes_(pid.encode("utf-8"))
        i = int(np.searchsorted(self._keys, key))
        if i >= len(self._keys) or self._keys[i] != key:
            raise KeyError(pid)
        return int(self._rows[i])

    def __getitem__(self, pid: str) -> PassageInfo:
        r = self._row(pid)
        w = None if self._wids is None else self._wids[r].as_py()
        return (self._titles[r].as_py() or "", self._texts[r].as_py() or "", None if w is None else str(w))

    def __contains__(self, pid: object) -> bool:
        try:
            self._row(pid)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        for i in np.argsort(self._rows):  # corpus order
            yield self._keys[i].decode("utf-8")


def load_passage_lookup(path: str):
    """``pid -> (title, text, wikipedia_id)`` for a passages Parquet (file or directory, path or URI):
    its memory-mapped :class:`re2g.data.passage_store.PassageStore` (a read-only ``Mapping`` with
    ``get_many``), which every process on a node shares. A store missing (passages written before
    re2g built one) or stale is built once, with a warning (:func:`~re2g.data.passage_store.open_passage_store`)."""
    from re2g.data.passage_store import open_passage_store

    return open_passage_store(str(path))


def read_passage_lookup(path: str) -> PassageLookup:
    """The in-process :class:`PassageLookup` of a passages Parquet: the whole corpus read into this
    process's memory (what every process held before the passage store; for comparison and for
    tables that exist only in memory)."""
    try:
        table = open_passages_dataset(str(path)).to_table()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFormatError(str(path), f"not a readable passages Parquet: {e}") from None
    lookup = PassageLookup.from_table(table)
    del table
    pa.default_memory_pool().release_unused()  # the chunks read (combined into one): their pages back
    return lookup
