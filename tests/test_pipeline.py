"""The in-process pipeline on the tiny sample: a run directory with exact dense shards + BM25, then
retrieve → rerank → generate, provenance, KILT output, and the run-directory loader."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from re2g.config import load_config, save_config
from re2g.errors import ArtifactError

OVERRIDES = ["index.exact=true", "index.num_shards=1", "generation.num_beams=2", "generation.max_new_tokens=6"]


@pytest.fixture(scope="module")
def run_dir(tiny_sample, tiny_passages, tiny_models, tmp_path_factory):
    """RUN_DIR/{config.yaml, passages, models/{biencoder,reranker,generator}, embeddings, index/{dense,bm25}}."""
    from re2g.index.embed import embed_corpus_local
    from re2g.index.retrievers import build_indexes

    run = tmp_path_factory.mktemp("pipeline") / "run"
    shutil.copytree(tiny_passages, run / "passages")
    for name in ("biencoder", "reranker", "generator"):
        shutil.copytree(tiny_models[name], run / "models" / name)
    cfg = load_config(preset="tiny", overrides=OVERRIDES + [f"run_dir={run}"])
    save_config(cfg, run)
    embed_corpus_local(str(run / "passages"), str(run / "models" / "biencoder"), str(run / "embeddings"),
                       batch_size=64, progress=False)
    build_indexes(cfg, passages=str(run / "passages"), embeddings=str(run / "embeddings"),
                  dense_dir=str(run / "index" / "dense"), bm25_dir=str(run / "index" / "bm25"), use_ray=False)
    return run


@pytest.fixture(scope="module")
def pipe(run_dir):
    from re2g.pipeline import Re2GPipeline

    return Re2GPipeline.from_run_dir(run_dir)


@pytest.fixture(scope="module")
def queries(tiny_sample):
    rows = [json.loads(line) for line in (tiny_sample / "tasks" / "slot_filling-dev-kilt.jsonl").open()]
    return [(r["id"], r["input"]) for r in rows[:2]]


def test_from_run_dir_loads_the_hybrid_and_the_models(pipe, run_dir):
    from re2g import stages

    assert isinstance(pipe.retriever, stages.Retriever) and isinstance(pipe.reranker, stages.Reranker)
    assert isinstance(pipe.generator, stages.Generator)
    assert pipe.retriever.dense is not None and pipe.retriever.bm25 is not None      # the hybrid
    assert pipe.retriever.k == 24 and pipe.reranker.top_k == 5
    assert pipe.cfg.generation.num_beams == 2 and pipe.generator.cfg.num_beams == 2  # the run's config.yaml
    assert not pipe.reranker.model.training and not pipe.generator.model.training


def test_answer_end_to_end_with_timings_and_provenance(pipe, queries):
    from re2g.models.decoding import Answer

    q = queries[0][1]
    ans = pipe.answer(q)
    assert isinstance(ans, Answer) and ans.query == q
    assert set(ans.timings) == {"retrieve", "rerank", "generate", "total"}
    assert all(v > 0 for v in ans.timings.values())
    assert ans.timings["total"] >= ans.timings["retrieve"] + ans.timings["rerank"] + ans.timings["generate"] - 1e-6
    assert ans.candidates and ans.answer == ans.candidates[0].text
    # provenance: the reranker's top 5 of the retrieved (DPR + BM25, deduplicated) candidates, in its order
    hits = pipe.retrieve([q])[0]
    assert len({h.pid for h in hits}) == len(hits) <= 24 and {h.source for h in hits} == {"dpr", "bm25"}
    with torch.inference_mode():
        z = pipe.reranker.model.score(q, hits, batch_size=32)
    order = sorted(range(len(hits)), key=lambda i: -float(z[i]))[:5]
    assert [p.pid for p in ans.provenance] == [hits[i].pid for i in order]
    assert [p.rerank_score for p in ans.provenance] == pytest.approx([float(z[i]) for i in order], abs=1e-5)
    assert [p.score for p in ans.provenance] == pytest.approx([hits[i].score for i in order], abs=1e-6)
    assert [(p.rank, p.rerank_rank) for p in ans.provenance] == [(hits[i].rank, r) for r, i in enumerate(order)]
    assert [p.source for p in ans.provenance] == [hits[i].source for i in order]
    w = [p.weight for p in ans.provenance]
    assert sum(w) == pytest.approx(1.0, abs=1e-5) and w == sorted(w, reverse=True)
    assert all(p.title and p.text and p.wikipedia_id for p in ans.provenance)


def test_rerank_sorts_keeps_top_k_and_answer_batch_matches(pipe, queries):
    from re2g.types import Candidate

    qs = [q for _, q in queries]
    hits = pipe.retrieve(qs)
    assert all(h.rerank_score is None for hs in hits for h in hs)
    reranked = pipe.rerank(qs, hits, top_k=3)
    for hs, rr in zip(hits, reranked):
        assert len(rr) == 3 and all(isinstance(h, Candidate) and h.rerank_score is not None for h in rr)
        assert [h.rerank_rank for h in rr] == [0, 1, 2]
        assert [h.rerank_score for h in rr] == sorted((h.rerank_score for h in rr), reverse=True)
        assert {h.pid for h in rr} <= {h.pid for h in hs}
    assert pipe.rerank(["q"], [[]]) == [[]]
    batch = pipe.answer_batch(qs)
    assert [a.query for a in batch] == qs
    for a, q in zip(batch, qs):
        assert [p.pid for p in a.provenance] == [p.pid for p in pipe.answer(q).provenance]


def test_kilt_prediction_records(pipe, queries):
    from re2g.data.kilt import parse_kilt_example
    from re2g.pipeline import kilt_prediction

    qid, q = queries[1]
    ans = pipe.answer(q)
    rec = kilt_prediction(qid, ans, input=q)
    ex = parse_kilt_example(json.loads(json.dumps(rec)))  # valid KILT after a JSON round trip
    assert ex.id == qid and ex.answers == ([ans.answer] if ans.answer else [])
    prov = rec["output"][0]["provenance"]
    assert [p["pid"] for p in prov] == [p.pid for p in ans.provenance]
    for p, src in zip(prov, ans.provenance):
        wid, span = src.pid.split("::")
        start, end = (int(x) for x in span.strip("[]").split("#")[0].split(","))
        assert (p["wikipedia_id"], p["title"]) == (src.wikipedia_id, src.title)
        assert (p["start_paragraph_id"], p["end_paragraph_id"]) == (start, end)
        assert p["rerank_score"] == src.rerank_score and p["weight"] == src.weight
    assert "input" not in kilt_prediction(qid, ans)


def test_run_dir_picks_the_indexed_encoder_and_explains_what_is_missing(run_dir, tiny_sample, tmp_path):
    from re2g.layout import RunLayout
    from re2g.models.factory import build_tiny_biencoder
    from re2g.pipeline import Re2GPipeline
    from re2g.run import pick_biencoder_dir

    decoy = run_dir / "models" / "dpr"      # tried first, but the index was built with models/biencoder
    torch.manual_seed(99)
    other = build_tiny_biencoder(tiny_sample / "tokenizers" / "wordpiece", load_config(preset="tiny").models.tiny)
    other.save_pretrained(decoy)
    try:
        assert pick_biencoder_dir(RunLayout(str(run_dir))) == str(run_dir / "models" / "biencoder")
    finally:
        shutil.rmtree(decoy)

    empty = tmp_path / "empty"
    (empty / "passages").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="no index"):
        Re2GPipeline.from_run_dir(empty)
    partial = tmp_path / "partial"
    shutil.copytree(run_dir / "passages", partial / "passages")
    shutil.copytree(run_dir / "index" / "bm25", partial / "index" / "bm25")
    with pytest.raises(ArtifactError, match="no reranker"):
        Re2GPipeline.from_run_dir(partial, load_config(preset="tiny", overrides=OVERRIDES))
