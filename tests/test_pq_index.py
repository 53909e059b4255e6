"""Product-quantized dense shards (issue 16, "compression for 21M"): IVF-PQ, OPQ + IVF-PQ and HNSW over
PQ codes, built through ``build_dense_index`` like every other shard kind, saved, loaded and searched;
recall@10 against exact search on a small clustered set above stated floors; the original vectors come
back exactly (from the shard's .npy); bad parameters are refused before any shard is built."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from re2g.config import IndexConfig, load_config
from re2g.errors import ArtifactError, ConfigError
from re2g.index.dense import DenseIndex, build_dense_index
from re2g.index.dense_format import default_ivf_nlist, default_pq_m, plan_pq_shards

N, D, B, K = 3000, 32, 60, 10
FP = "test-encoder@v1"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 40 topics, norms spread 0.5x-2x (so MIPS order differs from cosine order), as in test_dense_index
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((40, D))
    X = ((centers[rng.integers(0, 40, N)] + 0.6 * rng.standard_normal((N, D)))
         * rng.uniform(0.5, 2.0, (N, 1))).astype(np.float32)  # (N, D)
    Q = (centers[rng.integers(0, 40, B)] + 0.6 * rng.standard_normal((B, D))).astype(np.float32)  # (B, D)
    pids = [f"p{i}" for i in range(N)]
    emb = tmp_path_factory.mktemp("pq") / "emb.parquet"
    vec = pa.array(X.tolist(), type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"pid": pa.array(pids, pa.string()), "vector": vec}), emb, row_group_size=700)
    exact = np.argsort(-(Q.astype(np.float64) @ X.astype(np.float64).T), axis=1, kind="stable")[:, :K]  # (B, K)
    return {"X": X, "Q": Q, "pids": pids, "emb": emb, "exact": [{pids[j] for j in row} for row in exact]}


def recall(index: DenseIndex, data) -> float:
    """Mean |top-10 ∩ exact top-10| / 10 over the queries."""
    hits = index.search_vectors(data["Q"], K)
    return float(np.mean([len({h.pid for h in hs} & e) / K for hs, e in zip(hits, data["exact"])]))


# (name, config, recall@10 floor). Measured on this set (faiss 1.15): IVF-PQ ip 0.93, OPQ 0.93,
# HNSW-PQ mips_l2 0.84 (pq_m=11 on D+1 = 33: 3 dimensions per code); floors leave room for
# k-means' thread-order differences.
KINDS = [
    ("ivf-pq ip", dict(quantization="pq", metric="ip", pq_m=16, ivf_nprobe=8), 0.8),
    ("opq ivf-pq ip", dict(quantization="opq", metric="ip", pq_m=16, ivf_nprobe=8), 0.8),
    ("hnsw-pq mips_l2", dict(quantization="pq", metric="mips_l2", pq_coarse="hnsw", pq_m=11, hnsw_m=16,
                             ef_search=64), 0.7),
]


@pytest.mark.parametrize("name,kw,floor", KINDS, ids=[k[0] for k in KINDS])
def test_pq_shard_round_trip(data, tmp_path, name, kw, floor):
    cfg = IndexConfig(num_shards=2, ef_construction=40, **kw)
    info = build_dense_index(data["emb"], tmp_path / "idx", cfg, encoder_fingerprint=FP, use_ray=False)
    m = info.manifest
    assert m["quantization"] == kw["quantization"] and m["pq"]["m"] == kw["pq_m"] and m["pq"]["nbits"] == 8
    assert m["pq"]["opq"] == (kw["quantization"] == "opq") and m["pq"]["code_bytes"] == kw["pq_m"]
    for e in m["shards"]:  # each shard records its own factory string and training rows
        assert e["train_rows"] == e["count"] == N // 2 and e["vectors_file"]
        if cfg.pq_coarse == "ivf":
            assert e["nlist"] == default_ivf_nlist(N // 2, N // 2) == 38
            assert e["factory"] == ("OPQ16," if kw["quantization"] == "opq" else "") + "IVF38,PQ16x8np"
        else:
            assert e["factory"] == "HNSW16_PQ11x8" and e["nlist"] is None and m["hnsw"]["m"] == 16

    index = DenseIndex.load(tmp_path / "idx", expected_fingerprint=FP)
    r = recall(index, data)
    assert r >= floor, f"{name}: recall@10 {r:.3f} below {floor}"
    # vectors for stages 2/4: the originals, exactly (PQ codes would only approximate them)
    pids = [data["pids"][i] for i in (0, 1499, 1500, 2999)]
    np.testing.assert_array_equal(index.get_vectors(pids), data["X"][[0, 1499, 1500, 2999]])
    if cfg.pq_coarse == "ivf":  # nprobe is a search-time knob: all lists >= one list
        index.set_nprobe(1)
        r1 = recall(index, data)
        index.set_nprobe(38)
        assert recall(index, data) >= r1
        import faiss

        assert faiss.extract_index_ivf(DenseIndex.load(tmp_path / "idx", nprobe=38).shards[0].index).nprobe == 38


def test_pq_shard_built_by_ray_tasks_equals_in_process(data, tmp_path, ray_local):
    cfg = IndexConfig(num_shards=2, quantization="opq", metric="ip", pq_m=8, ivf_nlist=16)
    a = build_dense_index(data["emb"], tmp_path / "ray", cfg, encoder_fingerprint=FP, use_ray=True)
    b = build_dense_index(data["emb"], tmp_path / "local", cfg, encoder_fingerprint=FP, use_ray=False)
    assert a.manifest["checksums"] == b.manifest["checksums"]  # one code path, one thread: same bytes
    assert [e["factory"] for e in a.manifest["shards"]] == ["OPQ8,IVF16,PQ8x8np"] * 2


def test_pq_without_stored_vectors_refuses_vector_lookup(data, tmp_path):
    cfg = IndexConfig(num_shards=1, quantization="pq", metric="ip", pq_m=8)
    build_dense_index(data["emb"], tmp_path / "idx", cfg, encoder_fingerprint=FP, use_ray=False, store_vectors=False)
    index = DenseIndex.load(tmp_path / "idx")
    assert len(index.search_vectors(data["Q"][:2], 5)[0]) == 5
    with pytest.raises(ArtifactError, match="pq index built without its vectors"):
        index.get_vectors(["p0"])


def test_build_refuses_bad_pq_parameters_before_any_shard(data, tmp_path):
    out = tmp_path / "idx"
    with pytest.raises(ConfigError, match=r"index.pq_m = 5 does not divide the index dimension 32.*divisors: \[2, 4, 8, 16\]"):
        build_dense_index(data["emb"], out, IndexConfig(quantization="pq", metric="ip", pq_m=5),
                          encoder_fingerprint=FP, use_ray=False)
    with pytest.raises(ConfigError, match=r"index dimension 33 \(D = 32 \+ 1 for metric mips_l2\)"):
        build_dense_index(data["emb"], out, IndexConfig(quantization="pq", pq_m=8),
                          encoder_fingerprint=FP, use_ray=False)
    with pytest.raises(ConfigError, match=r"index.ivf_nlist = 2000 exceeds the 1500 training vectors of shard 0"):
        build_dense_index(data["emb"], out, IndexConfig(quantization="pq", metric="ip", num_shards=2, ivf_nlist=2000),
                          encoder_fingerprint=FP, use_ray=False)
    with pytest.raises(ConfigError, match=r"shard 0 has 200 vectors, fewer than 2\*\*pq_nbits = 256"):
        build_dense_index(data["emb"], out, IndexConfig(quantization="pq", metric="ip", num_shards=15),
                          encoder_fingerprint=FP, use_ray=False)
    assert not out.exists() and not list(tmp_path.glob(".idx*"))  # nothing half-built left behind


def test_config_refuses_bad_pq_fields():
    cases = [
        (["index.quantization=pq", "index.exact=true"], "exact: true means float32 flat shards"),
        (["index.quantization=opq", "index.pq_coarse=hnsw", "index.metric=ip"], "searches L2 only"),
        (["index.quantization=pq", "index.pq_train_size=100"], r"below 2\*\*pq_nbits = 256"),
        (["index.quantization=pq", "index.ivf_nlist=5000", "index.pq_train_size=4000"],
         r"ivf_nlist \(5000\) exceeds pq_train_size \(4000\)"),
        (["index.pq_nbits=16"], "pq_nbits"),
        (["index.quantization=ivfpq"], "quantization"),
    ]
    for overrides, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            load_config(preset="tiny", overrides=overrides)


def test_pq_defaults_are_divisors_and_sized_from_the_shard():
    assert [default_pq_m(d) for d in (768, 384, 385, 33, 769)] == [96, 48, 35, 3, 1]
    assert default_ivf_nlist(2_625_000, 262_144) == 6481  # 21M / 8 shards: 4 sqrt(N)
    assert default_ivf_nlist(12_382, 12_382) == 317  # capped by 39 training points per list
    cfg = IndexConfig(quantization="opq", metric="ip")
    plans = plan_pq_shards(768, 768, [2_625_000] * 8, cfg)
    assert plans[0] == {"factory": "OPQ96,IVF6481,PQ96x8np", "pq_m": 96, "train_rows": 262_144, "nlist": 6481}
    with pytest.raises(ConfigError, match="no divisor between 2 and dimension/8"):
        plan_pq_shards(769, 768, [10_000], IndexConfig(quantization="pq"))


def test_compression_benchmark_memory_part_matches_faiss_layout(tmp_path):
    """benchmarks/compression.py's memory part on a few thousand random 768-d vectors: each kind's file
    bytes per vector are faiss's layout (fp32 4·D, SQ8 D, IVF-PQ m code bytes + 8 B id + centroids
    and codebooks spread over N)."""
    import json

    from benchmarks import compression

    path = compression.main(["--skip-recall", "--memory-n", "3000", "--memory-hnsw-n", "300", "--out",
                             str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    data = json.loads(path.read_text())
    rows = {r["kind"]: r for r in data["results"]["memory"]["kinds"]}
    n, d = 3000, 768
    assert abs(rows["flat fp32"]["disk_bytes_per_vector"] - 4 * d) < 1
    assert abs(rows["flat sq8"]["disk_bytes_per_vector"] - (d + 2 * d * 4 / n)) < 0.5  # + trained ranges
    for m in (64, 96):
        r = rows[f"ivf-pq m={m}"]
        fixed = (r["nlist"] * d + 256 * d) * 4 / n  # centroids + codebooks, per vector
        assert r["factory"] == f"IVF{r['nlist']},PQ{m}x8np"
        assert abs(r["disk_bytes_per_vector"] - (m + 8 + fixed)) < 2, r
    assert rows["hnsw-pq M=32 m=96"]["factory"] == "HNSW32_PQ96x8" and rows["hnsw-pq M=32 m=96"]["index_dim"] == d
    assert all(r["resident_bytes_per_vector"] > 0 for r in rows.values())
    assert data["ratios"]["memory flat sq8: resident / flat fp32"] < 0.5
