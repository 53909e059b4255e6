"""Passages: splitting a KILT knowledge source into ~100-word passages, and the passages Parquet.

**Splitting** (:func:`split_page`, pure). Paragraph 0 of a KILT page repeats the title and is skipped
unless ``include_title_paragraph``. Words are whitespace tokens. Paragraphs are added whole while
the passage stays within ``max_words``; a passage is emitted as soon as it has ``min_words`` (or the
page ends, so only a page's last passage may be shorter). A paragraph that does not fit tops the
current passage up to ``max_words`` and its remaining words go on the same way, so a paragraph
longer than ``max_words`` becomes pieces of ``max_words`` words. Passage text is its words joined
by single spaces: the passages of a page, joined, give back exactly the page's words.

**Ids.** ``f"{wikipedia_id}::[{start},{end}]"``: the first and last paragraph (inclusive, KILT
paragraph indexes) the passage has words from. Only pieces of one paragraph can share a range;
the second and later get ``#1``, ``#2``, ...: ``123::[3,3]``, ``123::[3,3]#1``. :func:`parse_pid`
reads any of them back to ``(wikipedia_id, start, end)``.

**At scale** (:func:`split_knowledge_source`) the source is cut into byte ranges (``chunk_bytes``;
one per compressed file) that Ray Data processes in parallel, in two passes: the first validates
every row (errors name the file and the line) and finds duplicate page ids, the second splits and
writes Parquet into a temporary sibling directory that is renamed into place at the end.

**The artifact** (:mod:`re2g.data.passage_files`: its one schema check, writing, reading, the pid
lookup; re-exported here): a directory of Parquet files with string columns ``pid, title, text,
wikipedia_id`` (``wikipedia_id`` is null for corpora without pages), plus ``_manifest.json`` (kind
``passages`` of :mod:`re2g.artifacts`: counts, config, source, stats), which Parquet readers ignore.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.utils import infer_compression

from re2g.artifacts import staged_dir, write_manifest
from re2g.config import PassageConfig
from re2g.data.passage_files import (  # noqa: F401  (re-exported: the names callers import from here)
    MANIFEST,
    PASSAGE_COLUMNS,
    PASSAGE_SCHEMA,
    _name,
    _parquet_files,
    count_passages,
    iter_passages,
    passages_manifest,
    passages_table,
    read_passages,
    staged_output_dir,
    store_fields,
    write_passages,
)
from re2g.types import PID_PATTERN
from re2g.data.kilt import (
    DUPLICATE_ID,
    KnowledgePage,
    RowError,
    RowReport,
    open_input,
    parse_json_line,
    parse_page,
)
from re2g.errors import ArtifactError, DataFormatError

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024

log = logging.getLogger(__name__)

_PID_RE = PID_PATTERN


# --------------------------------------------------------------------------- ids


def make_pid(wikipedia_id: str, start: int, end: int, piece: int = 0) -> str:
    """``wid::[start,end]``, with ``#piece`` for the second and later pieces of one range."""
    pid = f"{wikipedia_id}::[{start},{end}]"
    return f"{pid}#{piece}" if piece else pid


def parse_pid(pid: str) -> tuple[str, int, int]:
    """``"123::[3,5]"`` or ``"123::[3,3]#2"`` -> ``("123", 3, 5)``; other strings raise ``ValueError``."""
    m = _PID_RE.match(pid) if isinstance(pid, str) else None
    if m is None:
        raise ValueError(f"not a KILT passage id (expected 'wikipedia_id::[start,end]'): {pid!r}")
    return m["wid"], int(m["start"]), int(m["end"])


# --------------------------------------------------------------------------- splitting (pure)


