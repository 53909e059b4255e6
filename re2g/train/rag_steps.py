"""Retrieval inside training and the losses of one micro-batch for stages 2 and 4 (pure of side
effects: no index is built, no model directory written here).

**Retrieval in training.** A worker reaches the dense index through an :class:`IndexHandle` (the
index-shard Ray actors, or the index loaded in the process); ``q`` is encoded *with* gradient, its
detached copy searches the index, and the stored vectors ``p`` of the hits come back from the same
index (``get_vectors``), so the document scores ``scale * q . p`` carry gradient to the query encoder
only (:func:`passage_scores`). Stage 4's candidates are the DPR hits and each example's BM25 hits
fused by :func:`re2g.index.fusion.fuse` -- the fusion and dedup the pipeline and Serve use.

**Stage 2** (:func:`rag_step`): DPR top-n, weights softmax(scale * q . p), ``marginal_loss``
(RAG-Sequence or RAG-Token) over the per-passage target log-probabilities (B, n, T).

**Stage 4** (:func:`e2e_step`): candidates (B, C) -> the reranker scores all of them
(``CrossEncoder.score_lists``) -> its top-k (``rerank_top``) go to BART, weighted by the reranker's
scores; ``query_encoder`` option ``combined`` (``log_softmax(z_dpr) + log_softmax(z_r)`` over the top),
``frozen`` or ``distill`` (``+ weight * distill_kl(z_r, z_dpr, T)`` over all candidates).

Lists keep their own lengths: padded tensors with masks everywhere (a padded passage gets weight 0),
so a query's loss and its dev answer never depend on which queries share its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from re2g.config import RetrievalConfig
from re2g.index.fusion import fuse
from re2g.models.losses import distill_kl
from re2g.models.marginalize import doc_log_weights, marginal_loss
from re2g.models.reranker import rerank_top
from re2g.train.rag_model import Re2GModel
from re2g.types import Candidate

QUERY_ENCODER_OPTIONS = ("combined", "frozen", "distill")


@dataclass
class IndexHandle:
    """How any process reaches the dense index: the named shard actors (``name_prefix``) or, without
    actors, the index loaded in this process (tests, small corpora). Cheap to pickle."""

    index_dir: str
    name_prefix: str | None = None
    num_shards: int = 0
    namespace: str | None = None

    def open(self):
        """The index (``search_vectors`` / ``get_vectors``), attached once per process."""
        key = (self.index_dir, self.name_prefix, self.namespace)
        if key not in _INDEXES:
            if self.name_prefix:
                from re2g.index.shards import ActorShardedIndex

                _INDEXES[key] = ActorShardedIndex.attach(self.name_prefix, self.num_shards, namespace=self.namespace,
                                                         index_dir=self.index_dir)
            else:
                from re2g.index.dense import DenseIndex

                _INDEXES[key] = DenseIndex.load(self.index_dir)
        return _INDEXES[key]


_INDEXES: dict[tuple, Any] = {}


def dpr_retrieve(index, q: torch.Tensor, k: int) -> list[list[Candidate]]:
    """DPR top-``k`` of query vectors ``q`` (B, D) (detached; no gradient through search)."""
    return index.search_vectors(q.detach().float().cpu().numpy(), k)


def passage_scores(index, q: torch.Tensor, pids: Sequence[Sequence[str]],
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale * q_b . p`` for the stored vectors of each query's ``pids`` (lists may differ in length):
    (B, C) scores (gradient to ``q``) and (B, C) mask of real entries; padding scores are 0.
    ``scale``: the bi-encoder's ``logit_scale`` (20 for normalized vectors, 1 for DPR's)."""
    B = len(pids)
    C = max((len(x) for x in pids), default=0)
    flat = [p for x in pids for p in x]
    P = torch.from_numpy(index.get_vectors(flat)).to(device=q.device, dtype=q.dtype)  # (n, D)
    idx = torch.tensor([b * C + j for b, x in enumerate(pids) for j in range(len(x))], dtype=torch.long,
                       device=q.device)
    Pm = torch.zeros(B * C, q.shape[-1], dtype=q.dtype, device=q.device).index_copy(0, idx, P).view(B, C, -1)
    mask = torch.zeros(B * C, dtype=torch.bool, device=q.device).index_fill(0, idx, True).view(B, C)
    return torch.einsum("bd,bcd->bc", q, Pm) * scale, mask


