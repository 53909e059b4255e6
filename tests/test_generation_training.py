"""Stage 2 (generation, RAG) and stage 4 (end to end) on the tiny sample task.

In process, against the tiny run directory's exact index: the loss of one micro-batch (gradients
reach the reranker in stage 4, the query encoder only with ``combined`` and ``distill``; ``frozen``
leaves it bitwise unchanged; the context encoder never trains), the padded score matrices,
training's candidate lists against the hybrid retriever's that serving uses, and dev metrics that do
not depend on the batch size or order. Then one short Ray Train run of stage 2 through the
index-shard actors (checkpoint with eval.json, saved model layout, before/after metrics). Stage 4's
learning runs are in tests/test_quickstart.py; the option comparison's numbers in docs/e2e_options.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from re2g.config import GenerationConfig, RetrievalConfig
from re2g.train.rag_eval import evaluate_e2e, evaluate_rag
from re2g.train.rag_model import Re2GModel
from re2g.train.rag_stages import E2EStage, plan_examples, training_examples
from re2g.train.rag_steps import (QUERY_ENCODER_OPTIONS, IndexHandle, bm25_entries, bm25_hits, e2e_step,
                                  fused_candidates, passage_scores, rag_step)
from re2g.types import Candidate

TINY = ["data.sample.size=tiny", "train.cpus_per_worker=0.5", "train.num_workers=2", "train.deepspeed.zero_stage=2",
        "models.generator_source_max_length=160", "models.reranker_max_length=96", "models.passage_max_length=64",
        "models.query_max_length=32", "generation.num_beams=2", "generation.max_new_tokens=8"]


# --------------------------------------------------------------------------- pure parts


class _Vectors:
    """A tiny exact in-memory index: stored vectors by pid, inner-product search."""

    def __init__(self, table):
        self.table = table

    def get_vectors(self, pids):
        import numpy as np

        return np.stack([self.table[p] for p in pids]).astype("float32")

    def search_vectors(self, Q, k):
        pids = list(self.table)
        S = Q @ self.get_vectors(pids).T  # (B, N)
        return [[Candidate(pids[j], float(row[j]), r, "dpr") for r, j in enumerate((-row).argsort(kind="stable")[:k])]
                for row in S]


def test_training_candidates_drop_a_bm25_hit_with_the_same_text_as_serving_does():
    """Drift fixed: training merged DPR and BM25 by pid only; serving (``fuse``) also drops a hit
    whose normalized text came earlier. Training now calls ``fuse``: "b" (same text as DPR's "a")
    is gone, and the lists equal ``fuse``'s."""
    import numpy as np

    from re2g.index.fusion import fuse

    lookup = {"a": ("Paris", "Paris is big.", "1"), "b": ("Paris", "paris is BIG", "1"), "c": ("Rome", "Rome.", "2")}
    idx = _Vectors({"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([0.5, 0.5])})
    bm25 = [bm25_hits([["b", 3.0], ["c", 2.0], ["a", 1.0]], lookup)]
    cfg = RetrievalConfig(dpr_top_k=1, bm25_top_k=3)
    dpr, cands = fused_candidates(idx, torch.tensor([[1.0, 0.0]]), bm25, lookup, cfg)
    assert [c.pid for c in cands[0]] == ["a", "c"] and [c.source for c in cands[0]] == ["dpr", "bm25"]
    assert cands[0] == fuse(cfg, dpr[0], bm25[0])
    assert cands[0][0].text == "Paris is big." and cands[0][1].rank == 1


def test_passage_scores_are_padded_inner_products_with_grad():
    import numpy as np

    idx = _Vectors({"a": np.array([1.0, 0.0]), "b": np.array([0.0, 2.0]), "c": np.array([1.0, 1.0])})
    q = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    s, mask = passage_scores(idx, q, [["a", "b", "c"], ["c"]])
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert s.tolist() == [[1.0, 4.0, 3.0], [2.0, 0.0, 0.0]]
    s[mask].sum().backward()
    assert q.grad.tolist() == [[2.0, 3.0], [1.0, 1.0]]


def test_plan_examples_equal_batches_every_epoch():
    ex = [{"id": str(i), "query": f"q{i}", "target": "t"} for i in range(21)]
    plan = plan_examples(ex, batch_size=4, epochs=3, world=2, grad_accum=1, max_steps=None, seed=0)
    assert plan.per_epoch == 5 and plan.steps == 7 and len(plan.rows) == 14
    assert all(len(mb) == 4 for mb in plan.rows)
    assert plan.rows[0] != plan.rows[5]  # reshuffled


# --------------------------------------------------------------------------- one loss step, in process


@pytest.fixture(scope="module")
def parts(tiny_run_dir):
    from re2g.index.bm25 import BM25Retriever
    from re2g.train.stages import passage_lookup

    run = Path(tiny_run_dir)
    index = IndexHandle(str(run / "index" / "dense")).open()
    lookup = passage_lookup(str(run / "passages"))
    batch = training_examples(str(run / "sample" / "tasks" / "slot_filling-train-kilt.jsonl"), limit=3)
    bm = BM25Retriever.from_dir(str(run / "index" / "bm25"))
    for x, hs in zip(batch, bm.batch_search([x["query"] for x in batch], 12)):
        x["bm25"] = bm25_entries(hs)
    return run, index, lookup, batch


def _model(run: Path, *, reranker: bool, frozen: bool = False) -> Re2GModel:
    from re2g.models.encoders import BiEncoder
    from re2g.models.generator import Generator
    from re2g.models.reranker import CrossEncoder

    rr = CrossEncoder.from_pretrained(run / "models" / "reranker") if reranker else None
    return Re2GModel(BiEncoder.from_pretrained(run / "models" / "biencoder"),
                     Generator.from_pretrained(run / "models" / "generator"), rr, frozen_query_encoder=frozen).train()


def _grad(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("option", QUERY_ENCODER_OPTIONS)
def test_e2e_gradients_per_option(parts, option):
    """Stage 4: the generator loss reaches the reranker (its weights change after a step); the query
    encoder gets gradient only with combined (through the doc scores) and distill (through the KD
    term); frozen leaves it bitwise unchanged; the context encoder never gets any."""
    run, index, lookup, batch = parts
    torch.manual_seed(0)
    model = _model(run, reranker=True, frozen=option == "frozen")
    before_q, before_r = _state(model.biencoder.query_encoder), _state(model.reranker)
    before_c = _state(model.biencoder.ctx_encoder)
    step = e2e_step(model, batch, index, lookup, option=option, retrieval=RetrievalConfig())
    step.loss.backward()
    assert _grad(model.reranker) > 0 and _grad(model.generator) > 0
    assert _grad(model.biencoder.ctx_encoder) == 0
    if option == "frozen":
        assert all(p.grad is None for p in model.biencoder.query_encoder.parameters())
    else:
        assert _grad(model.biencoder.query_encoder) > 0
    assert (step.kl is not None) == (option == "distill")
    # candidates: DPR top-12 then new BM25 hits; the generator saw the reranker's top-5
    assert all(12 <= len(c) <= 24 for c in step.candidates) and all(len(t) == 5 for t in step.top)
    assert all(set(t) <= {x.pid for x in c} for t, c in zip(step.top, step.candidates))

    groups = E2EStage(None, None, "", None, 1e-3, option=option).param_groups(model)
    opt = torch.optim.AdamW(groups)
    opt.step()
    changed = lambda before, m: any(not torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # noqa: E731
    assert changed(before_r, model.reranker)
    assert changed(before_q, model.biencoder.query_encoder) == (option != "frozen")
    assert not changed(before_c, model.biencoder.ctx_encoder)


def test_distill_alone_trains_the_query_encoder(parts):
    """With the KD weight at 0 the query encoder gets no gradient: in distill, all of it comes from KD."""
    run, index, lookup, batch = parts
    model = _model(run, reranker=True)
    e2e_step(model, batch, index, lookup, option="distill", retrieval=RetrievalConfig(),
             distill_weight=0.0).loss.backward()
    assert _grad(model.biencoder.query_encoder) == 0
    assert _grad(model.reranker) > 0


def test_rag_step_trains_query_encoder_and_generator(parts):
    """Stage 2: the doc scores q . p (stored vectors from the index) carry gradient to the query encoder."""
    run, index, lookup, batch = parts
    model = _model(run, reranker=False)
    step = rag_step(model, batch, index, lookup, n_docs=5)
    step.loss.backward()
    assert _grad(model.biencoder.query_encoder) > 0 and _grad(model.generator) > 0
    assert _grad(model.biencoder.ctx_encoder) == 0
    assert step.doc_scores.shape == (3, 5)
    # the doc scores are the index's own inner products for the retrieved pids
    q = model.biencoder.embed_queries([batch[0]["query"]])
    hits = index.search_vectors(q, 5)[0]
    assert [h.pid for h in hits] == step.top[0]


def test_shared_encoder_is_untied_and_saved_with_the_index_fingerprint(parts, tmp_path):
    from re2g.models.encoders import BiEncoder
    from re2g.models.generator import Generator

    run = parts[0]
    bi = BiEncoder.from_pretrained(run / "models" / "biencoder")
    shared = BiEncoder(bi.query_encoder, None, bi.tokenizer)
    fp = shared.fingerprint()
    model = Re2GModel(shared, Generator.from_pretrained(run / "models" / "generator"))
    assert not model.biencoder.shared and model.biencoder.fingerprint() == fp
    with torch.no_grad():
        next(model.biencoder.query_encoder.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "m", generator_at_root=True)
    assert BiEncoder.from_pretrained(tmp_path / "m" / "biencoder").fingerprint() == fp
    Generator.from_pretrained(tmp_path / "m")  # loads as a plain generator directory
    assert type(Re2GModel.from_pretrained(tmp_path / "m").generator) is Generator


@pytest.mark.parametrize("fusion", ["concat", "rrf"])
def test_training_candidates_equal_serving(parts, fusion):
    """Stage 4's candidate lists (DPR from the index + the BM25 hits kept with each example, fused by
    ``fuse``) equal the hybrid retriever's that the pipeline and Serve use, for the same queries and
    models: pids, order, sources, ranks, texts and scores."""
    from re2g.index.bm25 import BM25Retriever
    from re2g.index.dense import DenseIndex, DenseRetriever
    from re2g.index.fusion import HybridRetriever

    run, index, lookup, batch = parts
    model = _model(run, reranker=False).eval()
    cfg = RetrievalConfig(fusion=fusion)
    queries = [x["query"] for x in batch]
    bm = BM25Retriever.from_dir(str(run / "index" / "bm25"))
    served = HybridRetriever(DenseRetriever(DenseIndex.load(run / "index" / "dense", passages=lookup), model.biencoder),
                             bm, cfg).batch_search(queries)
    with torch.no_grad():
        q = model.biencoder.encode_queries(queries)
    bm25 = [bm25_hits(bm25_entries(hs), lookup) for hs in bm.batch_search(queries, cfg.bm25_top_k)]
    _, trained = fused_candidates(index, q, bm25, lookup, cfg)
    for mine, theirs in zip(trained, served):
        assert [(c.pid, c.source, c.rank, c.title, c.text) for c in mine] == \
               [(c.pid, c.source, c.rank, c.title, c.text) for c in theirs]
        assert [c.score for c in mine] == pytest.approx([c.score for c in theirs], abs=1e-4)


# DPR top-3 + BM25 top-3 fused: up to 6 candidates, and the reranker keeps 6
RAGGED = RetrievalConfig(dpr_top_k=3, bm25_top_k=3, rerank_top_k=6)


@pytest.fixture(scope="module")
def dev_ragged(parts):
    """Six dev examples with their BM25 entries; every other one keeps a single BM25 hit (as when
    Lucene matches one passage), so the fused candidate lists have 4 and 6 entries."""
    from re2g.data.kilt import read_kilt
    from re2g.index.bm25 import BM25Retriever

    run, index, lookup, _ = parts
    gold = [g for g in read_kilt(str(run / "sample" / "tasks" / "slot_filling-dev-kilt.jsonl")) if g.answers][:6]
    hits = BM25Retriever.from_dir(str(run / "index" / "bm25")).batch_search([g.input for g in gold], RAGGED.bm25_top_k)
    bm25 = [bm25_entries(hs[:1] if i % 2 else hs) for i, hs in enumerate(hits)]
    with torch.no_grad():
        q = _model(run, reranker=False).biencoder.encode_queries([g.input for g in gold])
    cands = fused_candidates(index, q, [bm25_hits(e, lookup) for e in bm25], lookup, RAGGED)[1]
    assert len({len(c) for c in cands}) > 1, [len(c) for c in cands]
    return gold, bm25


def test_dev_metrics_do_not_depend_on_batch_size_or_order(parts, dev_ragged):
    """Drift fixed: stage 4 cut every batch to its shortest candidate list (``k = min(k, mask.sum(-1).min())``),
    so a query's reranked top and answer depended on its batch mates. With ragged lists (``RAGGED``)
    every dev metric is the same for the whole dev set in one batch, one query per batch and in
    reverse order in batches of 4; stage 2's likewise."""
    run, index, lookup, _ = parts
    gold, bm25 = dev_ragged
    model = _model(run, reranker=True).eval()
    gen = GenerationConfig(num_beams=2, max_new_tokens=6)

    def e2e(order, size):
        return evaluate_e2e(model, [gold[i] for i in order], [bm25[i] for i in order], index, lookup,
                            option="distill", retrieval=RAGGED, generation=gen, temperature=10.0, batch_size=size)

    def rag(order, size):
        return evaluate_rag(model, [gold[i] for i in order], index, lookup, n_docs=3, generation=gen, batch_size=size)

    n = len(gold)
    for fn in (e2e, rag):
        ref = fn(range(n), n)
        for order, size in ((range(n), 1), (range(n - 1, -1, -1), 4)):
            got = fn(order, size)
            assert got.keys() == ref.keys()
            for k in ref:
                assert got[k] == pytest.approx(ref[k], abs=1e-5), (fn.__name__, k, size)


# --------------------------------------------------------------------------- Ray Train runs


def _cfg(run: Path, *extra: str):
    from re2g.config import load_config

    return load_config(preset="tiny", overrides=[f"run_dir={run}", "index.exact=true", *TINY, *extra])


@pytest.fixture(scope="module")
def short_run(tiny_run_dir, tmp_path_factory, ray_local):
    """Stage 2 for 4 steps (checkpoints at 2 and 4) through the index-shard actors."""
    from re2g.train.rag_driver import train_generator

    run = tmp_path_factory.mktemp("gen-short") / "run"
    shutil.copytree(tiny_run_dir, run)
    cfg = _cfg(run, "train.generator.max_steps=4", "train.generator.batch_size=2", "train.generator.checkpoint_every=2",
               "train.generator.max_dev_queries=4", "train.generator.log_every=2")
    return run, train_generator(cfg)


def test_generator_stage_runs_through_the_shard_actors(short_run, ray_local):
    from re2g.index.dense import read_manifest
    from re2g.models.encoders import BiEncoder
    from re2g.models.generator import Generator

    run, r = short_run
    assert r.run.steps == 4 and r.run.metrics["step"] == 4
    for m in (r.before["generator"], r.after["generator"]):
        assert set(m) >= {"em", "f1", "accuracy", "rprec", "recall@5"}
    assert r.before["generator"]["em"] == 0.0  # the untrained generator
    # every checkpoint has the dev metrics of its step beside it
    ckpts = sorted(p for p in Path(r.run.storage).glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2 and all((c / "eval.json").exists() for c in ckpts)
    assert "dev" in json.loads((ckpts[0] / "eval.json").read_text())
    final = json.loads((Path(r.run.checkpoint_dir) / "eval.json").read_text())
    assert final["after"]["generator"] == r.after["generator"]
    # the model: a plain generator directory + the bi-encoder still matching the index
    model = Path(r.model_dir)
    assert model == run / "models" / "generator"
    Generator.from_pretrained(model)
    bi = BiEncoder.from_pretrained(model / "biencoder")
    assert bi.fingerprint() == read_manifest(run / "index" / "dense")["encoder_fingerprint"]
    assert (run / "models" / "init" / "generator").is_dir()  # the untrained start was kept
    # the shard actors are gone
    from ray.util import list_named_actors

    assert not [a for a in list_named_actors(all_namespaces=True) if "re2g-train-gen" in str(a)]
