"""Combining DPR and BM25 results: pure functions over ``list[Candidate]`` plus a hybrid retriever.

* :func:`concat_dedup` -- Re2G's hybrid: DPR top-n, then BM25 top-n without the passages DPR
  already returned (same pid, or same normalized text); order kept, ranks renumbered.
* :func:`rrf` -- reciprocal rank fusion: ``score(p) = sum over lists of 1 / (k + rank + 1)``.
* :func:`linear` -- ``w * minmax(dpr) + (1 - w) * minmax(bm25)``, a missing score counts 0.

Every fused hit keeps the ``source`` of the retriever it came from (for a passage both found: the
first list it appears in, DPR before BM25).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace
from typing import Protocol, Sequence

from re2g.config import RetrievalConfig
from re2g.types import Candidate

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase, delete punctuation (any Unicode punctuation), collapse whitespace, strip."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return _WS.sub(" ", text).strip()


def _renumber(hits: list[Candidate]) -> list[Candidate]:
    return [h if h.rank == r else replace(h, rank=r) for r, h in enumerate(hits)]


def concat_dedup(dpr_hits: Sequence[Candidate], bm25_hits: Sequence[Candidate], n_dpr: int, n_bm25: int) -> list[Candidate]:
    """DPR's top ``n_dpr`` then BM25's top ``n_bm25``, dropping any hit whose pid or normalized
    (non-empty) text came earlier. At most ``n_dpr + n_bm25`` hits; ranks 0.. in the new order;
    scores and sources unchanged."""
    out: list[Candidate] = []
    seen_pids: set[str] = set()
    seen_texts: set[str] = set()
    for h in list(dpr_hits[:max(n_dpr, 0)]) + list(bm25_hits[:max(n_bm25, 0)]):
        norm = normalize_text(h.text)
        if h.pid in seen_pids or (norm and norm in seen_texts):
            continue
        seen_pids.add(h.pid)
        if norm:
            seen_texts.add(norm)
        out.append(h)
    return _renumber(out)


def rrf(lists: Sequence[Sequence[Candidate]], k: int = 60, top_k: int | None = None) -> list[Candidate]:
    """Reciprocal rank fusion by pid: ``score(p) = sum_lists 1 / (k + rank + 1)`` with ``rank`` the
    0-based position in each list. Best first (ties: first appearance); ``top_k`` (None: all).
    Each hit is the first occurrence (earliest list), with the fused score and a new rank."""
    scores: dict[str, float] = {}
    first: dict[str, Candidate] = {}
    for hits in lists:
        seen_here: set[str] = set()
        for pos, h in enumerate(hits):
            if h.pid in seen_here:  # a pid counts once per list (its best rank)
                continue
            seen_here.add(h.pid)
            scores[h.pid] = scores.get(h.pid, 0.0) + 1.0 / (k + pos + 1)
            first.setdefault(h.pid, h)
    order = sorted(first, key=lambda p: -scores[p])  # stable: ties keep first appearance
    if top_k is not None:
        order = order[:max(top_k, 0)]
    return [replace(first[p], score=scores[p], rank=r) for r, p in enumerate(order)]


def minmax(scores: Sequence[float]) -> list[float]:
    """Min-max normalize to [0, 1]; all-equal scores (incl. a single one) map to 1."""
    if not scores:
        return []
    lo, hi = min(scores), max(scores)
    if hi == lo:
        return [1.0] * len(scores)
    return [(s - lo) / (hi - lo) for s in scores]


def linear(dpr: Sequence[Candidate], bm25: Sequence[Candidate], w: float = 0.5, top_k: int | None = None) -> list[Candidate]:
    """``w * minmax(dpr score) + (1 - w) * minmax(bm25 score)`` per pid, a missing score counting 0.
    Best first (ties: DPR order, then BM25 order); ``top_k`` (None: all). Each hit is the DPR one
    when DPR found it, else the BM25 one, with the fused score and a new rank."""
    fused: dict[str, float] = {}
    first: dict[str, Candidate] = {}
    for hits, weight in ((dpr, w), (bm25, 1.0 - w)):
        uniq: dict[str, Candidate] = {}
        for h in hits:
            uniq.setdefault(h.pid, h)
        norm = minmax([h.score for h in uniq.values()])
        for h, s in zip(uniq.values(), norm):
            fused[h.pid] = fused.get(h.pid, 0.0) + weight * s
            first.setdefault(h.pid, h)
    order = sorted(first, key=lambda p: -fused[p])
    if top_k is not None:
        order = order[:max(top_k, 0)]
    return [replace(first[p], score=fused[p], rank=r) for r, p in enumerate(order)]


def retrieve_k(cfg: RetrievalConfig, *, dense: bool, bm25: bool) -> int:
    """How many candidates a query gets before reranking: ``dpr_top_k`` when a dense index is searched
    plus ``bm25_top_k`` when BM25 is. The one place this is decided (pipeline, Serve, training)."""
    return (cfg.dpr_top_k if dense else 0) + (cfg.bm25_top_k if bm25 else 0)


def fuse(cfg: RetrievalConfig, dpr_hits: Sequence[Candidate] | None, bm25_hits: Sequence[Candidate] | None,
         k: int | None = None) -> list[Candidate]:
    """One query's DPR and BM25 lists fused as ``cfg.fusion`` says (``concat``: :func:`concat_dedup`,
    ``rrf``, ``linear``), each part cut to its own ``dpr_top_k`` / ``bm25_top_k``, the result to ``k``
    (default: :func:`retrieve_k` of the parts given). A retriever the run lacks is None: the other's
    list is only deduplicated (pid, normalized text) and cut, its scores kept. Training (stages 2-4),
    the pipeline and Serve all call this."""
    if k is None:
        k = retrieve_k(cfg, dense=dpr_hits is not None, bm25=bm25_hits is not None)
    if dpr_hits is None or bm25_hits is None:
        return concat_dedup(dpr_hits or [], bm25_hits or [], cfg.dpr_top_k, cfg.bm25_top_k)[:k]
    if cfg.fusion == "concat":
        return concat_dedup(dpr_hits, bm25_hits, cfg.dpr_top_k, cfg.bm25_top_k)[:k]
    if cfg.fusion == "rrf":
        return rrf([dpr_hits[:cfg.dpr_top_k], bm25_hits[:cfg.bm25_top_k]], k=cfg.rrf_k, top_k=k)
    return linear(dpr_hits[:cfg.dpr_top_k], bm25_hits[:cfg.bm25_top_k], cfg.linear_dpr_weight, top_k=k)


class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[Candidate]: ...

    def batch_search(self, queries: Sequence[str], k: int) -> list[list[Candidate]]: ...


class HybridRetriever:
    """DPR + BM25 fused as ``cfg.fusion`` says (:func:`fuse`); same ``search``/``batch_search`` as its
    parts. A part may be None (a run with one retriever): the other's hits, deduplicated.

    ``k`` (default :func:`retrieve_k` of the parts present) caps the fused list; each part retrieves
    its own ``dpr_top_k`` / ``bm25_top_k`` (0 skips that retriever).
    """

    def __init__(self, dense: Retriever | None, bm25: Retriever | None, cfg: RetrievalConfig | None = None):
        self.dense = dense
        self.bm25 = bm25
        self.cfg = cfg or RetrievalConfig()

    @property
    def k(self) -> int:
        """Candidates per query by default (:func:`retrieve_k` of the parts present)."""
        return retrieve_k(self.cfg, dense=self.dense is not None, bm25=self.bm25 is not None)

    def fuse(self, dpr_hits: Sequence[Candidate] | None, bm25_hits: Sequence[Candidate] | None,
             k: int | None = None) -> list[Candidate]:
        """Fuse one query's two lists per the config (:func:`fuse`)."""
        return fuse(self.cfg, dpr_hits, bm25_hits, k)

    def search(self, query: str, k: int | None = None) -> list[Candidate]:
        """Fused hits for one query."""
        return self.batch_search([query], k)[0]

    def batch_search(self, queries: Sequence[str], k: int | None = None) -> list[list[Candidate]]:
        """Fused hits for each query (each part searched once for the whole batch)."""
        queries = list(queries)
        if not queries:
            return []
        c = self.cfg

        def part(retriever, n: int) -> list[list[Candidate] | None]:
            """One part's hits per query; None per query for a part the run lacks."""
            if retriever is None:
                return [None] * len(queries)
            return retriever.batch_search(queries, n) if n else [[] for _ in queries]

        dpr, bm = part(self.dense, c.dpr_top_k), part(self.bm25, c.bm25_top_k)
        return [self.fuse(d, b, self.k if k is None else k) for d, b in zip(dpr, bm)]
