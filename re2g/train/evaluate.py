"""Dev evaluation for the training stages: rankings from a bi-encoder (over a capped candidate pool,
or exactly over the whole corpus) or from a reranker over fixed candidate lists, scored with
``re2g.eval.retrieval``.

The pool (:func:`eval_pool`): the dev queries' positives, the negatives the stage has at hand for
them (BM25 / mined / hybrid candidates) and a seeded uniform sample of the corpus, at most
``pool_size`` passages in all (positives and negatives always included). The current context encoder
embeds the pool at each evaluation and a faiss flat inner-product index searches it
(:func:`dense_rankings`), so an evaluation costs O(pool) encoder passes instead of O(corpus).

What the pooled figure approximates: Recall@k / MRR@10 / R-Precision against the whole corpus.
Every gold passage is in the pool and the pool is a subset of the corpus, so a pooled ranking of a
query is its full-corpus ranking with the non-pool passages removed: a gold passage's rank can only
improve, and Recall@k / MRR@k / R-Precision are **upper bounds** (optimistic) on the full-corpus
figures for the same model. The gap comes from the non-pool passages that outscore a gold one: with
a uniform sample of a fraction f = m / N of the corpus, a query whose gold passage has r competitors
ahead of it in the whole corpus sees about f·r of them (plus those among its own negatives), so the
figure converges to the full-corpus one as f -> 1 (equal at f = 1, the default on the tiny and demo
samples); hard negatives in the pool close most of the gap early, because they are the passages most
likely to outrank a gold one. Compare pooled figures only at the same pool size and seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
    negatives: list[list[str]] | None = None  # per query: pids the eval pool must hold (e.g. BM25's top-k)

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


def eval_pool(lookup: Mapping, required: Iterable[str], size: int | None, seed: int = 0) -> list[str]:
    """The pids of a dev evaluation pool, in corpus order: every pid of ``required`` that is in
    ``lookup`` (the dev positives and negatives) plus a uniform sample (``numpy`` generator seeded
    with ``seed``) of the corpus positions, at most ``size`` pids in all unless ``required`` alone is
    larger. ``size`` None or >= ``len(lookup)``: the whole corpus (``list(lookup)``). One pass over
    the pids of ``lookup`` (iteration order = corpus order); the pool depends only on the arguments."""
    if size is not None and size < 1:
        raise ValueError(f"eval pool size must be >= 1 or None (whole corpus), got {size}")
    n = len(lookup)
    if size is None or size >= n:
        return list(lookup)
    need = {p for p in required if p in lookup}
    m = max(0, size - len(need))
    rng = np.random.default_rng(seed)
    take = np.zeros(n, dtype=bool)  # (N,) sampled corpus positions
    take[rng.choice(n, size=m, replace=False)] = True
    return [p for i, p in enumerate(lookup) if take[i] or p in need]


def _passages_of(lookup: Mapping, pids: Sequence[str]) -> tuple[list[str], list[str]]:
    infos = lookup.get_many(pids) if hasattr(lookup, "get_many") else [lookup[p] for p in pids]
    return [i[0] for i in infos], [i[1] for i in infos]


@torch.no_grad()
def dense_rankings(biencoder, queries: Sequence[str], lookup: Mapping, k: int = max(KS),
                   batch_size: int = 128, pool: Sequence[str] | None = None) -> list[list[str]]:
    """Top-``k`` pids per query by inner product ``q . p`` among ``pool`` (pids of ``lookup``, in
    corpus order; see :func:`eval_pool`; None: every passage of ``lookup``).

    The pool is embedded with the current context encoder (its pooling and normalization, as the
    index build does; the index's hit scores are these inner products under either index metric, and
    ``logit_scale`` > 0 does not change an order) and searched with a faiss ``IndexFlatIP``; faiss's
    top ``min(n, k + 16)`` are scored again as ``q . p`` in float32 and ordered by
    :func:`re2g.models.reranker.rerank_top` (descending, ties in corpus order), so with the whole
    corpus as the pool the rankings are :func:`exact_dense_rankings`'s."""
    import faiss

    pids = list(lookup) if pool is None else list(pool)
    if not pids or not len(queries):
        return [[] for _ in queries]
    P = biencoder.embed_passages(*_passages_of(lookup, pids), batch_size=batch_size)  # (n, D)
    Q = biencoder.embed_queries(list(queries), batch_size=batch_size)  # (B, D)
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))  # the worker's CPU share, as torch has it
    index = faiss.IndexFlatIP(P.shape[1])
    index.add(np.ascontiguousarray(P, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(Q, dtype=np.float32), min(len(pids), k + 16))  # (B, k'')
    ids = np.sort(np.where(ids < 0, len(pids), ids), axis=1)  # (B, k'') ascending pool (= corpus) position
    valid = ids < len(pids)
    safe = np.where(valid, ids, 0)
    S = np.einsum("bd,bkd->bk", Q, P[safe])  # (B, k'') the same inner products, float32
    top, keep = rerank_top(torch.from_numpy(np.ascontiguousarray(S)), torch.from_numpy(valid), k)  # (B, k')
    return [[pids[safe[b, j]] for j, m in zip(row, km) if m]
            for b, (row, km) in enumerate(zip(top.tolist(), keep.tolist()))]


@torch.no_grad()
def exact_dense_rankings(biencoder, queries: Sequence[str], lookup: Mapping, k: int = max(KS),
                         batch_size: int = 128) -> list[list[str]]:
    """The brute-force reference: exact inner-product top-``k`` over every passage in ``lookup``
    (pid -> (title, text, wid)), all N scores per query sorted by
    :func:`re2g.models.reranker.rerank_top` (descending, ties in corpus order). O(N) memory per
    query; for tests and small corpora."""
    pids = list(lookup)
    P = biencoder.embed_passages(*_passages_of(lookup, pids), batch_size=batch_size)  # (N, D)
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
