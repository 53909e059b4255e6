"""The three stages of retrieve → rerank → generate, each with one batched inference method (lists in,
lists out), over :class:`re2g.types.Candidate` records:

* :class:`Retriever` ``retrieve(queries) -> list[list[Candidate]]``: DPR and/or BM25, fused and
  deduplicated (:func:`re2g.index.fusion.fuse`), :func:`re2g.index.fusion.retrieve_k` per query;
* :class:`Reranker` ``rerank(queries, candidate_lists, top_k) -> list[list[Candidate]]``: the
  cross-encoder's scores z_r of each list (``CrossEncoder.score_lists``), the top-k by z_r
  (``re2g.models.reranker.rerank_top``: the same scoring and top-k code as training);
* :class:`Generator` ``generate(queries, reranked) -> list[Answer]``: RAG-Sequence / RAG-Token over the
  kept passages weighted by softmax(z_r) (:func:`re2g.models.decoding.decode`).

The in-process :class:`re2g.pipeline.Re2GPipeline` is their composition, each Serve deployment
(``serve/app.py``) wraps one of them, and ``re2g predict`` runs the pipeline over Ray Data; the
loaders that build them from a run directory are in :mod:`re2g.run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from re2g.config import GenerationConfig, RetrievalConfig
from re2g.index.fusion import HybridRetriever
from re2g.models.decoding import Answer, decode
from re2g.models.encoders import eval_mode
from re2g.models.reranker import rerank_top
from re2g.types import Candidate


class Retriever:
    """Candidates per query from the dense index (``dense``: a ``DenseRetriever``) and/or BM25 (``bm25``),
    fused as ``cfg.fusion`` says; ``k`` = :func:`re2g.index.fusion.retrieve_k` of the parts present."""

    def __init__(self, cfg: RetrievalConfig, *, dense: Any = None, bm25: Any = None):
        if dense is None and bm25 is None:
            raise ValueError("a retriever needs a dense index, BM25 or both")
        self.cfg = cfg
        self.dense = dense
        self.bm25 = bm25
        self.searcher = HybridRetriever(dense, bm25, cfg)

    @property
    def k(self) -> int:
        """Candidates per query (``dpr_top_k`` if dense + ``bm25_top_k`` if BM25)."""
        return self.searcher.k

    @property
    def dense_index(self) -> Any:
        """The dense index searched (``DenseIndex`` or ``ActorShardedIndex``), None without one."""
        return None if self.dense is None else self.dense.index

    def retrieve(self, queries: Sequence[str]) -> list[list[Candidate]]:
        """Fused, deduplicated candidates for each query, best first, ranks 0.."""
        return self.searcher.batch_search(list(queries))


class Reranker:
    """The cross-encoder (``model``: :class:`re2g.models.reranker.CrossEncoder`). ``top_k``: passages
    kept by default (``retrieval.rerank_top_k``); ``batch_size``: pairs per forward pass."""

    def __init__(self, model: Any, *, top_k: int = 5, batch_size: int = 32):
        self.model = model
        self.top_k = int(top_k)
        self.batch_size = int(batch_size)

    def scores(self, queries: Sequence[str], candidate_lists: Sequence[Sequence[Candidate]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """z_r of every (query, candidate), padded: z (B, C) and mask (B, C), C the longest list
        (``CrossEncoder.score_lists``: all pairs of the batch scored together, as in training)."""
        with eval_mode(self.model), torch.inference_mode():
            z, mask = self.model.score_lists(list(queries), candidate_lists, batch_size=self.batch_size)
        return z.float().cpu(), mask.cpu()

    def rerank(self, queries: Sequence[str], candidate_lists: Sequence[Sequence[Candidate]],
               top_k: int | None = None) -> list[list[Candidate]]:
        """Each list sorted by z_r, best first (ties keep retrieval order), its first ``top_k`` (default
        :attr:`top_k`), with ``rerank_score`` / ``rerank_rank`` set: ``rerank_top``, the top-k of
        training's stage 4 and dev evaluation (a short list keeps all its candidates)."""
        k = self.top_k if top_k is None else int(top_k)
        z, mask = self.scores(queries, candidate_lists)                         # (B, C), (B, C)
        top, keep = rerank_top(z, mask, k)                                      # (B, k'), (B, k')
        out = []
        for b, cands in enumerate(candidate_lists):
            row = [j for j, ok in zip(top[b].tolist(), keep[b].tolist()) if ok]
            out.append([cands[j].with_(rerank_score=float(z[b, j]), rerank_rank=r) for r, j in enumerate(row)])
        return out


class Generator:
    """The generator (``model``: :class:`re2g.models.generator.Generator`, separators set when loaded)
    decoding as ``cfg`` says (RAG-Sequence thorough / fast, or RAG-Token)."""

    def __init__(self, model: Any, cfg: GenerationConfig | None = None):
        self.model = model
        self.cfg = cfg or GenerationConfig()

    def generate(self, queries: Sequence[str], reranked: Sequence[Sequence[Candidate]]) -> list[Answer]:
        """One answer per query from its reranked candidates, weighted by softmax(``rerank_score``);
        the answer's provenance is those candidates with ``weight`` set."""
        scores = [[c.rerank_score for c in cs] for cs in reranked]
        return decode(self.model, list(queries), [list(cs) for cs in reranked], scores, self.cfg)
