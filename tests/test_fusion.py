"""Fusion of DPR and BM25 hits: concat + dedup (Re2G), reciprocal rank fusion, linear."""

from __future__ import annotations

import pytest

from re2g.config import RetrievalConfig
from re2g.index.fusion import HybridRetriever, concat_dedup, linear, minmax, normalize_text, rrf
from re2g.types import Hit


def hits(source, *items):
    """items: (pid, score) or (pid, score, text)."""
    return [Hit(it[0], it[1], r, source, text=it[2] if len(it) > 2 else "") for r, it in enumerate(items)]


def test_normalize_text():
    assert normalize_text("  Paris, is the\tCAPITAL!\n") == "paris is the capital"
    assert normalize_text("don't — stop…") == "dont stop"
    assert normalize_text("") == ""


def test_concat_dedup_by_pid_and_normalized_text_keeps_order():
    dpr = hits("dpr", ("d1", 9.0, "Paris is the capital."), ("d2", 8.0, "Berlin"), ("d3", 7.0, "Oslo"))
    bm25 = hits("bm25", ("d2", 30.0, "Berlin"), ("x9", 25.0, "paris  IS the capital"), ("b3", 20.0, "Rome"),
                ("b4", 10.0, "Madrid"))
    out = concat_dedup(dpr, bm25, n_dpr=2, n_bm25=3)
    assert [(h.pid, h.rank, h.source, h.score) for h in out] == [
        ("d1", 0, "dpr", 9.0), ("d2", 1, "dpr", 8.0), ("b3", 2, "bm25", 20.0)]
    # all of both
    out = concat_dedup(dpr, bm25, 12, 12)
    assert [h.pid for h in out] == ["d1", "d2", "d3", "b3", "b4"]
    assert [h.rank for h in out] == [0, 1, 2, 3, 4]


def test_concat_dedup_empty_text_is_not_a_duplicate():
    dpr = hits("dpr", ("a", 1.0), ("b", 0.5))
    bm25 = hits("bm25", ("c", 3.0), ("a", 2.0), ("d", 1.0, "..."))
    assert [h.pid for h in concat_dedup(dpr, bm25, 12, 12)] == ["a", "b", "c", "d"]
    assert concat_dedup([], [], 5, 5) == []
    assert [h.pid for h in concat_dedup(dpr, bm25, 0, 1)] == ["c"]


def test_rrf_hand_computed():
    dpr = hits("dpr", ("a", 9.0), ("b", 8.0), ("c", 7.0))
    bm25 = hits("bm25", ("c", 30.0), ("d", 20.0))
    out = rrf([dpr, bm25], k=1)
    # a: 1/2, b: 1/3, c: 1/4 + 1/2, d: 1/3 (tie with b: first appearance wins)
    assert [(h.pid, h.rank, h.source) for h in out] == [("c", 0, "dpr"), ("a", 1, "dpr"), ("b", 2, "dpr"),
                                                        ("d", 3, "bm25")]
    assert [h.score for h in out] == pytest.approx([0.75, 0.5, 1 / 3, 1 / 3])
    out60 = rrf([dpr, bm25], top_k=2)
    assert [h.pid for h in out60] == ["c", "a"]
    assert out60[0].score == pytest.approx(1 / 63 + 1 / 61)


def test_linear_hand_computed():
    dpr = hits("dpr", ("a", 10.0), ("b", 6.0), ("c", 2.0))  # -> 1, .5, 0
    bm25 = hits("bm25", ("c", 30.0), ("d", 20.0), ("a", 10.0))  # -> 1, .5, 0
    out = linear(dpr, bm25, w=0.75)
    assert [(h.pid, h.source) for h in out] == [("a", "dpr"), ("b", "dpr"), ("c", "dpr"), ("d", "bm25")]
    assert [h.score for h in out] == pytest.approx([0.75, 0.375, 0.25, 0.125])
    out = linear(dpr, bm25, w=0.25, top_k=2)
    assert [(h.pid, h.rank) for h in out] == [("c", 0), ("d", 1)]
    assert [h.score for h in out] == pytest.approx([0.75, 0.375])
    assert minmax([3.0]) == [1.0] and minmax([]) == []


class FakeRetriever:
    def __init__(self, source, table):
        self.source, self.table, self.calls = source, table, []

    def search(self, query, k):
        return self.batch_search([query], k)[0]

    def batch_search(self, queries, k):
        self.calls.append((list(queries), k))
        return [hits(self.source, *self.table[q])[:k] for q in queries]


def test_hybrid_retriever():
    dense = FakeRetriever("dpr", {"q": [("a", 2.0, "A"), ("b", 1.0, "B")], "r": [("z", 1.0, "Z")]})
    bm25 = FakeRetriever("bm25", {"q": [("b", 9.0, "B"), ("c", 5.0, "a!")], "r": []})
    h = HybridRetriever(dense, bm25, RetrievalConfig(dpr_top_k=2, bm25_top_k=2))
    assert [(x.pid, x.source) for x in h.search("q")] == [("a", "dpr"), ("b", "dpr")]  # c == "A" by text
    assert [[x.pid for x in r] for r in h.batch_search(["q", "r"])] == [["a", "b"], ["z"]]
    assert dense.calls[-1] == (["q", "r"], 2) and bm25.calls[-1] == (["q", "r"], 2)
    h = HybridRetriever(dense, bm25, RetrievalConfig(dpr_top_k=2, bm25_top_k=2, fusion="rrf", rrf_k=1))
    assert [x.pid for x in h.search("q")] == ["b", "a", "c"]  # b: 1/3 + 1/2
    h = HybridRetriever(dense, bm25, RetrievalConfig(dpr_top_k=2, bm25_top_k=2, fusion="linear",
                                                     linear_dpr_weight=0.5))
    # a: .5*1 + 0, b: .5*0 + .5*1 (tie: DPR order), c: 0
    assert [(x.pid, x.score) for x in h.search("q", k=2)] == [("a", 0.5), ("b", 0.5)]
    h = HybridRetriever(dense, bm25, RetrievalConfig(dpr_top_k=0, bm25_top_k=2))
    assert [x.source for x in h.search("q")] == ["bm25", "bm25"]
    assert h.batch_search([]) == []
