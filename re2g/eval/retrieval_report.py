"""The retrieval report: BM25, DPR and the hybrid scored on KILT task files."""

from __future__ import annotations

import json
from dataclasses import dataclass

from re2g.config import Re2GConfig


@dataclass
class RetrievalReportResult:
    """Per-task, per-system metrics."""

    results: dict  # task file -> {"skipped": int, "systems": [report dicts]}

    def table(self):
        from rich.console import Group

        from re2g.eval.retrieval import RetrievalReport, reports_table

        tables = []
        for task, r in self.results.items():
            reps = [RetrievalReport(name=s["name"], n=s["n"], metrics={k: v for k, v in s.items() if k not in ("name", "n")})
                    for s in r["systems"]]
            title = f"{task}" + (f" ({r['skipped']} queries without a positive passage left out)" if r["skipped"] else "")
            tables.append(reports_table(reps, title=title))
        return Group(*tables)

    def to_dict(self) -> dict:
        return self.results


def retrieval_report(cfg: Re2GConfig, *, tasks: list[str], passages: str, index_dir: str,
                     model_dir: str | None = None, out: str | None = None,
                     ks: tuple[int, ...] = (1, 5, 12, 24)) -> RetrievalReportResult:
    """Score BM25 (``index_dir/bm25``), DPR (``index_dir/dense`` with the bi-encoder at ``model_dir``)
    and their hybrid on each KILT task file; write JSON to ``out`` when given."""
    import pyarrow.parquet as pq

    from re2g.data.kilt import read_kilt
    from re2g.data.provenance import PassageLocator
    from re2g.eval.retrieval import evaluate_retrievers
    from re2g.index.retrievers import open_retrievers
    from re2g.layout import join

    encoder = None
    if model_dir is not None:
        from re2g.models.encoders import BiEncoder

        encoder = BiEncoder.from_pretrained(model_dir, query_max_length=cfg.models.query_max_length)
    retrievers = open_retrievers(cfg, passages=passages, dense_dir=join(index_dir, "dense") if encoder else None,
                                 bm25_dir=join(index_dir, "bm25"), query_encoder=encoder)
    locator = PassageLocator.from_table(pq.read_table(passages, columns=["pid"]))
    results = {}
    for task in tasks:
        examples = read_kilt(task)
        reports, skipped = evaluate_retrievers(retrievers, examples, locator, ks=ks)
        results[task] = {"skipped": skipped, "systems": [r.to_dict() for r in reports]}
    if out is not None:
        import fsspec

        with fsspec.open(out, "w") as f:
            json.dump(results, f, indent=2)
    return RetrievalReportResult(results)
