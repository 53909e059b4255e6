"""RAG-Sequence (thorough / fast) and RAG-Token decoding on the tiny untrained generator."""

from __future__ import annotations

import math

import pyarrow.dataset as pads
import pytest
import torch

from re2g.config import GenerationConfig
from re2g.models.decoding import (Answer, AnswerCandidate, decode, pool_candidates, rag_sequence_decode,
                                  rag_token_decode, rag_token_generate)
from re2g.types import Candidate

QUERIES = ["Where was Palgo Drainne born?", "Who employed the banker?"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def untrained(tiny_models):
    """The tiny untrained BART: its output barely depends on the input (greedy emits </s> at once)."""
    from re2g.models.generator import Generator

    return Generator.from_pretrained(tiny_models["generator"]).eval()


@pytest.fixture(scope="module")
def generator(tiny_models):
    """The tiny BART with seeded noise on every weight and </s> made less likely: answers of several
    tokens that depend on the passage and the query, so the decoders have something to tell apart."""
    from re2g.models.generator import Generator

    g = Generator.from_pretrained(tiny_models["generator"]).eval()
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in g.model.parameters():
            p.add_(torch.randn(p.shape, generator=rng) * 0.3)
        g.model.final_logits_bias[0, g.model.config.eos_token_id] = -5.0
    return g


@pytest.fixture(scope="module")
def reranker(tiny_models):
    from re2g.models.reranker import CrossEncoder

    return CrossEncoder.from_pretrained(tiny_models["reranker"]).eval()


@pytest.fixture(scope="module")
def passages(tiny_passages):
    rows = pads.dataset(str(tiny_passages), format="parquet").head(9).to_pylist()
    return [dict(r, source="bm25" if i % 2 else "dpr", score=10.0 - i) for i, r in enumerate(rows)]


def test_pool_candidates_dedups_and_records_origins():
    texts, origin = pool_candidates([["a", "b"], ["b", "c"], ["a", "a"]])
    assert texts == ["a", "b", "c"]
    assert origin.tolist() == [[True, False, True], [True, True, False], [False, True, False]]


def test_answer_is_well_formed_with_the_rerankers_top5_in_order(generator, reranker, passages):
    q = QUERIES[0]
    with torch.inference_mode():
        z = reranker.score(q, passages, batch_size=16)                     # (9,)
    order = torch.argsort(z, descending=True, stable=True)[:5].tolist()
    top = [dict(passages[i], rerank_score=float(z[i])) for i in order]
    scores = [p["rerank_score"] for p in top]
    (ans,) = rag_sequence_decode(generator, [q], [top], [scores], num_beams=2, max_new_tokens=MAX_NEW)
    assert isinstance(ans, Answer) and ans.query == q
    assert ans.candidates and all(isinstance(c, AnswerCandidate) for c in ans.candidates)
    assert ans.answer == ans.candidates[0].text
    lps = [c.logprob for c in ans.candidates]
    assert lps == sorted(lps, reverse=True) and all(math.isfinite(x) and x <= 0 for x in lps)
    assert len({c.text for c in ans.candidates}) == len(ans.candidates) <= 5 * 2
    # provenance: the reranker's top 5 as candidate records, in its order, weights softmax(rerank scores)
    assert all(isinstance(p, Candidate) for p in ans.provenance)
    assert [p.rank for p in ans.provenance] == list(range(5))
    assert [p.pid for p in ans.provenance] == [passages[i]["pid"] for i in order]
    rs = [p.rerank_score for p in ans.provenance]
    assert rs == sorted(rs, reverse=True)
    want_w = torch.softmax(torch.tensor(scores), -1).tolist()
    assert [p.weight for p in ans.provenance] == pytest.approx(want_w, abs=1e-6)
    for p, i in zip(ans.provenance, order):
        assert (p.title, p.text, p.wikipedia_id) == (passages[i]["title"], passages[i]["text"],
                                                     passages[i]["wikipedia_id"])
        assert p.source == passages[i]["source"] and p.score == passages[i]["score"]
    assert ans.to_dict()["provenance"][0]["pid"] == ans.provenance[0].pid


def test_thorough_scores_match_the_marginalization_of_forward_logprobs(generator, passages):
    from re2g.models.marginalize import rag_sequence_logprob

    docs, scores = passages[:3], [1.0, -0.5, 0.3]
    (ans,) = rag_sequence_decode(generator, [QUERIES[1]], [docs], [scores], num_beams=2, max_new_tokens=MAX_NEW)
    texts = [c.text for c in ans.candidates]
    enc = generator.tokenize_targets(texts)
    with torch.no_grad():
        lp = generator.forward_logprobs([QUERIES[1]] * len(texts), [docs] * len(texts), enc)
    want = rag_sequence_logprob(lp, enc["attention_mask"], torch.tensor([scores] * len(texts)))
    assert [c.logprob for c in ans.candidates] == pytest.approx(want.tolist(), abs=1e-4)


def test_fast_equals_thorough_for_identical_passages_and_never_exceeds_it(generator, passages):
    same = [dict(passages[0], pid=f"copy{i}") for i in range(3)]
    scores = [[0.7, -1.0, 2.0]]
    kw = dict(num_beams=2, max_new_tokens=MAX_NEW)
    (thorough,) = rag_sequence_decode(generator, [QUERIES[0]], [same], scores, **kw)
    (fast,) = rag_sequence_decode(generator, [QUERIES[0]], [same], scores, fast=True, **kw)
    assert [c.text for c in fast.candidates] == [c.text for c in thorough.candidates]
    assert [c.logprob for c in fast.candidates] == pytest.approx([c.logprob for c in thorough.candidates], abs=1e-5)
    # different passages: fast drops terms of the mixture, so it can only be lower
    docs, scores = passages[:4], [[0.0, 1.0, 0.5, -1.0]]
    (t,) = rag_sequence_decode(generator, [QUERIES[1]], [docs], scores, **kw)
    (f,) = rag_sequence_decode(generator, [QUERIES[1]], [docs], scores, fast=True, **kw)
    th = dict(t.candidates)
    assert set(th) == {c.text for c in f.candidates}
    assert all(c.logprob <= th[c.text] + 1e-5 for c in f.candidates)
    assert any(c.logprob < th[c.text] - 1e-3 for c in f.candidates)  # and here it is, for some


@pytest.mark.parametrize("which", ["untrained", "generator"])
def test_rag_token_with_one_passage_is_plain_greedy_bart(which, request, passages):
    generator = request.getfixturevalue(which)
    docs = [[passages[2]], [passages[3]]]
    got = rag_token_generate(generator, QUERIES, docs, None, num_beams=1, max_new_tokens=MAX_NEW)
    enc = generator.tokenize_sources(generator.build_sources(QUERIES, docs))
    with torch.no_grad():
        out = generator.model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW)  # (B, L)
    pad = generator.model.config.pad_token_id
    for b in range(2):
        want = [t for t in out[b, 1:].tolist()]
        while want and want[-1] == pad:
            want.pop()
        (ids, score), = got[b]
        assert ids == want and ids[-1] == generator.model.config.eos_token_id
        assert 1 <= len(ids) <= MAX_NEW
        assert score <= 0 and math.isfinite(score)


