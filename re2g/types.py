"""Typed records shared across re2g: passages and retrieval hits."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Source = Literal["dpr", "bm25", "rerank"]


@dataclass(frozen=True)
class Passage:
    """One passage of the knowledge source (the row of the passages Parquet)."""

    pid: str
    title: str
    text: str
    wikipedia_id: str | None = None


@dataclass(frozen=True)
class Hit:
    """One retrieved passage for one query. ``rank`` is 0-based within its result list;
    ``source`` says which retriever found it (``dpr`` or ``bm25``)."""

    pid: str
    score: float
    rank: int
    source: Source
    title: str = ""
    text: str = ""
    wikipedia_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
