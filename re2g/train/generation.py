"""Stage 2 (generation, RAG) and stage 4 (end-to-end) for the one training loop of ``re2g.train.loop``.

**Stage 2** (:class:`GenerationStage`): the query encoder and BART trained together on the target
outputs. For each query, ``q`` is encoded *with* gradient; its detached copy searches the dense index
held by the index-shard Ray actors (DPR top-n; the index is never copied into a worker); the stored
vectors ``p`` of the hits come back from the same actors (``get_vectors``), so the document scores
``q . p`` (B, n) carry gradient to the query encoder only. The context encoder is frozen and the
index stays fixed (as in RAG and Re2G). Loss: ``marginal_loss`` (RAG-Sequence or RAG-Token) over the
per-passage target log-probabilities (B, n, T).

**Stage 4** (:class:`E2EStage`): per query DPR top-12 (actors) + BM25 top-12 (fixed, retrieved once
by the driver) deduplicated -> the reranker scores every candidate (B, C) -> its top-5 go to BART; the
reranker's scores weight the marginalization, so the generator's loss trains the reranker. The query
encoder gets no gradient through that; ``query_encoder`` chooses what it does:

* ``combined``: document scores ``log_softmax(z_dpr) + log_softmax(z_rerank)`` over the top-5;
* ``frozen``: the query encoder is not updated (not in the optimizer, no gradient; bitwise unchanged);
* ``distill``: ``+ weight * distill_kl(z_rerank, z_dpr, T)`` over *all* candidates, BM25 hits
  included (their DPR scores from their stored vectors).

Dev evaluation (rank 0, same retrieval path): answers decoded as ``cfg.generation`` says, scored with
KILT's official metrics (``re2g.eval.kilt``): EM, F1, accuracy and page-level R-Precision /
Recall@5 of the provenance; stage 4 also the dev KL between the reranker's and DPR's distributions
over the candidates and the DPR top-k's own page R-Precision. The metrics of a checkpoint's step are
written beside it (``eval.json``); the driver adds the before/after table (``re2g.train.api.run_stage``).

Models: :class:`Re2GModel` holds the bi-encoder (query encoder trained, context encoder frozen and
saved unchanged, so the saved bi-encoder still matches the index's fingerprint), the generator and
(stage 4) the reranker; saved as ``biencoder/``, ``generator/``, ``reranker/`` under
``RUN_DIR/models/generation`` (stage 2) and ``RUN_DIR/models/e2e-<option>`` (stage 4).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from re2g.config import GenerationConfig, RetrievalConfig
from re2g.index.fusion import fuse
from re2g.models.losses import distill_kl
from re2g.models.marginalize import doc_log_weights, marginal_loss
from re2g.models.reranker import rerank_top
from re2g.train.stages import StageBase, param_groups
from re2g.types import Candidate, Hit

QUERY_ENCODER_OPTIONS = ("combined", "frozen", "distill")


# --------------------------------------------------------------------------- the dense index, per process


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


def start_index_actors(index_dir: str, *, num_cpus: float = 0.0, expected_fingerprint: str | None = None,
                       tag: str = "") -> tuple[IndexHandle, Any]:
    """Start one named shard actor per shard of ``index_dir`` (the caller has connected to Ray) and
    return the handle the training workers attach with, and the ``ActorShardedIndex`` (to shut down)."""
    import uuid

    import ray

    from re2g.index.shards import ActorShardedIndex

    ns = ray.get_runtime_context().namespace
    prefix = f"re2g-train{('-' + tag) if tag else ''}-{uuid.uuid4().hex[:8]}-shard-"
    idx = ActorShardedIndex.start(index_dir, expected_fingerprint=expected_fingerprint, num_cpus=num_cpus,
                                  name_prefix=prefix, namespace=ns, spread=True)
    return IndexHandle(str(Path(index_dir).absolute()), prefix, len(idx.names), ns), idx


def dpr_retrieve(index, q: torch.Tensor, k: int) -> list[list[Hit]]:
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


# --------------------------------------------------------------------------- the model


class Re2GModel(torch.nn.Module):
    """The bi-encoder, the generator and (stage 4) the reranker as one module for one DeepSpeed
    engine. The context encoder never trains; ``frozen_query_encoder`` keeps the query encoder out
    of training too (no gradient, eval mode)."""

    def __init__(self, biencoder: torch.nn.Module, generator: torch.nn.Module, reranker: torch.nn.Module | None = None,
                 *, frozen_query_encoder: bool = False):
        super().__init__()
        self.biencoder = biencoder
        self.generator = generator
        if reranker is not None:
            self.reranker = reranker
        self.frozen_query_encoder = frozen_query_encoder
        untie_and_freeze_ctx(biencoder)
        if frozen_query_encoder:
            biencoder.query_encoder.requires_grad_(False)

    @property
    def has_reranker(self) -> bool:
        return hasattr(self, "reranker")

    def train(self, mode: bool = True):
        super().train(mode)
        self.biencoder.ctx_encoder.eval()
        if self.frozen_query_encoder:
            self.biencoder.query_encoder.eval()
        return self

    def save_pretrained(self, directory: str | Path, *, generator_at_root: bool = False) -> Path:
        """``biencoder/``, ``generator/`` (or, ``generator_at_root``, the generator's files in
        ``directory`` itself, so it loads as a plain generator directory) and ``reranker/``."""
        d = Path(directory)
        self.generator.save_pretrained(d if generator_at_root else d / "generator")
        self.biencoder.save_pretrained(d / "biencoder")
        if self.has_reranker:
            self.reranker.save_pretrained(d / "reranker")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, frozen_query_encoder: bool = False,
                        generation: GenerationConfig | None = None) -> "Re2GModel":
        from re2g.models.encoders import BiEncoder
        from re2g.models.reranker import CrossEncoder

        d = Path(directory)
        rr = CrossEncoder.from_pretrained(d / "reranker") if (d / "reranker").is_dir() else None
        gen = d / "generator" if (d / "generator").is_dir() else d
        return cls(BiEncoder.from_pretrained(d / "biencoder"), load_generator_dir(gen, generation), rr,
                   frozen_query_encoder=frozen_query_encoder)


def untie_and_freeze_ctx(biencoder) -> None:
    """A shared bi-encoder gets its own (frozen) copy of the encoder as context encoder, so training
    the query side leaves the passage side -- and the index's fingerprint -- as they were."""
    if biencoder.shared:
        biencoder.ctx_encoder = copy.deepcopy(biencoder.query_encoder)
    biencoder.ctx_encoder.requires_grad_(False)