def test_rag_token_mixture_of_identical_passages_is_one_passage(generator, passages):
    one = rag_token_generate(generator, QUERIES[:1], [[passages[1]]], None, num_beams=2, max_new_tokens=MAX_NEW)
    three = rag_token_generate(generator, QUERIES[:1], [[dict(passages[1], pid=str(i)) for i in range(3)]],
                               [[3.0, 0.0, -2.0]], num_beams=2, max_new_tokens=MAX_NEW)
    assert [ids for ids, _ in one[0]] == [ids for ids, _ in three[0]]
    assert [s for _, s in one[0]] == pytest.approx([s for _, s in three[0]], abs=1e-4)
    assert 1 <= len(one[0]) <= 2 and one[0][0][1] >= one[0][-1][1]


def test_rag_token_answers_and_dispatch_with_mixed_passage_counts(generator, passages):
    qs = QUERIES + ["nothing retrieved"]
    pps = [passages[:3], passages[3:5], []]
    scores = [[0.1, 0.2, 0.3], [1.0, 0.0], []]
    ans = rag_token_decode(generator, qs, pps, scores, num_beams=2, max_new_tokens=MAX_NEW)
    assert [a.query for a in ans] == qs
    assert [len(a.provenance) for a in ans] == [3, 2, 0]
    assert ans[2].answer == "" and ans[2].candidates == []
    assert ans[0].answer == ans[0].candidates[0].text
    seq = decode(generator, qs, pps, scores, GenerationConfig(num_beams=2, max_new_tokens=MAX_NEW, decoding="fast"))
    assert [len(a.provenance) for a in seq] == [3, 2, 0] and seq[1].candidates
    tok = decode(generator, qs[:1], pps[:1], scores[:1],
                 GenerationConfig(marginalization="token", max_new_tokens=MAX_NEW))
    assert tok[0].answer == rag_token_decode(generator, qs[:1], pps[:1], scores[:1],
                                             max_new_tokens=MAX_NEW)[0].answer
    with pytest.raises(ValueError, match="scores"):
        decode(generator, qs[:1], pps[:1], [[0.0]])
