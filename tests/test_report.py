"""Run reports: Markdown, JSON and PNG plots from a summary dict."""

from __future__ import annotations

import json

from re2g.eval.report import stages_table, write_report


def test_report_files_and_contents(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 3.0 / s}) for s in range(1, 20)))
    summary = {
        "run_dir": "runs/x", "seconds": 123.0,
        "stages": [{"name": "dpr", "metric": "dev recall@5", "before": 0.1, "after": 0.6, "seconds": 30.0},
                   {"name": "bm25", "metric": "", "skipped": True, "seconds": 3.0},   # done in an earlier run
                   {"name": "e2e", "metric": "left out (quickstart.skip)", "skipped": True}],
        "retrieval": {"dev": {"bm25": {"recall@1": 0.3, "recall@5": 0.8, "mrr@10": 0.5},
                              "dpr": {"recall@1": 0.4, "recall@5": 0.9, "mrr@10": 0.6}}},
        "downstream": {"dev": {"untrained": {"em": 0.0, "f1": 0.1}, "stage 2": {"em": 0.4, "f1": 0.5}}},
        "training": {"dpr": str(log), "missing": str(tmp_path / "nope.jsonl")},
        "answers": [{"query": "q?", "answer": "a", "provenance": [{"pid": "1::[1,1]", "title": "T",
                                                                      "source": "bm25", "rerank_score": 1.5}]}],
    }
    files = write_report(summary, tmp_path / "report")
    assert {"training_curves", "recall_dev", "answers_dev", "markdown", "json"} <= set(files)
    for k in ("training_curves", "recall_dev", "answers_dev"):
        assert files[k].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["markdown"].read_text()
    assert "| dpr | dev recall@5 | 0.100 | 0.600 | +0.500 | 30 |" in md
    assert "| bm25 |  | — | — |  | done before |" in md and "| e2e | left out (quickstart.skip) | — | — |  | — |" in md
    assert "recall_dev.png" in md and "**q?** → a" in md
    assert json.loads(files["json"].read_text())["seconds"] == 123.0
    table = stages_table(summary)
    assert table.row_count == 4  # three stages and the total
    assert [c._cells[-1] for c in table.columns][0] == "total"
    assert table.columns[-1]._cells == ["30", "done before", "—", "123"]


def test_report_with_nothing_in_it(tmp_path):
    files = write_report({}, tmp_path / "r")
    assert set(files) == {"markdown", "json"}
