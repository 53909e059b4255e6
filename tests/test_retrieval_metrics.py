"""Retrieval metrics on hand-computed cases: passage and page level (paragraph and page-only
provenance), answer recall@k, and BEIR's nDCG@10 / Recall@100."""

import pytest

from re2g.data.kilt import KiltExample, KiltOutput, Provenance
from re2g.data.provenance import PassageLocator
from re2g.eval.retrieval import (
    answer_recall_at_k,
    beir_queries,
    contains_answer,
    dcg_at_k,
    evaluate_beir,
    evaluate_beir_retrievers,
    evaluate_rankings,
    evaluate_retrievers,
    mrr_at_k,
    ndcg_at_k,
    normalized_answers,
    page_r_precision,
    passage_has_answer,
    qrels_recall_at_k,
    r_precision,
    recall_at_k,
    reports_table,
)
from re2g.types import Hit


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


# --------------------------------------------------------------------------- page-level provenance



def _loc():
    import pyarrow as pa

    # page 1: three ranged passages; page 2: one; page 3: two passages whose ids carry no range
    # (page from the wikipedia_id column); "beir-9": no page at all (BEIR-like, wikipedia_id None)
    return PassageLocator.from_table(pa.table({
        "pid": ["1::[1,2]", "1::[3,3]", "1::[4,7]", "2::[1,4]", "w3-a", "w3-b", "beir-9"],
        "wikipedia_id": ["1", "1", "1", "2", "3", "3", None]}))


def test_page_only_provenance_makes_every_passage_of_the_page_a_positive():
    loc = _loc()
    assert (len(loc), loc.pages) == (6, 3)
    assert loc.positive_pids([Provenance(wikipedia_id="1")]) == ["1::[1,2]", "1::[3,3]", "1::[4,7]"]
    assert loc.positive_pids([{"wikipedia_id": "2"}]) == ["2::[1,4]"]
    # passages without a range are matched at page level, for page-only and paragraph provenance alike
    assert loc.positive_pids([Provenance(wikipedia_id="3")]) == ["w3-a", "w3-b"]
    assert loc.positive_pids([{"wikipedia_id": "3", "start_paragraph_id": 5}]) == ["w3-a", "w3-b"]
    # a paragraph entry for the same page is more precise and decides for that page
    prov = [Provenance(wikipedia_id="1"), Provenance(wikipedia_id="1", start_paragraph_id=3, end_paragraph_id=3),
            Provenance(wikipedia_id="2"), Provenance(wikipedia_id="404")]
    assert loc.positive_pids(prov) == ["1::[3,3]", "2::[1,4]"]
    assert loc.positive_pids([Provenance(wikipedia_id="beir-9")]) == []


def test_positives_keep_one_page_list_per_output():
    ex = KiltExample(id="q", input="?", output=[
        KiltOutput(answer="x", provenance=[Provenance(wikipedia_id="1"), Provenance(wikipedia_id="2")]),
        KiltOutput(answer="y", provenance=[Provenance(wikipedia_id="3")]), KiltOutput(answer="z")])
    pos = _loc().positives(ex)
    assert pos.pids == ["1::[1,2]", "1::[3,3]", "1::[4,7]", "2::[1,4]", "w3-a", "w3-b"]
    assert pos.page_ids == ["1", "2", "3"]
    assert pos.page_lists == [["1", "2"], ["3"], []]


def test_page_r_precision_is_kilts_best_over_outputs():
    # outputs {1, 2} and {3}; ranked pages 3, 3, 1, 2 -> distinct 3, 1, 2
    # output {1,2}: first 2 distinct = 3, 1 -> 1/2; output {3}: first 1 = 3 -> 1/1; best = 1.0
    assert page_r_precision(["3", "3", "1", "2"], [["1", "2"], ["3"]]) == 1.0
    # ranked 9, 1, 2: output {1,2}: (9, 1) -> 1/2; output {3}: (9) -> 0; best 0.5
    # (the union of the outputs' pages would give another value: {1,2,3}, first 3 = 9, 1, 2 -> 2/3)
    assert page_r_precision(["9", "1", "2"], [["1", "2"], ["3"]]) == 0.5
    assert r_precision(["9", "1", "2"], {"1", "2", "3"}) == pytest.approx(2 / 3)
    assert page_r_precision(["1"], [["1"], []]) == 1.0


# --------------------------------------------------------------------------- answer recall


