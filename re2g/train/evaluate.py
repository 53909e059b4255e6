"""Dev evaluation for the training stages: rankings from a bi-encoder (exact search over the whole
corpus) or from a reranker over fixed candidate lists, scored with ``re2g.eval.retrieval``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from re2g.eval.retrieval import RetrievalReport, evaluate_rankings
from re2g.models.reranker import rerank_top

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
    """Exact inner-product top-``k`` over every passage in ``lookup`` (pid -> (title, text, wid)),
    ordered by :func:`re2g.models.reranker.rerank_top` (descending, ties in corpus order)."""
    pids = list(lookup)
    P = biencoder.embed_passages([lookup[p][0] for p in pids], [lookup[p][1] for p in pids],
                                 batch_size=batch_size)  # (N, D)
    Q = biencoder.embed_queries(list(queries), batch_size=batch_size)  # (B, D)
    S = torch.from_numpy(np.ascontiguousarray(Q @ P.T))  # (B, N)
    top, _ = rerank_top(S, torch.ones_like(S, dtype=torch.bool), k)  # (B, k)
    return [[pids[j] for j in row] for row in top.tolist()]


@torch.no_grad()
def rerank_rankings(reranker, queries: Sequence[str], candidates: Sequence[Sequence[str]], lookup: Mapping,
                    batch_size: int = 64) -> list[list[str]]:
    """Each query's candidates (those in ``lookup``) sorted by the reranker's score, the scoring and
    ordering stage 4 and inference use (``CrossEncoder.score_lists`` + ``rerank_top``: ties keep the
    retriever order)."""
    from re2g.models.encoders import eval_mode

    lists = [[c for c in cands if c in lookup] for cands in candidates]
    with eval_mode(reranker):
        z, mask = reranker.score_lists(list(queries), [[lookup[c][:2] for c in cs] for cs in lists],
                                       batch_size=batch_size)  # (B, C)
    top, keep = rerank_top(z, mask, z.shape[1])
    return [[cs[j] for j, m in zip(row, km) if m] for cs, row, km in zip(lists, top.tolist(), keep.tolist())]


def metrics_dict(rep: RetrievalReport, prefix: str = "dev_") -> dict[str, float]:
    """A report's means as flat metrics ``dev_recall@5`` ..."""
    return {f"{prefix}{k}": round(float(v), 6) for k, v in rep.metrics.items()}
