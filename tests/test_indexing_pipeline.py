"""Corpus -> embeddings (Ray Data) -> dense shards + BM25 -> retrieval report, on the tiny sample."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest

from re2g.config import load_config
from re2g.errors import ArtifactError, DataFormatError


@pytest.fixture(scope="module")
def tiny_run(tiny_passages, tiny_models, tmp_path_factory, ray_local):
    """Embeddings through Ray Data, then exact dense shards + BM25 built through build_indexes."""
    from re2g.index.embed import embed_corpus
    from re2g.index.retrievers import build_indexes

    root = tmp_path_factory.mktemp("indexing")
    emb = root / "embeddings"
    stats = embed_corpus(str(tiny_passages), str(tiny_models["biencoder"]), str(emb), batch_size=32, actors=1)
    cfg = load_config(preset="tiny", overrides=["index.exact=true", "index.num_shards=3"])
    summary = build_indexes(cfg, passages=str(tiny_passages), embeddings=str(emb),
                            dense_dir=str(root / "index" / "dense"), bm25_dir=str(root / "index" / "bm25"))
    return {"root": root, "emb": emb, "stats": stats, "summary": summary, "cfg": cfg}


def _read_embeddings(path):
    t = pads.dataset(str(path), format="parquet").to_table()
    pids = t.column("pid").to_pylist()
    X = np.asarray(t.column("vector").to_pylist(), dtype=np.float32)
    order = np.argsort(pids)
    return [pids[i] for i in order], X[order]


def test_ray_data_embedding_matches_a_plain_loop(tiny_run, tiny_passages, tiny_models, tmp_path):
    from re2g.index.embed import embed_corpus_local, read_embeddings_meta
    from re2g.models.fingerprint import encoder_fingerprint

    stats = tiny_run["stats"]
    n = pads.dataset(str(tiny_passages), format="parquet").count_rows()
    assert stats.passages == n and stats.dim == 64 and stats.passages_per_s > 0
    meta = read_embeddings_meta(str(tiny_run["emb"]))
    assert meta["fingerprint"] == encoder_fingerprint(str(tiny_models["biencoder"]))
    assert meta["passages"] == n

    local = embed_corpus_local(str(tiny_passages), str(tiny_models["biencoder"]), str(tmp_path / "e"),
                               batch_size=16, progress=False)
    assert local.passages == n
    pa_, Xa = _read_embeddings(tiny_run["emb"])
    pb, Xb = _read_embeddings(tmp_path / "e")
    assert pa_ == pb
    assert np.allclose(Xa, Xb, atol=1e-5)


def test_exact_dense_search_equals_brute_force(tiny_run, tiny_models, tiny_passages):
    from re2g.index.retrievers import open_retrievers
    from re2g.models.encoders import BiEncoder

    enc = BiEncoder.from_pretrained(tiny_models["biencoder"])
    r = open_retrievers(tiny_run["cfg"], passages=str(tiny_passages), dense_dir=str(tiny_run["root"] / "index" / "dense"),
                        bm25_dir=str(tiny_run["root"] / "index" / "bm25"), query_encoder=enc)
    assert set(r) == {"bm25", "dpr", "hybrid"}
    queries = ["Where was Palgo Drainne born?", "employer of a banker", "Zavastan"]
    hits = r["dpr"].batch_search(queries, 10)
    pids, X = _read_embeddings(tiny_run["emb"])
    Q = enc.embed_queries(queries)
    scores = Q @ X.T
    for qi, hs in enumerate(hits):
        want = np.sort(scores[qi])[::-1][:10]
        assert np.allclose([h.score for h in hs], want, atol=1e-4)
        assert all(h.source == "dpr" and h.text for h in hs)
        assert [h.rank for h in hs] == list(range(10))
    # the hybrid keeps DPR first then BM25, without duplicates
    fused = r["hybrid"].search(queries[0])
    assert len({h.pid for h in fused}) == len(fused) <= 24
    assert {h.source for h in fused} <= {"dpr", "bm25"}


def test_hnsw_recall_against_exact_on_the_sample(tiny_run, tiny_models, tiny_passages, tmp_path):
    from re2g.index.dense import DenseIndex, build_dense_index
    from re2g.index.embed import read_embeddings_meta

    fp = read_embeddings_meta(str(tiny_run["emb"]))["fingerprint"]
    cfg = load_config(preset="tiny").index  # HNSW, M=32, efConstruction=200, efSearch=128
    build_dense_index(str(tiny_run["emb"]), tmp_path / "hnsw", cfg, encoder_fingerprint=fp, use_ray=False)
    hnsw = DenseIndex.load(tmp_path / "hnsw", expected_fingerprint=fp)
    exact = DenseIndex.load(tiny_run["root"] / "index" / "dense", expected_fingerprint=fp)
    _, X = _read_embeddings(tiny_run["emb"])
    Q = X[::7] + np.random.default_rng(0).normal(0, 0.01, X[::7].shape).astype(np.float32)
    got = hnsw.search_vectors(Q, 10)
    want = exact.search_vectors(Q, 10)
    recall = np.mean([len({h.pid for h in g} & {h.pid for h in w}) / 10 for g, w in zip(got, want)])
    assert recall >= 0.95, recall


def test_index_refuses_another_encoder(tiny_run, tiny_sample, tiny_passages, tmp_path):
    import torch

    from re2g.index.retrievers import open_retrievers
    from re2g.models.factory import build_tiny_biencoder

    torch.manual_seed(123)
    other = build_tiny_biencoder(tiny_sample / "tokenizers" / "wordpiece", load_config(preset="tiny").models.tiny)
    with pytest.raises(ArtifactError) as e:
        open_retrievers(tiny_run["cfg"], passages=str(tiny_passages),
                        dense_dir=str(tiny_run["root"] / "index" / "dense"), bm25_dir=None, query_encoder=other)
    assert other.fingerprint() in str(e.value)


def test_retrieval_report_on_dev(tiny_run, tiny_sample, tiny_passages, tiny_models, tmp_path):
    from re2g.eval.retrieval_report import retrieval_report

    out = tmp_path / "report.json"
    dev = str(tiny_sample / "tasks" / "slot_filling-dev-kilt.jsonl")
    res = retrieval_report(tiny_run["cfg"], tasks=[dev], passages=str(tiny_passages),
                           index_dir=str(tiny_run["root"] / "index"), model_dir=str(tiny_models["biencoder"]),
                           out=str(out))
    systems = {s["name"]: s for s in json.loads(out.read_text())[dev]["systems"]}
    assert set(systems) == {"bm25", "dpr", "hybrid"}
    for s in systems.values():
        assert {"recall@1", "recall@5", "recall@12", "recall@24", "mrr@10", "rprec_page"} <= set(s)
    # BM25 finds the entity's page when the query names the entity; the untrained encoder does not
    assert systems["bm25"]["recall@12"] >= 0.8
    assert systems["bm25"]["recall@12"] > systems["dpr"]["recall@12"] + 0.3
    # the hybrid holds BM25's hits too, so its Recall@24 is at least BM25's Recall@12
    assert systems["hybrid"]["recall@24"] >= systems["bm25"]["recall@12"] - 1e-9
    assert res.table() is not None


def test_embedding_bad_input_leaves_nothing(tiny_models, tmp_path, ray_local):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from re2g.index.embed import embed_corpus, embed_corpus_local

    (tmp_path / "empty").mkdir()
    pq.write_table(pa.table({"pid": pa.array([], pa.string()), "title": pa.array([], pa.string()),
                             "text": pa.array([], pa.string())}), tmp_path / "empty" / "p.parquet")
    with pytest.raises(DataFormatError, match="empty"):
        embed_corpus(str(tmp_path / "empty"), str(tiny_models["biencoder"]), str(tmp_path / "out"))
    (tmp_path / "nocol").mkdir()
    pq.write_table(pa.table({"pid": ["a"], "body": ["x"]}), tmp_path / "nocol" / "p.parquet")
    with pytest.raises(DataFormatError, match="title"):
        embed_corpus_local(str(tmp_path / "nocol"), str(tiny_models["biencoder"]), str(tmp_path / "out"))
    # a crash inside the encoder (a null text) leaves no output and no temporary directory
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"pid": ["a", "b"], "title": ["t", "t"], "text": ["fine", None]}),
                   tmp_path / "bad" / "p.parquet")
    with pytest.raises(Exception):
        embed_corpus(str(tmp_path / "bad"), str(tiny_models["biencoder"]), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_jobs_build_the_run_layout(tiny_passages, tiny_models, tmp_path, ray_local):
    """The Ray job entry points (as `ray job submit -- python -m jobs.X` runs them), in process."""
    import shutil

    from jobs import build_index, embed_corpus

    run = tmp_path / "run"
    shutil.copytree(tiny_passages, run / "passages")
    shutil.copytree(tiny_models["biencoder"], run / "models" / "dpr")
    common = ["--preset", "tiny", "--set", f"run_dir={run}", "--set", "index.num_shards=2"]
    assert embed_corpus.main(common) == 0
    assert build_index.main(common) == 0
    manifest = json.loads((run / "index" / "dense" / "manifest.json").read_text())
    assert manifest["counts"]["vectors"] == pads.dataset(str(tiny_passages), format="parquet").count_rows()
    assert len(manifest["shards"]) == 2
    assert (run / "jobs" / "build_index.json").exists() and (run / "config.yaml").exists()
    # a bad config is a clear, non-zero exit
    assert build_index.main(["--set", "index.num_shards=0"]) == 2


def test_encoder_actors_never_take_every_cpu():
    from re2g.index.embed import actor_cpu_request

    assert actor_cpu_request(1, 1, 2, False) == 1.0
    assert actor_cpu_request(2, 1, 2, False) == 0.5       # 2 actors on 2 CPUs: one CPU left for read/write
    assert actor_cpu_request(4, 2, 64, False) == 2.0      # plenty of CPUs: the thread count
    assert actor_cpu_request(2, 1, 1, False) == 0.375
    assert actor_cpu_request(8, 1, 2, True) is None       # GPU actors reserve a GPU, not CPUs
