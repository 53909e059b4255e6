"""Typed records shared across re2g: passages and the one candidate record of retrieve → rerank → generate.

A passage travels from retrieval to the answer's provenance as one :class:`Candidate`: the retriever
fills ``pid, score, rank, source`` (+ ``title, text, wikipedia_id``), the reranker adds
``rerank_score, rerank_rank``, the generator ``weight`` (p(z_j | x)). The API schemas
(``serve/schemas.py``) and KILT provenance (``re2g.pipeline.kilt_provenance``) are derived from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

Source = Literal["dpr", "bm25", "rerank"]   # "rerank": a passage a client gave to /v1/rerank

PassageInfo = tuple[str, str, "str | None"]  # (title, text, wikipedia_id): a passage lookup's value

# a KILT passage id ``wikiid::[start,end]`` (``#piece`` when a paragraph was cut in pieces)
PID_PATTERN = re.compile(r"^(?P<wid>.+)::\[(?P<start>\d+),(?P<end>\d+)\](?:#(?P<piece>[1-9]\d*))?$", re.S)


@dataclass(frozen=True)
class Passage:
    """One passage of the knowledge source (the row of the passages Parquet)."""

    pid: str
    title: str
    text: str
    wikipedia_id: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One passage for one query, from retrieval to the answer's provenance.

    ``score``/``rank``/``source``: the retriever's score, 0-based rank in its (fused) list and which
    retriever found it (``dpr``, ``bm25``; ``rerank`` for passages a client gave to /v1/rerank; None
    for a passage given without one, e.g. straight to the generator).
    ``rerank_score``/``rerank_rank``: the cross-encoder's z_r and 0-based position by it (None before
    reranking). ``weight``: p(z_j | x) in the generator's marginalization (None before generation).
    """

    pid: str
    score: float
    rank: int
    source: Source | None
    title: str = ""
    text: str = ""
    wikipedia_id: str | None = None
    rerank_score: float | None = None
    rerank_rank: int | None = None
    weight: float | None = None

    @property
    def page_id(self) -> str:
        """The page (``wikipedia_id``; else the part of a ``wikiid::[start,end]`` pid before ``::``; else the pid)."""
        if self.wikipedia_id:
            return str(self.wikipedia_id)
        m = PID_PATTERN.match(self.pid)
        return m["wid"] if m else self.pid

    @property
    def paragraph_span(self) -> tuple[int, int] | None:
        """``(start, end)`` paragraph ids of a KILT pid ``wikiid::[start,end]``; None for other pids."""
        m = PID_PATTERN.match(self.pid)
        return (int(m["start"]), int(m["end"])) if m else None

    def with_(self, **changes) -> "Candidate":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def of(cls, passage: Any, rank: int = 0) -> "Candidate":
        """``passage`` as a candidate: a :class:`Candidate` as it is; a mapping or an object with some of
        Candidate's field names (a :class:`Passage`, a passages-Parquet row; a missing score is 0.0, a
        missing rank ``rank``, a missing source None); a ``(title, text)`` pair."""
        if isinstance(passage, Candidate):
            return passage
        if isinstance(passage, (tuple, list)) and len(passage) == 2:
            return cls(pid="", score=0.0, rank=rank, source=None, title=str(passage[0] or ""),
                       text=str(passage[1] or ""))
        get = passage.get if isinstance(passage, Mapping) else (lambda name: getattr(passage, name, None))
        values = {f.name: get(f.name) for f in fields(cls)}
        values = {k: v for k, v in values.items() if v is not None}
        values["pid"] = str(values.get("pid", ""))
        values["score"] = float(values.get("score", 0.0))
        values.setdefault("rank", rank)
        values.setdefault("source", None)
        return cls(**values)


# The retrievers' name for a candidate before reranking (same record).
Hit = Candidate