def reinit_weights(module: torch.nn.Module, std: float) -> None:
    """Every Linear and Embedding weight redrawn from N(0, std), biases and padding rows 0 (BART's own
    initialization scheme, with another std; uses torch's global RNG)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, std)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()


def load_generator_dir(path: str | Path, generation: GenerationConfig | None = None):
    from re2g.models.generator import Generator

    g = generation or GenerationConfig()
    return Generator.from_pretrained(path, title_sep=g.title_sep, query_sep=g.query_sep)


# --------------------------------------------------------------------------- losses of one micro-batch


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


# --------------------------------------------------------------------------- dev evaluation


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

    answers, kls, kls1, dpr_lists = [], [], [], []
    with eval_mode(model):
        for s in _chunks(len(gold), batch_size):
            queries = [g.input for g in gold[s]]
            r = retrieve_rerank(model, queries, [bm25_hits(e, lookup) for e in bm25[s]], index, lookup, retrieval,
                                option=option, rerank_batch_size=64)
            dpr_lists += [[h.pid for h in hs] for hs in r.dpr]
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
    return out


# --------------------------------------------------------------------------- the stages


@dataclass
class _GenStageBase(StageBase):
    """What stages 2 and 4 share: where the starting models are, the index handle, dev gold."""

    index: IndexHandle | None = None
    biencoder_dir: str = ""
    generator_dir: str = ""
    gold: list = field(default_factory=list)          # KILT dev examples (KiltExample)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    marginalization: str = "sequence"
    query_encoder_lr: float | None = None
    dev_metric: str = "dev_em"
    _last_eval: dict | None = None

    generator_at_root: bool = False

    def _index(self):
        return self.index.open()

    def save(self, model, directory: str | Path) -> None:
        """The models, and the dev metrics of this step (when evaluated) beside the checkpoint."""
        model.save_pretrained(directory, generator_at_root=self.generator_at_root)
        if self._last_eval is not None:
            Path(directory).parent.joinpath("eval.json").write_text(json.dumps({"dev": self._last_eval}, indent=2))
            self._last_eval = None

    def _remember(self, metrics: dict) -> dict:
        self._last_eval = dict(metrics)
        return metrics


@dataclass
class GenerationStage(_GenStageBase):
    """Stage 2 -- RAG: query encoder + BART on the target outputs, passages from the fixed index."""

    name: str = "generator"
    n_docs: int = 5
    train_query_encoder: bool = True
    generator_at_root: bool = True
    reinit_std: float | None = None

    def build(self) -> torch.nn.Module:
        from re2g.models.encoders import BiEncoder

        gen = load_generator_dir(self.generator_dir, self.generation)
        if self.reinit_std:
            reinit_weights(gen.model, self.reinit_std)
        return Re2GModel(BiEncoder.from_pretrained(self.biencoder_dir), gen,
                         frozen_query_encoder=not self.train_query_encoder)

    def load(self, directory: str | Path) -> torch.nn.Module:
        return Re2GModel.from_pretrained(directory, frozen_query_encoder=not self.train_query_encoder,
                                         generation=self.generation)

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        return (param_groups(module.generator, self.lr, self.weight_decay)
                + param_groups(module.biencoder.query_encoder, self.query_encoder_lr or self.lr, self.weight_decay))

    def loss(self, model, batch: list[dict]) -> tuple[torch.Tensor, int]:
        parts = rag_step(model, batch, self._index(), self.lookup, n_docs=self.n_docs, kind=self.marginalization)
        return parts.loss, len(batch)

    def evaluate(self, model) -> dict[str, float]:
        return self._remember(evaluate_rag(model, self.gold, self._index(), self.lookup, n_docs=self.n_docs,
                                           generation=self.generation))

    @torch.no_grad()
    def probe(self, model) -> list[float]:
        was = model.training
        model.eval()
        try:
            parts = rag_step(model, [{"query": g.input, "target": (g.answers or [""])[0]} for g in self.gold[:2]],
                             self._index(), self.lookup, n_docs=self.n_docs, kind=self.marginalization)
        finally:
            model.train(was)
        return [float(parts.nll)] + [float(v) for v in parts.doc_scores.reshape(-1)]


@dataclass
class E2EStage(_GenStageBase):
    """Stage 4 -- end to end: the reranker's scores weight the marginalization (see the module doc)."""

    name: str = "e2e"
    reranker_dir: str = ""
    option: str = "distill"
    reranker_lr: float | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # dpr/bm25_top_k, fusion, rerank_top_k
    temperature: float = 10.0
    distill_weight: float = 1.0
    dev_bm25: list = field(default_factory=list)

    def build(self) -> torch.nn.Module:
        from re2g.models.encoders import BiEncoder
        from re2g.models.reranker import CrossEncoder

        return Re2GModel(BiEncoder.from_pretrained(self.biencoder_dir),
                         load_generator_dir(self.generator_dir, self.generation),
                         CrossEncoder.from_pretrained(self.reranker_dir),
                         frozen_query_encoder=self.option == "frozen")

    def load(self, directory: str | Path) -> torch.nn.Module:
        return Re2GModel.from_pretrained(directory, frozen_query_encoder=self.option == "frozen",
                                         generation=self.generation)

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        groups = (param_groups(module.generator, self.lr, self.weight_decay)
                  + param_groups(module.reranker, self.reranker_lr or self.lr, self.weight_decay))
        if self.option != "frozen":
            groups += param_groups(module.biencoder.query_encoder, self.query_encoder_lr or self.lr, self.weight_decay)
        return groups

    def step(self, model, batch: list[dict]) -> StepParts:
        return e2e_step(model, batch, self._index(), self.lookup, option=self.option, retrieval=self.retrieval,
                        kind=self.marginalization, temperature=self.temperature,
                        distill_weight=self.distill_weight)

    def loss(self, model, batch: list[dict]) -> tuple[torch.Tensor, int]:
        return self.step(model, batch).loss, len(batch)

    def evaluate(self, model) -> dict[str, float]:
        return self._remember(evaluate_e2e(model, self.gold, self.dev_bm25, self._index(), self.lookup,
                                           option=self.option, retrieval=self.retrieval,
                                           generation=self.generation, temperature=self.temperature))

    @torch.no_grad()
    def probe(self, model) -> list[float]:
        was = model.training
        model.eval()
        try:
            batch = [{"query": g.input, "target": (g.answers or [""])[0], "bm25": b}
                     for g, b in zip(self.gold[:2], self.dev_bm25[:2])]
            parts = self.step(model, batch)
        finally:
            model.train(was)
        return [float(parts.nll)] + [float(v) for v in parts.doc_scores.reshape(-1)]


