"""Retrieve → rerank → generate, in process: the reference path the Serve app and ``re2g answer`` wrap.

```
query ─ retriever.batch_search (hybrid: DPR top-12 + BM25 top-12, deduplicated)
      ─ CrossEncoder scores every hit, sorted by z_r, keep retrieval.rerank_top_k (5)
      ─ Generator over "passage // query" for each kept passage, weights softmax(z_r)  (re2g.models.decoding)
      ─ Answer(answer, candidates, provenance, timings)
```

:meth:`Re2GPipeline.from_run_dir` loads everything from a run directory (``re2g.layout``):

* passages: ``RUN_DIR/passages``; dense index ``RUN_DIR/index/dense``; BM25 ``RUN_DIR/index/bm25``
  (whichever exist; both: the hybrid);
* query encoder: the first of ``models/dpr`` (after stage 1), ``models/dpr_init``, ``models/biencoder``
  (``re2g init-models RUN_DIR/models``) whose saved fingerprint is the dense index's; when none matches,
  the first that exists (and the index refuses it with a clear error); when none exists,
  ``models.query_encoder`` of the config;
* reranker: ``models/reranker``, else ``models.reranker`` of the config;
* generator: ``models/generator``, else ``models.generator`` of the config.
Keyword arguments name other directories (e.g. a stage-4 checkpoint's models).

:func:`kilt_prediction` turns an :class:`Answer` into a KILT output record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from re2g.config import CONFIG_FILENAME, Re2GConfig
from re2g.data.kilt import KiltOutput, Provenance
from re2g.errors import ArtifactError
from re2g.layout import RunLayout
from re2g.models.decoding import Answer, decode
from re2g.models.encoders import eval_mode
from re2g.types import Hit

# model subdirectories of RUN_DIR/models, in the order they are tried
BIENCODER_DIRS = ("dpr", "dpr_init", "biencoder")
RERANKER_DIR = "reranker"
GENERATOR_DIR = "generator"


@dataclass(frozen=True)
class RerankedHit(Hit):
    """A retrieved passage after reranking. ``score``/``rank``/``source`` stay the retriever's;
    ``rerank_score`` is the cross-encoder's z_r and ``rerank_rank`` the 0-based position by it."""

    rerank_score: float = 0.0
    rerank_rank: int = 0


def dedup_hits(hits: Sequence[Hit]) -> list[Hit]:
    """First occurrence of every pid, order kept."""
    seen: set[str] = set()
    out = []
    for h in hits:
        if h.pid not in seen:
            seen.add(h.pid)
            out.append(h)
    return out


def rank_by_scores(hits: Sequence[Hit], scores: Sequence[float], top_k: int) -> list[RerankedHit]:
    """Hits sorted by reranker score, best first (ties keep retrieval order), the first ``top_k``."""
    order = sorted(range(len(hits)), key=lambda i: -float(scores[i]))[:top_k]
    base = [f.name for f in fields(Hit)]
    return [RerankedHit(**{k: getattr(hits[i], k) for k in base}, rerank_score=float(scores[i]), rerank_rank=r)
            for r, i in enumerate(order)]