def with_passages(hits: Sequence[Candidate], lookup: Mapping) -> list[Candidate]:
    """``hits`` with ``title``, ``text`` and ``wikipedia_id`` from ``lookup`` (pid -> (title, text,
    wid)); the dense index's hits carry only pid, score, rank and source."""
    out = []
    for h in hits:
        title, text, wid = lookup[h.pid]
        out.append(h.with_(title=title, text=text, wikipedia_id=wid))
    return out


def bm25_entries(hits: Sequence[Candidate]) -> list[list]:
    """One query's BM25 hits as ``[[pid, score], ...]`` (best first): what a training example keeps
    (JSON, through Ray Data) so that :func:`bm25_hits` gives the hits back."""
    return [[h.pid, float(h.score)] for h in hits]


def bm25_hits(entries: Sequence[Sequence], lookup: Mapping) -> list[Candidate]:
    """The BM25 hits of :func:`bm25_entries` back as candidates (source ``bm25``, ranks 0..)."""
    return with_passages([Candidate(str(p), float(s), r, "bm25") for r, (p, s) in enumerate(entries)], lookup)


def fused_candidates(index, q: torch.Tensor, bm25: Sequence[Sequence[Candidate]], lookup: Mapping,
                     retrieval: RetrievalConfig) -> tuple[list[list[Candidate]], list[list[Candidate]]]:
    """Per query the DPR top-``dpr_top_k`` of ``q`` (B, D) from ``index`` and the candidates fused with
    its BM25 hits by :func:`re2g.index.fusion.fuse` -- the same fusion and dedup (pid, then normalized
    text) as the pipeline and Serve. Returns (DPR hits, fused candidates)."""
    dpr = [with_passages(hs, lookup) for hs in dpr_retrieve(index, q, retrieval.dpr_top_k)]
    return dpr, [fuse(retrieval, d, b) for d, b in zip(dpr, bm25)]


EMPTY_PASSAGE = ("", "")  # what fills a padded passage slot (its weight is 0: masked out)