# --------------------------------------------------------------------------- training data


def plan_examples(examples: Sequence[dict], *, batch_size: int, epochs: int, world: int, grad_accum: int,
                  max_steps: int | None, seed: int):
    """Micro-batches of ``{"id", "query", "target", ["bm25"]}`` examples, reshuffled every epoch."""
    import random

    from re2g.train.data import _finish_plan

    rng = random.Random(seed)
    epochs_out = []
    for _ in range(epochs):
        order = list(examples)
        rng.shuffle(order)
        epochs_out.append([order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)])
    dropped = epochs * (len(examples) % batch_size)
    return _finish_plan(epochs_out, world, grad_accum, max_steps, dropped)


def training_examples(kilt_path: str, limit: int | None = None) -> list[dict]:
    """KILT examples with an answer -> ``{"id", "query", "target"}`` (the first answer is the target)."""
    from re2g.data.kilt import read_kilt

    out = []
    for ex in read_kilt(kilt_path):
        if ex.answers:
            out.append({"id": ex.id, "query": ex.input, "target": ex.answers[0]})
        if limit is not None and len(out) >= limit:
            break
    return out


def bm25_top(cfg, inputs, queries: Sequence[str]) -> list[list[list]]:
    """BM25 top-``retrieval.bm25_top_k`` per query as :func:`bm25_entries` (retrieved once, in the driver)."""
    from re2g.train.api import _bm25

    k = cfg.retrieval.bm25_top_k
    if k <= 0:
        return [[] for _ in queries]
    return [bm25_entries(hs) for hs in _bm25(cfg, inputs).batch_search(list(queries), k)]


