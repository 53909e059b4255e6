"""`re2g retrieval-report`'s library function on the data users bring: a KILT task whose provenance
names pages only, an answers-only task (NQ-open style) and a BEIR split, with a real BM25 index over
small corpora (no Ray, no dense model: seconds)."""

from __future__ import annotations

import json

import pytest

from re2g.config import load_config


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The tiny sample task, its passages (split in process) and a BM25 index at ``index/bm25``."""
    from re2g.config import PassageConfig, SampleConfig
    from re2g.data.kilt import iter_knowledge_source
    from re2g.data.passages import split_page, write_passages
    from re2g.data.sample import generate_sample
    from re2g.index.bm25 import build_bm25_index

    root = tmp_path_factory.mktemp("report_formats")
    generate_sample(root / "sample", SampleConfig(size="tiny"), progress=False)
    rows = [r for page in iter_knowledge_source(str(root / "sample" / "knowledge_source.jsonl"))
            for r in split_page(page, PassageConfig())]
    write_passages(rows, str(root / "passages"))
    build_bm25_index(str(root / "passages"), str(root / "index" / "bm25"), threads=1)
    return root


def _rewrite(src, dst, change):
    """A copy of the KILT file ``src`` at ``dst`` with ``change(example dict)`` applied to each line."""
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            d = json.loads(line)
            change(d)
            g.write(json.dumps(d) + "\n")
    return str(dst)


def _page_only(d):
    for o in d["output"]:
        for p in o.get("provenance", []):
            p.pop("start_paragraph_id", None)
            p.pop("end_paragraph_id", None)


def _answers_only(d):
    for o in d["output"]:
        o.pop("provenance", None)


def test_page_only_and_answers_only_tasks(sample_run, tmp_path):
    from re2g.eval.retrieval_report import retrieval_report

    src = sample_run / "sample" / "tasks" / "qa-dev-kilt.jsonl"
    paragraphs = str(src)
    pages = _rewrite(src, tmp_path / "pages.jsonl", _page_only)
    answers = _rewrite(src, tmp_path / "answers.jsonl", _answers_only)
    out = tmp_path / "report.json"
    res = retrieval_report(load_config(preset="tiny"), tasks=[paragraphs, pages, answers],
                           passages=str(sample_run / "passages"), index_dir=str(sample_run / "index"), out=str(out))
    saved = json.loads(out.read_text())
    assert saved == res.to_dict()
    (para,), (page,), (ans,) = (saved[t]["systems"] for t in (paragraphs, pages, answers))
    n = sum(1 for _ in open(src))
    assert [saved[t]["skipped"] for t in (paragraphs, pages, answers)] == [0, 0, 0]
    assert para["name"] == page["name"] == ans["name"] == "bm25"

    # paragraph provenance: passage metrics and answer recall, each over all 108 queries
    assert (para["n"], para["n_answer"]) == (n, n)
    # page-only provenance: every passage of the page is a positive, so no query is left out and
    # recall@k can only grow; page-level R-Precision is the same page-level figure
    assert (page["n"], page["n_answer"]) == (n, n)
    for k in (1, 5, 12, 24):
        assert page[f"recall@{k}"] >= para[f"recall@{k}"]
    assert page["recall@24"] > 0.9  # BM25 finds the page named in the question
    assert page["rprec_page"] == para["rprec_page"]
    # answers only: no passage metrics at all, answer recall over every query, equal to the
    # paragraph task's (same rankings, same answers)
    assert (ans["n"], ans["n_answer"]) == (0, n)
    assert not {"recall@1", "mrr@10", "rprec_page"} & set(ans)
    for k in (1, 5, 12, 24):
        assert ans[f"answer_recall@{k}"] == para[f"answer_recall@{k}"]
    assert ans["answer_recall@1"] <= ans["answer_recall@5"] <= ans["answer_recall@24"]
    assert ans["answer_recall@24"] > 0.5

    # fact verification: FEVER's labels are not answer strings, so no answer recall
    fever = str(sample_run / "sample" / "tasks" / "fact_verification-dev-kilt.jsonl")
    (fv,) = retrieval_report(load_config(preset="tiny"), tasks=[fever], passages=str(sample_run / "passages"),
                             index_dir=str(sample_run / "index")).to_dict()[fever]["systems"]
    assert fv["n"] > 0 and fv["n_answer"] == 0 and not any(k.startswith("answer_") for k in fv)

    from rich.console import Console

    console = Console(width=240, record=True)
    console.print(res.table())
    text = console.export_text()
    assert "with answers" in text and "answer_recall@5" in text and "left out" not in text


def _write_beir(root):
    """A 6-document BEIR dataset whose BM25 order is plain from the words shared with each query."""
    docs = {"d1": "apple banana cherry", "d2": "apple orchard in autumn", "d3": "quantum physics",
            "d4": "ancient roman history", "q5": "lecture notes on quantum physics", "d6": "sailing boats"}
    queries = {"q1": "apple banana", "q2": "roman history", "q3": "sailing", "q5": "lecture notes on quantum physics",
               "q7": "unused query of another split"}
    qrels = [("q1", "d1", 2), ("q1", "d2", 1), ("q1", "d6", 0),  # graded; d6 judged not relevant
             ("q2", "d3", 1),                                    # d3 shares no word with q2
             ("q3", "d6", 0),                                    # no relevant document: left out
             ("q5", "d3", 1),                                    # q5's own text is document q5
             ("q8", "d1", 1)]                                    # not in queries.jsonl: left out
    root.mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                               for k, v in docs.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                             + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))


def test_beir_split(tmp_path):
    from re2g.data.corpora import convert_corpus
    from re2g.eval.retrieval_report import retrieval_report
    from re2g.index.bm25 import build_bm25_index

    beir = tmp_path / "beir"
    _write_beir(beir)
    convert_corpus(str(beir), str(tmp_path / "passages"), "beir")
    build_bm25_index(str(tmp_path / "passages"), str(tmp_path / "index" / "bm25"), threads=1)
    res = retrieval_report(load_config(preset="tiny"), passages=str(tmp_path / "passages"),
                           index_dir=str(tmp_path / "index"), beir=str(beir), split="test")
    section = res.to_dict()[str(beir)]
    assert (section["format"], section["split"], section["queries"]) == ("beir", "test", 3)
    assert (section["no_relevant"], section["missing"], section["skipped"]) == (1, 1, 2)
    (bm25,) = section["systems"]
    # q1: BM25 ranks d1 (both words) then d2 (apple): the ideal order -> nDCG 1, recall 2/2
    # q2: d3 is never retrieved -> 0, 0
    # q5: document q5 (the query's own id) is dropped as BEIR does, then d3 first -> 1, 1
    assert bm25["n"] == 3
    assert bm25["ndcg@10"] == pytest.approx(2 / 3)
    assert bm25["qrels_recall@100"] == pytest.approx(2 / 3)

    from rich.console import Console

    console = Console(width=240, record=True)
    console.print(res.table())
    text = " ".join(console.export_text().split())
    assert "BEIR test" in text and "ndcg@10" in text and "qrels_recall@100" in text
    assert "1 judged query without a relevant document; 1 judged query not in queries.jsonl: left out" in text


def test_nothing_to_score_is_refused(tmp_path):
    from re2g.eval.retrieval_report import retrieval_report

    with pytest.raises(ValueError, match="nothing to score"):
        retrieval_report(load_config(preset="tiny"), passages=str(tmp_path), index_dir=str(tmp_path))


def test_scaled_depths():
    from re2g.eval.retrieval_report import scaled_depths

    assert scaled_depths(12, 12, 101) == (51, 50)
    assert scaled_depths(12, 4, 100) == (75, 25)
    assert scaled_depths(0, 12, 100) == (0, 100)
    assert scaled_depths(0, 0, 100) == (0, 0)
