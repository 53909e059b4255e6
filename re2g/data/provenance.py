"""KILT provenance -> positive passages (for training labels and passage-level metrics).

A passage covers paragraphs ``[start, end]`` of its page (from its id, see
:func:`re2g.data.passages.parse_pid`); a provenance entry names paragraphs ``[ps, pe]`` of a page.
The passage is a positive when

    overlap = |[start, end] ∩ [ps, pe]| / |[ps, pe]|   (in paragraphs, inclusive ranges)

is at least ``threshold`` (0.75 in Re2G). All pieces of a long paragraph cover it, so all are
positives for it.

Page-level provenance (a ``wikipedia_id`` without ``start_paragraph_id``, as in KILT tasks whose
annotation names pages only): every passage of that page is a positive -- unless another entry of
the same provenance list names paragraphs of that same page; the precise entry then decides for
that page. Passages without a paragraph range (ids that are not ``wid::[start,end]``, their page
taken from a ``wikipedia_id`` column) can only be matched at page level: they are positives for any
provenance entry of their page. Passages with neither (BEIR-like corpora: ``wikipedia_id`` None)
belong to no page and are never positives.

Page-level ids are the provenance ``wikipedia_id`` values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from re2g.data.kilt import KiltExample, Provenance
from re2g.data.passages import parse_pid

DEFAULT_THRESHOLD = 0.75

Span = tuple[int, int, str]  # (start paragraph, end paragraph, pid)


def overlap(passage: tuple[int, int], provenance: tuple[int, int]) -> float:
    """Share of the provenance paragraphs ``[ps, pe]`` the passage ``[start, end]`` covers (0..1)."""
    (s, e), (ps, pe) = passage, provenance
    inter = min(e, pe) - max(s, ps) + 1
    return max(inter, 0) / (pe - ps + 1)


def _get(p: Provenance | Mapping[str, Any], key: str) -> Any:
    return p.get(key) if isinstance(p, Mapping) else getattr(p, key)


def _span(p: Provenance | Mapping[str, Any]) -> tuple[int, int] | None:
    start = _get(p, "start_paragraph_id")
    if start is None:
        return None
    end = _get(p, "end_paragraph_id")
    return (start, start if end is None else max(end, start))


@dataclass(frozen=True)
class Positives:
    """The positives of one example: passage ids and page ids (``wikipedia_id``), first seen first.
    ``page_lists``: the pages of each output's provenance (outputs without provenance give ``[]``),
    as KILT's page-level R-Precision takes them."""

    pids: list[str]
    page_ids: list[str]
    page_lists: list[list[str]] = field(default_factory=list)


