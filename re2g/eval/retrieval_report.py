"""The retrieval report: BM25, DPR and the hybrid scored on KILT task files or on a BEIR split.

KILT task files (one section per file, ``"format": "kilt"``):

- ``recall@k`` (DPR's top-k accuracy: a positive passage among the first k), ``mrr@10`` and
  ``rprec_page`` (KILT's page-level R-Precision) over the ``n`` queries with a positive passage in
  the corpus. Provenance with paragraph ids makes the passages covering them positives; provenance
  naming a page only makes every passage of that page a positive.
- ``answer_recall@k`` over the ``n_answer`` queries with a gold answer: a top-k passage's text
  contains a gold answer as a token sequence after KILT/SQuAD normalization (DPR's top-k accuracy;
  titles are not searched). Tasks without provenance (NQ-open, TriviaQA, WebQuestions) get only
  these; queries with both get both.
  FEVER's labels (``SUPPORTS`` / ``REFUTES``) are not answer strings: fact verification gets none.
- ``skipped``: queries with neither a positive passage nor an answer (left out, and said so).

BEIR (``--beir DIR --split test``; one section ``"format": "beir"``): ``ndcg@10`` (graded gains =
qrel scores, log2 discount, ideal DCG from the query's qrels) and ``qrels_recall@100`` (BEIR's
Recall@100: the share of the query's relevant documents in the top 100), over the judged queries
with a relevant document, as BEIR computes them with ``pytrec_eval`` (a document whose id equals
the query id is ignored). BM25 and DPR retrieve 100 each; the hybrid keeps the config's share of
each part, scaled to 100 candidates (Re2G's 12 + 12 becomes 51 + 50), so its list is as deep as
theirs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from re2g.config import Re2GConfig

BEIR_NDCG_K = 10
BEIR_RECALL_K = 100


@dataclass
class RetrievalReportResult:
    """Per-section (task file or BEIR split), per-system metrics."""

    results: dict  # section -> {"format": "kilt" | "beir", "skipped": int, "systems": [report dicts], ...}

    def table(self):
        from rich.console import Group

        from re2g.eval.retrieval import RetrievalReport, reports_table

        tables = []
        for task, r in self.results.items():
            reps = [RetrievalReport.from_dict(s) for s in r["systems"]]
            if r.get("format") == "beir":
                left = [f"{r[k]} judged {'query' if r[k] == 1 else 'queries'} {what}"
                        for k, what in (("no_relevant", "without a relevant document"),
                                        ("missing", "not in queries.jsonl")) if r.get(k)]
                title = f"{task}: BEIR {r.get('split', '')}" + (f" ({'; '.join(left)}: left out)" if left else "")
            else:
                title = task + (f" ({r['skipped']} queries without a positive passage or an answer left out)"
                                if r["skipped"] else "")
            t = reports_table(reps, title=title)
            if r.get("format") == "beir":
                t.caption = ("ndcg@10: gains = qrel scores, log2 discount; qrels_recall@100: BEIR's Recall@100, "
                             "the share of the relevant documents in the top 100")
            tables.append(t)
        return Group(*tables)

    def to_dict(self) -> dict:
        return self.results


def score_kilt_tasks(retrievers: Mapping, tasks: Sequence[str], locator, *,
                     ks: tuple[int, ...] = (1, 5, 12, 24)) -> dict:
    """``{task file: {"format": "kilt", "skipped", "systems"}}`` for each KILT task file, scored with
    :func:`re2g.eval.retrieval.evaluate_retrievers` (``retrievers``: name -> ``batch_search``)."""
    from re2g.data.kilt import read_kilt
    from re2g.eval.retrieval import evaluate_retrievers

    results = {}
    for task in tasks:
        reports, skipped = evaluate_retrievers(retrievers, read_kilt(task), locator, ks=ks)
        results[task] = {"format": "kilt", "skipped": skipped, "systems": [r.to_dict() for r in reports]}
    return results


def beir_qrels_path(beir_dir: str, split: str) -> str:
    """``beir_dir/qrels/<split>.tsv`` (BEIR's layout)."""
    from re2g.layout import join

    return join(beir_dir, "qrels", f"{split}.tsv")


def score_beir(retrievers: Mapping, beir_dir: str, *, split: str = "test", ndcg_k: int = BEIR_NDCG_K,
               recall_k: int = BEIR_RECALL_K) -> dict:
    """``{"<beir_dir>": {"format": "beir", "split", "queries", "no_relevant", "missing", "skipped",
    "systems"}}``: the BEIR split's judged queries (``queries.jsonl`` + ``qrels/<split>.tsv``)
    scored with :func:`re2g.eval.retrieval.evaluate_beir_retrievers`."""
    from re2g.data.corpora import qrels_by_query, read_beir_qrels, read_beir_queries
    from re2g.eval.retrieval import beir_queries, evaluate_beir_retrievers

    qs = beir_queries(read_beir_queries(beir_dir), qrels_by_query(read_beir_qrels(beir_qrels_path(beir_dir, split))))
    reports = evaluate_beir_retrievers(retrievers, qs, ndcg_k=ndcg_k, recall_k=recall_k)
    return {str(beir_dir): {"format": "beir", "split": split, "queries": len(qs.qids), "no_relevant": qs.no_relevant,
                            "missing": qs.missing, "skipped": qs.no_relevant + qs.missing,
                            "systems": [r.to_dict() for r in reports]}}


def scaled_depths(dpr_top_k: int, bm25_top_k: int, total: int) -> tuple[int, int]:
    """The hybrid's per-part depths scaled to ``total`` candidates in the config's proportion
    (DPR's share rounded up): ``(12, 12, 101) -> (51, 50)``; a part at 0 stays at 0."""
    if dpr_top_k + bm25_top_k == 0:
        return 0, 0
    dpr = -(-total * dpr_top_k // (dpr_top_k + bm25_top_k))
    return dpr, total - dpr


def deeper_hybrid(retrievers: Mapping, total: int) -> dict:
    """``retrievers`` with the ``hybrid`` (a :class:`re2g.index.fusion.HybridRetriever`) replaced by
    one over the same parts whose depths are :func:`scaled_depths` to ``total``."""
    out = dict(retrievers)
    h = out.get("hybrid")
    if h is not None:
        from re2g.index.fusion import HybridRetriever

        dpr, bm25 = scaled_depths(h.cfg.dpr_top_k, h.cfg.bm25_top_k, total)
        cfg = h.cfg.model_copy(update={"dpr_top_k": dpr, "bm25_top_k": bm25})
        out["hybrid"] = HybridRetriever(h.dense, h.bm25, cfg)
    return out


def retrieval_report(cfg: Re2GConfig, *, tasks: Sequence[str] | None = None, passages: str, index_dir: str,
                     model_dir: str | None = None, out: str | None = None,
                     ks: tuple[int, ...] = (1, 5, 12, 24), beir: str | None = None,
                     split: str = "test") -> RetrievalReportResult:
    """Score BM25 (``index_dir/bm25``), DPR (``index_dir/dense`` with the bi-encoder at ``model_dir``)
    and their hybrid on each KILT task file in ``tasks`` and/or on the BEIR dataset directory
    ``beir`` (its ``split`` qrels); write JSON to ``out`` when given."""
    if not tasks and beir is None:
        raise ValueError("nothing to score: give KILT task files or a BEIR dataset directory")
    from re2g.data.provenance import PassageLocator
    from re2g.index.retrievers import open_retrievers
    from re2g.layout import join

    encoder = None
    if model_dir is not None:
        from re2g.models.encoders import BiEncoder

        encoder = BiEncoder.from_pretrained(model_dir, query_max_length=cfg.models.query_max_length)

    opened = open_retrievers(cfg, passages=passages, dense_dir=join(index_dir, "dense") if encoder else None,
                             bm25_dir=join(index_dir, "bm25"), query_encoder=encoder)
    results = {}
    if tasks:
        results.update(score_kilt_tasks(opened, list(tasks), PassageLocator.from_parquet(passages), ks=ks))
    if beir is not None:
        results.update(score_beir(deeper_hybrid(opened, BEIR_RECALL_K + 1), beir, split=split))
    if out is not None:
        from re2g.artifacts import write_json_atomic

        write_json_atomic(out, results)
    return RetrievalReportResult(results)