class Re2GPipeline:
    """Retriever + reranker + generator, in this process.

    ``retriever``: anything with ``batch_search(queries, k)`` (the hybrid, or DPR or BM25 alone); it is
    asked for ``retrieve_k`` hits (default ``dpr_top_k + bm25_top_k``; the hybrid takes each part's own
    k from its config). ``cfg``: the run's config (``retrieval.rerank_top_k``, ``generation``). When
    ``cfg.generation`` names separators, they are set on the generator.
    """

    def __init__(self, retriever: Any, reranker, generator, cfg: Re2GConfig | None = None, *,
                 retrieve_k: int | None = None, rerank_batch_size: int = 32):
        self.retriever = retriever
        self.reranker = reranker
        self.generator = generator
        self.cfg = cfg or Re2GConfig()
        r = self.cfg.retrieval
        self.retrieve_k = int(retrieve_k or (r.dpr_top_k + r.bm25_top_k))
        self.rerank_top_k = r.rerank_top_k
        self.rerank_batch_size = int(rerank_batch_size)
        g = self.cfg.generation
        if g.title_sep is not None:
            generator.title_sep = g.title_sep
        if g.query_sep is not None:
            generator.query_sep = g.query_sep

    # ---- the three stages

    def retrieve(self, queries: Sequence[str]) -> list[list[Hit]]:
        """Candidates per query (DPR then BM25 for the hybrid), deduplicated by pid."""
        return [dedup_hits(hs) for hs in self.retriever.batch_search(list(queries), self.retrieve_k)]

    def rerank(self, queries: Sequence[str], hits: Sequence[Sequence[Hit]],
               top_k: int | None = None) -> list[list[RerankedHit]]:
        """Score every (query, hit) with the cross-encoder (all queries' pairs batched together), sort
        each list by score and keep ``top_k`` (default ``retrieval.rerank_top_k``)."""
        k = self.rerank_top_k if top_k is None else int(top_k)
        flat_q = [q for q, hs in zip(queries, hits) for _ in hs]
        flat_h = [h for hs in hits for h in hs]
        if not flat_h:
            return [[] for _ in queries]
        with eval_mode(self.reranker), torch.inference_mode():
            z = self.reranker.score_pairs(flat_q, [h.title for h in flat_h], [h.text for h in flat_h],
                                          batch_size=self.rerank_batch_size).float().cpu().tolist()  # (sum n_b,)
        out, start = [], 0
        for hs in hits:
            out.append(rank_by_scores(hs, z[start:start + len(hs)], k))
            start += len(hs)
        return out

    def generate(self, queries: Sequence[str], reranked: Sequence[Sequence[RerankedHit]]) -> list[Answer]:
        """Answers from the kept passages, weighted by softmax(reranker scores), per ``cfg.generation``."""
        scores = [[h.rerank_score for h in hs] for hs in reranked]
        return decode(self.generator, list(queries), [list(hs) for hs in reranked], scores, self.cfg.generation)

    # ---- all three

    def answer_batch(self, queries: Sequence[str]) -> list[Answer]:
        """Retrieve, rerank and generate for a batch; each answer's ``timings`` are the batch's seconds
        per stage (``retrieve``, ``rerank``, ``generate``, ``total``)."""
        queries = list(queries)
        t0 = time.perf_counter()
        hits = self.retrieve(queries)
        t1 = time.perf_counter()
        reranked = self.rerank(queries, hits)
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
        """Load models and indexes from a run directory (see the module docstring for what is looked
        for where). ``cfg`` default: ``RUN_DIR/config.yaml``, else the ``tiny`` preset. ``device``
        default: ``cfg.device`` (auto: CUDA when available)."""
        from re2g.config import load_config, load_saved_config
        from re2g.index.retrievers import open_retrievers
        from re2g.models.encoders import BiEncoder
        from re2g.models.factory import load_biencoder
        from re2g.models.generator import Generator
        from re2g.models.reranker import CrossEncoder
        from re2g.runtime import pick_device

        run = Path(run_dir)
        if cfg is None:
            cfg = load_saved_config(run) if (run / CONFIG_FILENAME).exists() else load_config(preset="tiny")
        layout = RunLayout(str(run))
        dev = pick_device(device or cfg.device)
        m = cfg.models
        passages = Path(layout.passages)
        dense_dir = Path(layout.dense_index)
        bm25_dir = Path(layout.bm25_index)
        has_dense = (dense_dir / "manifest.json").is_file()
        has_bm25 = bm25_dir.is_dir()
        if not passages.is_dir():
            raise ArtifactError(f"{passages}: passages not found (run `re2g passages` for this run)")
        if not (has_dense or has_bm25):
            raise ArtifactError(f"{run}: no index: neither {dense_dir} nor {bm25_dir} exists (run `re2g index`)")

        query_encoder = None
        if has_dense:
            bi = biencoder or pick_biencoder_dir(layout)
            if bi is not None:
                query_encoder = BiEncoder.from_pretrained(bi, query_max_length=m.query_max_length,
                                                          passage_max_length=m.passage_max_length)
            elif m.query_encoder is not None:
                query_encoder = load_biencoder(m)
            else:
                raise ArtifactError(f"{run}: a dense index but no query encoder: none of "
                                    f"{', '.join(layout.model(n) for n in BIENCODER_DIRS)} exists and "
                                    "models.query_encoder is not set")
            query_encoder.to(dev).eval()
        retrievers = open_retrievers(cfg, passages=str(passages), dense_dir=str(dense_dir) if has_dense else None,
                                     bm25_dir=str(bm25_dir) if has_bm25 else None, query_encoder=query_encoder)
        retriever = retrievers.get("hybrid") or retrievers.get("dpr") or retrievers.get("bm25")

        rr = reranker or _model_dir(layout, RERANKER_DIR) or m.reranker
        gen = generator or _model_dir(layout, GENERATOR_DIR) or m.generator
        for what, src, sub in (("reranker", rr, RERANKER_DIR), ("generator", gen, GENERATOR_DIR)):
            if src is None:
                raise ArtifactError(f"{run}: no {what}: {layout.model(sub)} does not exist and "
                                    f"models.{what} is not set")
        rerank_model = CrossEncoder.from_pretrained(rr, max_length=m.reranker_max_length).to(dev).eval()
        gen_model = Generator.from_pretrained(gen, source_max_length=m.generator_source_max_length,
                                              target_max_length=m.generator_target_max_length,
                                              title_sep=cfg.generation.title_sep,
                                              query_sep=cfg.generation.query_sep).to(dev).eval()
        return cls(retriever, rerank_model, gen_model, cfg)


