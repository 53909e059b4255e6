"""KILT provenance -> positive passages (for training labels and passage-level metrics).

A passage covers paragraphs ``[start, end]`` of its page (from its id, see
:func:`re2g.data.passages.parse_pid`); a provenance entry names paragraphs ``[ps, pe]`` of a page.
The passage is a positive when

    overlap = |[start, end] ∩ [ps, pe]| / |[ps, pe]|   (in paragraphs, inclusive ranges)

is at least ``threshold`` (0.75 in Re2G). All pieces of a long paragraph cover it, so all are
positives for it. Provenance without paragraph ids counts at page level only. Page-level ids are
the provenance ``wikipedia_id`` values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    """The positives of one example: passage ids and page ids (``wikipedia_id``), first seen first."""

    pids: list[str]
    page_ids: list[str]


class PassageLocator:
    """Passages by page: ``wikipedia_id -> [(start, end, pid), ...]`` sorted by start.

    Build it once from the passages table (:meth:`from_table`) or from pids (:meth:`from_pids`);
    lookups are a dict access plus a scan of the page's few passages.
    """

    def __init__(self, spans: Mapping[str, Sequence[Span]]):
        self._spans: dict[str, tuple[Span, ...]] = {wid: tuple(sorted(s)) for wid, s in spans.items()}

    @classmethod
    def from_pids(cls, pids: Iterable[str]) -> "PassageLocator":
        """From KILT passage ids; ids that are not ``wid::[start,end]`` are ignored."""
        spans: dict[str, list[Span]] = {}
        for pid in pids:
            try:
                wid, s, e = parse_pid(pid)
            except ValueError:
                continue
            spans.setdefault(wid, []).append((s, e, pid))
        return cls(spans)

    @classmethod
    def from_table(cls, table: pa.Table) -> "PassageLocator":
        """From a passages table (column ``pid``; the page is taken from the id)."""
        if "pid" not in table.column_names:
            raise ValueError(f"passages table has no 'pid' column (columns: {', '.join(table.column_names)})")
        return cls.from_pids(p for p in table.column("pid").to_pylist() if p is not None)

    def __len__(self) -> int:
        return sum(len(s) for s in self._spans.values())

    def __contains__(self, wikipedia_id: object) -> bool:
        return wikipedia_id in self._spans

    @property
    def pages(self) -> int:
        return len(self._spans)

    def passages(self, wikipedia_id: str) -> tuple[Span, ...]:
        """The page's passages as ``(start, end, pid)``, by start (empty for an unknown page)."""
        return self._spans.get(str(wikipedia_id), ())

    def positive_pids(self, provenance: Iterable[Provenance | Mapping[str, Any]],
                      threshold: float = DEFAULT_THRESHOLD) -> list[str]:
        """Passages covering at least ``threshold`` of any provenance entry's paragraphs."""
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        out: dict[str, None] = {}
        for p in provenance:
            span = _span(p)
            if span is None:
                continue
            for s, e, pid in self.passages(str(_get(p, "wikipedia_id"))):
                if s > span[1]:
                    break
                if overlap((s, e), span) >= threshold - 1e-12:
                    out.setdefault(pid, None)
        return list(out)

    def positives(self, example: KiltExample | Iterable[Provenance | Mapping[str, Any]],
                  threshold: float = DEFAULT_THRESHOLD) -> Positives:
        """Positive passages and pages of an example (all outputs' provenance) or of a provenance list."""
        prov = example.provenance if isinstance(example, KiltExample) else list(example)
        return Positives(pids=self.positive_pids(prov, threshold), page_ids=page_ids(prov))


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
