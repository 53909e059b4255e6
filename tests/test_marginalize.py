"""RAG-Sequence / RAG-Token marginalization against a direct float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from re2g.models.marginalize import (doc_log_weights, marginal_loss, marginal_nll, marginalize_sequences,
                                     rag_sequence_logprob, rag_token_logprob)


def _random_case(B=3, n_docs=4, T=5, vocab=7, seed=0):
    """Token log-probs of real distributions, a ragged target mask, random doc scores (float64)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, n_docs, T, vocab, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (B, T), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, y[:, None, :, None].expand(B, n_docs, T, 1)).squeeze(-1)
    lengths = torch.tensor([T, max(1, T - 2), 1][:B] + [T] * max(0, B - 3))
    mask = torch.arange(T)[None, :] < lengths[:, None]                     # (B, T)
    lp = lp.masked_fill(~mask[:, None, :], 0.0)                            # as forward_logprobs gives
    scores = torch.randn(B, n_docs, generator=g, dtype=torch.float64) * 3
    return lp, mask, scores


def _direct(lp, mask, scores):
    """Plain loops over examples, passages and positions with math.exp/log (float64)."""
    seq, tok = [], []
    for b in range(lp.shape[0]):
        z = [math.exp(s) for s in scores[b].tolist()]
        w = [v / sum(z) for v in z]
        n = int(mask[b].sum())
        p_seq = sum(w[j] * math.exp(sum(lp[b, j, t].item() for t in range(n))) for j in range(len(w)))
        seq.append(math.log(p_seq))
        tok.append(sum(math.log(sum(w[j] * math.exp(lp[b, j, t].item()) for j in range(len(w))))
                       for t in range(n)))
    return torch.tensor(seq, dtype=torch.float64), torch.tensor(tok, dtype=torch.float64)


def test_both_marginalizations_match_a_direct_computation():
    lp, mask, scores = _random_case()
    want_seq, want_tok = _direct(lp, mask, scores)
    assert torch.allclose(rag_sequence_logprob(lp, mask, scores), want_seq, atol=1e-10)
    assert torch.allclose(rag_token_logprob(lp, mask, scores), want_tok, atol=1e-10)
    assert torch.allclose(marginal_nll(lp, mask, scores, kind="sequence"), -want_seq, atol=1e-10)
    assert torch.allclose(marginal_nll(lp, mask, scores, kind="token"), -want_tok, atol=1e-10)
    assert torch.isclose(marginal_loss(lp, mask, scores, kind="token"), -want_tok.mean(), atol=1e-10)
    assert not torch.allclose(want_seq, want_tok)  # the two models differ on multi-token targets


def test_padding_is_masked_whatever_it_holds():
    lp, mask, scores = _random_case(seed=1)
    garbage = lp.masked_fill(~mask[:, None, :], -123.0)
    for kind in ("sequence", "token"):
        assert torch.allclose(marginal_nll(garbage, mask, scores, kind=kind),
                              marginal_nll(lp, mask, scores, kind=kind), atol=1e-12)


def test_log_probabilities_as_doc_scores_give_the_same_result():
    lp, mask, scores = _random_case(seed=2)
    logp = torch.log_softmax(scores, -1)
    assert torch.allclose(doc_log_weights(logp), logp, atol=1e-12)
    for kind in ("sequence", "token"):
        assert torch.allclose(marginal_nll(lp, mask, logp, kind=kind), marginal_nll(lp, mask, scores, kind=kind))
    # stage 4 "combined": a sum of two log-softmaxes is renormalized inside
    other = torch.randn_like(scores)
    combined = torch.log_softmax(scores, -1) + torch.log_softmax(other, -1)
    assert torch.allclose(doc_log_weights(combined), torch.log_softmax(scores + other, -1), atol=1e-12)


def test_one_passage_is_plain_seq2seq_nll():
    lp, mask, scores = _random_case(n_docs=1, seed=3)
    plain = -(lp[:, 0, :] * mask).sum(-1)                                  # the seq2seq NLL (B,)
    for kind in ("sequence", "token"):
        assert torch.allclose(marginal_nll(lp, mask, scores, kind=kind), plain, atol=1e-12)


def test_one_token_targets_make_both_equal():
    lp, mask, scores = _random_case(T=1, seed=4)
    assert torch.allclose(rag_sequence_logprob(lp, mask, scores), rag_token_logprob(lp, mask, scores), atol=1e-12)


def test_padding_passages_get_zero_weight():
    lp, mask, scores = _random_case(seed=5)
    doc_mask = torch.tensor([[True, True, False, False], [True, False, False, False], [True] * 4])
    for kind in ("sequence", "token"):
        got = marginal_nll(lp, mask, scores, kind=kind, doc_mask=doc_mask)
        for b in range(3):
            keep = doc_mask[b]
            want = marginal_nll(lp[b:b + 1, keep], mask[b:b + 1], scores[b:b + 1, keep], kind=kind)
            assert torch.allclose(got[b:b + 1], want, atol=1e-12)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_padded_passages_give_no_nan_and_no_gradient(kind):
    """Stage 4's padded top (a query with fewer candidates than k): -inf document log-weights on the
    padding (``doc_log_weights`` of a masked row, as ``combined`` builds them) and any token log-probs
    there; the loss and every gradient stay finite, and nothing flows into the padding."""
    lp, mask, scores = _random_case(seed=7)
    doc_mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True] * 4])
    scores = doc_log_weights(scores, doc_mask).detach().requires_grad_(True)  # -inf on the padding
    lp = lp.masked_fill(~doc_mask[:, :, None], -1e9).requires_grad_(True)
    loss = marginal_loss(lp, mask, scores, kind=kind, doc_mask=doc_mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all() and torch.isfinite(lp.grad).all()
    assert (scores.grad[~doc_mask] == 0).all() and (lp.grad[~doc_mask] == 0).all()


def test_fast_decoding_zero_probabilities():
    seq = torch.tensor([[-1.0, float("-inf"), -2.0]], dtype=torch.float64)
    scores = torch.tensor([[0.0, 5.0, 1.0]], dtype=torch.float64)
    w = torch.softmax(scores, -1)[0]
    want = math.log(w[0] * math.exp(-1.0) + w[2] * math.exp(-2.0))
    assert marginalize_sequences(seq, scores).item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_gradients_reach_the_doc_scores_and_token_logprobs(kind):
    lp, mask, scores = _random_case(seed=6)
    scores = scores.clone().requires_grad_(True)
    lp = lp.clone().requires_grad_(True)
    marginal_loss(lp, mask, scores, kind=kind).backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    assert torch.allclose(scores.grad.sum(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12)  # softmax
    assert (lp.grad[~mask[:, None, :].expand_as(lp)] == 0).all()            # nothing flows into padding
    assert lp.grad[mask[:, None, :].expand_as(lp)].abs().sum() > 0
    # matches the float64 finite-difference of the direct computation on one score
    eps = 1e-6
    bumped = scores.detach().clone()
    bumped[0, 1] += eps
    f = (lambda s: -_direct(lp.detach(), mask, s)[0 if kind == "sequence" else 1].mean())
    fd = (f(bumped) - f(scores.detach())) / eps
    assert scores.grad[0, 1].item() == pytest.approx(fd.item(), abs=1e-5)


def test_unknown_kind_is_an_error():
    lp, mask, scores = _random_case()
    with pytest.raises(ValueError, match="sequence"):
        marginal_nll(lp, mask, scores, kind="tokens")
