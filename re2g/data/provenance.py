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
from typing import Any

import pyarrow as pa

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