class PassageLocator:
    """Passages by page: ``wikipedia_id -> [(start, end, pid), ...]`` sorted by start, plus the
    passages of each page that have no paragraph range (matched at page level only).

    Build it once from the passages table (:meth:`from_table`), a passages Parquet
    (:meth:`from_parquet`) or from pids (:meth:`from_pids`); lookups are a dict access plus a scan
    of the page's few passages.
    """

    def __init__(self, spans: Mapping[str, Sequence[Span]], unranged: Mapping[str, Sequence[str]] | None = None):
        self._spans: dict[str, tuple[Span, ...]] = {wid: tuple(sorted(s)) for wid, s in spans.items()}
        self._unranged: dict[str, tuple[str, ...]] = {str(w): tuple(p) for w, p in (unranged or {}).items() if p}

    @classmethod
    def from_pids(cls, pids: Iterable[str], wikipedia_ids: Iterable[str | None] | None = None) -> "PassageLocator":
        """From passage ids (``wid::[start,end]``), with an optional ``wikipedia_id`` per pid for the
        passages whose ids carry no range (a pid that parses keeps the page of its id). Passages
        with no page either way are ignored."""
        spans: dict[str, list[Span]] = {}
        unranged: dict[str, list[str]] = {}
        wids = iter(wikipedia_ids) if wikipedia_ids is not None else None
        for pid in pids:
            wid_col = next(wids, None) if wids is not None else None
            if pid is None:
                continue
            try:
                wid, s, e = parse_pid(pid)
            except ValueError:
                if wid_col is not None and str(wid_col).strip():
                    unranged.setdefault(str(wid_col).strip(), []).append(pid)
                continue
            spans.setdefault(wid, []).append((s, e, pid))
        return cls(spans, unranged)

    @classmethod
    def from_store(cls, store: Any) -> "PassageLocator":
        """From a memory-mapped passage store (:class:`re2g.data.passage_store.PassageStore`): a
        :class:`SortedPidLocator` over the store's sorted pid index, the same answers as
        ``from_pids(store)`` without a Python object per passage. Any other mapping of pids: ``from_pids``."""
        from re2g.data.passage_store import PIDS_FILE

        path = Path(str(getattr(store, "path", "")), PIDS_FILE)
        if not getattr(store, "path", None) or not path.is_file():
            return cls.from_pids(store)
        return SortedPidLocator(np.load(path, mmap_mode="r"))

    @classmethod
    def from_table(cls, table: pa.Table) -> "PassageLocator":
        """From a passages table: column ``pid`` (the page and paragraphs taken from the id), and
        ``wikipedia_id`` when present (the page of passages whose ids carry no range)."""
        if "pid" not in table.column_names:
            raise ValueError(f"passages table has no 'pid' column (columns: {', '.join(table.column_names)})")
        wids = table.column("wikipedia_id").to_pylist() if "wikipedia_id" in table.column_names else None
        return cls.from_pids(table.column("pid").to_pylist(), wids)

    @classmethod
    def from_parquet(cls, path: str) -> "PassageLocator":
        """From a passages Parquet file or directory (reads ``pid`` and, when present, ``wikipedia_id``)."""
        import pyarrow.dataset as ds

        data = ds.dataset(str(path), format="parquet")
        cols = [c for c in ("pid", "wikipedia_id") if c in data.schema.names]
        return cls.from_table(data.to_table(columns=cols))

    def __len__(self) -> int:
        return sum(len(s) for s in self._spans.values()) + sum(len(p) for p in self._unranged.values())

    def __contains__(self, wikipedia_id: object) -> bool:
        return wikipedia_id in self._spans or wikipedia_id in self._unranged

    @property
    def pages(self) -> int:
        return len(self._spans.keys() | self._unranged.keys())

    def passages(self, wikipedia_id: str) -> tuple[Span, ...]:
        """The page's passages with a paragraph range as ``(start, end, pid)``, by start (empty for
        an unknown page)."""
        return self._spans.get(str(wikipedia_id), ())

    def unranged(self, wikipedia_id: str) -> tuple[str, ...]:
        """The page's passages without a paragraph range (pids, in table order)."""
        return self._unranged.get(str(wikipedia_id), ())

    def positive_pids(self, provenance: Iterable[Provenance | Mapping[str, Any]],
                      threshold: float = DEFAULT_THRESHOLD) -> list[str]:
        """Passages covering at least ``threshold`` of any provenance entry's paragraphs; for an
        entry without paragraph ids, every passage of its page (unless another entry names
        paragraphs of that page); passages without a range: every one of the entry's page."""
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        prov = list(provenance)
        precise = {str(_get(p, "wikipedia_id")) for p in prov if _span(p) is not None}
        out: dict[str, None] = {}
        for p in prov:
            wid = str(_get(p, "wikipedia_id"))
            span = _span(p)
            if span is None:
                if wid in precise:
                    continue
                for _, _, pid in self.passages(wid):
                    out.setdefault(pid, None)
            else:
                for s, e, pid in self.passages(wid):
                    if s > span[1]:
                        break
                    if overlap((s, e), span) >= threshold - 1e-12:
                        out.setdefault(pid, None)
            for pid in self.unranged(wid):
                out.setdefault(pid, None)
        return list(out)

    def positives(self, example: KiltExample | Iterable[Provenance | Mapping[str, Any]],
                  threshold: float = DEFAULT_THRESHOLD) -> Positives:
        """Positive passages and pages of an example (all outputs' provenance) or of a provenance
        list; for an example also its gold page lists, one per output (KILT's R-Precision)."""
        if isinstance(example, KiltExample):
            prov = example.provenance
            lists = [page_ids(o.provenance or []) for o in example.output]
        else:
            prov = list(example)
            lists = [page_ids(prov)]
        return Positives(pids=self.positive_pids(prov, threshold), page_ids=page_ids(prov), page_lists=lists)


#: pids parsed per chunk when a SortedPidLocator is built (bounds its transient Arrow arrays)
PARSE_CHUNK = 1 << 20
# RE2 (Arrow's regex engine) form of re2g.types.PID_PATTERN; RE2's \d and $ are ASCII-only and end-only, so
# ids where Python's re could differ (non-ASCII, a trailing newline) are parsed by parse_pid itself
_PID_RE2 = r"(?s)^(?P<wid>.+)::\[(?P<start>\d+),(?P<end>\d+)\](?:#(?P<piece>[1-9]\d*))?$"
_PYTHON_ONLY = r"[^\x00-\x7f]|\n$"


