"""Retrieval metrics on hand-computed cases."""

import pytest

from re2g.eval.retrieval import evaluate_rankings, mrr_at_k, r_precision, recall_at_k


def test_recall_and_mrr():
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, {"c"}, 2) == 0.0
    assert recall_at_k(ranked, {"c"}, 3) == 1.0
    assert recall_at_k(ranked, {"x", "b"}, 2) == 1.0
    assert mrr_at_k(ranked, {"c", "d"}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, {"d"}, 3) == 0.0
    assert mrr_at_k([], {"d"}, 3) == 0.0


def test_r_precision_dedups_pages():
    # two gold pages; ranked distinct pages: p1, p3 (p1 repeated)
    assert r_precision(["p1", "p1", "p3", "p2"], {"p1", "p2"}) == 0.5
    assert r_precision(["p2", "p1"], {"p1", "p2"}) == 1.0
    assert r_precision(["p9"], {"p1"}) == 0.0
    assert r_precision(["p1"], set()) == 0.0


def test_evaluate_rankings_means():
    rep = evaluate_rankings("sys", [["a", "b"], ["c", "d"]], [{"b"}, {"x"}], ks=(1, 2), mrr_k=10,
                            page_rankings=[["P", "Q"], ["R"]], page_golds=[{"Q"}, {"R"}])
    assert rep.n == 2
    assert rep.metrics["recall@1"] == 0.0
    assert rep.metrics["recall@2"] == 0.5
    assert rep.metrics["mrr@10"] == pytest.approx(0.25)
    assert rep.metrics["rprec_page"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        evaluate_rankings("x", [["a"]], [])