# --------------------------------------------------------------------------- driver side: the two stages


def _layout(cfg):
    from re2g.layout import RunLayout

    return RunLayout(cfg.run_dir)


def _biencoder_for_index(cfg, explicit: str | None, dense_dir: str, prefer: Sequence[str] = ()) -> str:
    """The bi-encoder whose context encoder made the dense index: ``explicit``, else the first of
    ``prefer`` and ``RUN_DIR/models/{dpr,dpr_init,biencoder}`` whose saved fingerprint is the index's."""
    from re2g.errors import ArtifactError
    from re2g.index.dense import read_manifest
    from re2g.models.fingerprint import read_model_meta
    from re2g.pipeline import BIENCODER_DIRS

    want = read_manifest(dense_dir)["encoder_fingerprint"]
    layout = _layout(cfg)
    tried = [explicit] if explicit else [*prefer, *(layout.model(n) for n in BIENCODER_DIRS),
                                         str(Path(layout.model("init")) / "biencoder")]
    for d in tried:
        meta = read_model_meta(d) if d and Path(d).is_dir() else None
        if meta and meta.get("fingerprint") == want:
            return str(d)
    raise ArtifactError(f"{dense_dir}: no bi-encoder matching the index's encoder fingerprint {want} among "
                        f"{', '.join(str(t) for t in tried)} (set train.generator.biencoder / train.e2e.biencoder, "
                        "or rebuild the index with `re2g embed` + `re2g index`)")