def test_contains_answer_normalizes_as_kilt_and_matches_whole_tokens():
    # case, articles and punctuation are dropped on both sides
    assert contains_answer("Songs by THE Beatles, in 1963.", ["the beatles!"])
    assert contains_answer("The U.S. Army", ["US army"])
    assert contains_answer("an apple a day", ["Apple Day"])  # "apple a day" -> "apple day"
    # whole tokens only: "beat" is not in "beatles", "1963" is not in "19634"
    assert not contains_answer("the beatles", ["beat"])
    assert not contains_answer("year 19634", ["1963"])
    # an answer that normalizes to nothing never matches
    assert normalized_answers(["The", " ", "", "A.", "Paris", "paris"]) == ["paris"]
    assert not contains_answer("the a an", ["The"])
    assert contains_answer("x", ["nope", "X"])


def test_passage_has_answer_title_and_text_apart():
    # the text only by default (DPR's rule); the title too when asked
    assert not passage_has_answer("Dasyuromorphia", "an order of marsupials", ["dasyuromorphia"])
    assert passage_has_answer("Dasyuromorphia", "an order of marsupials", ["dasyuromorphia"], use_title=True)
    assert passage_has_answer("Dasyuromorphia", "Dasyuromorphia is an order", ["dasyuromorphia"])
    # no match across the title's end and the text's start
    assert not passage_has_answer("New", "York City", ["New York"], use_title=True)


