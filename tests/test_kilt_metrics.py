"""KILT's official metrics (re2g.eval.kilt) on hand-made cases and a fixture pair whose expected
output was worked out by hand from the official scorer's rules (tests/data/kilt_official)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from re2g.data.kilt import parse_kilt_example
from re2g.errors import DataFormatError, Re2GError
from re2g.eval.cli import evaluate_app
from re2g.eval.kilt import (
    evaluate_kilt,
    evaluate_kilt_files,
    evidence_rank,
    evidence_sets,
    exact_match,
    f1_score,
    gold_answers,
    gold_page_lists,
    max_over_answers,
    normalize_answer,
    output_pages,
    r_precision,
    read_predictions,
    recall_at_k,
    rouge_l,
    score_example,
)

FIXTURE = Path(__file__).parent / "data" / "kilt_official"
ONE = 2 / (2 + 1e-8)  # ROUGE-L F of identical strings: 2pr / (p + r + 1e-8)


def gold(id_, *outputs, input_="q?"):
    """A gold example; each output is (answer or None, [page ids] or None for no provenance key)."""
    outs = []
    for answer, pages in outputs:
        o = {} if answer is None else {"answer": answer}
        if pages is not None:
            o["provenance"] = [{"wikipedia_id": p, "title": f"t{p}"} for p in pages]
        outs.append(o)
    return parse_kilt_example({"id": id_, "input": input_, "output": outs})


def guess(id_, answer="x", pages=None):
    o = {"answer": answer}
    if pages is not None:
        o["provenance"] = [{"wikipedia_id": p} for p in pages]
    return {"id": id_, "output": [o]}


def close(a: dict, b: dict, tol=1e-9):
    assert a.keys() == b.keys()
    for section in a:
        assert a[section].keys() == b[section].keys(), section
        for k in a[section]:
            assert a[section][k] == pytest.approx(b[section][k], abs=tol), (section, k)


# --------------------------------------------------------------------------- answers


def test_normalization_follows_squad_order():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("A cat, an apple & THE dog.") == "cat apple dog"
    assert normalize_answer("theater an") == "theater"          # articles only as whole words
    assert normalize_answer("the") == ""
    assert normalize_answer("Éclair «x»") == "éclair «x»"         # only ASCII punctuation goes
    assert exact_match("the Beatles.", "Beatles") == 1.0
    assert exact_match("Beatle", "Beatles") == 0.0


def test_f1_counts_tokens_with_multiplicity():
    assert f1_score("William Shakespeare wrote it", "William Shakespeare") == pytest.approx(2 / 3)
    assert f1_score("a a b", "a b b") == pytest.approx(2 / 3)    # 'a' is an article: [b] vs [b, b]
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)    # common: x, y -> p = r = 2/3
    assert f1_score("the", "the") == 0.0                         # both normalize to nothing
    assert exact_match("the", "the") == 1.0                      # ... while EM is 1, as in KILT


def test_rouge_l_is_raw_and_zero_on_empty():
    assert rouge_l("Paris", "Paris") == pytest.approx(ONE, abs=1e-15)
    assert rouge_l("paris", "Paris") == 0.0                      # no normalization
    assert rouge_l("William Shakespeare wrote it", "William Shakespeare") == pytest.approx(1 / 1.50000001)
    assert rouge_l("...", "Paris") == 0.0                        # the package raises: scored 0
    assert rouge_l("Paris", "...") == 0.0


def test_max_over_several_gold_answers():
    g = gold("q", ("The Eiffel Tower", ["1"]), ("Eiffel Tower", None), (" ", ["2"]), (None, ["3"]))
    assert gold_answers(g) == {"The Eiffel Tower", "Eiffel Tower"}
    assert max_over_answers(f1_score, "Eiffel", gold_answers(g)) == pytest.approx(2 / 3)
    assert max_over_answers(rouge_l, "Eiffel Tower", gold_answers(g)) == pytest.approx(ONE)
    with pytest.raises(ValueError):
        max_over_answers(exact_match, "x", [])


# --------------------------------------------------------------------------- pages


def test_r_precision_best_gold_output_and_several_pages():
    g = gold("q", ("a", ["1", "2", "2"]), ("b", ["3"]), ("c", None))
    assert gold_page_lists(g) == [["1", "2"], ["3"], []]
    assert r_precision(["2", "9", "1"], gold_page_lists(g)) == 0.5    # R=2: first 2 are 2, 9
    assert r_precision(["2", "1"], gold_page_lists(g)) == 1.0
    assert r_precision(["3", "1"], gold_page_lists(g)) == 1.0         # R=1 for the 2nd output
    assert r_precision([], gold_page_lists(g)) == 0.0
    assert r_precision(["1"], [[]]) == 0.0                            # R = 0 scores 0
    with pytest.raises(ValueError):
        r_precision(["1"], [])


def test_predicted_pages_are_stripped_and_distinct():
    ex = read_predictions_from([guess("q", "x", [" 7", "7", "8 ", 9])])[0]
    assert output_pages(ex.output[0]) == ["7", "8", "9"]


def test_evidence_sets_and_rank():
    g = gold("q", ("a", ["1", "2"]), ("b", ["1"]), ("c", ["2", "1"]), ("d", []), ("e", None))
    sets = evidence_sets(g)
    assert sets == [frozenset({"1", "2"}), frozenset({"1"}), frozenset()]   # equal sets once, [] kept
    # page 1 starts {1,2} and completes {1}: two points; page 2 then completes {1,2}
    assert evidence_rank(["1", "9", "2"], sets) == [True, False, True]
    assert evidence_rank(["2", "9"], sets) == [("partial", 0), False]
    assert recall_at_k(["1", "9", "2"], sets, 1) == pytest.approx(1 / 3)
    assert recall_at_k(["1", "9", "2"], sets, 3) == pytest.approx(2 / 3)   # the empty set never completes
    assert recall_at_k([], sets, 5) == 0.0
    assert recall_at_k(["1"], [], 5) == 0.0
    with pytest.raises(ValueError):
        recall_at_k(["1"], sets, 0)


def test_recall_counts_rank_points_not_pages():
    g = gold("q", ("a", ["1", "2"]), ("b", ["3"]))
    sets = evidence_sets(g)
    # 1 starts set 0 (a point), 3 completes set 1, 2 completes set 0: its point moves to the end
    assert evidence_rank(["1", "3", "2"], sets) == [True, True]
    assert recall_at_k(["1", "3", "2"], sets, 1) == 0.5
    assert recall_at_k(["4", "1", "5", "2"], sets, 2) == 0.0         # rank: F, F, T
    assert recall_at_k(["4", "1", "5", "2"], sets, 3) == 0.5


# --------------------------------------------------------------------------- per example, gating


def test_kilt_credit_only_when_r_precision_is_one():
    g = gold("q", ("Paris", ["1", "2"]))
    full = score_example(g, read_predictions_from([guess("q", "Paris", ["2", "1", "3"])])[0])
    half = score_example(g, read_predictions_from([guess("q", "Paris", ["2", "3", "1"])])[0])
    assert full.rprec == 1 and full.kilt and full.accuracy == 1
    assert half.rprec == 0.5 and not half.kilt and half.em == 1
    r = evaluate_kilt([g, gold("r", ("Rome", ["5"]))],
                      [guess("q", "Paris", ["2", "3", "1"]), guess("r", "rome", ["5"])], ks=(1, 5))
    assert r["downstream"] == pytest.approx({"accuracy": 0.5, "em": 1.0, "f1": 1.0, "rougel": ONE / 2})
    assert r["kilt"] == pytest.approx({"KILT-accuracy": 0.0, "KILT-em": 0.5, "KILT-f1": 0.5, "KILT-rougel": 0.0})
    assert r["retrieval"] == pytest.approx({"Rprec": 0.75, "recall@1": 0.5, "recall@5": 1.0})


def test_empty_prediction_scores_zero_but_counts():
    golds = [gold("q", ("Paris", ["1"])), gold("r", ("Rome", ["2"]))]
    r = evaluate_kilt(golds, [guess("q", "  ", ["1"]), guess("r", "Rome", ["2"])])
    assert r["downstream"]["accuracy"] == 0.5 and r["kilt"]["KILT-em"] == 0.5
    assert r["retrieval"] == {"Rprec": 1.0, "recall@5": 1.0}       # retrieval still scored
    # a gold example without answers is fine for an empty prediction, as in KILT ...
    r = evaluate_kilt([gold("q", (None, ["1"]))], [guess("q", "", ["1"])])
    assert r["downstream"]["em"] == 0.0 and r["retrieval"]["Rprec"] == 1.0
    # ... and an error for a non-empty one (KILT's scorer fails there)
    with pytest.raises(DataFormatError, match="'q'.*no non-empty gold answer"):
        evaluate_kilt([gold("q", (None, ["1"]))], [guess("q", "Paris", ["1"])])


def test_no_examples_gives_zeros():
    r = evaluate_kilt([], [], ks=(1, 5))
    assert r["retrieval"] == {"Rprec": 0.0, "recall@1": 0.0, "recall@5": 0.0}
    assert set(r) == {"kilt", "downstream", "retrieval"}


# --------------------------------------------------------------------------- input checks


def test_ids_are_matched_after_stripping_and_extras_ignored(caplog):
    golds = [gold(" q", ("Paris", ["1"]))]
    with caplog.at_level(logging.WARNING, logger="re2g.eval.kilt"):
        r = evaluate_kilt(golds, [guess("q ", "Paris", ["1"]), guess("zz", "x")], guess_name="p.jsonl")
    assert r["kilt"]["KILT-accuracy"] == 1.0
    assert "p.jsonl" in caplog.text and "'zz'" in caplog.text
    with pytest.raises(DataFormatError, match=r"p\.jsonl.*'zz'"):
        evaluate_kilt(golds, [guess("q", "Paris", ["1"]), guess("zz", "x")], strict=True, guess_name="p.jsonl")


@pytest.mark.parametrize("golds, guesses, where, what", [
    ([("q", "a"), ("r", "b")], [("q", "a")], "p.jsonl", r"no prediction for 1 gold id.*g\.jsonl.*'r'"),
    ([("q", "a")], [("r", "a")], "p.jsonl", r"no prediction.*'q'"),
    ([("q", "a"), ("q ", "b")], [("q", "a")], "g.jsonl", r"duplicate gold id 'q'"),
    ([("q", "a")], [("q", "a"), (" q", "b")], "p.jsonl", r"duplicate prediction id 'q'"),
])
def test_rejections_name_the_file_and_ids(golds, guesses, where, what):
    g = [gold(i, (a, ["1"])) for i, a in golds]
    p = [guess(i, a, ["1"]) for i, a in guesses]
    with pytest.raises(DataFormatError, match=what) as e:
        evaluate_kilt(g, p, gold_name="g.jsonl", guess_name="p.jsonl")
    assert str(e.value).startswith(where)


def test_rejects_what_the_official_scorer_cannot_score():
    g = [gold("q", ("a", ["1"]))]
    two = {"id": "q", "output": [{"answer": "a"}, {"answer": "b"}]}
    no_answer = {"id": "q", "output": [{"provenance": [{"wikipedia_id": "1"}]}]}
    for bad in (two, no_answer, {"id": "q", "output": []}):
        with pytest.raises(DataFormatError, match="'q'.*exactly one output with an 'answer'"):
            evaluate_kilt(g, [bad], guess_name="p.jsonl")
    empty_gold = parse_kilt_example({"id": "q", "input": "?", "output": []})
    with pytest.raises(DataFormatError, match="'q'.*no outputs"):
        evaluate_kilt([empty_gold], [guess("q", "", [])])
    with pytest.raises(ValueError):
        evaluate_kilt(g, [guess("q", "a")], ks=(0,))


def test_prediction_reader(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": 7, "output": [{"answer": "a", "provenance": [
        {"title": "no page id"}, {"wikipedia_id": 12}]}]}) + "\n\n")
    ex = read_predictions(str(p))[0]
    assert ex.id == "7" and ex.input == "" and output_pages(ex.output[0]) == ["12"]
    p.write_text('{"id": "q", "output": []}\n{"id": "q", "output": []}\n')
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: field 'id': duplicate"):
        read_predictions(str(p))
    p.write_text('{"id": "q", "output": [{"answer": "a", "provenance": null}]}\n')
    with pytest.raises(DataFormatError, match=r"p\.jsonl:1: field 'output\[0\]\.provenance'"):
        read_predictions(str(p))
    p.write_text('{"id": "q"}\n')
    with pytest.raises(DataFormatError, match=r"p\.jsonl:1: field 'output'"):
        read_predictions(str(p))


# --------------------------------------------------------------------------- fixture + CLI


def test_fixture_matches_hand_computed_official_output():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    got = evaluate_kilt_files(str(FIXTURE / "gold.jsonl"), str(FIXTURE / "guess.jsonl"))
    close(got, expected)
    assert list(got) == ["kilt", "downstream", "retrieval"]
    assert list(got["kilt"]) == ["KILT-accuracy", "KILT-em", "KILT-f1", "KILT-rougel"]
    assert list(got["downstream"]) == ["accuracy", "em", "f1", "rougel"]
    assert list(got["retrieval"]) == ["Rprec", "recall@5"]
    both = evaluate_kilt_files(str(FIXTURE / "gold.jsonl"), str(FIXTURE / "guess.jsonl"), ks=(5, 1))
    close(both, json.loads((FIXTURE / "expected_ks_1_5.json").read_text()))


def test_cli_json_table_and_errors(tmp_path):
    runner = CliRunner()
    args = ["kilt", "--gold", str(FIXTURE / "gold.jsonl"), "--guess", str(FIXTURE / "guess.jsonl")]
    res = runner.invoke(evaluate_app, [*args, "--ks", "1,5"])
    assert res.exit_code == 0, res.output
    close(json.loads(res.stdout), json.loads((FIXTURE / "expected_ks_1_5.json").read_text()))
    res = runner.invoke(evaluate_app, [*args, "--table"])
    assert res.exit_code == 0 and "KILT" in res.stdout and "0.7500" in res.stdout and "recall@5" in res.stdout
    bad = tmp_path / "guess.jsonl"
    bad.write_text('{"id": "q1", "output": [{"answer": "Paris"}]}\n')
    res = runner.invoke(evaluate_app, ["kilt", "--gold", str(FIXTURE / "gold.jsonl"), "--guess", str(bad)])
    assert res.exit_code == 2
    assert "guess.jsonl" in res.stderr and "no prediction for 5 gold id" in res.stderr and "'q2'" in res.stderr
    res = runner.invoke(evaluate_app, [*args, "--ks", "0"])
    assert res.exit_code != 0


def test_errors_are_re2g_errors():
    assert issubclass(DataFormatError, Re2GError)


def read_predictions_from(rows):
    from re2g.eval.kilt import parse_prediction

    return [parse_prediction(r, "<test>", i) for i, r in enumerate(rows, start=1)]