def ensure_dense_index(cfg, inputs, dense_dir: str, biencoder_dir: str | None, log=print) -> None:
    """Build ``dense_dir`` (embed with Ray Data, then the shards) when it does not exist."""
    if Path(dense_dir, "manifest.json").is_file():
        return
    from re2g.errors import ArtifactError
    from re2g.index.embed import embed_corpus
    from re2g.index.retrievers import build_indexes
    from re2g.pipeline import pick_biencoder_dir

    layout = _layout(cfg)
    init = Path(layout.model("init")) / "biencoder"
    bi = biencoder_dir or pick_biencoder_dir(layout) or (str(init) if init.is_dir() else None)
    if bi is None:
        if cfg.models.query_encoder is not None:
            raise ArtifactError(f"{dense_dir}: no dense index; build it with `re2g embed` + `re2g index`")
        bi = _init_model(cfg, inputs, "biencoder")
    emb = str(Path(_layout(cfg).embeddings))
    log(f"[index] no dense index: embedding the passages with {bi} and building {dense_dir}")
    embed_corpus(inputs.passages, bi, emb, batch_size=cfg.index.embed_batch_size, actors=cfg.index.embed_actors,
                 overwrite=True)
    build_indexes(cfg, passages=inputs.passages, embeddings=emb, dense_dir=dense_dir, bm25_dir=None, overwrite=True)


def _is_stage2_output(d: Path) -> bool:
    return (d / "biencoder").is_dir()


def _init_model(cfg, inputs, name: str) -> str:
    """``RUN_DIR/models/init/<name>`` (as ``re2g init-models`` makes it), built from config when missing."""
    d = Path(_layout(cfg).model("init")) / name
    if not d.is_dir():
        from re2g.models.init import init_models

        tok = Path(inputs.tokenizer).parent if inputs.tokenizer else None
        init_models(cfg.models, d.parent, tokenizers_dir=tok, which=(name,))
    return str(d)


def start_generator(cfg, inputs) -> str:
    """Where stage 2 starts: ``models.generator`` if set, else ``RUN_DIR/models/init/generator``; an
    untrained ``RUN_DIR/models/generator`` (``re2g init-models RUN_DIR/models``) is moved there first,
    as stage 2 writes its output to ``RUN_DIR/models/generator``. Built from config when none exists."""
    if cfg.models.generator is not None:
        return cfg.models.generator
    out, init = Path(_layout(cfg).model("generator")), Path(_layout(cfg).model("init")) / "generator"
    if not init.is_dir() and out.is_dir() and not _is_stage2_output(out):
        import shutil

        init.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out, init)
    return _init_model(cfg, inputs, "generator")


def start_reranker(cfg, inputs) -> str:
    """Where stage 4's reranker starts: ``RUN_DIR/models/reranker`` (stage 3), else ``models.reranker``,
    else ``RUN_DIR/models/init/reranker`` (built from config when missing)."""
    d = Path(_layout(cfg).model("reranker"))
    if d.is_dir():
        return str(d)
    return cfg.models.reranker or _init_model(cfg, inputs, "reranker")


def _dev_gold(inputs, limit: int | None) -> list:
    from re2g.data.kilt import read_kilt

    gold = [ex for ex in read_kilt(inputs.dev_file) if ex.answers]
    return gold[:limit] if limit else gold