def test_answer_recall_at_k():
    flags = [False, False, True, False]
    assert [answer_recall_at_k(flags, k) for k in (1, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]
    assert answer_recall_at_k([], 5) == 0.0
    with pytest.raises(ValueError):
        answer_recall_at_k(flags, 0)


def test_evaluate_rankings_keeps_two_populations():
    # q0: passage gold only; q1: passage gold and answers; q2: answers only
    rep = evaluate_rankings("s", [["a", "b"], ["c", "d"], ["e"]], [{"b"}, {"c"}, None], ks=(1, 2), mrr_k=10,
                            answer_flags=[None, [False, True], [True]], answer_ks=(1,))
    assert (rep.n, rep.n_answer) == (2, 2)
    assert rep.metrics["recall@1"] == 0.5          # (0 + 1) / 2, q2 not counted
    assert rep.metrics["mrr@10"] == pytest.approx(0.75)  # (1/2 + 1) / 2
    assert rep.metrics["answer_recall@1"] == 0.5   # (0 + 1) / 2, q0 not counted
    assert "answer_recall@2" not in rep.metrics
    assert rep.to_dict()["n_answer"] == 2
    assert rep.per_query[2] == {"answer_recall@1": 1.0}
    t = reports_table([rep])
    assert [c.header for c in t.columns][:3] == ["system", "queries", "with answers"]


class _FixedRetriever:
    """Returns the given hit lists by query text."""

    def __init__(self, ranked: dict[str, list[tuple[str, str]]]):
        self.ranked = ranked

    def batch_search(self, queries, k):
        return [[Hit(pid=p, score=1.0 - r / 100, rank=r, source="bm25", title="", text=t,
                     wikipedia_id=p.split("::")[0] if "::" in p else None)
                 for r, (p, t) in enumerate(self.ranked[q][:k])] for q in queries]


def test_evaluate_retrievers_scores_page_only_and_answers_only_examples():
    examples = [
        # paragraph provenance: positive 1::[3,3]
        KiltExample("a", "qa", [KiltOutput(answer="Roustad", provenance=[
            Provenance(wikipedia_id="1", start_paragraph_id=3, end_paragraph_id=3)])]),
        # page-only provenance: every passage of page 2 is a positive
        KiltExample("b", "qb", [KiltOutput(provenance=[Provenance(wikipedia_id="2")])]),
        # answers only (NQ-open style)
        KiltExample("c", "qc", [KiltOutput(answer="the Danube"), KiltOutput(answer="Donau")]),
        # neither: left out and counted (a page missing from the corpus; a FEVER label is no answer string)
        KiltExample("d", "qd", [KiltOutput(answer="SUPPORTS", provenance=[Provenance(wikipedia_id="404")])]),
    ]
    retr = _FixedRetriever({
        "qa": [("1::[1,2]", "born in roustad."), ("1::[3,3]", "x")],
        "qb": [("1::[4,7]", "y"), ("2::[1,4]", "z")],
        "qc": [("1::[1,2]", "a river"), ("2::[1,4]", "The Danube flows")],
        "qd": [("1::[1,2]", "w")],
    })
    (rep,), skipped = evaluate_retrievers({"fixed": retr}, examples, _loc(), ks=(1, 2), mrr_k=10)
    assert skipped == 1
    assert (rep.n, rep.n_answer) == (2, 2)  # passage metrics: a, b; answer metrics: a, c
    assert rep.metrics["recall@1"] == 0.0   # a: 1::[3,3] at rank 2; b: 2::[1,4] at rank 2
    assert rep.metrics["recall@2"] == 1.0
    assert rep.metrics["mrr@10"] == 0.5
    assert rep.metrics["rprec_page"] == 0.5  # a: page 1 first -> 1; b: page 1 first, gold 2 -> 0
    assert rep.metrics["answer_recall@1"] == 0.5  # a: "roustad" at rank 1; c: "danube" at rank 2
    assert rep.metrics["answer_recall@2"] == 1.0


# --------------------------------------------------------------------------- BEIR


def test_ndcg_by_hand():
    qrels = {"d1": 2, "d2": 1, "d3": 3, "d4": 0}
    ranked = ["d1", "x", "d3", "d1", "d2", "d4"]  # the repeated d1 counts once: d1, x, d3, d2, d4
    # DCG@10  = 2/log2(2) + 0/log2(3) + 3/log2(4) + 1/log2(5) + 0/log2(6)
    #         = 2 + 0 + 1.5 + 0.4306766 = 3.9306766
    # IDCG@10 = gains sorted 3, 2, 1: 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.2618595 + 0.5 = 4.7618595
    assert dcg_at_k(ranked, qrels, 10) == pytest.approx(3.9306766, abs=1e-7)
    assert ndcg_at_k(ranked, qrels, 10) == pytest.approx(3.9306766 / 4.7618595, abs=1e-7)  # 0.8254499
    # @2: DCG = 2 + 0 = 2; IDCG = 3 + 1.2618595 = 4.2618595 -> 0.4692787
    assert ndcg_at_k(ranked, qrels, 2) == pytest.approx(0.4692787, abs=1e-7)
    # the ideal order scores 1; no relevant document scores 0
    assert ndcg_at_k(["d3", "d1", "d2"], qrels, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["d1"], {"d4": 0}, 10) == 0.0
    with pytest.raises(ValueError):
        ndcg_at_k(ranked, qrels, 0)


def test_qrels_recall_at_100():
    qrels = {"a": 1, "b": 2, "c": 0}  # relevant: a, b (score > 0); c is judged not relevant
    ranked = [f"x{i}" for i in range(49)] + ["a"] + [f"y{i}" for i in range(100)] + ["b"]  # a at 50, b at 151
    assert qrels_recall_at_k(ranked, qrels, 100) == 0.5
    assert qrels_recall_at_k(ranked, qrels, 200) == 1.0
    assert qrels_recall_at_k(["c"], qrels, 100) == 0.0
    assert qrels_recall_at_k(["a"], {"c": 0}, 100) == 0.0


def test_evaluate_beir_and_its_queries():
    from re2g.data.corpora import Query

    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}, "q3": {"d4": 0}, "q9": {"d1": 1}}
    qs = beir_queries([Query("q1", "one"), Query("q2", "two"), Query("q3", "three"), Query("q4", "four")], qrels)
    assert (qs.qids, qs.no_relevant, qs.missing) == (["q1", "q2"], 1, 1)
    rep = evaluate_beir("s", [["d1", "d2"], ["d9"]], qs.qrels)
    # q1: the ideal order -> nDCG 1, recall 2/2; q2: d3 not retrieved -> 0, 0
    assert rep.n == 2
    assert rep.metrics == {"ndcg@10": 0.5, "qrels_recall@100": 0.5}
    # a document with the query's own id is dropped, as BEIR does (ArguAna, Quora)
    retr = _FixedRetriever({"one": [("q1", ""), ("d1", ""), ("d2", "")], "two": [("d3", "")]})
    (rep,) = evaluate_beir_retrievers({"fixed": retr}, qs)
    assert rep.metrics == {"ndcg@10": 1.0, "qrels_recall@100": 1.0}
    (rep,) = evaluate_beir_retrievers({"fixed": retr}, qs, ignore_identical_ids=False)
    # q1 ranked q1, d1, d2: DCG = 0 + 2/log2(3) + 1/log2(4) = 1.7618595; IDCG = 2 + 1/log2(3) = 2.6309298
    assert rep.metrics["ndcg@10"] == pytest.approx((1.7618595 / 2.6309298 + 1.0) / 2, abs=1e-7)
