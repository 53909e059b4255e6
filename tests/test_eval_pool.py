"""The dense dev evaluation over a capped candidate pool (issue 16): with the whole corpus as the pool it
equals the brute-force rankings; with a smaller pool every dev positive and negative is in it, each
ranking is the full ranking restricted to the pool, and the metrics are >= the full-corpus ones; the
stage's evaluation through the passage store; the config field validates."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from re2g.config import DPRTrainConfig, JointTrainConfig, load_config
from re2g.train.evaluate import DevSet, dense_rankings, eval_pool, exact_dense_rankings, metrics_dict, report


@pytest.fixture(scope="module")
def corpus(tiny_sample):
    """The tiny sample's paragraphs as passages (pid ``wid::[i,i]``, a few hundred) and its qa dev queries
    with their provenance paragraph as the gold passage."""
    lookup = {}
    for line in (tiny_sample / "knowledge_source.jsonl").read_text().splitlines():
        page = json.loads(line)
        for i, para in enumerate(page["text"][1:], start=1):
            lookup[f"{page['wikipedia_id']}::[{i},{i}]"] = (page["wikipedia_title"], para, page["wikipedia_id"])
    queries, gold, pages = [], [], []
    for line in (tiny_sample / "tasks" / "qa-dev-kilt.jsonl").read_text().splitlines()[:40]:
        r = json.loads(line)
        prov = r["output"][0]["provenance"][0]
        pid = f"{prov['wikipedia_id']}::[{prov['start_paragraph_id']},{prov['end_paragraph_id']}]"
        if pid in lookup:
            queries.append(r["input"])
            gold.append([pid])
            pages.append([prov["wikipedia_id"]])
    assert 200 <= len(lookup) <= 1000 and len(queries) >= 20, (len(lookup), len(queries))
    return lookup, DevSet(queries, gold, pages)


@pytest.fixture(scope="module")
def biencoder(tiny_sample):
    from re2g.models.factory import build_tiny_biencoder

    torch.manual_seed(0)
    return build_tiny_biencoder(tiny_sample / "tokenizers" / "wordpiece", load_config(preset="tiny").models.tiny).eval()


@pytest.fixture(scope="module")
def full(corpus, biencoder):
    """The brute-force ranking of every passage for each dev query."""
    lookup, dev = corpus
    return exact_dense_rankings(biencoder, dev.queries, lookup, k=len(lookup))


def test_whole_corpus_pool_equals_brute_force(corpus, biencoder, full):
    lookup, dev = corpus
    exact = [r[:20] for r in full]
    assert eval_pool(lookup, [], None) == list(lookup)
    assert eval_pool(lookup, [], len(lookup)) == list(lookup)
    assert eval_pool(lookup, [], 100_000) == list(lookup)  # the config default on a tiny corpus
    assert dense_rankings(biencoder, dev.queries, lookup, pool=eval_pool(lookup, [], 100_000)) == exact
    assert all(len(r) == 20 for r in exact)


def test_small_pool_holds_required_and_is_optimistic(corpus, biencoder, full):
    lookup, dev = corpus
    negatives = [r[:5] for r in full]  # stand-ins for the BM25 / mined negatives
    required = [p for g in dev.gold for p in g] + [p for n in negatives for p in n] + ["not-a-pid"]
    size = len(set(required)) + 30
    pool = eval_pool(lookup, required, size, seed=3)
    assert pool == eval_pool(lookup, required, size, seed=3)  # seeded
    assert pool != eval_pool(lookup, required, size, seed=4)
    assert set(required) - {"not-a-pid"} <= set(pool) and len(pool) <= size and "not-a-pid" not in pool
    order = {p: i for i, p in enumerate(lookup)}
    assert [order[p] for p in pool] == sorted(order[p] for p in pool)  # corpus order
    assert len(pool) < len(lookup)

    pooled = dense_rankings(biencoder, dev.queries, lookup, pool=pool)
    in_pool = set(pool)
    for p_rank, f_rank in zip(pooled, full):
        assert p_rank == [p for p in f_rank if p in in_pool][:20]  # the full ranking restricted to the pool
    m_pool = metrics_dict(report("pool", pooled, dev, lookup))
    m_full = metrics_dict(report("full", [r[:20] for r in full], dev, lookup))
    for k, v in m_full.items():
        assert m_pool[k] >= v - 1e-9, k
    assert m_pool["dev_recall@20"] > m_full["dev_recall@20"]  # a pool this small is visibly optimistic


def test_pool_size_validation(corpus):
    lookup, _ = corpus
    with pytest.raises(ValueError, match="eval pool size"):
        eval_pool(lookup, [], 0)
    for cls in (DPRTrainConfig, JointTrainConfig):
        assert cls().eval_pool_size == 100_000
        assert cls(eval_pool_size=None).eval_pool_size is None
        with pytest.raises(ValidationError, match="eval_pool_size"):
            cls(eval_pool_size=0)
        with pytest.raises(ValidationError, match="eval_pool_size"):
            cls(eval_pool_size="many")


def test_stage_evaluation_through_the_store(corpus, biencoder, full, tmp_path, monkeypatch):
    """DPRStage.evaluate on a passages Parquet (opened as the memory-mapped store): the default pool
    (the whole tiny corpus) gives the exact figures; a small pool holds the dev negatives."""
    from re2g.data.passage_files import PASSAGE_SCHEMA
    from re2g.train.stages import DPRStage, JointStage

    monkeypatch.setenv("RE2G_CACHE", str(tmp_path / "cache"))
    lookup, dev = corpus
    cols = {"pid": list(lookup), "title": [v[0] for v in lookup.values()],
            "text": [v[1] for v in lookup.values()], "wikipedia_id": [v[2] for v in lookup.values()]}
    path = tmp_path / "passages.parquet"
    pq.write_table(pa.table(cols, schema=PASSAGE_SCHEMA), path)
    models = load_config(preset="tiny").models
    exact = metrics_dict(report("dpr", [r[:20] for r in full], dev, lookup))

    stage = DPRStage(models, None, str(path), dev, 1e-4, eval_pool_size=100_000)
    assert stage.eval_pool() == list(lookup)
    assert stage.evaluate(biencoder) == exact

    negs = DevSet(dev.queries, dev.gold, dev.pages, negatives=[[p] for p in list(lookup)[:len(dev.queries)]])
    small = DPRStage(models, None, str(path), negs, 1e-4, eval_pool_size=60, eval_pool_seed=1)
    pool = small.eval_pool()
    assert {p for ps in negs.gold + negs.negatives for p in ps} <= set(pool) and len(pool) <= max(
        60, len({p for ps in negs.gold + negs.negatives for p in ps}))
    got = small.evaluate(biencoder)
    assert all(got[k] >= exact[k] - 1e-9 for k in exact)
    joint = JointStage(models, None, str(path), dev, 1e-4, eval_pool_size=100_000)
    assert joint.eval_pool() == list(lookup)
