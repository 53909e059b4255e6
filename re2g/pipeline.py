"""Retrieve → rerank → generate, in process: the composition of the three stages of :mod:`re2g.stages`.

```
query ─ Retriever.retrieve   DPR top-12 + BM25 top-12, fused and deduplicated (re2g.index.fusion)
      ─ Reranker.rerank      cross-encoder z_r of every candidate, sorted, keep retrieval.rerank_top_k (5)
      ─ Generator.generate   "passage // query" for each kept passage, weights softmax(z_r) (re2g.models.decoding)
      ─ Answer(answer, candidates, provenance: the kept re2g.types.Candidate records, timings)
```

The Serve app wraps the same stage objects one per deployment (``serve/app.py``) and ``re2g predict``
runs this pipeline over Ray Data (:mod:`re2g.predict`): same run + same query = same answer.
:meth:`Re2GPipeline.from_run_dir` resolves a run directory with :func:`re2g.run.resolve_run` and loads
each stage with its loader there. :func:`kilt_prediction` turns an :class:`Answer` into a KILT record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from re2g.config import Re2GConfig
from re2g.data.kilt import KiltOutput, Provenance
from re2g.models.decoding import Answer
from re2g.run import BIENCODER_DIRS, pick_biencoder_dir  # noqa: F401  (re2g.train imports them from here)
from re2g.stages import Generator, Reranker, Retriever
from re2g.types import Candidate


class Re2GPipeline:
    """The three stages in this process: ``retriever`` (:class:`re2g.stages.Retriever`), ``reranker``
    (:class:`re2g.stages.Reranker`), ``generator`` (:class:`re2g.stages.Generator`); ``cfg``: the run's
    config (for reference: each stage was built with its part)."""

    def __init__(self, retriever: Retriever, reranker: Reranker, generator: Generator, cfg: Re2GConfig | None = None):
        self.retriever = retriever
        self.reranker = reranker
        self.generator = generator
        self.cfg = cfg or Re2GConfig()

    # ---- the three stages

    def retrieve(self, queries: Sequence[str]) -> list[list[Candidate]]:
        """Fused, deduplicated candidates per query (:meth:`re2g.stages.Retriever.retrieve`)."""
        return self.retriever.retrieve(queries)

    def rerank(self, queries: Sequence[str], candidate_lists: Sequence[Sequence[Candidate]],
               top_k: int | None = None) -> list[list[Candidate]]:
        """Each list by z_r, its first ``top_k`` (default ``retrieval.rerank_top_k``;
        :meth:`re2g.stages.Reranker.rerank`)."""
        return self.reranker.rerank(queries, candidate_lists, top_k)

    def generate(self, queries: Sequence[str], reranked: Sequence[Sequence[Candidate]]) -> list[Answer]:
        """Answers from the kept candidates weighted by softmax(z_r) (:meth:`re2g.stages.Generator.generate`)."""
        return self.generator.generate(queries, reranked)

    # ---- all three

    def answer_batch(self, queries: Sequence[str]) -> list[Answer]:
        """Retrieve, rerank and generate for a batch; each answer's ``timings`` are the batch's seconds
        per stage (``retrieve``, ``rerank``, ``generate``, ``total``)."""
        queries = list(queries)
        t0 = time.perf_counter()
        candidates = self.retrieve(queries)
        t1 = time.perf_counter()
        reranked = self.rerank(queries, candidates)
        t2 = time.perf_counter()
        answers = self.generate(queries, reranked)
        t3 = time.perf_counter()
        timings = {"retrieve": t1 - t0, "rerank": t2 - t1, "generate": t3 - t2, "total": t3 - t0}
        for a in answers:
            a.timings = dict(timings)
        return answers

    def answer(self, query: str) -> Answer:
        """:meth:`answer_batch` for one query."""
        return self.answer_batch([query])[0]

    # ---- loading

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, cfg: Re2GConfig | None = None, *, biencoder: str | Path | None = None,
                     reranker: str | Path | None = None, generator: str | Path | None = None,
                     device: str | None = None) -> "Re2GPipeline":
        """Load the three stages from a run directory (:func:`re2g.run.resolve_run` says what is looked
        for where and what is checked; ``biencoder`` / ``reranker`` / ``generator`` name other model
        directories). ``cfg`` default: ``RUN_DIR/config.yaml``, else the ``tiny`` preset. ``device``
        default: ``cfg.device`` (auto: CUDA when available; in a Ray actor, when the actor has a GPU)."""
        from re2g.run import load_generator, load_reranker, load_retriever, resolve_run, run_config
        from re2g.runtime import pick_device

        cfg = cfg or run_config(run_dir)
        pieces = resolve_run(run_dir, cfg, biencoder=biencoder, reranker=reranker, generator=generator)
        dev = pick_device(device or cfg.device)  # in a Ray actor (re2g predict): cuda only with a GPU of its own
        return cls(load_retriever(pieces, cfg, dev), load_reranker(pieces, cfg, dev), load_generator(pieces, cfg, dev),
                   cfg)


# --------------------------------------------------------------------------- KILT output


def kilt_provenance(candidates: Sequence[Candidate]) -> list[Provenance]:
    """KILT provenance of candidates, in the given order: ``wikipedia_id`` (:attr:`Candidate.page_id`),
    ``title``, the paragraph range when the pid carries one (:attr:`Candidate.paragraph_span`), and as
    extras the pid and the source and scores that exist (``source``, ``rerank_score``, ``weight``)."""
    out = []
    for c in candidates:
        start, end = c.paragraph_span or (None, None)
        extra: dict[str, Any] = {"pid": c.pid}
        extra.update({k: v for k, v in (("source", c.source), ("rerank_score", c.rerank_score),
                                         ("weight", c.weight)) if v is not None})
        out.append(Provenance(wikipedia_id=c.page_id, title=c.title or None, start_paragraph_id=start,
                              end_paragraph_id=end, extra=extra))
    return out


def kilt_prediction(example_id: str, answer: Answer, *, input: str | None = None) -> dict:
    """One KILT prediction record: ``{"id", ["input"], "output": [{"answer", "provenance": [...]}]}``,
    the provenance being the answer's passages (the reranker's top-k, in order)."""
    record: dict[str, Any] = {"id": str(example_id)}
    if input is not None:
        record["input"] = input
    record["output"] = [KiltOutput(answer=answer.answer, provenance=kilt_provenance(answer.provenance)).to_dict()]
    return record
