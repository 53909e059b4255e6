"""Dev evaluation for the training stages: rankings from a bi-encoder (exact search over the whole
corpus) or from a reranker over fixed candidate lists, scored with ``re2g.eval.retrieval``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from re2g.eval.retrieval import RetrievalReport, evaluate_rankings

KS = (1, 5, 20)
MRR_K = 10


@dataclass
class DevSet:
    """Dev queries with gold passages and pages, and (optionally) fixed candidate lists."""

    queries: list[str]
    gold: list[list[str]]
    pages: list[list[str]]
    candidates: list[list[str]] | None = None

    @classmethod
    def from_records(cls, records, limit: int | None = None) -> "DevSet":
        rs = list(records)[:limit] if limit else list(records)
        cands = [r.candidates for r in rs] if rs and any(r.candidates for r in rs) else None
        return cls([r.query for r in rs], [r.positives for r in rs], [r.pages for r in rs], cands)


def page_of(pid: str, lookup: Mapping) -> str:
    """The page (wikipedia id) of a passage: from the lookup, else from the id ``wid::[s,e]``."""
    info = lookup.get(pid)
    if info is not None and info[2] is not None:
        return str(info[2])
    return pid.split("::", 1)[0]


def report(name: str, rankings: Sequence[Sequence[str]], dev: DevSet, lookup: Mapping) -> RetrievalReport:
    """Recall@1/5/20, MRR@10 (passage level) and R-Precision (page level)."""
    pages = [[page_of(p, lookup) for p in r] for r in rankings]
    return evaluate_rankings(name, rankings, dev.gold, ks=KS, mrr_k=MRR_K, page_rankings=pages, page_golds=dev.pages)


@torch.no_grad()
def dense_rankings(biencoder, queries: Sequence[str], lookup: Mapping, k: int = max(KS),
                   batch_size: int = 128) -> list[list[str]]:
    """Exact inner-product top-``k`` over every passage in ``lookup`` (pid -> (title, text, wid))."""
    pids = list(lookup)
    P = biencoder.embed_passages([lookup[p][0] for p in pids], [lookup[p][1] for p in pids],
                                 batch_size=batch_size)  # (N, D)
    Q = biencoder.embed_queries(list(queries), batch_size=batch_size)  # (B, D)
    S = Q @ P.T  # (B, N)
    k = min(k, len(pids))
    top = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return [[pids[j] for j in row] for row in top]


@torch.no_grad()
def rerank_rankings(reranker, queries: Sequence[str], candidates: Sequence[Sequence[str]], lookup: Mapping,
                    batch_size: int = 64) -> list[list[str]]:
    """Each query's candidates sorted by the reranker's score (stable: ties keep the retriever order)."""
    was = reranker.training
    reranker.eval()
    out = []
    try:
        for q, cands in zip(queries, candidates):
            cands = [c for c in cands if c in lookup]
            if not cands:
                out.append([])
                continue
            s = reranker.score_pairs([q] * len(cands), [lookup[c][0] for c in cands], [lookup[c][1] for c in cands],
                                     batch_size=batch_size).float().cpu().numpy()
            out.append([cands[j] for j in np.argsort(-s, kind="stable")])
    finally:
        reranker.train(was)
    return out


def metrics_dict(rep: RetrievalReport, prefix: str = "dev_") -> dict[str, float]:
    """A report's means as flat metrics ``dev_recall@5`` ..."""
    return {f"{prefix}{k}": round(float(v), 6) for k, v in rep.metrics.items()}