def split_page(page: Mapping[str, Any] | KnowledgePage, cfg: PassageConfig) -> list[dict]:
    """Split one knowledge-source page into passages ``{pid, title, text, wikipedia_id}``.

    Every passage has at most ``cfg.max_words`` words and at least ``cfg.min_words`` except the
    page's last; see the module docstring for the rule and the id scheme.
    """
    if isinstance(page, KnowledgePage):
        wid, title, paragraphs = page.wikipedia_id, page.wikipedia_title, page.text
    else:
        wid, title, paragraphs = str(page["wikipedia_id"]), page.get("wikipedia_title") or "", page["text"]
    out: list[dict] = []
    pieces: dict[tuple[int, int], int] = {}
    buf: list[str] = []
    start = end = 0

    def emit() -> None:
        k = pieces.get((start, end), 0)
        pieces[(start, end)] = k + 1
        out.append({"pid": make_pid(wid, start, end, k), "title": title, "text": " ".join(buf),
                    "wikipedia_id": wid})

    for i in range(0 if cfg.include_title_paragraph else 1, len(paragraphs)):
        words = paragraphs[i].split()
        pos = 0
        while pos < len(words):
            take = min(cfg.max_words - len(buf), len(words) - pos)
            if not buf:
                start = i
            buf.extend(words[pos:pos + take])
            end = i
            pos += take
            if len(buf) >= cfg.min_words:
                emit()
                buf = []
    if buf:
        emit()
    return out


# --------------------------------------------------------------------------- stats


@dataclass
class PassageStats:
    """What a split or a conversion produced. ``pages``: source rows accepted (pages for KILT,
    passages for DPR/BEIR); ``skipped``: bad rows skipped (by kind in ``report``)."""

    pages: int
    passages: int
    words_min: int
    words_mean: float
    words_max: int
    skipped: int
    seconds: float
    source: str = ""
    out: str = ""
    report: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self):
        """A ``rich`` table for the console."""
        from rich.table import Table

        t = Table(title=f"passages: {self.out}" if self.out else "passages", show_header=False)
        t.add_column("", style="bold")
        t.add_column("", justify="right")
        t.add_row("source", self.source)
        t.add_row("pages", f"{self.pages:,}")
        t.add_row("passages", f"{self.passages:,}")
        t.add_row("words min / mean / max", f"{self.words_min} / {self.words_mean:.1f} / {self.words_max}")
        skipped = f"{self.skipped:,}"
        if self.skipped and self.report.get("by_kind"):
            skipped += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.report["by_kind"].items())) + ")"
        t.add_row("bad rows skipped", skipped)
        t.add_row("seconds", f"{self.seconds:.1f}")
        return t


# --------------------------------------------------------------------------- Ray Data split

# One chunk: the lines of ``uri`` whose first byte lies in [start, end) (end < 0: to the end).


def _source_files(source: str) -> tuple[Any, list[str]]:
    fs, p = url_to_fs(str(source))
    if any(ch in p for ch in "*?["):
        files = sorted(fs.glob(p))
    elif fs.isdir(p):
        files = sorted(f for f in fs.ls(p, detail=False)
                       if re.search(r"\.jsonl?(\.\w+)?$", f) and not f.rsplit("/", 1)[-1].startswith((".", "_")))
    elif fs.exists(p):
        files = [p]
    else:
        raise DataFormatError(str(source), "knowledge source not found")
    if not files:
        raise DataFormatError(str(source), "no jsonl files found")
    return fs, files


