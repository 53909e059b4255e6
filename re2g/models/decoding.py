"""Answer generation from weighted passages: RAG-Sequence and RAG-Token decoding.

Every query comes with its passages (the reranker's top-k, in order) and one score per passage;
the passage weights are p(z_j | x) = softmax(scores) (:func:`re2g.models.marginalize.doc_log_weights`).

Both generator kinds decode here, through the few methods each class has (no branches on the kind):
``prepare_sources`` (seq2seq: every s_j through the encoder once; causal LM: every prompt tokenized once,
left-padded), ``beam_search`` (the model's own ``generate``), ``score_targets`` (teacher-forced
log p(y|s_j) of (row, target) pairs) and ``token_steps`` (a next-token stepper over a KV cache):
:class:`re2g.models.generator.Generator` and :class:`re2g.models.causal.CausalGenerator`.

* **RAG-Sequence** (:func:`rag_sequence_decode`): beam search on every s_j (passage_j [SEP] query, or the
  causal LM's prompt; the model's ``generate`` with ``num_return_sequences``), candidates pooled
  (deduplicated by text), then each candidate y scored log p(y|x) = log Σ_j p(z_j|x) p(y|s_j):
  ``thorough`` computes p(y|s_j) for every candidate and every passage (teacher-forced);
  ``fast`` (the RAG paper's approximation) computes it only for the passages whose beams produced y
  and takes p(y|s_j) = 0 elsewhere -- n_docs times fewer scored pairs.
  Every source is prepared once (:func:`encode_sources`) for all queries of a batch: a seq2seq beam
  search and rescoring (the decoder alone, :func:`score_targets`) both read the encoder states; a
  causal LM's rescoring runs the prompts once and each pair's target over its prompt's KV cache.
* **RAG-Token** (:func:`rag_token_generate`): one left-to-right search over the marginal next-token
  distribution log Σ_j p(z_j|x) p(y_t | s_j, y_<t); every hypothesis is continued under all n_docs
  sources, each (hypothesis, passage) row with its own KV cache (seq2seq: decoder self-attention, the
  cross-attention keys/values projected once; causal LM: the prompt run once), reordered with the beams,
  so a step feeds one token per row. Greedy for ``num_beams=1``, else beam search on summed
  log-probabilities (no length penalty), stopping once no live beam can beat the finished ones. Of the
  model's generation settings only ``forced_bos_token_id`` / ``forced_eos_token_id`` apply (no
  ``no_repeat_ngram_size``, ``min_length``).

``use_cache=False`` (RAG-Sequence and RAG-Token) reruns whole prefixes instead: the reference the cached
paths are tested against (tests/test_causal.py: same tokens, log-probs within 1e-5).

The answer is the candidate with the highest p(y|x) under those weights (:class:`Answer`), with
every candidate and its log-probability, and the passages as :class:`re2g.types.Candidate` records
with their weights. Passages may be given as candidates, ``Passage`` objects, mappings with the same
field names, or ``(title, text)`` pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from re2g.models.encoders import eval_mode
from re2g.models.generator import EncodedSources, decode_text  # noqa: F401  (EncodedSources: re-exported)
from re2g.models.marginalize import doc_log_weights, marginalize_sequences, marginalize_tokens
from re2g.types import Candidate

# --------------------------------------------------------------------------- results


class AnswerCandidate(NamedTuple):
    """One generated answer and its log p(y | x) under the passage-weighted model."""

    text: str
    logprob: float


@dataclass
class Answer:
    """The generated answer for one query.

    ``candidates`` best first, as ``(text, logprob)``; ``provenance`` the passages as
    :class:`re2g.types.Candidate` records in the order they were given (the reranker's), ``weight`` set
    to p(z_j | x); ``timings`` seconds per stage when a pipeline made it (for a batch, the whole
    batch's stage times).
    """

    answer: str
    candidates: list[AnswerCandidate]
    provenance: list[Candidate]
    query: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"query": self.query, "answer": self.answer,
                "candidates": [{"text": c.text, "logprob": c.logprob} for c in self.candidates],
                "provenance": [p.to_dict() for p in self.provenance], "timings": dict(self.timings)}


def make_answer(query: str, candidates: Sequence[tuple[str, float]], passages: Sequence[Any],
                doc_log_w: torch.Tensor) -> Answer:
    """Sort candidates best first and attach provenance: the passages as :class:`re2g.types.Candidate`
    records (:meth:`Candidate.of`) with weights exp(doc_log_w) (n_docs,)."""
    ranked = sorted((AnswerCandidate(t, float(lp)) for t, lp in candidates), key=lambda c: -c.logprob)
    weights = doc_log_w.detach().exp().tolist()
    prov = [Candidate.of(p, j).with_(weight=float(w)) for j, (p, w) in enumerate(zip(passages, weights))]
    return Answer(answer=ranked[0].text if ranked else "", candidates=ranked, provenance=prov, query=query)


# --------------------------------------------------------------------------- helpers


def pool_candidates(per_doc: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Pool the beams of all passages of one query: unique texts in first-seen order (passage by
    passage, best beam first) and ``origin`` (C, n_docs), True where passage j's beams produced text c."""
    texts: list[str] = []
    index: dict[str, int] = {}
    for beams in per_doc:
        for t in beams:
            if t not in index:
                index[t] = len(texts)
                texts.append(t)
    origin = torch.zeros(len(texts), len(per_doc), dtype=torch.bool)
    for j, beams in enumerate(per_doc):
        for t in beams:
            origin[index[t], j] = True
    return texts, origin


def _as_scores(doc_scores: Any, passages_per_query: Sequence[Sequence[Any]]) -> list[torch.Tensor]:
    """One float tensor (n_docs_b,) per query; None: all zeros (uniform weights)."""
    if doc_scores is None:
        return [torch.zeros(len(ps)) for ps in passages_per_query]
    out = [torch.as_tensor(s, dtype=torch.float32).detach().cpu().reshape(-1) for s in doc_scores]
    if len(out) != len(passages_per_query):
        raise ValueError(f"{len(out)} score lists for {len(passages_per_query)} queries")
    for b, (s, ps) in enumerate(zip(out, passages_per_query)):
        if s.numel() != len(ps):
            raise ValueError(f"query {b}: {s.numel()} scores for {len(ps)} passages")
    return out


def _groups_by_n_docs(passages_per_query: Sequence[Sequence[Any]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for b, ps in enumerate(passages_per_query):
        groups.setdefault(len(ps), []).append(b)
    return groups


def _batched_decode(fn, generator, queries, passages_per_query, doc_scores, **kwargs) -> list[Answer]:
    """Run ``fn`` on the queries grouped by their passage count (the generator batches equal counts);
    a query without passages gets an empty answer (no candidates, no provenance)."""
    scores = _as_scores(doc_scores, passages_per_query)
    out: list[Answer | None] = [None] * len(queries)
    for n_docs, idx in _groups_by_n_docs(passages_per_query).items():
        if n_docs == 0:
            for b in idx:
                out[b] = Answer(answer="", candidates=[], provenance=[], query=queries[b])
            continue
        answers = fn(generator, [queries[b] for b in idx], [list(passages_per_query[b]) for b in idx],
                     torch.stack([scores[b] for b in idx]), **kwargs)
        for b, a in zip(idx, answers):
            out[b] = a
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- RAG-Sequence


def encode_sources(generator, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]]):
    """Every source of a group of queries prepared once (``generator.prepare_sources``): for a seq2seq
    generator the encoder's states (:class:`EncodedSources`), for a causal LM the tokenized prompts
    (:class:`re2g.models.causal.CausalPrompts`). Every query needs the same passage count."""
    return generator.prepare_sources(queries, passages_per_query)


def beam_search(generator, src, *, num_beams: int, num_return_sequences: int = 1,
                max_new_tokens: int | None = None, use_cache: bool = True) -> list[list[str]]:
    """Beam search on every prepared source (``generator.beam_search``: the model's own ``generate``
    over the encoder states or the prompts, with its KV cache unless ``use_cache=False``): texts
    (N, num_return_sequences), best beam first."""
    return generator.beam_search(src, num_beams=num_beams, num_return_sequences=num_return_sequences,
                                 max_new_tokens=max_new_tokens, use_cache=use_cache)


def score_targets(generator, src, rows: Sequence[int], targets: Sequence[str], *,
                  batch_size: int = 128, use_cache: bool = True) -> torch.Tensor:
    """log p(targets[p] | s_{rows[p]}) for every pair p, (P,), teacher-forced over the prepared sources
    (``generator.score_targets``: the same numbers as ``forward_logprobs`` summed over the target),
    ``batch_size`` pairs per pass; ``use_cache``: a causal LM scores targets over its prompts' KV cache
    (False: prompt + target in one pass)."""
    return generator.score_targets(src, rows, targets, batch_size=batch_size, use_cache=use_cache)


def _pairs(texts: Sequence[str], origin: torch.Tensor | None, n_docs: int) -> list[tuple[int, int]]:
    """(candidate, passage) pairs to score: all (thorough), or where ``origin`` (C, n_docs) is True (fast)."""
    if origin is None:
        return [(c, j) for c in range(len(texts)) for j in range(n_docs)]
    return [tuple(p) for p in origin.nonzero().tolist()]


def score_candidates(generator, query: str, passages: Sequence[Any], candidates: Sequence[str],
                     origin: torch.Tensor | None = None, *, batch_size: int = 128,
                     src: EncodedSources | None = None) -> torch.Tensor:
    """log p(y_c | s_j) for every candidate and passage, (C, n_docs).

    ``origin`` None (thorough): every pair is scored. ``origin`` (C, n_docs) bool (fast): only the
    pairs where it is True; the others are -inf (p = 0). Teacher-forced over the sources' encoder
    states (``src``, else encoded here), ``batch_size`` pairs per decoder pass; no gradient.
    """
    n_docs, C = len(passages), len(candidates)
    if src is None:
        src = encode_sources(generator, [query], [list(passages)])
    pairs = _pairs(candidates, origin, n_docs)
    out = torch.full((C, n_docs), float("-inf"))
    if pairs:
        lp = score_targets(generator, src, [j for _, j in pairs], [candidates[c] for c, _ in pairs],
                           batch_size=batch_size)
        c_idx, j_idx = torch.tensor(pairs).T
        out[c_idx, j_idx] = lp
    return out


def _rag_sequence_group(generator, queries, passages_per_query, scores, *, num_beams, num_return_sequences,
                        max_new_tokens, fast, batch_size, use_cache=True) -> list[Answer]:
    """Every query of the group at once: one encoder pass over all B * n_docs sources, one beam search,
    one rescoring of every (query, candidate, passage) pair -- no per-query model call."""
    src = encode_sources(generator, queries, passages_per_query)
    n_docs = src.n_docs
    beams = beam_search(generator, src, num_beams=num_beams, num_return_sequences=num_return_sequences or num_beams,
                        max_new_tokens=max_new_tokens, use_cache=use_cache)  # (B * n_docs, r) texts
    pooled = [pool_candidates(beams[b * n_docs:(b + 1) * n_docs]) for b in range(len(queries))]
    rows: list[int] = []
    targets: list[str] = []
    spans: list[tuple[int, list[tuple[int, int]]]] = []
    for b, (texts, origin) in enumerate(pooled):
        pairs = _pairs(texts, origin if fast else None, n_docs)
        spans.append((len(rows), pairs))
        rows += [b * n_docs + j for _, j in pairs]
        targets += [texts[c] for c, _ in pairs]
    lp = score_targets(generator, src, rows, targets, batch_size=batch_size, use_cache=use_cache)  # (P,)
    answers = []
    for b, q in enumerate(queries):
        texts, _ = pooled[b]
        start, pairs = spans[b]
        seq_lp = torch.full((len(texts), n_docs), float("-inf"))            # (C, n_docs)
        if pairs:
            c_idx, j_idx = torch.tensor(pairs).T
            seq_lp[c_idx, j_idx] = lp[start:start + len(pairs)]
        cand_lp = marginalize_sequences(seq_lp, scores[b].expand_as(seq_lp))  # (C,)
        answers.append(make_answer(q, list(zip(texts, cand_lp.tolist())), passages_per_query[b],
                                   doc_log_weights(scores[b][None])[0]))
    return answers


def rag_sequence_decode(generator, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]],
                        doc_scores: Any = None, *, num_beams: int = 4, num_return_sequences: int | None = None,
                        max_new_tokens: int | None = None, fast: bool = False,
                        batch_size: int = 128, use_cache: bool = True) -> list[Answer]:
    """RAG-Sequence answers: beam search per passage, candidates pooled and rescored (thorough, or
    ``fast``), the best under Σ_j p(z_j|x) p(y|s_j). ``doc_scores``: one score list per query
    (softmax-normalized here; None: uniform). Queries may have different passage counts. Each
    passage count's queries are computed together (:func:`_rag_sequence_group`); ``batch_size``:
    (candidate, passage) pairs per rescoring pass; ``use_cache=False``: beam search without the KV cache
    and a causal LM's rescoring without its prompts' cache (the reference the cached path is tested against)."""
    return _batched_decode(_rag_sequence_group, generator, list(queries), passages_per_query, doc_scores,
                           num_beams=num_beams, num_return_sequences=num_return_sequences,
                           max_new_tokens=max_new_tokens, fast=fast, batch_size=batch_size, use_cache=use_cache)