class SortedPidLocator(PassageLocator):
    """A :class:`PassageLocator` over a sorted array of pids -- the passage store's memory-mapped
    ``pids.npy`` ((U,) ``S{w}``, UTF-8, sorted bytewise, NUL-padded) -- instead of a dict of every page.

    Holds per pid its paragraph range and the byte length of its page id: (U,) int64 start, end and
    (U,) int32 page-id length (-1: not a ``wid::[start,end]`` id), 20 bytes a passage (~420 MB at 21M,
    against a few GB of Python tuples for ``from_pids``); the pid strings stay in the shared mapping.
    A page's passages are the pids that start with ``wid::`` (a contiguous range of the sorted array,
    found by binary search) whose page id is exactly ``wid`` (its length: ``a::b::[0,0]`` starts with
    ``a::`` too). Answers equal ``PassageLocator.from_pids(pids)``'s: passages without a range are
    ignored (no ``unranged``), as there.
    """

    def __init__(self, keys: np.ndarray):
        if keys.ndim != 1 or keys.dtype.kind != "S":
            raise ValueError(f"SortedPidLocator needs a 1-d bytes array of sorted pids, got {keys.dtype} "
                             f"with shape {keys.shape}")
        self._keys = keys                                   # (U,) S{w}, sorted
        n = len(keys)
        self._start = np.zeros(n, dtype=np.int64)            # (U,)
        self._end = np.zeros(n, dtype=np.int64)              # (U,)
        self._wid_len = np.full(n, -1, dtype=np.int32)       # (U,) bytes of the page id; -1: no range
        self._pages: int | None = None
        for lo in range(0, n, PARSE_CHUNK):
            self._parse(lo, min(n, lo + PARSE_CHUNK))
        pa.default_memory_pool().release_unused()           # the chunks' Arrow buffers back to the OS
        self._spans, self._unranged = {}, {}

    def _parse(self, lo: int, hi: int) -> None:
        """Fill rows ``[lo, hi)``: Arrow's regex over the chunk, Python's for the ids RE2 may read differently."""
        raw = pa.array(np.asarray(self._keys[lo:hi]), type=pa.binary())
        text = raw.cast(pa.string())                        # the store holds UTF-8 (checked when it was built)
        parts = pc.extract_regex(text, _PID_RE2)            # struct<wid, start, end, piece>, null: no match
        ok = pc.fill_null(pc.is_valid(parts), False)
        if pc.any(ok).as_py():
            idx = np.flatnonzero(ok.to_numpy(zero_copy_only=False))
            got = parts.filter(ok)
            self._wid_len[lo + idx] = pc.binary_length(got.field("wid").cast(pa.binary())).to_numpy()
            self._start[lo + idx] = got.field("start").cast(pa.int64()).to_numpy()
            self._end[lo + idx] = got.field("end").cast(pa.int64()).to_numpy()
        odd = pc.and_(pc.invert(ok), pc.match_substring_regex(text, _PYTHON_ONLY))
        for i in np.flatnonzero(pc.fill_null(odd, False).to_numpy(zero_copy_only=False)).tolist():
            try:
                wid, s, e = parse_pid(text[i].as_py())
            except ValueError:
                continue
            self._wid_len[lo + i], self._start[lo + i], self._end[lo + i] = len(wid.encode("utf-8")), s, e

    def _rows(self, wikipedia_id: object) -> np.ndarray:
        """Rows of the sorted pids whose page id is ``wikipedia_id``: (n,) int64."""
        if not isinstance(wikipedia_id, str):
            return np.zeros(0, dtype=np.int64)
        wid = wikipedia_id.encode("utf-8")
        prefix = wid + b"::"
        if len(prefix) > self._keys.dtype.itemsize or b"\0" in wid:
            return np.zeros(0, dtype=np.int64)
        upper = wid + b":;"                                 # the first string after every "wid::..."
        bounds = np.array([prefix, upper], dtype=self._keys.dtype)
        lo, hi = np.searchsorted(self._keys, bounds)
        rows = np.arange(lo, hi, dtype=np.int64)
        return rows[self._wid_len[lo:hi] == len(wid)]

    def __len__(self) -> int:
        return int((self._wid_len >= 0).sum())

    def __contains__(self, wikipedia_id: object) -> bool:
        return len(self._rows(wikipedia_id)) > 0

    @property
    def pages(self) -> int:
        if self._pages is None:
            seen: set[str] = set()
            for lo in range(0, len(self._keys), PARSE_CHUNK):
                hi = min(len(self._keys), lo + PARSE_CHUNK)
                have = np.flatnonzero(self._wid_len[lo:hi] >= 0)
                for j, w in zip(have.tolist(), self._wid_len[lo:hi][have].tolist()):
                    seen.add(bytes(self._keys[lo + j])[:w].decode("utf-8"))
            self._pages = len(seen)
        return self._pages

    def passages(self, wikipedia_id: str) -> tuple[Span, ...]:
        rows = self._rows(str(wikipedia_id))
        return tuple(sorted((int(self._start[r]), int(self._end[r]), self._keys[r].decode("utf-8")) for r in rows))

    def unranged(self, wikipedia_id: str) -> tuple[str, ...]:
        return ()


def page_ids(provenance: Iterable[Provenance | Mapping[str, Any]]) -> list[str]:
    """The distinct ``wikipedia_id`` values of the provenance, in order (page-level positives)."""
    return list(dict.fromkeys(str(_get(p, "wikipedia_id")) for p in provenance))


def positive_pids(provenance: Iterable[Provenance | Mapping[str, Any]],
                  passages: PassageLocator | Mapping[str, Sequence[Span]] | Iterable[str],
                  threshold: float = DEFAULT_THRESHOLD) -> list[str]:
    """Positive passage ids for the provenance, given a locator, a mapping
    ``wikipedia_id -> [(start, end, pid)]`` or passage ids (build a :class:`PassageLocator` once
    instead when calling this for many examples)."""
    if not isinstance(passages, PassageLocator):
        passages = PassageLocator(passages) if isinstance(passages, Mapping) else PassageLocator.from_pids(passages)
    return passages.positive_pids(provenance, threshold)
