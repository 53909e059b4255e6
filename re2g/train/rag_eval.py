"""Dev evaluation of stages 2 and 4 and their reports.

Answers come from :func:`re2g.models.decoding.decode` (what the pipeline and Serve decode with) over
the passages of training's own path (:mod:`re2g.train.rag_steps`: DPR; for stage 4 DPR + BM25 fused
by ``fuse`` and the reranker's ``rerank_top``), scored with KILT's official metrics
(``re2g.eval.kilt``): EM, F1, accuracy and page-level R-Precision / Recall@5 of the provenance;
stage 4 also the dev KL between the reranker's and DPR's distributions over the candidates, the
DPR top-k's own page R-Precision and the spread (max - min) of DPR's and the reranker's scores over
each query's candidates (:func:`score_spread`). Every metric is a mean over queries computed per query, so it does
not depend on the batch size or the order of the dev set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from re2g.config import GenerationConfig, RetrievalConfig
from re2g.models.losses import distill_kl
from re2g.train.rag_model import Re2GModel
from re2g.train.rag_steps import bm25_hits, dpr_retrieve, passage_scores, retrieve_rerank, with_passages


def kilt_scores(gold: Sequence, predictions: Sequence[dict]) -> dict[str, float]:
    """EM, F1, accuracy, page-level R-Precision and Recall@5 (KILT's official definitions)."""
    from re2g.eval.kilt import evaluate_kilt

    r = evaluate_kilt(list(gold), list(predictions), ks=(5,))
    d, ret = r["downstream"], r["retrieval"]
    return {"em": d["em"], "f1": d["f1"], "accuracy": d["accuracy"], "rprec": ret["Rprec"],
            "recall@5": ret["recall@5"]}


def page_rprec(gold: Sequence, pid_lists: Sequence[Sequence[str]], lookup: Mapping) -> float:
    """Page-level R-Precision of ranked passage lists (e.g. DPR's own top-k) against KILT gold."""
    from re2g.eval.kilt import gold_page_lists, r_precision
    from re2g.train.evaluate import page_of

    vals = [r_precision([page_of(p, lookup) for p in pids], gold_page_lists(g)) for g, pids in zip(gold, pid_lists)]
    return float(np.mean(vals)) if vals else 0.0


def score_spread(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per query, max - min of the scores ``z`` (B, C) over its real candidates ``mask`` (B, C) -> (B,);
    0 for a row with fewer than one real entry. Stage 4 reports it for DPR and the reranker: when
    DPR's spread is far wider than the reranker's, ``distill`` (at T = 10 especially) mostly teaches
    DPR to be flat rather than to keep the reranker's order (docs/e2e_options.md)."""
    m = mask.bool()
    z = z.float()
    hi = z.masked_fill(~m, float("-inf")).amax(dim=-1)
    lo = z.masked_fill(~m, float("inf")).amin(dim=-1)
    return torch.where(m.any(dim=-1), hi - lo, torch.zeros_like(hi))


def _predictions(gold: Sequence, answers) -> list[dict]:
    from re2g.pipeline import kilt_prediction

    return [kilt_prediction(g.id, a) for g, a in zip(gold, answers)]


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


@torch.no_grad()
def evaluate_rag(model: Re2GModel, gold: Sequence, index, lookup: Mapping, *, n_docs: int,
                 generation: GenerationConfig, batch_size: int = 32) -> dict[str, float]:
    """Stage 2 dev metrics: DPR top-n from the index, answers (:func:`re2g.models.decoding.decode`)
    weighted by softmax(scale * q . p), the weights the training loss uses. Per query, whatever the
    batch: the same metrics for any ``batch_size`` and order."""
    from re2g.models.decoding import decode
    from re2g.models.encoders import eval_mode

    answers = []
    with eval_mode(model):
        for s in _chunks(len(gold), batch_size):
            queries = [g.input for g in gold[s]]
            q = model.biencoder.encode_queries(queries)                     # (B, D)
            hits = [with_passages(hs, lookup) for hs in dpr_retrieve(index, q, n_docs)]
            scores, _ = passage_scores(index, q, [[h.pid for h in hs] for hs in hits], model.biencoder.logit_scale)
            answers += decode(model.generator, queries, hits,
                              [scores[b, :len(hs)].tolist() for b, hs in enumerate(hits)], generation)
    return {f"dev_{k}": round(float(v), 6) for k, v in kilt_scores(gold, _predictions(gold, answers)).items()}


@torch.no_grad()
def evaluate_e2e(model: Re2GModel, gold: Sequence, bm25: Sequence[Sequence], index, lookup: Mapping, *,
                 option: str, retrieval: RetrievalConfig, generation: GenerationConfig, temperature: float,
                 batch_size: int = 16) -> dict[str, float]:
    """Stage 4 dev metrics through training's own path (:func:`retrieve_rerank`: DPR + BM25 fused as
    serving fuses, the reranker's top-k) and :func:`re2g.models.decoding.decode`; plus the KL between
    the reranker's and DPR's distributions over the candidates (at T and at 1) and the page
    R-Precision of DPR's own top-k. ``bm25``: each query's :func:`bm25_entries`. Per query, whatever
    the batch: the same metrics for any ``batch_size`` and order."""
    from re2g.models.decoding import decode
    from re2g.models.encoders import eval_mode
    from re2g.models.losses import listwise_kl

    answers, kls, kls1, dpr_lists, spreads, spreads_r = [], [], [], [], [], []
    with eval_mode(model):
        for s in _chunks(len(gold), batch_size):
            queries = [g.input for g in gold[s]]
            r = retrieve_rerank(model, queries, [bm25_hits(e, lookup) for e in bm25[s]], index, lookup, retrieval,
                                option=option, rerank_batch_size=64)
            dpr_lists += [[h.pid for h in hs] for hs in r.dpr]
            spreads += score_spread(r.z_dpr, r.mask).tolist()
            spreads_r += score_spread(r.z_r, r.mask).tolist()
            for b in range(len(queries)):  # per query: sums that do not depend on the batch
                row = slice(b, b + 1)
                kls.append(float(distill_kl(r.z_r[row], r.z_dpr[row], r.mask[row], temperature)))
                kls1.append(float(listwise_kl(r.z_r[row], r.z_dpr[row], r.mask[row])))
            doc = [r.doc_scores[b, :int(n)].tolist() for b, n in enumerate(r.top_mask.sum(-1))]
            answers += decode(model.generator, queries, r.top_candidates(), doc, generation)
    n = max(len(gold), 1)
    out = {f"dev_{k}": round(float(v), 6) for k, v in kilt_scores(gold, _predictions(gold, answers)).items()}
    out["dev_kl"] = round(sum(kls) / n, 6)
    out["dev_kl_t1"] = round(sum(kls1) / n, 6)
    out["dev_dpr_rprec"] = round(page_rprec(gold, dpr_lists, lookup), 6)
    out["dev_dpr_spread"] = round(sum(spreads) / n, 6)
    out["dev_rerank_spread"] = round(sum(spreads_r) / n, 6)
    return out


METRICS = ("em", "f1", "accuracy", "rprec", "recall@5", "kl", "kl_t1", "dpr_rprec", "dpr_spread", "rerank_spread")


def results_table(result, title: str | None = None):
    """Dev metrics before and after a generation / end-to-end run (a ``rich`` table)."""
    from rich.table import Table

    rows = [(f"{n} (before)", m) for n, m in result.before.items()] + [(f"{n} (after)", m) for n, m in result.after.items()]
    keys = [k for k in METRICS if any(k in m for _, m in rows)]
    t = Table(title=title or f"{result.stage}: dev, before and after training ({result.run.steps} steps, "
              f"{result.run.seconds:.0f} s)")
    t.add_column("model")
    for k in keys:
        t.add_column(k, justify="right")
    for name, m in rows:
        t.add_row(name, *(f"{m[k]:.3f}" if k in m else "" for k in keys))
    return t


def options_markdown(results: Mapping[str, Any]) -> str:
    """The comparison of the query-encoder options (``{option: StageResult}``) as a Markdown table."""
    lines = ["| option | EM before → after | F1 before → after | R-Prec before → after | KL (T) before → after "
             "| KL (T=1) before → after | DPR R-Prec before → after |",
             "|---|---|---|---|---|---|---|"]
    for opt, r in results.items():
        b, a = next(iter(r.before.values())), next(iter(r.after.values()))

        def cell(k, digits=3):
            return f"{b.get(k, math.nan):.{digits}f} → {a.get(k, math.nan):.{digits}f}"

        lines.append(f"| {opt} | {cell('em')} | {cell('f1')} | {cell('rprec')} | {cell('kl')} | {cell('kl_t1')} "
                     f"| {cell('dpr_rprec')} |")
    return "\n".join(lines) + "\n"
