"""Answer generation from weighted passages: RAG-Sequence and RAG-Token decoding.

Every query comes with its passages (the reranker's top-k, in order) and one score per passage;
the passage weights are p(z_j | x) = softmax(scores) (:func:`re2g.models.marginalize.doc_log_weights`).

* **RAG-Sequence** (:func:`rag_sequence_decode`): beam search on every s_j = passage_j [SEP] query
  (``Generator.generate`` with ``num_return_sequences``), candidates pooled (deduplicated by text), then
  each candidate y scored log p(y|x) = log Σ_j p(z_j|x) p(y|s_j):
  ``thorough`` computes p(y|s_j) for every candidate and every passage (one teacher-forced pass each);
  ``fast`` (the RAG paper's approximation) computes it only for the passages whose beams produced y
  and takes p(y|s_j) = 0 elsewhere -- n_docs times fewer scoring passes.
* **RAG-Token** (:func:`rag_token_generate`): one left-to-right search over the marginal next-token
  distribution log Σ_j p(z_j|x) p(y_t | s_j, y_<t); every hypothesis runs the decoder against all
  n_docs encoder outputs (encoded once). Greedy for ``num_beams=1``, else beam search on summed
  log-probabilities (no length penalty), stopping once no live beam can beat the finished ones. Of the
  model's generation settings only ``forced_bos_token_id`` / ``forced_eos_token_id`` apply (no
  ``no_repeat_ngram_size``, ``min_length``); the decoder reruns the whole prefix at every step (no KV
  cache: answers are short).

The answer is the candidate with the highest p(y|x) under those weights (:class:`Answer`), with
every candidate and its log-probability, and the passages as :class:`ProvenancePassage`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from re2g.models.encoders import eval_mode, title_text
from re2g.models.generator import decode_text
from re2g.models.marginalize import doc_log_weights, marginalize_sequences, marginalize_tokens, sequence_logprobs

# --------------------------------------------------------------------------- results


class Candidate(NamedTuple):
    """One generated answer and its log p(y | x) under the passage-weighted model."""

    text: str
    logprob: float


@dataclass(frozen=True)
class ProvenancePassage:
    """A passage the answer was generated from: where it came from and how much it counted.

    ``source`` is the retriever that found it (``dpr``/``bm25``), ``retrieval_score`` that retriever's
    score, ``rerank_score`` the reranker's z_r (None when not reranked), ``weight`` p(z_j | x).
    """

    pid: str
    title: str
    text: str
    wikipedia_id: str | None
    source: str | None
    retrieval_score: float | None
    rerank_score: float | None
    weight: float

    @classmethod
    def from_passage(cls, passage: Any, weight: float) -> "ProvenancePassage":
        """From a ``Hit`` / ``RerankedHit`` / ``Passage``, a mapping with the same keys, or (title, text)."""
        title, text = title_text(passage)

        def get(name: str) -> Any:
            if isinstance(passage, Mapping):
                return passage.get(name)
            return getattr(passage, name, None)

        def num(v: Any) -> float | None:
            return None if v is None else float(v)

        return cls(pid=str(get("pid") or ""), title=title, text=text, wikipedia_id=get("wikipedia_id"),
                   source=get("source"), retrieval_score=num(get("score") if get("retrieval_score") is None
                                                             else get("retrieval_score")),
                   rerank_score=num(get("rerank_score")), weight=float(weight))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    """The generated answer for one query.

    ``candidates`` best first, as ``(text, logprob)``; ``provenance`` in the order the passages were
    given (the reranker's); ``timings`` seconds per stage when a pipeline made it (for a batch, the
    whole batch's stage times).
    """

    answer: str
    candidates: list[Candidate]
    provenance: list[ProvenancePassage]
    query: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"query": self.query, "answer": self.answer,
                "candidates": [{"text": c.text, "logprob": c.logprob} for c in self.candidates],
                "provenance": [p.to_dict() for p in self.provenance], "timings": dict(self.timings)}


def make_answer(query: str, candidates: Sequence[tuple[str, float]], passages: Sequence[Any],
                doc_log_w: torch.Tensor) -> Answer:
    """Sort candidates best first and attach provenance with weights exp(doc_log_w) (n_docs,)."""
    ranked = sorted((Candidate(t, float(lp)) for t, lp in candidates), key=lambda c: -c.logprob)
    weights = doc_log_w.detach().exp().tolist()
    prov = [ProvenancePassage.from_passage(p, w) for p, w in zip(passages, weights)]
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


def score_candidates(generator, query: str, passages: Sequence[Any], candidates: Sequence[str],
                     origin: torch.Tensor | None = None, *, batch_size: int = 32) -> torch.Tensor:
    """log p(y_c | s_j) for every candidate and passage, (C, n_docs).

    ``origin`` None (thorough): every pair is scored. ``origin`` (C, n_docs) bool (fast): only the
    pairs where it is True; the others are -inf (p = 0). Teacher-forced, ``batch_size`` candidates
    (thorough) or pairs (fast) per forward pass; no gradient.
    """
    n_docs, C = len(passages), len(candidates)
    out = torch.full((C, n_docs), float("-inf"))
    with eval_mode(generator), torch.inference_mode():
        if origin is None:
            for s in range(0, C, batch_size):
                chunk = list(candidates[s:s + batch_size])
                enc = generator.tokenize_targets(chunk)
                lp = generator.forward_logprobs([query] * len(chunk), [list(passages)] * len(chunk), enc)
                out[s:s + len(chunk)] = sequence_logprobs(lp, enc["attention_mask"].to(lp.device)).float().cpu()
        else:
            pairs = origin.nonzero().tolist()                               # [(c, j), ...]
            for s in range(0, len(pairs), batch_size):
                chunk = pairs[s:s + batch_size]
                enc = generator.tokenize_targets([candidates[c] for c, _ in chunk])
                lp = generator.forward_logprobs([query] * len(chunk), [[passages[j]] for _, j in chunk], enc)
                seq = sequence_logprobs(lp, enc["attention_mask"].to(lp.device))[:, 0].float().cpu()  # (P,)
                for (c, j), v in zip(chunk, seq.tolist()):
                    out[c, j] = v
    return out


def _rag_sequence_group(generator, queries, passages_per_query, scores, *, num_beams, num_return_sequences,
                        max_new_tokens, fast, batch_size) -> list[Answer]:
    beams = generator.generate(queries, passages_per_query, num_beams=num_beams,
                               num_return_sequences=num_return_sequences or num_beams,
                               max_new_tokens=max_new_tokens)               # (B, n_docs, r) texts
    answers = []
    for b, q in enumerate(queries):
        texts, origin = pool_candidates(beams[b])
        seq_lp = score_candidates(generator, q, passages_per_query[b], texts, origin if fast else None,
                                  batch_size=batch_size)                    # (C, n_docs)
        cand_lp = marginalize_sequences(seq_lp, scores[b].expand_as(seq_lp))  # (C,)
        answers.append(make_answer(q, list(zip(texts, cand_lp.tolist())), passages_per_query[b],
                                   doc_log_weights(scores[b][None])[0]))
    return answers


def rag_sequence_decode(generator, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]],
                        doc_scores: Any = None, *, num_beams: int = 4, num_return_sequences: int | None = None,
                        max_new_tokens: int | None = None, fast: bool = False,
                        batch_size: int = 32) -> list[Answer]:
    """RAG-Sequence answers: beam search per passage, candidates pooled and rescored (thorough, or
    ``fast``), the best under Σ_j p(z_j|x) p(y|s_j). ``doc_scores``: one score list per query
    (softmax-normalized here; None: uniform). Queries may have different passage counts."""
    return _batched_decode(_rag_sequence_group, generator, list(queries), passages_per_query, doc_scores,
                           num_beams=num_beams, num_return_sequences=num_return_sequences,
                           max_new_tokens=max_new_tokens, fast=fast, batch_size=batch_size)


# --------------------------------------------------------------------------- RAG-Token


def _special_ids(model) -> tuple[int, int, int | None, int | None]:
    cfg, gen = model.config, getattr(model, "generation_config", None)

    def pick(name):
        v = getattr(gen, name, None) if gen is not None else None
        return v if v is not None else getattr(cfg, name, None)

    start, eos = pick("decoder_start_token_id"), pick("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    return start, eos, pick("forced_bos_token_id"), pick("forced_eos_token_id")


def rag_token_generate(generator, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]],
                       doc_scores: Any = None, *, num_beams: int = 1,
                       max_new_tokens: int | None = None) -> list[list[tuple[list[int], float]]]:
    """RAG-Token search over Σ_j p(z_j|x) p(y_t|s_j, y_<t): per query up to ``num_beams`` hypotheses
    ``(token ids without the decoder start token, log p(y|x))``, best first. Every query needs the
    same passage count here (see :func:`rag_token_decode` for mixed counts)."""
    model = generator.model
    start, eos, forced_bos, forced_eos = _special_ids(model)
    max_new = int(max_new_tokens or generator.target_max_length)
    K = int(num_beams)
    B = len(queries)
    enc = generator.tokenize_sources(generator.build_sources(queries, passages_per_query))
    n_docs = len(passages_per_query[0])
    dev = generator.device
    src_ids, src_mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)          # (B*n_docs, S)
    lw = doc_log_weights(torch.stack(_as_scores(doc_scores, passages_per_query)).to(dev))  # (B, n_docs)
    alive: list[list[tuple[list[int], float]]] = [[([start], 0.0)] for _ in range(B)]
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(B)]
    done = [False] * B
    with eval_mode(model), torch.inference_mode():
        memory = model.get_encoder()(input_ids=src_ids, attention_mask=src_mask).last_hidden_state  # (B*n_docs, S, d)
        for step in range(max_new):
            rows = [(b, toks, s) for b in range(B) if not done[b] for toks, s in alive[b]]
            if not rows:
                break
            q_idx = torch.tensor([b for b, _, _ in rows], device=dev)                  # (H,)
            src_rows = (q_idx[:, None] * n_docs + torch.arange(n_docs, device=dev)).reshape(-1)  # (H*n_docs,)
            dec = torch.tensor([toks for _, toks, _ in rows], device=dev)              # (H, step+1)
            logits = model(encoder_outputs=(memory[src_rows],), attention_mask=src_mask[src_rows],
                           decoder_input_ids=dec.repeat_interleave(n_docs, 0), use_cache=False).logits
            lp = torch.log_softmax(logits[:, -1].float(), -1).view(len(rows), n_docs, -1)  # (H, n_docs, V)
            marg = marginalize_tokens(lp, lw[q_idx])                                    # (H, V)
            forced = forced_bos if step == 0 and forced_bos is not None else (
                forced_eos if step == max_new - 1 and forced_eos is not None else None)
            if forced is not None:
                only = torch.full_like(marg, float("-inf"))
                only[:, forced] = marg[:, forced]
                marg = only
            total = marg + torch.tensor([s for _, _, s in rows], device=dev)[:, None]  # (H, V)
            h0 = 0
            for b in range(B):
                if done[b]:
                    continue
                hb = len(alive[b])
                cand = total[h0:h0 + hb].reshape(-1)
                top = cand.topk(min(2 * K, cand.numel()))
                V = total.shape[1]
                new_alive = []
                for rank, (s, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                    if s == float("-inf"):
                        break
                    h, v = divmod(flat, V)
                    toks = rows[h0 + h][1] + [v]
                    if v == eos:
                        if rank < K:  # as HF: an eos hypothesis counts only within the top K
                            finished[b].append((toks, s))
                    else:
                        new_alive.append((toks, s))
                    if len(new_alive) == K:
                        break
                alive[b] = new_alive
                h0 += hb
                finished[b].sort(key=lambda x: -x[1])
                # no length penalty: scores only fall, so no live beam can beat K finished ones
                best_alive = max((s for _, s in new_alive), default=float("-inf"))
                if not new_alive or (len(finished[b]) >= K and best_alive <= finished[b][K - 1][1]):
                    done[b] = True
    results = []
    for b in range(B):
        hyps = sorted(finished[b] + ([] if done[b] else alive[b]), key=lambda x: -x[1])[:K]
        results.append([(toks[1:], s) for toks, s in hyps])
    return results


def _rag_token_group(generator, queries, passages_per_query, scores, *, num_beams, max_new_tokens) -> list[Answer]:
    hyps = rag_token_generate(generator, queries, passages_per_query, scores, num_beams=num_beams,
                              max_new_tokens=max_new_tokens)
    answers = []
    for b, q in enumerate(queries):
        seen: dict[str, float] = {}
        for ids, s in hyps[b]:
            text = decode_text(generator.tokenizer, ids)      # whole characters only
            seen.setdefault(text, s)  # best first: keep the better of two token paths to one text
        answers.append(make_answer(q, list(seen.items()), passages_per_query[b], doc_log_weights(scores[b][None])[0]))
    return answers


def rag_token_decode(generator, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]],
                     doc_scores: Any = None, *, num_beams: int = 1, max_new_tokens: int | None = None) -> list[Answer]:
    """RAG-Token answers (greedy for ``num_beams=1``); candidates are the final beams with their
    RAG-Token log p(y|x). Queries may have different passage counts."""
    return _batched_decode(_rag_token_group, generator, list(queries), passages_per_query, doc_scores,
                           num_beams=num_beams, max_new_tokens=max_new_tokens)


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