# --------------------------------------------------------------------------- RAG-Token


def _forced_ids(model) -> tuple[int | None, int | None]:
    """``forced_bos_token_id`` / ``forced_eos_token_id`` of the model's generation settings (config fallback)."""
    cfg, gen = model.config, getattr(model, "generation_config", None)

    def pick(name):
        v = getattr(gen, name, None) if gen is not None else None
        return v if v is not None else getattr(cfg, name, None)

    return pick("forced_bos_token_id"), pick("forced_eos_token_id")


def rag_token_generate(generator, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]],
                       doc_scores: Any = None, *, num_beams: int = 1, max_new_tokens: int | None = None,
                       use_cache: bool = True) -> list[list[tuple[list[int], float]]]:
    """RAG-Token search over Σ_j p(z_j|x) p(y_t|s_j, y_<t): per query up to ``num_beams`` hypotheses
    ``(generated token ids, log p(y|x))``, best first (a seq2seq generator's decoder start token and a
    causal LM's prompt are not part of the ids). Every query needs the same passage count here (see
    :func:`rag_token_decode` for mixed counts).

    The model runs through ``generator.token_steps``: every (hypothesis, passage) row keeps its own KV
    cache, reordered with the beams, so each step feeds one new token per row (``use_cache=False``: the
    whole prefix is rerun each step, the reference for tests)."""
    model = generator.model
    eos = generator.eos_ids
    forced_bos, forced_eos = _forced_ids(model)
    max_new = int(max_new_tokens or generator.target_max_length)
    K = int(num_beams)
    B = len(queries)
    src = generator.prepare_sources(queries, passages_per_query)
    n_docs = len(passages_per_query[0])
    dev = generator.device
    lw = doc_log_weights(torch.stack(_as_scores(doc_scores, passages_per_query)).to(dev))  # (B, n_docs)
    alive: list[list[tuple[list[int], float]]] = [[([], 0.0)] for _ in range(B)]
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(B)]
    done = [False] * B
    docs = torch.arange(n_docs, device=dev)
    with eval_mode(model), torch.inference_mode():
        steps = generator.token_steps(src, use_cache=use_cache)
        lp_rows = steps.first()                                                # (B*n_docs, V): one row per (query, passage)
        rows = [(b, [], 0.0) for b in range(B)]                                # the hypotheses lp_rows belongs to
        for step in range(max_new):
            q_idx = torch.tensor([b for b, _, _ in rows], device=dev)          # (H,)
            lp = lp_rows.view(len(rows), n_docs, -1)                           # (H, n_docs, V)
            marg = marginalize_tokens(lp, lw[q_idx])                           # (H, V)
            forced = forced_bos if step == 0 and forced_bos is not None else (
                forced_eos if step == max_new - 1 and forced_eos is not None else None)
            if forced is not None:
                only = torch.full_like(marg, float("-inf"))
                only[:, forced] = marg[:, forced]
                marg = only
            total = marg + torch.tensor([s for _, _, s in rows], device=dev, dtype=marg.dtype)[:, None]  # (H, V)
            V = total.shape[1]
            nxt: list[tuple[int, list[int], float, int]] = []                   # (b, tokens, score, parent h)
            h0 = 0
            for b in range(B):
                if done[b]:
                    continue
                hb = len(alive[b])
                cand = total[h0:h0 + hb].reshape(-1)
                top = cand.topk(min(2 * K, cand.numel()))
                new_alive = []
                for rank, (s, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                    if s == float("-inf"):
                        break
                    h, v = divmod(flat, V)
                    toks = rows[h0 + h][1] + [v]
                    if v in eos:
                        if rank < K:  # as HF: an eos hypothesis counts only within the top K
                            finished[b].append((toks, s))
                    else:
                        new_alive.append((toks, s))
                        nxt.append((b, toks, s, h0 + h))
                    if len(new_alive) == K:
                        break
                alive[b] = new_alive
                h0 += hb
                finished[b].sort(key=lambda x: -x[1])
                # no length penalty: scores only fall, so no live beam can beat K finished ones
                best_alive = max((s for _, s in new_alive), default=float("-inf"))
                if not new_alive or (len(finished[b]) >= K and best_alive <= finished[b][K - 1][1]):
                    done[b] = True
            rows = [(b, toks, s) for b, toks, s, _ in nxt if not done[b]]
            if not rows or step == max_new - 1:
                break
            parent = torch.tensor([h for b, _, _, h in nxt if not done[b]], device=dev)       # (H',)
            tokens = torch.tensor([t[-1] for _, t, _ in rows], device=dev)                     # (H',)
            lp_rows = steps.advance((parent[:, None] * n_docs + docs).reshape(-1),
                                    tokens.repeat_interleave(n_docs))                           # (H'*n_docs, V)
    results = []
    for b in range(B):
        hyps = sorted(finished[b] + ([] if done[b] else alive[b]), key=lambda x: -x[1])[:K]
        results.append([(toks, s) for toks, s in hyps])
    return results


def _rag_token_group(generator, queries, passages_per_query, scores, *, num_beams, max_new_tokens,
                     use_cache=True) -> list[Answer]:
    hyps = rag_token_generate(generator, queries, passages_per_query, scores, num_beams=num_beams,
                              max_new_tokens=max_new_tokens, use_cache=use_cache)
    answers = []
    for b, q in enumerate(queries):
        seen: dict[str, float] = {}
        for ids, s in hyps[b]:
            text = decode_text(generator.tokenizer, ids)      # whole characters only
            seen.setdefault(text, s)  # best first: keep the better of two token paths to one text
        answers.append(make_answer(q, list(seen.items()), passages_per_query[b], doc_log_weights(scores[b][None])[0]))
    return answers


def rag_token_decode(generator, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]],
                     doc_scores: Any = None, *, num_beams: int = 1, max_new_tokens: int | None = None,
                     use_cache: bool = True) -> list[Answer]:
    """RAG-Token answers (greedy for ``num_beams=1``); candidates are the final beams with their
    RAG-Token log p(y|x). Queries may have different passage counts."""
    return _batched_decode(_rag_token_group, generator, list(queries), passages_per_query, doc_scores,
                           num_beams=num_beams, max_new_tokens=max_new_tokens, use_cache=use_cache)


# --------------------------------------------------------------------------- dispatch


def decode(generator, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]], doc_scores: Any,
           cfg=None) -> list[Answer]:
    """Answers as a :class:`re2g.config.GenerationConfig` says (None: its defaults): RAG-Sequence
    (thorough or fast) or RAG-Token; weights softmax(``doc_scores``)."""
    if cfg is None:
        from re2g.config import GenerationConfig

        cfg = GenerationConfig()
    if cfg.marginalization == "token":
        return rag_token_decode(generator, queries, passages_per_query, doc_scores,
                                num_beams=cfg.token_num_beams, max_new_tokens=cfg.max_new_tokens)
    return rag_sequence_decode(generator, queries, passages_per_query, doc_scores, num_beams=cfg.num_beams,
                               num_return_sequences=cfg.num_return_sequences, max_new_tokens=cfg.max_new_tokens,
                               fast=cfg.decoding == "fast")
