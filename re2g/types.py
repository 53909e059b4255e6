"""Typed records shared across re2g: passages and the one candidate record of retrieve → rerank → generate.

A passage travels from retrieval to the answer's provenance as one :class:`Candidate`: the retriever
fills ``pid, score, rank, source`` (+ ``title, text, wikipedia_id``), the reranker adds
``rerank_score, rerank_rank``, the generator ``weight`` (p(z_j | x)). The API schemas
(``serve/schemas.py``) and KILT provenance (``re2g.pipeline.kilt_provenance``) are derived from it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Literal

Source = Literal["dpr", "bm25", "rerank"]

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
    retriever found it (``dpr``, ``bm25``; ``rerank`` for passages a client gave to /v1/rerank).
    ``rerank_score``/``rerank_rank``: the cross-encoder's z_r and 0-based position by it (None before
    reranking). ``weight``: p(z_j | x) in the generator's marginalization (None before generation).
    """

    pid: str
    score: float
    rank: int
    source: Source
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
        return asdict(self)


# The retrievers' name for a candidate before reranking (same record).
Hit = Candidate
