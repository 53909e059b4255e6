"""Batching pays without changing answers: RAG-Sequence decoding of a batch equals decoding each query
alone (the sources encoded once, one beam search, one rescoring pass for the batch), the beam search
over cached encoder states equals the generator's own ``generate``, and the ingress's coalescing
(``serve.app.Coalescer``) sends concurrent requests' stage calls as one call per batch. Tiny untrained
models, made-up passages; no Ray, no Serve app (tests/test_serve.py checks batched == unbatched through Serve)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from re2g.models import decoding

QUERIES = ["who founded the company", "where was the author born", "what river flows through the city"]


@pytest.fixture(scope="module")
def generator(tiny_models):
    from re2g.models.generator import Generator

    torch.manual_seed(0)
    g = Generator.from_pretrained(tiny_models["generator"]).eval()
    # a little trained-looking: random weights of a larger scale give varied, multi-token beams
    with torch.no_grad():
        for p in g.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return g


@pytest.fixture(scope="module")
def passages():
    words = "the company was founded in 1867 by an author born near the river that flows through the city".split()
    return [{"pid": f"p{i}", "title": f"Page {i}", "text": " ".join(words[i % 7:] + words[:i % 7] * (1 + i % 3))}
            for i in range(12)]


def _same(a, b, tol=1e-4):
    assert a.answer == b.answer
    assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
    assert [c.logprob for c in a.candidates] == pytest.approx([c.logprob for c in b.candidates], abs=tol)
    assert [p.pid for p in a.provenance] == [p.pid for p in b.provenance]


@pytest.mark.parametrize("fast", [False, True])
def test_rag_sequence_batch_equals_one_by_one(generator, passages, fast):
    docs = [passages[0:3], passages[3:6], passages[6:9]]                    # 3 passages each
    scores = [[1.0, 0.2, -0.5], [0.0, 0.0, 0.0], [-1.0, 2.0, 0.5]]
    kw = dict(num_beams=2, max_new_tokens=4, fast=fast)
    together = decoding.rag_sequence_decode(generator, QUERIES, docs, scores, batch_size=7, **kw)
    for q, d, s, got in zip(QUERIES, docs, scores, together):
        (alone,) = decoding.rag_sequence_decode(generator, [q], [d], [s], **kw)
        _same(alone, got)
        assert got.query == q


def test_mixed_passage_counts_in_one_batch(generator, passages):
    docs = [passages[0:2], passages[2:5], []]
    got = decoding.rag_sequence_decode(generator, QUERIES, docs, None, num_beams=2, max_new_tokens=4)
    assert [len(a.provenance) for a in got] == [2, 3, 0] and got[2].answer == ""
    (one,) = decoding.rag_sequence_decode(generator, QUERIES[1:2], docs[1:2], None, num_beams=2, max_new_tokens=4)
    _same(one, got[1])


def test_beam_search_over_cached_states_equals_generate(generator, passages):
    """The encoder runs once (encode_sources) and the cache's cross-attention part is not reordered:
    the beams are those of the generator's own generate (which encodes and reorders everything)."""
    docs = [passages[0:2], passages[2:4]]
    src = decoding.encode_sources(generator, QUERIES[:2], docs)
    got = decoding.beam_search(generator, src, num_beams=3, num_return_sequences=3, max_new_tokens=5)
    want = generator.generate(QUERIES[:2], docs, num_beams=3, num_return_sequences=3, max_new_tokens=5)
    assert got == [beams for per_query in want for beams in per_query]


def test_score_targets_equals_forward_logprobs(generator, passages):
    from re2g.models.marginalize import sequence_logprobs

    docs = [passages[0:2], passages[4:6]]
    src = decoding.encode_sources(generator, QUERIES[:2], docs)
    targets = ["a", "the river", "1867 in the north", ""]
    rows = [0, 3, 1, 2]                                                     # b * n_docs + j
    got = decoding.score_targets(generator, src, rows, targets, batch_size=3)
    for p, (r, t) in enumerate(zip(rows, targets)):
        b, j = divmod(r, 2)
        enc = generator.tokenize_targets([t])
        with torch.no_grad():
            lp = generator.forward_logprobs([QUERIES[b]], [[docs[b][j]]], enc)   # (1, 1, T)
        assert float(got[p]) == pytest.approx(float(sequence_logprobs(lp, enc["attention_mask"])[0, 0]), abs=1e-4)


# --------------------------------------------------------------------------- the ingress's coalescing


def test_coalescer_batches_concurrent_calls_and_keeps_order():
    from serve.app import Coalescer

    sent: list[list[int]] = []

    async def send(items):
        sent.append(list(items))
        await asyncio.sleep(0.02)
        return [i * 10 for i in items]

    async def main():
        c = Coalescer(send, max_batch_size=4)
        alone = await c(7)                                   # light load: goes at once, alone
        many = await asyncio.gather(*(c(i) for i in range(9)))
        return alone, many

    alone, many = asyncio.run(main())
    assert alone == 70 and many == [i * 10 for i in range(9)]
    assert sent[0] == [7] and sent[1] == [0]                 # the first of a burst does not wait either
    assert [len(b) for b in sent[2:]] == [4, 4]              # the rest waited for it, in batches of 4
    assert sorted(i for b in sent[1:] for i in b) == list(range(9))


def test_coalescer_fails_each_caller_and_leaves_out_those_that_gave_up():
    from serve.app import Coalescer

    sent: list[list[str]] = []

    async def send(items):
        sent.append(list(items))
        await asyncio.sleep(0.02)
        if "bad" in items:
            raise ValueError("bad batch")
        return [s.upper() for s in items]

    async def main():
        c = Coalescer(send, max_batch_size=8)
        first = asyncio.ensure_future(c("x"))                # in flight: the next calls wait
        await asyncio.sleep(0)
        gave_up = asyncio.ensure_future(c("late"))
        others = [asyncio.ensure_future(c(s)) for s in ("bad", "y")]
        await asyncio.sleep(0)
        gave_up.cancel()                                     # the API's deadline, before its batch went
        out = await asyncio.gather(first, *others, return_exceptions=True)
        return out

    first, bad, y = asyncio.run(main())
    assert first == "X" and isinstance(bad, ValueError) and isinstance(y, ValueError)
    assert sent == [["x"], ["bad", "y"]]


def test_handle_backend_coalesces_rerank_calls_with_their_own_top_k():
    from types import SimpleNamespace

    from re2g.types import Hit
    from serve.app import HandleBackend

    calls = []

    class Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            calls.append(args)

            async def result():
                await asyncio.sleep(0.01)
                return self.fn(*args)

            return result()

    def rerank_many(queries, hits, top_k):
        return [list(reversed(h))[:top_k] for h in hits]

    def hits(n):
        return [Hit(pid=str(i), score=float(i), rank=i, source="dpr", title="t", text="x") for i in range(n)]

    backend = HandleBackend(None, SimpleNamespace(rerank_many=Method(rerank_many)), None, None,
                            coalesce={"rerank": (8, 1)})

    async def main():
        return await asyncio.gather(*(backend.rerank(f"q{k}", hits(6), k) for k in (1, 3, 2, 5)))

    got = asyncio.run(main())
    assert [[h.pid for h in r] for r in got] == [["5"], ["5", "4", "3"], ["5", "4"], ["5", "4", "3", "2", "1"]]
    assert [len(c[0]) for c in calls] == [1, 3] and calls[1][2] == 5   # first alone, then one call, top 5