def _model_dir(layout: RunLayout, name: str) -> str | None:
    p = Path(layout.model(name))
    return str(p) if p.is_dir() else None


def pick_biencoder_dir(layout: RunLayout) -> str | None:
    """The first of ``models/{dpr,dpr_init,biencoder}`` whose saved fingerprint equals the dense index's
    encoder fingerprint; else the first that exists; None when none does."""
    from re2g.index.dense import read_manifest
    from re2g.models.fingerprint import read_model_meta

    existing = [d for d in (_model_dir(layout, n) for n in BIENCODER_DIRS) if d is not None]
    try:
        want = read_manifest(layout.dense_index)["encoder_fingerprint"]
    except ArtifactError:
        want = None
    for d in existing:
        meta = read_model_meta(d) or {}
        if want is not None and meta.get("fingerprint") == want:
            return d
    return existing[0] if existing else None


# --------------------------------------------------------------------------- KILT output


def kilt_provenance(passages: Sequence[Any]) -> list[Provenance]:
    """KILT provenance of passages (``RerankedHit``, ``Hit``, ``ProvenancePassage``, in the given order):
    ``wikipedia_id`` (from the passage, else from a ``wikiid::[start,end]`` pid, else the pid), ``title``,
    the paragraph range when the pid carries one, and as extras the pid and the scores that exist."""
    from re2g.data.passages import parse_pid

    out = []
    for p in passages:
        try:
            wid, start, end = parse_pid(p.pid)
        except ValueError:
            wid, start, end = p.pid, None, None
        extra = {"pid": p.pid}
        for name in ("source", "rerank_score", "weight"):
            v = getattr(p, name, None)
            if v is not None:
                extra[name] = v
        out.append(Provenance(wikipedia_id=str(p.wikipedia_id or wid), title=p.title or None,
                              start_paragraph_id=start, end_paragraph_id=end, extra=extra))
    return out


def kilt_prediction(example_id: str, answer: Answer, *, input: str | None = None) -> dict:
    """One KILT prediction record: ``{"id", ["input"], "output": [{"answer", "provenance": [...]}]}``,
    the provenance being the answer's passages (the reranker's top-k, in order)."""
    record: dict[str, Any] = {"id": str(example_id)}
    if input is not None:
        record["input"] = input
    record["output"] = [KiltOutput(answer=answer.answer, provenance=kilt_provenance(answer.provenance)).to_dict()]
    return record