def _with_eval_every(stage_cfg, plan, num_workers: int):
    """Evaluate at every checkpoint (so each checkpoint has its ``eval.json``) unless set."""
    if stage_cfg.eval_every is not None:
        return stage_cfg
    every = stage_cfg.checkpoint_every or max(1, plan.per_epoch // (num_workers * stage_cfg.grad_accum))
    return stage_cfg.model_copy(update={"eval_every": every})


def _dev(gold):
    from re2g.train.evaluate import DevSet

    return DevSet([g.input for g in gold], [[] for _ in gold], [[] for _ in gold])


def train_generator(cfg, *, inputs=None, fail_once_at_step: int | None = None, log=print):
    """Stage 2 on Ray Train + DeepSpeed, retrieval through index-shard actors; dev EM/F1/accuracy and
    provenance R-Precision/Recall@5 before and after. Returns a ``StageResult``; the model goes to
    ``RUN_DIR/models/generator`` (the generator's files, loadable as a plain generator directory, and
    ``biencoder/``: the trained query encoder with the index's context encoder)."""
    from re2g.train.api import prepare_inputs, run_stage

    inputs = inputs or prepare_inputs(cfg)
    c = cfg.train.generator
    dense_dir = c.dense_index or _layout(cfg).dense_index
    ensure_dense_index(cfg, inputs, dense_dir, c.biencoder, log=log)
    bi = _biencoder_for_index(cfg, c.biencoder, dense_dir)
    gen = c.generator or start_generator(cfg, inputs)
    examples = training_examples(inputs.train_file)
    plan = plan_examples(examples, batch_size=c.batch_size, epochs=c.epochs, world=cfg.train.num_workers,
                         grad_accum=c.grad_accum, max_steps=c.max_steps, seed=c.seed)
    kind = c.marginalization or cfg.generation.marginalization
    gold = _dev_gold(inputs, c.max_dev_queries)
    handle, actors = start_index_actors(dense_dir, num_cpus=c.index_actor_cpus, tag="gen")
    try:
        stage = GenerationStage(models=cfg.models, tokenizer_dir=inputs.tokenizer, passages=inputs.passages,
                                dev=_dev(gold), lr=c.lr, weight_decay=c.weight_decay, index=handle, biencoder_dir=bi,
                                generator_dir=gen, gold=gold, generation=cfg.generation, marginalization=kind,
                                query_encoder_lr=c.query_encoder_lr, n_docs=c.n_docs,
                                train_query_encoder=c.train_query_encoder, reinit_std=c.reinit_std)
        log(f"[generator] {len(examples)} training examples, DPR top-{c.n_docs} from {handle.num_shards} shard "
            f"actors, RAG-{kind.capitalize()}; bi-encoder {bi}, generator {gen}"
            + (f" (weights redrawn, std {c.reinit_std})" if c.reinit_std else ""))
        return run_stage(cfg, stage, plan, _with_eval_every(c, plan, cfg.train.num_workers), inputs,
                         fail_once_at_step=fail_once_at_step, log=log,
                         data_info={"train_examples": len(examples), "micro_batches": len(plan.rows),
                                    "dev_examples": len(gold), "biencoder": bi, "generator": gen,
                                    "dense_index": dense_dir, "marginalization": kind})
    finally:
        actors.shutdown()


def train_e2e(cfg, *, query_encoder: str | None = None, inputs=None, fail_once_at_step: int | None = None,
              log=print):
    """Stage 4 on Ray Train + DeepSpeed with the query-encoder option ``query_encoder`` (default
    ``train.e2e.query_encoder``): DPR (actors) + BM25 candidates, reranker top-k to BART weighted by the
    reranker. Starts from stage 2's query encoder and generator (``RUN_DIR/models/generator``) and
    stage 3's reranker when they exist. The models go to ``RUN_DIR/models/e2e-<option>/``
    (``biencoder/``, ``reranker/``, ``generator/``)."""
    from re2g.train.api import prepare_inputs, run_stage

    inputs = inputs or prepare_inputs(cfg)
    c = cfg.train.e2e
    option = query_encoder or c.query_encoder
    if option not in QUERY_ENCODER_OPTIONS:
        from re2g.errors import ConfigError

        raise ConfigError(f"train.e2e.query_encoder: got {option!r}: expected one of {', '.join(QUERY_ENCODER_OPTIONS)}")
    layout = _layout(cfg)
    stage2 = Path(layout.model("generator"))
    dense_dir = c.dense_index or layout.dense_index
    ensure_dense_index(cfg, inputs, dense_dir, c.biencoder, log=log)
    bi = _biencoder_for_index(cfg, c.biencoder, dense_dir, prefer=[str(stage2 / "biencoder")])
    gen = c.generator or (str(stage2) if stage2.is_dir() else start_generator(cfg, inputs))
    rr = c.reranker or start_reranker(cfg, inputs)
    r = cfg.retrieval
    examples = training_examples(inputs.train_file)
    for x, hits in zip(examples, bm25_top(cfg, inputs, [x["query"] for x in examples])):
        x["bm25"] = hits
    gold = _dev_gold(inputs, c.max_dev_queries)
    dev_bm25 = bm25_top(cfg, inputs, [g.input for g in gold])
    plan = plan_examples(examples, batch_size=c.batch_size, epochs=c.epochs, world=cfg.train.num_workers,
                         grad_accum=c.grad_accum, max_steps=c.max_steps, seed=c.seed)
    kind = c.marginalization or cfg.generation.marginalization
    handle, actors = start_index_actors(dense_dir, num_cpus=c.index_actor_cpus, tag="e2e")
    try:
        stage = E2EStage(models=cfg.models, tokenizer_dir=inputs.tokenizer, passages=inputs.passages, dev=_dev(gold),
                         lr=c.lr, weight_decay=c.weight_decay, name=f"e2e-{option}", index=handle, biencoder_dir=bi,
                         generator_dir=gen, reranker_dir=rr, gold=gold, generation=cfg.generation,
                         marginalization=kind, query_encoder_lr=c.query_encoder_lr, reranker_lr=c.reranker_lr,
                         option=option, retrieval=r, temperature=c.distill_temperature,
                         distill_weight=c.distill_weight, dev_bm25=dev_bm25)
        log(f"[e2e-{option}] {len(examples)} training examples; DPR top-{r.dpr_top_k} ({handle.num_shards} shard "
            f"actors) + BM25 top-{r.bm25_top_k} -> reranker top-{r.rerank_top_k} -> RAG-{kind.capitalize()}; "
            f"bi-encoder {bi}, reranker {rr}, generator {gen}")
        return run_stage(cfg, stage, plan, _with_eval_every(c, plan, cfg.train.num_workers), inputs,
                         fail_once_at_step=fail_once_at_step, log=log,
                         data_info={"train_examples": len(examples), "micro_batches": len(plan.rows),
                                    "dev_examples": len(gold), "option": option, "biencoder": bi, "reranker": rr,
                                    "generator": gen, "dense_index": dense_dir, "marginalization": kind,
                                    "temperature": c.distill_temperature, "distill_weight": c.distill_weight})
    finally:
        actors.shutdown()


# --------------------------------------------------------------------------- reporting


METRICS = ("em", "f1", "accuracy", "rprec", "recall@5", "kl", "kl_t1", "dpr_rprec")


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


def compare_e2e_options(cfg, options: Sequence[str] = QUERY_ENCODER_OPTIONS, *, inputs=None, out: str | None = None,
                        log=print) -> dict[str, Any]:
    """Stage 4 once per query-encoder option from the same starting models (stage 2's query encoder
    and generator, stage 3's reranker), each into ``RUN_DIR/models/e2e-<option>``; writes the
    comparison (:func:`options_markdown`) to ``out`` (default ``RUN_DIR/reports/e2e_options.md``).
    Returns ``{"results": {option: StageResult}, "markdown": str, "path": str}``."""
    from re2g.layout import join
    from re2g.train.api import prepare_inputs

    inputs = inputs or prepare_inputs(cfg)
    results = {}
    for option in options:
        results[option] = train_e2e(cfg, query_encoder=option, inputs=inputs, log=log)
    md = options_markdown(results)
    path = out or join(_layout(cfg).reports, "e2e_options.md")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(md)
    return {"results": results, "markdown": md, "path": str(path)}