def auto_chunk_bytes(total_bytes: int, cpus: int) -> int:
    """About four chunks per CPU, each between 1 MiB and ``DEFAULT_CHUNK_BYTES``."""
    return int(min(DEFAULT_CHUNK_BYTES, max(1 << 20, -(-total_bytes // max(4 * cpus, 1)))))


def plan_chunks(source: str, chunk_bytes: int | None = None, *, cpus: int = 1) -> list[dict]:
    """Byte ranges of the source's files, in file order (compressed files are one chunk each).
    ``chunk_bytes=None``: :func:`auto_chunk_bytes` for ``cpus``."""
    fs, files = _source_files(source)
    if chunk_bytes is None:
        chunk_bytes = auto_chunk_bytes(sum(fs.size(f) for f in files), cpus)
    chunks = []
    for f in files:
        uri = _name(fs, f)
        size = fs.size(f)
        if infer_compression(f) or size <= chunk_bytes:
            chunks.append({"uri": uri, "start": 0, "end": -1})
            continue
        for s in range(0, size, chunk_bytes):
            chunks.append({"uri": uri, "start": s, "end": min(s + chunk_bytes, size)})
    for i, c in enumerate(chunks):
        c["chunk"] = i
    return chunks


def _chunk_lines(chunk: Mapping) -> Iterator[tuple[int, bytes]]:
    """``(line number within the chunk, raw line)`` for every line the chunk owns."""
    start, end = chunk["start"], chunk["end"]
    with open_input(chunk["uri"], "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before ``start`` (or just its "\n")
            pos = f.tell()
        else:
            pos = 0
        n = 0
        while end < 0 or pos < end:
            raw = f.readline()
            if not raw:
                break
            n += 1
            pos += len(raw)
            yield n, raw


_SCAN_SCHEMA = pa.schema([
    ("chunk", pa.int64()), ("lines", pa.int64()),
    ("wids", pa.list_(pa.string())), ("wid_lines", pa.list_(pa.int64())),
    ("n_passages", pa.list_(pa.int32())), ("w_sum", pa.list_(pa.int64())),
    ("w_min", pa.list_(pa.int32())), ("w_max", pa.list_(pa.int32())),
    ("errors", pa.string()), ("error_counts", pa.string()),
])


def _scan_chunk(chunk: Mapping, cfg: PassageConfig, keep_errors: int = 5) -> dict:
    """Validate and split one chunk without keeping the passages: per page its id, line and
    passage/word counts; bad rows as ``[line, kind, field, reason]`` (the first few of each kind)."""
    out: dict[str, Any] = {k: [] for k in ("wids", "wid_lines", "n_passages", "w_sum", "w_min", "w_max")}
    errors: list = []
    counts: dict[str, int] = {}
    lines = 0
    for n, raw in _chunk_lines(chunk):
        lines = n
        if not raw.strip():
            continue
        try:
            page = parse_page(parse_json_line(raw, chunk["uri"], n), chunk["uri"], n, keep_extra=False)
        except RowError as e:
            counts[e.kind] = counts.get(e.kind, 0) + 1
            if counts[e.kind] <= keep_errors:
                errors.append([n, e.kind, e.field, e.reason])
            continue
        words = [len(p["text"].split()) for p in split_page(page, cfg)]
        out["wids"].append(page.wikipedia_id)
        out["wid_lines"].append(n)
        out["n_passages"].append(len(words))
        out["w_sum"].append(sum(words))
        out["w_min"].append(min(words, default=0))
        out["w_max"].append(max(words, default=0))
    return {"chunk": chunk["chunk"], "lines": lines, **out, "errors": json.dumps(errors),
            "error_counts": json.dumps(counts)}


def _scan_batch(batch: pa.Table, cfg: PassageConfig) -> pa.Table:
    rows = [_scan_chunk(c, cfg) for c in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=_SCAN_SCHEMA)


def _split_chunk(chunk: Mapping, cfg: PassageConfig) -> Iterator[dict]:
    """The passages of one chunk's valid pages (rows listed in ``chunk['skip']`` and bad rows,
    already reported by the scan, are left out)."""
    skip = set(json.loads(chunk["skip"]))
    for n, raw in _chunk_lines(chunk):
        if n in skip or not raw.strip():
            continue
        try:
            page = parse_page(parse_json_line(raw, chunk["uri"], n), chunk["uri"], n, keep_extra=False)
        except RowError:
            continue
        yield from split_page(page, cfg)


@dataclass
class _ScanResult:
    pages: int
    passages: int
    words_min: int
    words_mean: float
    words_max: int
    errors: list[RowError]          # in file order; every kind's first few
    counts: dict[str, int]          # all bad rows by kind
    skip: dict[int, list[int]]      # chunk -> duplicate rows (chunk lines) to leave out


def _collect_scan(scan: pa.Table, chunks: list[dict]) -> _ScanResult:
    """Absolute line numbers, duplicate page ids and totals from the per-chunk scans."""
    scan = scan.sort_by("chunk")
    first_line: dict[int, int] = {}
    next_line: dict[str, int] = {}
    for c, lines in zip(scan["chunk"].to_pylist(), scan["lines"].to_pylist()):
        uri = chunks[c]["uri"]
        first_line[c] = next_line.get(uri, 1)
        next_line[uri] = first_line[c] + lines

    def line_of(c: int, n: int) -> int:
        return first_line[c] + n - 1

    errors: list[tuple[int, int, RowError]] = []
    counts: dict[str, int] = {}
    columns = (scan[k].to_pylist() for k in ("chunk", "errors", "error_counts"))
    for c, errs, cnt in zip(*columns):
        for n, kind, fld, reason in json.loads(errs):
            errors.append((c, n, RowError(chunks[c]["uri"], reason, line=line_of(c, n), field=fld, kind=kind)))
        for k, v in json.loads(cnt).items():
            counts[k] = counts.get(k, 0) + v

    # Duplicate page ids: keep the first occurrence in file order.
    parent = pc.list_parent_indices(scan["wids"])
    flat = pa.table({
        "wid": pc.list_flatten(scan["wids"]),
        "chunk": pc.take(scan["chunk"], parent),
        "line": pc.list_flatten(scan["wid_lines"]),
    })
    order = pa.array(np.arange(flat.num_rows, dtype=np.int64))
    flat = flat.append_column("order", order)
    dup_rows = np.zeros(flat.num_rows, dtype=bool)
    skip: dict[int, list[int]] = {}
    if flat.num_rows:
        grouped = flat.group_by("wid").aggregate([("order", "count")])
        dup_ids = pc.filter(grouped["wid"], pc.greater(grouped["order_count"], 1))
        if len(dup_ids):
            sub = flat.filter(pc.is_in(flat["wid"], value_set=dup_ids)).sort_by("order")
            first: dict[str, tuple[int, int]] = {}
            kept = 0
            for r in sub.to_pylist():
                if r["wid"] not in first:
                    first[r["wid"]] = (r["chunk"], r["line"])
                    continue
                dup_rows[r["order"]] = True
                skip.setdefault(r["chunk"], []).append(r["line"])
                counts[DUPLICATE_ID] = counts.get(DUPLICATE_ID, 0) + 1
                if kept < 5:
                    kept += 1
                    fc, fn = first[r["wid"]]
                    where = f"line {line_of(fc, fn)}"
                    if chunks[fc]["uri"] != chunks[r["chunk"]]["uri"]:
                        where += f" of {chunks[fc]['uri']}"
                    errors.append((r["chunk"], r["line"], RowError(
                        chunks[r["chunk"]]["uri"], f"duplicate wikipedia_id {r['wid']!r} (first on {where})",
                        line=line_of(r["chunk"], r["line"]), field="wikipedia_id", kind=DUPLICATE_ID)))
    errors.sort(key=lambda e: (e[0], e[1]))

    keep = ~dup_rows
    n_pass = pc.list_flatten(scan["n_passages"]).to_numpy(zero_copy_only=False)[keep]
    w_sum = pc.list_flatten(scan["w_sum"]).to_numpy(zero_copy_only=False)[keep]
    has = n_pass > 0
    w_min = pc.list_flatten(scan["w_min"]).to_numpy(zero_copy_only=False)[keep][has]
    w_max = pc.list_flatten(scan["w_max"]).to_numpy(zero_copy_only=False)[keep][has]
    passages = int(n_pass.sum())
    return _ScanResult(
        pages=int(keep.sum()), passages=passages,
        words_min=int(w_min.min()) if len(w_min) else 0,
        words_mean=float(w_sum.sum() / passages) if passages else 0.0,
        words_max=int(w_max.max()) if len(w_max) else 0,
        errors=[e for _, _, e in errors], counts=counts, skip=skip)


def split_knowledge_source(source: str, out: str, cfg: PassageConfig | None = None, *,
                           skip_bad_rows: bool = False, overwrite: bool = False,
                           chunk_bytes: int | None = None) -> PassageStats:
    """Split a KILT knowledge source (a jsonl file, a directory of them or a glob; local or URI)
    into a passages Parquet directory at ``out``, with Ray Data, on the Ray the caller connected.

    Nothing is written to ``out`` unless every step succeeds: bad rows (malformed JSON, a missing
    or mistyped field, a duplicate ``wikipedia_id``, whose passages would repeat ids) raise
    :class:`~re2g.data.kilt.RowError` naming file, line and field before any passage is written;
    with ``skip_bad_rows`` they are skipped and counted in the returned stats. An existing non-empty
    ``out`` is refused unless ``overwrite``. ``chunk_bytes``: the size of the byte ranges read in
    parallel (default: about four per CPU of the cluster, at most 64 MiB).
    """
    import ray

    cfg = cfg or PassageConfig()
    t0 = time.perf_counter()
    with staged_dir(out, overwrite=overwrite) as stage:
        chunks = plan_chunks(source, chunk_bytes, cpus=int(ray.cluster_resources().get("CPU", 1)))

        # Pass 1: validate every row, find duplicate ids, count (nothing is written).
        ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
        scan_ds = ds.map_batches(_scan_batch, fn_kwargs={"cfg": cfg}, batch_size=1, batch_format="pyarrow")
        tables = [t for t in ray.get(scan_ds.to_arrow_refs()) if t.num_rows]
        scan = _collect_scan(pa.concat_tables(tables).cast(_SCAN_SCHEMA), chunks)
        n_bad = sum(scan.counts.values())
        if n_bad and not skip_bad_rows:
            err = scan.errors[0]
            more = f" ({n_bad} bad rows in all; skip_bad_rows=True skips them)" if n_bad > 1 else \
                " (skip_bad_rows=True skips bad rows)"
            raise RowError(err.path, err.reason + more, line=err.line, field=err.field, kind=err.kind)

        # Pass 2: split and write, in source order.
        todo = [{**c, "skip": json.dumps(scan.skip.get(c["chunk"], []))} for c in chunks]
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds.context.execution_options.preserve_order = True
        if scan.passages:
            ds.flat_map(_split_chunk, fn_kwargs={"cfg": cfg}).write_parquet(
                stage.path, filesystem=stage.arrow_filesystem())
        if not _parquet_files(stage.fs, stage.path):  # no passages: still a valid, empty artifact
            with stage.fs.open(f"{stage.path}/part-00000.parquet", "wb") as f:
                pq.write_table(PASSAGE_SCHEMA.empty_table(), f)
        written = count_passages(stage.uri)
        if written != scan.passages:
            raise ArtifactError(f"{out}: wrote {written} passages, expected {scan.passages} "
                                "(did the source change while it was being split?)")

        report = RowReport(path=str(source), rows=scan.pages + n_bad, skipped=n_bad, by_kind=dict(scan.counts))
        for e in scan.errors:
            lines = report.first_lines.setdefault(e.kind, [])
            if len(lines) < report.keep:
                lines.append(e.line)
            if len(report.messages) < report.keep:
                report.messages.append(str(e))
        stats = PassageStats(pages=scan.pages, passages=scan.passages, words_min=scan.words_min,
                             words_mean=round(scan.words_mean, 2), words_max=scan.words_max, skipped=n_bad,
                             seconds=0.0, source=str(source), out=str(out), report=report.to_dict())
        store = store_fields(stage)  # the memory-mapped passage store, built once here
        stats.seconds = round(time.perf_counter() - t0, 2)
        write_manifest(stage.uri, passages_manifest(
            written, config=cfg.model_dump(mode="json"), counts={"pages": scan.pages, "skipped": n_bad},
            source=str(source), stats=stats.to_dict(), **store))
    if n_bad:
        log.warning("%s", report.summary())
    return stats
