"""KILT files: task jsonl (``id``, ``input``, ``output[{answer, provenance}]``) and the knowledge
source (one Wikipedia page per line: ``_id``, ``wikipedia_id``, ``wikipedia_title``, ``text``).

Every reader validates each row and raises :class:`RowError` (a
:class:`~re2g.errors.DataFormatError`) naming the file, the 1-based line, the field and what was
expected. With ``skip_bad_rows=True`` bad rows are skipped instead, counted in a :class:`RowReport`
(pass one in to read it back) and logged as a warning -- never silently.

Paths may be local or fsspec URIs (``s3://...``, ``memory://...``); ``.gz``/``.bz2``/... are
(de)compressed by suffix. Writers are atomic: a temporary sibling is written, then renamed.

Unknown keys are kept in ``extra`` so reading and writing a KILT file loses nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.utils import infer_compression

from re2g.errors import DataFormatError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Kinds of bad rows (RowError.kind, RowReport.by_kind keys).
BAD_JSON = "bad_json"
BAD_ROW = "bad_row"            # a tabular row that does not parse (quoting, field count)
BAD_ENCODING = "bad_encoding"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_VALUE = "bad_value"
DUPLICATE_ID = "duplicate_id"


class RowError(DataFormatError):
    """One bad row. ``kind`` is one of ``bad_json``, ``bad_row``, ``bad_encoding``,
    ``missing_field``, ``wrong_type``, ``bad_value``, ``duplicate_id``."""

    def __init__(self, path: str, reason: str, line: int | None = None, field: str | None = None,
                 kind: str = BAD_VALUE):
        super().__init__(path, reason, line=line, field=field)
        self.kind = kind

    def __reduce__(self):  # picklable across Ray workers
        return (RowError, (self.path, self.reason, self.line, self.field, self.kind))


@dataclass
class RowReport:
    """What a reader skipped: counts by kind, the first few line numbers of each kind, the first
    few messages. ``rows`` counts the non-blank rows read (good and bad)."""

    path: str = ""
    rows: int = 0
    skipped: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, list[int]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    keep: int = 5

    def add(self, err: RowError) -> None:
        """Count one skipped row."""
        self.skipped += 1
        self.by_kind[err.kind] = self.by_kind.get(err.kind, 0) + 1
        lines = self.first_lines.setdefault(err.kind, [])
        if err.line is not None and len(lines) < self.keep:
            lines.append(err.line)
        if len(self.messages) < self.keep:
            self.messages.append(str(err))

    def summary(self) -> str:
        """One line: ``path: skipped 3 of 10 rows: bad_json 2 (lines 4, 7), duplicate_id 1 (line 9)``."""
        if not self.skipped:
            return f"{self.path}: {self.rows} rows, none skipped"
        parts = []
        for kind, n in sorted(self.by_kind.items()):
            lines = self.first_lines.get(kind, [])
            shown = ", ".join(map(str, lines)) + (", ..." if n > len(lines) else "")
            parts.append(f"{kind} {n} (line{'s' if len(lines) > 1 else ''} {shown})" if lines else f"{kind} {n}")
        return f"{self.path}: skipped {self.skipped} of {self.rows} rows: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "skipped": self.skipped, "by_kind": dict(self.by_kind),
                "first_lines": {k: list(v) for k, v in self.first_lines.items()},
                "messages": list(self.messages)}


# --------------------------------------------------------------------------- records


@dataclass
class Provenance:
    """A piece of evidence: paragraphs ``start_paragraph_id..end_paragraph_id`` (inclusive) of a
    Wikipedia page. Only ``wikipedia_id`` is required (predictions often carry just the page)."""

    wikipedia_id: str
    title: str | None = None
    start_paragraph_id: int | None = None
    end_paragraph_id: int | None = None
    start_character: int | None = None
    end_character: int | None = None
    bleu_score: float | None = None
    section: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"wikipedia_id": self.wikipedia_id}
        for k in _PROV_OPTIONAL:
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        d.update(self.extra)
        return d


@dataclass
class KiltOutput:
    """One entry of ``output``: an answer and/or provenance (either may be absent)."""

    answer: str | None = None
    provenance: list[Provenance] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.answer is not None:
            d["answer"] = self.answer
        if self.provenance is not None:
            d["provenance"] = [p.to_dict() for p in self.provenance]
        d.update(self.extra)
        return d


@dataclass
class KiltExample:
    """One KILT task example. ``meta`` and unknown keys (``extra``) pass through unchanged."""

    id: str
    input: str
    output: list[KiltOutput] = field(default_factory=list)
    meta: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answers(self) -> list[str]:
        """The non-empty answers of all outputs, in order."""
        return [o.answer for o in self.output if o.answer]

    @property
    def provenance(self) -> list[Provenance]:
        """The provenance of all outputs, concatenated."""
        return [p for o in self.output for p in (o.provenance or [])]

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"id": self.id, "input": self.input, "output": [o.to_dict() for o in self.output]}
        if self.meta is not None:
            d["meta"] = self.meta
        d.update(self.extra)
        return d


@dataclass
class KnowledgePage:
    """One page of a KILT knowledge source. ``text[i]`` is paragraph ``i`` (paragraph 0 repeats the
    title). ``id`` is the JSON key ``_id``; other keys (anchors, categories, ...) go to ``extra``."""

    wikipedia_id: str
    wikipedia_title: str
    text: list[str]
    id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.id is not None:
            d["_id"] = self.id
        d.update(wikipedia_id=self.wikipedia_id, wikipedia_title=self.wikipedia_title, text=self.text)
        d.update(self.extra)
        return d


# --------------------------------------------------------------------------- field checks

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}
_PROV_OPTIONAL = ("title", "start_paragraph_id", "end_paragraph_id", "start_character", "end_character",
                  "bleu_score", "section")
_PROV_TYPES: dict[str, type] = {"title": str, "start_paragraph_id": int, "end_paragraph_id": int,
                                "start_character": int, "end_character": int, "bleu_score": float,
                                "section": str}


class _Row:
    """Where a row came from, to build errors (path, line)."""

    __slots__ = ("path", "line")

    def __init__(self, path: str, line: int | None):
        self.path, self.line = path, line

    def error(self, name: str | None, reason: str, kind: str) -> RowError:
        return RowError(self.path, reason, line=self.line, field=name, kind=kind)


def _shown(value: Any) -> str:
    s = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return s if len(s) <= 40 else s[:37] + "..."


def _is(value: Any, typ: type) -> bool:
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


def _check(row: _Row, name: str, value: Any, typ: type) -> Any:
    if not _is(value, typ):
        raise row.error(name, f"expected {_TYPE_NAMES[typ]}, got {type(value).__name__} {_shown(value)}",
                        WRONG_TYPE)
    return float(value) if typ is float else value


def _required(row: _Row, obj: Mapping, key: str, typ: type, prefix: str = "") -> Any:
    if key not in obj or obj[key] is None:
        raise row.error(prefix + key, f"missing (expected {_TYPE_NAMES[typ]})", MISSING_FIELD)
    return _check(row, prefix + key, obj[key], typ)


def _optional(row: _Row, obj: Mapping, key: str, typ: type, prefix: str = "") -> Any:
    value = obj.get(key)
    return None if value is None else _check(row, prefix + key, value, typ)


def _object(row: _Row, obj: Any, what: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise row.error(None, f"expected a JSON object ({what}), got {type(obj).__name__}", BAD_JSON)
    return obj


# --------------------------------------------------------------------------- parsers (pure)


def parse_provenance(obj: Any, path: str = "<data>", line: int | None = None, prefix: str = "") -> Provenance:
    """Validate one provenance object (``prefix`` names it in errors, e.g. ``output[0].provenance[1].``)."""
    row = _Row(path, line)
    if not isinstance(obj, Mapping):
        raise row.error(prefix.rstrip("."), f"expected an object, got {type(obj).__name__}", WRONG_TYPE)
    wid = _required(row, obj, "wikipedia_id", str, prefix)
    if not wid:
        raise row.error(prefix + "wikipedia_id", "empty (expected a page id)", BAD_VALUE)
    values = {k: _optional(row, obj, k, _PROV_TYPES[k], prefix) for k in _PROV_OPTIONAL}
    start, end = values["start_paragraph_id"], values["end_paragraph_id"]
    for k in ("start_paragraph_id", "end_paragraph_id"):
        if values[k] is not None and values[k] < 0:
            raise row.error(prefix + k, f"expected a paragraph index >= 0, got {values[k]}", BAD_VALUE)
    if start is not None and end is not None and end < start:
        raise row.error(prefix + "end_paragraph_id",
                        f"expected >= start_paragraph_id ({start}), got {end}", BAD_VALUE)
    extra = {k: v for k, v in obj.items() if k != "wikipedia_id" and k not in _PROV_TYPES}
    return Provenance(wikipedia_id=wid, extra=extra, **values)


def parse_kilt_example(obj: Any, path: str = "<data>", line: int | None = None) -> KiltExample:
    """Validate one KILT task row (a parsed JSON object) into a :class:`KiltExample`."""
    row = _Row(path, line)
    obj = _object(row, obj, "a KILT example")
    ex_id = _required(row, obj, "id", str)
    if not ex_id:
        raise row.error("id", "empty (expected a non-empty id)", BAD_VALUE)
    text = _required(row, obj, "input", str)
    outputs_raw = _optional(row, obj, "output", list) or []
    outputs = []
    for i, o in enumerate(outputs_raw):
        pre = f"output[{i}]"
        if not isinstance(o, Mapping):
            raise row.error(pre, f"expected an object, got {type(o).__name__}", WRONG_TYPE)
        answer = _optional(row, o, "answer", str, pre + ".")
        prov_raw = _optional(row, o, "provenance", list, pre + ".")
        prov = None if prov_raw is None else [
            parse_provenance(p, path, line, f"{pre}.provenance[{j}].") for j, p in enumerate(prov_raw)]
        extra = {k: v for k, v in o.items() if k not in ("answer", "provenance")}
        outputs.append(KiltOutput(answer=answer, provenance=prov, extra=extra))
    meta = _optional(row, obj, "meta", dict)
    extra = {k: v for k, v in obj.items() if k not in ("id", "input", "output", "meta")}
    return KiltExample(id=ex_id, input=text, output=outputs, meta=meta, extra=extra)


def parse_page(obj: Any, path: str = "<data>", line: int | None = None, *, keep_extra: bool = True) -> KnowledgePage:
    """Validate one knowledge-source row into a :class:`KnowledgePage`. ``keep_extra=False`` drops
    the other keys (anchors, history, ...) when only the text is needed."""
    row = _Row(path, line)
    obj = _object(row, obj, "a knowledge-source page")
    wid = _required(row, obj, "wikipedia_id", str)
    if not wid:
        raise row.error("wikipedia_id", "empty (expected a page id)", BAD_VALUE)
    title = _required(row, obj, "wikipedia_title", str)
    paragraphs = _required(row, obj, "text", list)
    for i, p in enumerate(paragraphs):
        if not isinstance(p, str):
            raise row.error(f"text[{i}]", f"expected a string paragraph, got {type(p).__name__} {_shown(p)}",
                            WRONG_TYPE)
    page_id = _optional(row, obj, "_id", str)
    extra = {k: v for k, v in obj.items() if k not in ("_id", "wikipedia_id", "wikipedia_title", "text")} \
        if keep_extra else {}
    return KnowledgePage(wikipedia_id=wid, wikipedia_title=title, text=paragraphs, id=page_id, extra=extra)


def parse_json_line(raw: bytes | str, path: str = "<data>", line: int | None = None) -> Any:
    """Decode one jsonl line (UTF-8) or raise :class:`RowError` (``bad_encoding``/``bad_json``)."""
    row = _Row(path, line)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise row.error(None, f"not valid UTF-8 (byte {e.start} of the line)", BAD_ENCODING) from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise row.error(None, f"malformed JSON at column {e.colno}: {e.msg}", BAD_JSON) from None


# --------------------------------------------------------------------------- generic jsonl io


def open_input(path: str, mode: str = "rb"):
    """``fsspec.open`` with compression inferred from the suffix; a missing file raises
    :class:`DataFormatError`."""
    fs, p = url_to_fs(str(path))
    if not fs.exists(p):
        raise DataFormatError(str(path), "file not found")
    return fsspec.open(str(path), mode, compression=infer_compression(str(path)))


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` for every line of a text file, 1-based."""
    with open_input(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            yield n, raw


def iter_jsonl_rows(path: str, parse: Callable[[Any, str, int], T], *,
                    key: Callable[[T], Hashable] | None = None, key_field: str = "id",
                    skip_bad_rows: bool = False, report: RowReport | None = None) -> Iterator[T]:
    """Parse a jsonl file row by row with ``parse(obj, path, line)``; blank lines are ignored.

    ``key``: rows must have unique keys (``key_field`` names the field in the error). A bad row
    raises :class:`RowError`; with ``skip_bad_rows`` it is counted in ``report`` instead, and a
    warning with the summary is logged at the end.
    """
    path = str(path)
    report = report if report is not None else RowReport()
    report.path = path
    seen: dict[Hashable, int] = {}
    for line, raw in iter_lines(path):
        if not raw.strip():
            continue
        report.rows += 1
        try:
            item = parse(parse_json_line(raw, path, line), path, line)
            if key is not None:
                k = key(item)
                if k in seen:
                    raise RowError(path, f"duplicate {_shown(k)} (first on line {seen[k]})", line=line,
                                   field=key_field, kind=DUPLICATE_ID)
                seen[k] = line
        except RowError as err:
            if not skip_bad_rows:
                raise
            report.add(err)
            continue
        yield item
    if report.skipped:
        log.warning("%s", report.summary())


def atomic_write(path: str):
    """A binary file that appears at ``path`` whole or not at all (:func:`re2g.artifacts.open_atomic`:
    a temporary sibling renamed when the block ends without error). Compression follows the suffix."""
    from re2g.artifacts import open_atomic

    return open_atomic(path)


def write_jsonl(path: str, rows: Iterable[Mapping]) -> int:
    """Write dicts as jsonl (UTF-8, one object per line), atomically. Returns the row count."""
    n = 0
    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n")
            n += 1
    return n


# --------------------------------------------------------------------------- KILT tasks


def iter_kilt(path: str, skip_bad_rows: bool = False, report: RowReport | None = None) -> Iterator[KiltExample]:
    """Stream a KILT task jsonl as :class:`KiltExample` (ids must be unique)."""
    return iter_jsonl_rows(path, parse_kilt_example, key=lambda e: e.id, key_field="id",
                           skip_bad_rows=skip_bad_rows, report=report)


def read_kilt(path: str, skip_bad_rows: bool = False, report: RowReport | None = None) -> list[KiltExample]:
    """Read a KILT task jsonl. Bad rows raise :class:`RowError` (``path:line: field 'x': reason``);
    with ``skip_bad_rows`` they are skipped, counted in ``report`` and logged."""
    return list(iter_kilt(path, skip_bad_rows=skip_bad_rows, report=report))


def _validated(items: Iterable[T | Mapping], parse: Callable, key: Callable, key_field: str,
               path: str) -> Iterator[dict]:
    """Rows to write: records or dicts, validated (dicts through ``parse``), keys unique."""
    seen: dict[Hashable, int] = {}
    for i, item in enumerate(items, start=1):
        if isinstance(item, Mapping):
            item = parse(item, path, i)
        k = key(item)
        if k in seen:
            raise RowError(path, f"duplicate {_shown(k)} (first in row {seen[k]})", line=i, field=key_field,
                           kind=DUPLICATE_ID)
        seen[k] = i
        yield item.to_dict()


def write_kilt(path: str, examples: Iterable[KiltExample | Mapping]) -> int:
    """Write KILT examples (records or dicts, validated) as jsonl, atomically. Duplicate ids are
    refused. Returns the number written."""
    return write_jsonl(path, _validated(examples, parse_kilt_example, lambda e: e.id, "id", str(path)))


# --------------------------------------------------------------------------- knowledge source


def iter_knowledge_source(path: str, skip_bad_rows: bool = False, report: RowReport | None = None, *,
                          keep_extra: bool = True) -> Iterator[KnowledgePage]:
    """Stream a KILT knowledge source (``wikipedia_id`` unique)."""
    def parse(obj, p, line):
        return parse_page(obj, p, line, keep_extra=keep_extra)

    return iter_jsonl_rows(path, parse, key=lambda pg: pg.wikipedia_id, key_field="wikipedia_id",
                           skip_bad_rows=skip_bad_rows, report=report)


def read_knowledge_source(path: str, skip_bad_rows: bool = False,
                          report: RowReport | None = None) -> list[KnowledgePage]:
    """Read a KILT knowledge source into memory (small sources; see
    :func:`re2g.data.passages.split_knowledge_source` for a full dump)."""
    return list(iter_knowledge_source(path, skip_bad_rows=skip_bad_rows, report=report))


def write_knowledge_source(path: str, pages: Iterable[KnowledgePage | Mapping]) -> int:
    """Write knowledge-source pages (records or dicts, validated) as jsonl, atomically.
    Duplicate ``wikipedia_id`` values are refused. Returns the number written."""
    return write_jsonl(path, _validated(pages, parse_page, lambda p: p.wikipedia_id, "wikipedia_id", str(path)))
