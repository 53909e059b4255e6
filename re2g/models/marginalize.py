"""RAG marginalization over retrieved passages: short pure functions with their shapes.

Inputs, for B examples, n_docs passages each and targets of T tokens:

* ``token_logprobs`` (B, n_docs, T): log p(y_t | s_j, y_<t), as :meth:`Generator.forward_logprobs` gives;
* ``target_mask`` (B, T): 1/True on real target tokens, 0/False on padding (the tokenizer's
  ``attention_mask``); padded positions are ignored whatever ``token_logprobs`` holds there;
* ``doc_scores`` (B, n_docs): the passages' scores from whatever the stage uses -- DPR inner
  products, reranker logits, or a sum of log-softmaxes (stage 4's ``combined``). They are turned into
  log p(z_j | x) with ``log_softmax`` *inside* every function here; ``log_softmax`` leaves
  log-probabilities unchanged, so passing log p(z_j | x) works as well;
* ``doc_mask`` (B, n_docs), optional: False for padding passages (a query that got fewer than n_docs);
  those get p(z_j | x) = 0. Every example needs at least one real passage.

The two models (Lewis et al. 2020, eqs. 1-2):

    RAG-Sequence  log p(y|x) = log Σ_j p(z_j|x) Π_t p(y_t | s_j, y_<t)
    RAG-Token     log p(y|x) = Σ_t log Σ_j p(z_j|x) p(y_t | s_j, y_<t)

With one passage both are the plain seq2seq log-likelihood; with a one-token target (classification,
fact verification) they are equal. Gradients flow to ``token_logprobs`` and to ``doc_scores``
(that is how the reranker learns from the target output in stage 4).
"""

from __future__ import annotations

from typing import Literal

import torch

Marginalization = Literal["sequence", "token"]


def doc_log_weights(doc_scores: torch.Tensor, doc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(z_j | x) = log_softmax(doc_scores) over the passages; masked passages get -inf.

    (B, n_docs) -> (B, n_docs)
    """
    if doc_mask is not None:
        doc_scores = doc_scores.masked_fill(~doc_mask.bool(), float("-inf"))
    return torch.log_softmax(doc_scores, dim=-1)


def masked_token_logprobs(token_logprobs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """``token_logprobs`` with padding set to exactly 0. (B, n_docs, T), (B, T) -> (B, n_docs, T)"""
    keep = target_mask.bool()[:, None, :]                                  # (B, 1, T)
    return torch.where(keep, token_logprobs, torch.zeros_like(token_logprobs))


def sequence_logprobs(token_logprobs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """log p(y | s_j) = Σ_t log p(y_t | s_j, y_<t) per passage. (B, n_docs, T) -> (B, n_docs)"""
    return masked_token_logprobs(token_logprobs, target_mask).sum(-1)


def marginalize_sequences(seq_logprobs: torch.Tensor, doc_scores: torch.Tensor,
                          doc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log Σ_j p(z_j|x) p(y|s_j) from per-passage sequence log-probs (-inf allowed: p = 0 there,
    as fast decoding needs). (B, n_docs), (B, n_docs) -> (B,)"""
    return torch.logsumexp(doc_log_weights(doc_scores, doc_mask) + seq_logprobs, dim=-1)


def rag_sequence_logprob(token_logprobs: torch.Tensor, target_mask: torch.Tensor, doc_scores: torch.Tensor,
                         doc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """RAG-Sequence log p(y|x) = log Σ_j p(z_j|x) Π_t p(y_t|s_j, y_<t).

    (B, n_docs, T), (B, T), (B, n_docs) -> (B,)
    """
    return marginalize_sequences(sequence_logprobs(token_logprobs, target_mask), doc_scores, doc_mask)


def marginalize_tokens(token_logprobs: torch.Tensor, doc_scores: torch.Tensor,
                       doc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log Σ_j p(z_j|x) p(y_t|s_j, y_<t) per position (also the next-token distribution of RAG-Token
    decoding when the last axis is the vocabulary). (B, n_docs, T), (B, n_docs) -> (B, T)"""
    lw = doc_log_weights(doc_scores, doc_mask)                             # (B, n_docs)
    return torch.logsumexp(lw[:, :, None] + token_logprobs, dim=1)         # (B, T)


def rag_token_logprob(token_logprobs: torch.Tensor, target_mask: torch.Tensor, doc_scores: torch.Tensor,
                      doc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """RAG-Token log p(y|x) = Σ_t log Σ_j p(z_j|x) p(y_t|s_j, y_<t), padding positions skipped.

    (B, n_docs, T), (B, T), (B, n_docs) -> (B,)
    """
    per_token = marginalize_tokens(token_logprobs, doc_scores, doc_mask)   # (B, T)
    return torch.where(target_mask.bool(), per_token, torch.zeros_like(per_token)).sum(-1)


def marginal_nll(token_logprobs: torch.Tensor, target_mask: torch.Tensor, doc_scores: torch.Tensor, *,
                 kind: Marginalization = "sequence", doc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example negative log-likelihood −log p(y|x) under RAG-Sequence or RAG-Token.

    (B, n_docs, T), (B, T), (B, n_docs) -> (B,)
    """
    if kind == "sequence":
        return -rag_sequence_logprob(token_logprobs, target_mask, doc_scores, doc_mask)
    if kind == "token":
        return -rag_token_logprob(token_logprobs, target_mask, doc_scores, doc_mask)
    raise ValueError(f"marginalization must be 'sequence' or 'token', got {kind!r}")


def marginal_loss(token_logprobs: torch.Tensor, target_mask: torch.Tensor, doc_scores: torch.Tensor, *,
                  kind: Marginalization = "sequence", doc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: the mean over examples of :func:`marginal_nll`. -> scalar"""
    return marginal_nll(token_logprobs, target_mask, doc_scores, kind=kind, doc_mask=doc_mask).mean()
