"""Retrieval metrics over ranked lists: passage-level Recall@k / MRR@k and page-level R-Precision.

Pure functions over ids. A query's gold is a set of positive passage ids (passage level) or a
set of Wikipedia page ids (page level, as KILT scores provenance). Ranked lists are ordered best
first; duplicates of a page count once at page level (the page's best rank).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def recall_at_k(ranked: Sequence[str], gold: Iterable[str], k: int) -> float:
    """1.0 when any gold id is among the first ``k`` ranked ids, else 0.0 (DPR's top-k accuracy)."""
    g = set(gold)
    return float(any(r in g for r in ranked[:k]))


def mrr_at_k(ranked: Sequence[str], gold: Iterable[str], k: int = 10) -> float:
    """Reciprocal rank of the first gold id within the first ``k``; 0.0 when none is there."""
    g = set(gold)
    for i, r in enumerate(ranked[:k]):
        if r in g:
            return 1.0 / (i + 1)
    return 0.0


def dedup_keep_order(ids: Iterable[str]) -> list[str]:
    """Ids in order with later repeats dropped (pages of several passages count once)."""
    seen: set[str] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def r_precision(ranked_pages: Sequence[str], gold_pages: Iterable[str]) -> float:
    """R-Precision: with R distinct gold pages, the share of the first R distinct ranked pages that are gold."""
    g = set(gold_pages)
    if not g:
        return 0.0
    top = dedup_keep_order(ranked_pages)[: len(g)]
    return sum(p in g for p in top) / len(g)


@dataclass
class RetrievalReport:
    """Mean metrics over queries for one system; ``per_query`` keeps each query's values."""

    name: str
    n: int
    metrics: dict[str, float]
    per_query: list[dict[str, float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "n": self.n, **{k: round(v, 6) for k, v in self.metrics.items()}}


def evaluate_rankings(name: str, rankings: Sequence[Sequence[str]], golds: Sequence[Iterable[str]], *,
                      ks: Sequence[int] = (1, 5, 12, 24), mrr_k: int = 10,
                      page_rankings: Sequence[Sequence[str]] | None = None,
                      page_golds: Sequence[Iterable[str]] | None = None) -> RetrievalReport:
    """Recall@k for each ``k`` and MRR@``mrr_k`` at passage level (and R-Precision at page level
    when page rankings and page golds are given), averaged over queries."""
    if len(rankings) != len(golds):
        raise ValueError(f"{len(rankings)} rankings for {len(golds)} gold sets")
    per = []
    for i, (r, g) in enumerate(zip(rankings, golds)):
        g = set(g)
        row = {f"recall@{k}": recall_at_k(r, g, k) for k in ks}
        row[f"mrr@{mrr_k}"] = mrr_at_k(r, g, mrr_k)
        if page_rankings is not None and page_golds is not None:
            row["rprec_page"] = r_precision(page_rankings[i], page_golds[i])
        per.append(row)
    keys = per[0].keys() if per else []
    means = {k: sum(p[k] for p in per) / len(per) for k in keys}
    return RetrievalReport(name=name, n=len(per), metrics=means, per_query=per)


def reports_table(reports: Sequence[RetrievalReport], title: str = "retrieval"):
    """A rich table with one row per system and one column per metric."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("system")
    t.add_column("queries", justify="right")
    keys = list(reports[0].metrics) if reports else []
    for k in keys:
        t.add_column(k, justify="right")
    for r in reports:
        t.add_row(r.name, str(r.n), *(f"{r.metrics[k]:.3f}" for k in keys))
    return t


def _page_of(hit) -> str:
    wid = getattr(hit, "wikipedia_id", None)
    if wid:
        return str(wid)
    return str(hit.pid).split("::", 1)[0]


def evaluate_retrievers(retrievers, examples, locator, *, ks: Sequence[int] = (1, 5, 12, 24), mrr_k: int = 10,
                        batch_size: int = 512, progress: bool = False) -> tuple[list[RetrievalReport], int]:
    """Run each retriever (``name -> object with batch_search(queries, k)``) over KILT ``examples``
    and score its rankings against their provenance: passage-level Recall@k / MRR@k (positives from
    ``locator``, a :class:`re2g.data.provenance.PassageLocator`) and page-level R-Precision.

    Examples without any positive passage in the corpus are left out; their count is returned
    beside the reports (callers print it, so nothing is dropped silently).
    """
    from tqdm.auto import tqdm

    kept, golds, page_golds = [], [], []
    for ex in examples:
        pos = locator.positives(ex)
        if pos.pids:
            kept.append(ex)
            golds.append(pos.pids)
            page_golds.append(pos.page_ids)
    skipped = len(examples) - len(kept)
    queries = [ex.input for ex in kept]
    k_max = max(max(ks), mrr_k)
    reports = []
    for name, retriever in retrievers.items():
        hits: list = []
        for s in tqdm(range(0, len(queries), batch_size), desc=f"retrieve {name}", disable=not progress):
            hits.extend(retriever.batch_search(queries[s:s + batch_size], k_max))
        rankings = [[h.pid for h in hs] for hs in hits]
        page_rankings = [[_page_of(h) for h in hs] for hs in hits]
        reports.append(evaluate_rankings(name, rankings, golds, ks=ks, mrr_k=mrr_k,
                                         page_rankings=page_rankings, page_golds=page_golds))
    return reports, skipped
