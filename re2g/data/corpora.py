"""Other corpora into the passages contract: DPR's ``psgs_w100.tsv`` and BEIR datasets.

* DPR: tab-separated with the header ``id\\ttext\\ttitle`` (any column order); fields may be
  quoted with ``"`` (``""`` inside a quoted field is a quote), as in DPR's own file.
* BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/*.tsv`` (header ``query-id\\tcorpus-id\\tscore``).

Passages get ``pid`` = the corpus id and ``wikipedia_id`` = None. Bad rows raise
:class:`~re2g.data.kilt.RowError` (``path:line: field 'x': reason``; the line where the row
starts), or are skipped and counted with ``skip_bad_rows``. Duplicate ids are refused.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fsspec.core import url_to_fs

from re2g.data.kilt import (
    BAD_ROW,
    BAD_VALUE,
    DUPLICATE_ID,
    MISSING_FIELD,
    WRONG_TYPE,
    RowError,
    RowReport,
    _optional,
    _required,
    _Row,
    _object,
    iter_jsonl_rows,
    open_input,
)
from re2g.data.passages import PassageStats, write_passages
from re2g.errors import DataFormatError
from re2g.types import Passage

log = logging.getLogger(__name__)

CorpusFormat = Literal["dpr", "beir"]
DPR_COLUMNS = ("id", "text", "title")
QRELS_COLUMNS = ("query-id", "corpus-id", "score")


@dataclass(frozen=True)
class Query:
    """A BEIR query; ``metadata`` passes through."""

    qid: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Qrel:
    """A relevance judgement: ``corpus_id`` is relevant to ``query_id`` with ``score``."""

    query_id: str
    corpus_id: str
    score: int


# --------------------------------------------------------------------------- row loops


def _tsv_rows(path: str, expected: tuple[str, ...], *, quoting: bool) -> Iterator[tuple[int, list[str] | RowError]]:
    """``(line, fields)`` per row after checking the header; a row that does not parse comes as
    ``(line, RowError)``. Fields are ordered as ``expected``. Blank lines are skipped."""
    path = str(path)
    with open_input(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        if quoting:
            reader = csv.reader(text, delimiter="\t", quotechar='"', strict=True)
        else:
            reader = csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE)
        line = 1
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(path, f"empty file (expected a header: {', '.join(expected)})", line=1) from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataFormatError(path, f"unreadable header: {e}", line=1) from None
        names = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in expected if c not in names]
        if missing:
            raise DataFormatError(path, f"header {names!r}: expected the columns {', '.join(expected)} "
                                        "(tab-separated)", line=1, field=missing[0])
        order = [names.index(c) for c in expected]
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield line, RowError(path, f"malformed row: {e}", line=line, kind=BAD_ROW)
                continue
            except UnicodeDecodeError as e:  # the decoder cannot resume: stop here
                raise DataFormatError(path, f"not valid UTF-8 ({e.reason})", line=line) from None
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(names):
                yield line, RowError(path, f"expected {len(names)} tab-separated fields ({', '.join(names)}), "
                                           f"got {len(row)}", line=line, kind=BAD_ROW)
                continue
            yield line, [row[i] for i in order]


def _rows(items: Iterator[tuple[int, list[str] | RowError]], parse, key, key_field: str, path: str,
          skip_bad_rows: bool, report: RowReport | None) -> Iterator[Any]:
    report = report if report is not None else RowReport()
    report.path = str(path)
    seen: dict[Any, int] = {}
    for line, fields in items:
        report.rows += 1
        try:
            if isinstance(fields, RowError):
                raise fields
            item = parse(fields, line)
            k = key(item)
            if k in seen:
                raise RowError(path, f"duplicate {k!r} (first on line {seen[k]})", line=line, field=key_field,
                               kind=DUPLICATE_ID)
            seen[k] = line
        except RowError as err:
            if not skip_bad_rows:
                raise
            report.add(err)
            continue
        yield item
    if report.skipped:
        log.warning("%s", report.summary())


# --------------------------------------------------------------------------- DPR


def iter_dpr_tsv(path: str, skip_bad_rows: bool = False, report: RowReport | None = None) -> Iterator[Passage]:
    """Stream DPR's ``psgs_w100.tsv`` as passages (``pid`` = the DPR id, ``wikipedia_id`` None).
    Empty ids or texts and duplicate ids are bad rows."""
    path = str(path)

    def parse(fields: list[str], line: int) -> Passage:
        pid, text, title = fields
        if not pid.strip():
            raise RowError(path, "empty (expected a passage id)", line=line, field="id", kind=MISSING_FIELD)
        if not text.strip():
            raise RowError(path, f"empty passage text (id {pid!r})", line=line, field="text", kind=BAD_VALUE)
        return Passage(pid=pid.strip(), title=title, text=text, wikipedia_id=None)

    return _rows(_tsv_rows(path, DPR_COLUMNS, quoting=True), parse, lambda p: p.pid, "id", path,
                 skip_bad_rows, report)


# --------------------------------------------------------------------------- BEIR


def _nonempty_str(row: _Row, obj: Mapping, key: str) -> str:
    value = _required(row, obj, key, str)
    if not value.strip():
        raise row.error(key, "empty (expected a non-empty string)", BAD_VALUE)
    return value


def parse_beir_doc(obj: Any, path: str = "<data>", line: int | None = None) -> Passage:
    """One ``corpus.jsonl`` row -> :class:`Passage` (``title`` may be missing or empty)."""
    row = _Row(path, line)
    obj = _object(row, obj, "a BEIR document")
    return Passage(pid=_nonempty_str(row, obj, "_id"), title=_optional(row, obj, "title", str) or "",
                   text=_nonempty_str(row, obj, "text"), wikipedia_id=None)


def parse_beir_query(obj: Any, path: str = "<data>", line: int | None = None) -> Query:
    """One ``queries.jsonl`` row -> :class:`Query`."""
    row = _Row(path, line)
    obj = _object(row, obj, "a BEIR query")
    return Query(qid=_nonempty_str(row, obj, "_id"), text=_nonempty_str(row, obj, "text"),
                 metadata=_optional(row, obj, "metadata", dict) or {})


def _beir_file(src: str, name: str) -> str:
    """``src`` itself when it is a file, else ``src/name`` (``.jsonl`` or ``.jsonl.gz``)."""
    fs, p = url_to_fs(str(src))
    if fs.isdir(p):
        for candidate in (f"{p}/{name}", f"{p}/{name}.gz"):
            if fs.exists(candidate):
                return fs.unstrip_protocol(candidate)
        raise DataFormatError(str(src), f"no {name} in the BEIR dataset directory")
    return str(src)


def iter_beir_corpus(path: str, skip_bad_rows: bool = False, report: RowReport | None = None) -> Iterator[Passage]:
    """Stream a BEIR ``corpus.jsonl`` (or a dataset directory holding one) as passages."""
    return iter_jsonl_rows(_beir_file(path, "corpus.jsonl"), parse_beir_doc, key=lambda p: p.pid, key_field="_id",
                           skip_bad_rows=skip_bad_rows, report=report)


def read_beir_queries(path: str, skip_bad_rows: bool = False, report: RowReport | None = None) -> list[Query]:
    """Read a BEIR ``queries.jsonl`` (or a dataset directory holding one); ids must be unique."""
    return list(iter_jsonl_rows(_beir_file(path, "queries.jsonl"), parse_beir_query, key=lambda q: q.qid,
                                key_field="_id", skip_bad_rows=skip_bad_rows, report=report))


def read_beir_qrels(path: str, skip_bad_rows: bool = False, report: RowReport | None = None) -> list[Qrel]:
    """Read a BEIR qrels tsv (``query-id\\tcorpus-id\\tscore`` with a header). Scores are integers;
    a (query, document) pair judged twice is a duplicate."""
    path = str(path)

    def parse(fields: list[str], line: int) -> Qrel:
        qid, cid, score = (f.strip() for f in fields)
        for name, value in (("query-id", qid), ("corpus-id", cid)):
            if not value:
                raise RowError(path, "empty (expected an id)", line=line, field=name, kind=MISSING_FIELD)
        try:
            value = int(score)
        except ValueError:
            raise RowError(path, f"expected an integer score, got {score!r}", line=line, field="score",
                           kind=WRONG_TYPE) from None
        return Qrel(query_id=qid, corpus_id=cid, score=value)

    return list(_rows(_tsv_rows(path, QRELS_COLUMNS, quoting=False), parse,
                      lambda q: (q.query_id, q.corpus_id), "corpus-id", path, skip_bad_rows, report))


def qrels_by_query(qrels: list[Qrel]) -> dict[str, dict[str, int]]:
    """``{query_id: {corpus_id: score}}`` (the shape retrieval metrics take)."""
    out: dict[str, dict[str, int]] = {}
    for q in qrels:
        out.setdefault(q.query_id, {})[q.corpus_id] = q.score
    return out


# --------------------------------------------------------------------------- conversion


def convert_corpus(src: str, out: str, fmt: CorpusFormat, *, overwrite: bool = False,
                   skip_bad_rows: bool = False) -> PassageStats:
    """Convert a DPR tsv (``fmt="dpr"``) or a BEIR corpus (``fmt="beir"``: ``corpus.jsonl`` or its
    dataset directory) into a passages Parquet directory at ``out``, atomically (a bad row, unless
    skipped, leaves no output). One process, streaming; for KILT sources use
    :func:`re2g.data.passages.split_knowledge_source`."""
    readers = {"dpr": iter_dpr_tsv, "beir": iter_beir_corpus}
    if fmt not in readers:
        raise ValueError(f"fmt: got {fmt!r}: expected one of {', '.join(readers)}")
    t0 = time.perf_counter()
    report = RowReport()
    words = {"min": None, "max": 0, "sum": 0}

    def counted() -> Iterator[Passage]:
        for p in readers[fmt](src, skip_bad_rows=skip_bad_rows, report=report):
            n = len(p.text.split())
            words["min"] = n if words["min"] is None else min(words["min"], n)
            words["max"] = max(words["max"], n)
            words["sum"] += n
            yield p

    def stats(n: int) -> PassageStats:
        return PassageStats(pages=n, passages=n, words_min=words["min"] or 0,
                            words_mean=round(words["sum"] / n, 2) if n else 0.0, words_max=words["max"],
                            skipped=report.skipped, seconds=round(time.perf_counter() - t0, 2),
                            source=str(src), out=str(out), report=report.to_dict())

    def manifest(n: int) -> dict:
        return {"source": str(src), "source_format": fmt, "stats": stats(n).to_dict()}

    n = write_passages(counted(), out, overwrite=overwrite, manifest=manifest)
    return stats(n)