def padded_rows(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Each row of passages filled up to ``width`` with :data:`EMPTY_PASSAGE` (the generator takes
    the same passage count for every query; the marginalization's ``doc_mask`` drops the filling)."""
    return [list(r) + [EMPTY_PASSAGE] * (width - len(r)) for r in rows]


def top_doc_scores(z_r: torch.Tensor, z_dpr: torch.Tensor, top: torch.Tensor, top_mask: torch.Tensor,
                   option: str) -> torch.Tensor:
    """The scores that weight the marginalization over the reranker's top: ``z_r`` there, or for
    ``combined`` ``log_softmax(z_dpr) + log_softmax(z_r)`` over each query's real top entries
    (padding -inf). (B, C), (B, C), (B, k'), (B, k') -> (B, k')"""
    zr_top = z_r.gather(1, top)
    if option != "combined":
        return zr_top
    return doc_log_weights(z_dpr.gather(1, top), top_mask) + doc_log_weights(zr_top, top_mask)


@dataclass
class StepParts:
    """What one loss computation produced (for tests and logging)."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor | None = None
    doc_scores: torch.Tensor | None = None  # (B, k) the scores that weighted the marginalization
    candidates: list[list[Any]] = field(default_factory=list)  # pids (stage 2) or Candidates (stage 4)
    top: list[list[str]] = field(default_factory=list)             # the pids the generator saw


def rag_step(model: Re2GModel, batch: Sequence[Mapping], index, lookup: Mapping, *, n_docs: int,
             kind: str = "sequence") -> StepParts:
    """Stage 2 loss: DPR top-``n_docs`` from ``index``, weights softmax(q . p), ``marginal_loss``."""
    queries = [x["query"] for x in batch]
    q = model.biencoder.encode_queries(queries)                               # (B, D)
    pids = [[h.pid for h in hs] for hs in dpr_retrieve(index, q, n_docs)]
    scores, mask = passage_scores(index, q, pids, model.biencoder.logit_scale)  # (B, n), (B, n)
    gen = model.generator
    enc_t = gen.tokenize_targets([x["target"] for x in batch])
    passages = padded_rows([[lookup[p][:2] for p in row] for row in pids], mask.shape[1])
    lp = gen.forward_logprobs(queries, passages, enc_t)                       # (B, n, T)
    nll = marginal_loss(lp, enc_t["attention_mask"].to(lp.device), scores, kind=kind, doc_mask=mask)
    return StepParts(nll, nll.detach(), None, scores, pids, pids)


@dataclass
class Reranked:
    """Stage 4's path for a batch of queries, up to the generator: the candidates, their DPR and
    reranker scores, the reranker's top and the scores that weight the marginalization over it."""

    dpr: list[list[Candidate]]       # DPR top-k per query (before fusion)
    candidates: list[list[Candidate]]
    z_dpr: torch.Tensor              # (B, C) scale * q . p (gradient to the query encoder)
    z_r: torch.Tensor                # (B, C) the reranker's scores
    mask: torch.Tensor               # (B, C) real candidates
    top: torch.Tensor                # (B, k') positions of the reranker's top, best first
    top_mask: torch.Tensor           # (B, k') real entries of the top
    doc_scores: torch.Tensor         # (B, k') weights of the marginalization (before softmax)

    def top_candidates(self) -> list[list[Candidate]]:
        """The reranker's top per query (real entries only), with ``rerank_score`` and ``rerank_rank``."""
        z = self.z_r.detach().float().cpu()
        return [[c[j].with_(rerank_score=float(z[b, j]), rerank_rank=r)
                 for r, (j, m) in enumerate(zip(row, keep)) if m]
                for b, (c, row, keep) in enumerate(zip(self.candidates, self.top.tolist(), self.top_mask.tolist()))]


def retrieve_rerank(model: Re2GModel, queries: Sequence[str], bm25: Sequence[Sequence[Candidate]], index,
                    lookup: Mapping, retrieval: RetrievalConfig, *, option: str,
                    rerank_batch_size: int | None = None) -> Reranked:
    """Stage 4's retrieve -> fuse -> rerank for ``queries`` with their BM25 hits: DPR from ``index``,
    :func:`re2g.index.fusion.fuse`, the reranker's :meth:`~re2g.models.reranker.CrossEncoder.score_lists`
    and :func:`~re2g.models.reranker.rerank_top` (``retrieval.rerank_top_k``). Every list keeps its own
    length (padded tensors + masks): a query's result never depends on the others in the batch."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and option != "frozen"):
        q = model.biencoder.encode_queries(list(queries))                    # (B, D)
    dpr, cands = fused_candidates(index, q, bm25, lookup, retrieval)
    z_dpr, mask = passage_scores(index, q, [[c.pid for c in row] for row in cands],
                                 model.biencoder.logit_scale)                # (B, C)
    z_r, _ = model.reranker.score_lists(queries, cands, batch_size=rerank_batch_size)  # (B, C)
    top, top_mask = rerank_top(z_r, mask, retrieval.rerank_top_k)            # (B, k')
    return Reranked(dpr, cands, z_dpr, z_r, mask, top, top_mask, top_doc_scores(z_r, z_dpr, top, top_mask, option))


def e2e_step(model: Re2GModel, batch: Sequence[Mapping], index, lookup: Mapping, *, option: str,
             retrieval: RetrievalConfig, kind: str = "sequence", temperature: float = 10.0,
             distill_weight: float = 1.0) -> StepParts:
    """Stage 4 loss for one micro-batch (each example has ``query``, ``target`` and ``bm25``:
    :func:`bm25_entries`)."""
    if option not in QUERY_ENCODER_OPTIONS:
        raise ValueError(f"query_encoder option must be one of {QUERY_ENCODER_OPTIONS}, got {option!r}")
    queries = [x["query"] for x in batch]
    r = retrieve_rerank(model, queries, [bm25_hits(x.get("bm25", []), lookup) for x in batch], index, lookup,
                        retrieval, option=option)
    top = r.top_candidates()
    gen = model.generator
    enc_t = gen.tokenize_targets([x["target"] for x in batch])
    lp = gen.forward_logprobs(queries, padded_rows(top, r.top.shape[1]), enc_t)  # (B, k', T)
    nll = marginal_loss(lp, enc_t["attention_mask"].to(lp.device), r.doc_scores, kind=kind, doc_mask=r.top_mask)
    loss, kl = nll, None
    if option == "distill":
        kl = distill_kl(r.z_r, r.z_dpr, r.mask, temperature)
        loss = nll + distill_weight * kl
    return StepParts(loss, nll.detach(), None if kl is None else kl.detach(), r.doc_scores, r.candidates,
                     [[c.pid for c in row] for row in top])
