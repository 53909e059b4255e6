"""Dense index: MIPS transform, sharded build (Ray tasks / in-process), checks, search, actors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from re2g.config import IndexConfig
from re2g.errors import ArtifactError, DataFormatError
from re2g.index import dense, dense_build
from re2g.index.dense import (
    DenseIndex,
    DenseRetriever,
    ShardResult,
    build_dense_index,
    l2_to_ip,
    merge_topk,
    mips_to_l2_passages,
    mips_to_l2_queries,
    shard_bounds,
)

N, D, B = 3000, 32, 40
FP = "test-encoder@v1"


def write_embeddings(path: Path, pids, X, row_group_size: int = 500) -> Path:
    vec = pa.array([list(map(float, row)) for row in X], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"pid": pa.array(pids, pa.string()), "vector": vec}), path,
                   row_group_size=row_group_size)
    return path


def brute_force(X, Q, k):
    S = Q.astype(np.float64) @ X.astype(np.float64).T  # (B, N)
    top = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(S, top, axis=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # Clustered vectors with norms spread 0.5x-2x (so MIPS order differs from cosine order), like
    # real embeddings (topics). Isotropic Gaussian vectors are adversarial for the MIPS->L2
    # transform (queries lie far from the sphere the passages are mapped onto): measured here,
    # HNSW recall@10 at efSearch=128 was ~0.5 for mips_l2 there (1.0 for ip).
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, D))
    X = ((centers[rng.integers(0, 50, N)] + 0.7 * rng.standard_normal((N, D)))
         * rng.uniform(0.5, 2.0, (N, 1))).astype(np.float32)
    Q = (centers[rng.integers(0, 50, B)] + 0.7 * rng.standard_normal((B, D))).astype(np.float32)
    pids = [f"p{i}" for i in range(N)]
    root = tmp_path_factory.mktemp("dense")
    emb = root / "emb"
    emb.mkdir()
    # a directory of two files with several row groups: shard slices cross file and group bounds
    write_embeddings(emb / "part-0.parquet", pids[:1300], X[:1300], 400)
    write_embeddings(emb / "part-1.parquet", pids[1300:], X[1300:], 400)
    return {"X": X, "Q": Q, "pids": pids, "emb": emb, "root": root}


def cfg(**kw) -> IndexConfig:
    base = dict(num_shards=3, hnsw_m=16, ef_construction=80, ef_search=128)
    base.update(kw)
    return IndexConfig(**base)


@pytest.fixture(scope="module")
def flat_sharded(data):
    return build_dense_index(data["emb"], data["root"] / "flat3", cfg(exact=True), encoder_fingerprint=FP,
                             use_ray=False)


def pids_scores(results):
    return [[h.pid for h in r] for r in results], np.array([[h.score for h in r] for r in results])


# ----------------------------------------------------------------------------- pure math


def test_mips_transform_preserves_inner_product_order_by_hand():
    X = np.array([[1, 0], [0, 2], [1, 1]], np.float32)
    Xt = mips_to_l2_passages(X, 4.0)
    np.testing.assert_allclose(Xt, [[1, 0, np.sqrt(3)], [0, 2, 0], [1, 1, np.sqrt(2)]], rtol=1e-6)
    q = np.array([[3, 1]], np.float32)
    qt = mips_to_l2_queries(q)
    np.testing.assert_array_equal(qt, [[3, 1, 0]])
    d = ((qt[:, None, :] - Xt[None]) ** 2).sum(-1)  # (1, 3); ip = 3, 2, 4
    np.testing.assert_allclose(d, [[8, 10, 6]], rtol=1e-6)  # |q|^2 + 4 - 2 ip
    assert list(np.argsort(d[0])) == [2, 0, 1]  # = descending inner product
    np.testing.assert_allclose(l2_to_ip(d, (q.astype(np.float64) ** 2).sum(1), 4.0), [[3, 2, 4]], rtol=1e-6)


def test_mips_transform_random_order_and_norms():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 8)).astype(np.float32) * rng.uniform(0.1, 3, (200, 1)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    m = float((X.astype(np.float64) ** 2).sum(1).max())
    Xt, qt = mips_to_l2_passages(X, m), mips_to_l2_queries(q)
    np.testing.assert_allclose((Xt.astype(np.float64) ** 2).sum(1), m, rtol=1e-5)
    d = ((qt[:, None, :].astype(np.float64) - Xt[None]) ** 2).sum(-1)
    ip = q.astype(np.float64) @ X.T.astype(np.float64)
    for b in range(5):
        assert list(np.argsort(d[b])[:20]) == list(np.argsort(-ip[b])[:20])


def test_read_embedding_rows_across_files_and_groups(data):
    stats = dense.scan_embeddings(data["emb"])
    assert (stats.count, stats.dim, stats.file_rows) == (N, D, (1300, 1700))
    for start, end in [(0, 1), (350, 1750), (1299, 1301), (2999, 3000), (0, N)]:
        pids, X = dense.read_embedding_rows(stats.files, stats.file_rows, start, end, D, batch_size=128)
        assert pids == data["pids"][start:end]
        np.testing.assert_array_equal(X, data["X"][start:end])


def test_merge_topk_and_bounds():
    a = ShardResult(np.array([[5.0, 1.0]]), np.array([["a", "b"]], dtype=object))
    b = ShardResult(np.array([[3.0, -np.inf]]), np.array([["c", None]], dtype=object))
    assert merge_topk([a, b], 3) == [[("a", 5.0), ("c", 3.0), ("b", 1.0)]]
    assert merge_topk([a, b], 10) == [[("a", 5.0), ("c", 3.0), ("b", 1.0)]]
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]


# ----------------------------------------------------------------------------- exact + HNSW search


@pytest.mark.parametrize("metric", ["mips_l2", "ip"])
def test_sharded_flat_equals_unsharded_exact(data, tmp_path, metric):
    one = build_dense_index(data["emb"], tmp_path / "one", cfg(num_shards=1, exact=True, metric=metric),
                            encoder_fingerprint=FP, use_ray=False)
    three = build_dense_index(data["emb"], tmp_path / "three", cfg(num_shards=3, exact=True, metric=metric),
                              encoder_fingerprint=FP, use_ray=False)
    assert (one.num_shards, three.num_shards, three.total_count) == (1, 3, N)
    r1 = DenseIndex.load(one.path).search_vectors(data["Q"], 10)
    r3 = DenseIndex.load(three.path).search_vectors(data["Q"], 10)
    p1, s1 = pids_scores(r1)
    p3, s3 = pids_scores(r3)
    assert p1 == p3
    np.testing.assert_array_equal(s1, s3)
    assert all([h.rank for h in r] == list(range(10)) and {h.source for h in r} == {"dpr"} for r in r3)
    # and both are the true maximum inner product passages, with inner-product scores
    top, ip = brute_force(data["X"], data["Q"], 10)
    assert p3 == [[data["pids"][i] for i in row] for row in top]
    np.testing.assert_allclose(s3, ip, rtol=1e-4, atol=1e-3)


def recall_at_10(approx, exact) -> float:
    return float(np.mean([len({h.pid for h in a} & {h.pid for h in e}) / 10 for a, e in zip(approx, exact)]))


@pytest.mark.parametrize("metric", ["mips_l2", "ip"])
def test_hnsw_recall_at_10_vs_exact(data, flat_sharded, tmp_path, metric):
    info = build_dense_index(data["emb"], tmp_path / "hnsw", cfg(num_shards=2, metric=metric),
                             encoder_fingerprint=FP, use_ray=False)
    assert info.manifest["faiss_index"] == "IndexHNSWFlat"
    exact = DenseIndex.load(flat_sharded.path).search_vectors(data["Q"], 10)
    idx = DenseIndex.load(info.path)  # efSearch 128 from the manifest
    assert all(s.index.hnsw.efSearch == 128 for s in idx.shards)
    assert recall_at_10(idx.search_vectors(data["Q"], 10), exact) >= 0.95
    idx.set_ef_search(256)
    assert all(s.index.hnsw.efSearch == 256 for s in idx.shards)
    low = DenseIndex.load(info.path, ef_search=4, verify=False)
    assert all(s.index.hnsw.efSearch == 4 for s in low.shards)


def test_hnsw_sq8(data, flat_sharded, tmp_path):
    info = build_dense_index(data["emb"], tmp_path / "sq8", cfg(num_shards=2, quantization="sq8"),
                             encoder_fingerprint=FP, use_ray=False)
    assert info.manifest["faiss_index"] == "IndexHNSWSQ"
    exact = DenseIndex.load(flat_sharded.path).search_vectors(data["Q"], 10)
    idx = DenseIndex.load(info.path)
    assert recall_at_10(idx.search_vectors(data["Q"], 10), exact) >= 0.9
    # 8-bit storage is lossy: the original vectors stay beside it (.npy) and come back exactly
    assert all(s["vectors_file"].endswith(".vectors.npy") for s in info.manifest["shards"])
    np.testing.assert_array_equal(idx.get_vectors(["p2999", "p0"]), data["X"][[2999, 0]])


def test_manifest_contents(flat_sharded, data):
    m = flat_sharded.manifest
    assert m["dim"] == D and m["index_dim"] == D + 1 and m["metric"] == "mips_l2"
    assert m["transform"]["max_norm_sq"] == pytest.approx(float((data["X"].astype(np.float64) ** 2).sum(1).max()))
    assert m["encoder_fingerprint"] == FP and m["total_count"] == N and len(m["shards"]) == 3
    assert [s["count"] for s in m["shards"]] == [1000, 1000, 1000]
    files = [s[k] for s in m["shards"] for k in ("file", "pid_file")]
    assert not any("vectors_file" in s for s in m["shards"])  # float32 shards: vectors stored once, in faiss
    assert not list(Path(flat_sharded.path).glob("*.npy"))
    assert sorted(m["checksums"]) == sorted(files) and all(len(v) == 64 for v in m["checksums"].values())
    assert (Path(flat_sharded.path) / "config.yaml").is_file()


# ----------------------------------------------------------------------------- Ray: tasks and actors


def test_build_with_ray_tasks_equals_in_process(data, tmp_path, ray_local):
    c = cfg(num_shards=2, hnsw_m=8, ef_construction=40)
    a = build_dense_index(data["emb"], tmp_path / "ray", c, encoder_fingerprint=FP, use_ray=True)
    b = build_dense_index(data["emb"], tmp_path / "local", c, encoder_fingerprint=FP, use_ray=False)
    assert a.manifest["shards"] == b.manifest["shards"]
    assert a.manifest["checksums"] == b.manifest["checksums"]  # same files, byte for byte (sha256)
    ra = DenseIndex.load(a.path).search_vectors(data["Q"], 10)
    rb = DenseIndex.load(b.path).search_vectors(data["Q"], 10)
    assert ra == rb


def test_actor_sharded_search_equals_in_process(data, flat_sharded, tmp_path, ray_local):
    from re2g.index.shards import ActorShardedIndex

    info = build_dense_index(data["emb"], tmp_path / "h", cfg(num_shards=3, hnsw_m=8, ef_construction=40),
                             encoder_fingerprint=FP, use_ray=False)
    for path in (flat_sharded.path, info.path):
        local = DenseIndex.load(path)
        actors = ActorShardedIndex.start(path, expected_fingerprint=FP, num_cpus=0.1, namespace="dense-test")
        try:
            assert actors.search_vectors(data["Q"], 10) == local.search_vectors(data["Q"], 10)
            assert actors.search_vectors(data["Q"][:1], 7) == local.search_vectors(data["Q"][:1], 7)
            # named: another process (a training worker, a Serve replica) finds the same shards
            ray_local.get_actor(actors.names[0], namespace="dense-test")
            other = ActorShardedIndex.attach(actors.name_prefix, 3, namespace="dense-test", index_dir=path)
            assert other.search_vectors(data["Q"][:3], 5) == local.search_vectors(data["Q"][:3], 5)
            pids = ["p2999", "p0", "p1500"]
            np.testing.assert_array_equal(actors.get_vectors(pids), data["X"][[2999, 0, 1500]])
            with pytest.raises(KeyError, match="nope"):
                actors.get_vectors(["p1", "nope"])
        finally:
            actors.shutdown()


def test_passage_lookup_is_a_mapping_over_arrow():
    """PassageLookup (what load_passage_lookup returns): the dict it replaced, without a Python
    object per passage; a pid given twice keeps its first row; unknown or non-str keys are missing."""
    import pickle

    import pyarrow as pa

    from re2g.index.dense import PassageLookup

    t = pa.table({"pid": ["b", "a", "c::[1,2]", "a", "é::[1,1]"], "title": ["B", "A", None, "A2", "E"],
                  "text": ["tb", "ta", "tc", "x", "te"], "wikipedia_id": [2, 1, None, 9, 5]})
    lookup = PassageLookup.from_table(pa.concat_tables([t.slice(0, 2), t.slice(2)]))  # two chunks
    assert dict(lookup) == {"b": ("B", "tb", "2"), "a": ("A", "ta", "1"), "c::[1,2]": ("", "tc", None),
                            "é::[1,1]": ("E", "te", "5")}
    assert list(lookup) == ["b", "a", "c::[1,2]", "é::[1,1]"] and len(lookup) == 4  # corpus order
    assert "a" in lookup and "c::[1,2]x" not in lookup and "" not in lookup and 3 not in lookup
    with pytest.raises(KeyError, match="zz"):
        lookup["zz"]
    assert lookup.get("zz") is None
    assert dict(pickle.loads(pickle.dumps(lookup))) == dict(lookup)  # shipped to Ray workers
    empty = PassageLookup.from_table(t.slice(0, 0))
    assert len(empty) == 0 and list(empty) == [] and "a" not in empty
    no_wid = PassageLookup.from_table(t.drop_columns(["wikipedia_id"]))
    assert no_wid["b"] == ("B", "tb", None)


def test_shard_actor_restarts_after_it_dies(data, flat_sharded, ray_local):
    """``max_restarts``: a shard actor killed (as when its node is lost) comes back with its shard
    reloaded, and a search sent while it restarts is retried and returns the same results."""
    from re2g.index.shards import ActorShardedIndex

    local = DenseIndex.load(flat_sharded.path)
    actors = ActorShardedIndex.start(flat_sharded.path, expected_fingerprint=FP, num_cpus=0.1,
                                     namespace="dense-restart", max_restarts=1)
    try:
        def pid():
            return ray_local.get(actors.actors[1].__ray_call__.remote(lambda self: os.getpid()))

        want = local.search_vectors(data["Q"][:5], 10)
        assert actors.search_vectors(data["Q"][:5], 10) == want
        before = pid()
        ray_local.kill(actors.actors[1], no_restart=False)
        assert actors.search_vectors(data["Q"][:5], 10) == want
        assert pid() != before  # a new process: the actor was restarted and loaded its shard again
    finally:
        actors.shutdown()


def test_actor_start_reports_corrupt_shard(flat_sharded, tmp_path, ray_local):
    from re2g.index.shards import ActorShardedIndex

    bad = tmp_path / "bad"
    shutil.copytree(flat_sharded.path, bad)
    (bad / "shard_00002.faiss").unlink()
    with pytest.raises(ArtifactError, match="shard_00002.faiss"):
        ActorShardedIndex.start(bad, num_cpus=0.1)
    with pytest.raises(ArtifactError, match="fingerprint"):
        ActorShardedIndex.start(flat_sharded.path, expected_fingerprint="other", num_cpus=0.1)


# ----------------------------------------------------------------------------- atomic build, checks


def _no_leftovers(parent: Path, name: str) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_failed_build_leaves_nothing_loadable(data, tmp_path, monkeypatch):
    real = dense_build.build_shard

    def crash_on_shard_1(*args):
        if args[5] == 1:  # shard_id
            raise RuntimeError("simulated crash mid-build")
        return real(*args)

    monkeypatch.setattr(dense_build, "build_shard", crash_on_shard_1)
    out = tmp_path / "idx"
    with pytest.raises(RuntimeError, match="simulated"):
        build_dense_index(data["emb"], out, cfg(exact=True), encoder_fingerprint=FP, use_ray=False)
    assert not out.exists() and _no_leftovers(tmp_path, "idx")
    with pytest.raises(ArtifactError):
        DenseIndex.load(out)
    # an existing index survives a failed overwrite untouched
    monkeypatch.setattr(dense_build, "build_shard", real)
    good = build_dense_index(data["emb"], out, cfg(exact=True), encoder_fingerprint=FP, use_ray=False)
    monkeypatch.setattr(dense_build, "build_shard", crash_on_shard_1)
    with pytest.raises(RuntimeError):
        build_dense_index(data["emb"], out, cfg(exact=True), encoder_fingerprint="new", overwrite=True,
                          use_ray=False)
    assert DenseIndex.load(out).encoder_fingerprint == FP == good.encoder_fingerprint
    assert _no_leftovers(tmp_path, "idx")


def test_failed_ray_build_after_shards_leaves_nothing(data, tmp_path, monkeypatch, ray_local):
    def boom(*a, **k):
        raise OSError("disk full while writing the manifest")

    monkeypatch.setattr(dense_build, "write_manifest", boom)
    out = tmp_path / "idx"
    with pytest.raises(OSError):
        build_dense_index(data["emb"], out, cfg(num_shards=2, exact=True), encoder_fingerprint=FP)
    assert not out.exists() and _no_leftovers(tmp_path, "idx")


def test_existing_out_dir_needs_overwrite(data, flat_sharded):
    with pytest.raises(ArtifactError, match="overwrite"):
        build_dense_index(data["emb"], flat_sharded.path, cfg(exact=True), encoder_fingerprint=FP, use_ray=False)


def test_normal_load_hashes_no_file_and_verify_finds_a_flipped_byte(flat_sharded, tmp_path, monkeypatch):
    """A byte changed mid-file (size and ends unchanged) loads normally: the load reads no file whole
    (sha256 is never computed); ``verify=True`` and ``re2g index verify`` find it, naming the file."""
    from typer.testing import CliRunner

    from re2g import artifacts
    from re2g.cli import app
    from re2g.index.verify import verify_artifacts

    bad = tmp_path / "bad"
    shutil.copytree(flat_sharded.path, bad)
    f = bad / "shard_00001.faiss"
    raw = bytearray(f.read_bytes())
    assert len(raw) > 2 * dense.ENDS_BYTES  # the flipped byte lies outside the ends a load hashes
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))

    def no_full_hash(path, *a, **kw):
        raise AssertionError(f"a normal load hashed {path} whole")

    with monkeypatch.context() as m:
        m.setattr(artifacts, "sha256_file", no_full_hash)
        assert len(DenseIndex.load(bad)) == N
    with pytest.raises(ArtifactError, match=r"shard_00001\.faiss: checksum mismatch"):
        DenseIndex.load(bad, verify=True)

    checks = verify_artifacts(bad)
    assert {c.file: c.status for c in checks if not c.ok} == {"shard_00001.faiss": "mismatch"}
    assert len(checks) == 6 and sum(c.ok for c in checks) == 5  # faiss, pids per shard
    res = CliRunner().invoke(app, ["index", "verify", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "mismatch bad/shard_00001.faiss  (sha256 " in res.output and "ok       bad/shard_00000.faiss" in res.output
    good = CliRunner().invoke(app, ["index", "verify", str(flat_sharded.path)])
    assert good.exit_code == 0 and good.output.count("ok ") == 6, good.output
    empty = CliRunner().invoke(app, ["index", "verify", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "not a directory" in " ".join(empty.output.split())


def test_truncated_or_swapped_shard_fails_a_normal_load(flat_sharded, tmp_path):
    """Sizes and ends, checked at every load: a truncated file and two shards' files swapped (same
    size: 1,000 vectors each) are refused, naming the file."""
    trunc = tmp_path / "trunc"
    shutil.copytree(flat_sharded.path, trunc)
    v = trunc / "shard_00002.pids.parquet"
    v.write_bytes(v.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"shard_00002\.pids\.parquet: shard pid file is \d+ bytes, the "
                                            r"manifest says \d+ \(truncated"):
        DenseIndex.load(trunc)
    from re2g.index.verify import verify_artifacts

    assert [(c.file, c.status) for c in verify_artifacts(trunc) if not c.ok] == [("shard_00002.pids.parquet", "size")]

    swap = tmp_path / "swap"
    shutil.copytree(flat_sharded.path, swap)
    a, b = swap / "shard_00000.faiss", swap / "shard_00002.faiss"
    assert a.stat().st_size == b.stat().st_size
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    with pytest.raises(ArtifactError, match=r"shard_00000\.faiss: shard index file changed on disk"):
        DenseIndex.load(swap)


def test_missing_shard_file_is_clear(flat_sharded, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(flat_sharded.path, bad)
    (bad / "shard_00000.pids.parquet").unlink()
    with pytest.raises(ArtifactError, match=r"shard_00000\.pids\.parquet.*missing"):
        DenseIndex.load(bad, verify=False)
    (bad / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json"):
        DenseIndex.load(bad)


def test_fingerprint_mismatch_names_both(flat_sharded):
    with pytest.raises(ArtifactError) as e:
        DenseIndex.load(flat_sharded.path, expected_fingerprint="other-encoder@v2")
    assert FP in str(e.value) and "other-encoder@v2" in str(e.value)
    assert DenseIndex.load(flat_sharded.path, expected_fingerprint=FP).encoder_fingerprint == FP


# ----------------------------------------------------------------------------- bad embeddings


def _build(path, out):
    return build_dense_index(path, out, cfg(exact=True), encoder_fingerprint=FP, use_ray=False)


def test_bad_embeddings_are_clear_errors(tmp_path):
    X = np.ones((4, 3), np.float32)
    empty = write_embeddings(tmp_path / "empty.parquet", [], np.zeros((0, 3)))
    with pytest.raises(DataFormatError, match="empty.parquet.*no embeddings"):
        _build(empty, tmp_path / "o")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataFormatError, match="no .parquet files"):
        _build(tmp_path / "emptydir", tmp_path / "o")

    dup = write_embeddings(tmp_path / "dup.parquet", ["a", "b", "c", "b"], X)
    with pytest.raises(DataFormatError, match=r"dup\.parquet:4: field 'pid': duplicate pid 'b' \(first at row 2\)"):
        _build(dup, tmp_path / "o")

    Xn = X.copy()
    Xn[2, 1] = np.nan
    nan = write_embeddings(tmp_path / "nan.parquet", ["a", "b", "c", "d"], Xn)
    with pytest.raises(DataFormatError, match=r"nan\.parquet:3: field 'vector': .*non-finite"):
        _build(nan, tmp_path / "o")

    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"pid": ["a", "b", "c"], "vector": pa.array([[1.0, 2.0], [1.0, 2.0], [1.0]],
                                                                     pa.list_(pa.float32()))}), mixed)
    with pytest.raises(DataFormatError, match=r"mixed\.parquet:3: field 'vector': vector has 1 values, expected 2"):
        _build(mixed, tmp_path / "o")

    # dimension must also agree across files of a directory, rows counted per file
    d = tmp_path / "dir"
    d.mkdir()
    write_embeddings(d / "a.parquet", ["a", "b"], np.ones((2, 3)))
    write_embeddings(d / "b.parquet", ["c", "d"], np.ones((2, 4)))
    with pytest.raises(DataFormatError, match=r"b\.parquet:1: field 'vector'"):
        _build(d, tmp_path / "o")

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"pid": [1, 2], "vector": [[1.0], [2.0]]}), wrong)
    with pytest.raises(DataFormatError, match="field 'pid': expected string"):
        _build(wrong, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- vectors, passages, retriever


def test_get_vectors_round_trip(data, flat_sharded, tmp_path):
    """Float32 shards give the original vectors back from faiss's storage (``reconstruct_batch``, the
    mips_l2 column dropped), HNSW-Flat too; an index built before that, with a ``.npy`` per shard,
    still loads and reads it."""
    pids = ["p2999", "p0", "p1300", "p1299", "p0"]
    hnsw = build_dense_index(data["emb"], tmp_path / "h", cfg(num_shards=2, hnsw_m=8, ef_construction=40, metric="ip"),
                             encoder_fingerprint=FP, use_ray=False)
    for path in (flat_sharded.path, hnsw.path):
        idx = DenseIndex.load(path)
        assert all(s._vectors_path is None and s.vectors_in_index for s in idx.shards)
        np.testing.assert_array_equal(idx.get_vectors(pids), data["X"][[2999, 0, 1300, 1299, 0]])
        assert idx.get_vectors([]).shape == (0, D)
        with pytest.raises(KeyError, match="'missing-pid'"):
            idx.get_vectors(["p1", "missing-pid"])

    # an older index: every shard with its vectors beside it, in the manifest (sizes, ends, sha256)
    from re2g.artifacts import sha256_file
    from re2g.file_checks import file_records
    from re2g.index.dense_format import shard_file_names

    old = tmp_path / "old"
    shutil.copytree(flat_sharded.path, old)
    m = json.loads((old / "manifest.json").read_text())
    for entry in m["shards"]:
        name = shard_file_names(entry["shard"])["vectors_file"]
        np.save(old / name, data["X"][entry["start"]:entry["end"]] * 2)  # x2: the .npy is read, not the index
        entry["vectors_file"] = name
        m["checksums"][name] = sha256_file(old / name)
    m["sizes"], m["ends_sha256"] = file_records(old, sorted(m["checksums"]))
    (old / "manifest.json").write_text(json.dumps(m))
    idx = DenseIndex.load(old, verify=True)
    assert all(s._vectors_path is not None for s in idx.shards)
    np.testing.assert_array_equal(idx.get_vectors(pids), 2 * data["X"][[2999, 0, 1300, 1299, 0]])




class FakeEncoder:
    """Queries are 'q<i>' -> the i-th test query vector."""

    def __init__(self, Q):
        self.Q = Q

    def embed_queries(self, texts):
        return self.Q[[int(t[1:]) for t in texts]]


def test_dense_retriever_with_passages(data, flat_sharded, tmp_path, monkeypatch):
    monkeypatch.setenv("RE2G_CACHE", str(tmp_path / "cache"))  # a single Parquet file's store lives there
    passages = tmp_path / "passages.parquet"
    pq.write_table(pa.table({"pid": data["pids"], "title": [f"T{i}" for i in range(N)],
                             "text": [f"text {i}" for i in range(N)],
                             "wikipedia_id": [str(i // 10) for i in range(N)]}), passages)
    idx = DenseIndex.load(flat_sharded.path)
    r = DenseRetriever(idx, FakeEncoder(data["Q"]), passages=passages)
    hits = r.search("q3", 5)
    assert hits == idx.search_vectors(data["Q"][3:4], 5)[0]
    i = int(hits[0].pid[1:])
    assert (hits[0].title, hits[0].text, hits[0].wikipedia_id) == (f"T{i}", f"text {i}", str(i // 10))
    batch = r.batch_search(["q0", "q3"], 5)
    assert batch[1] == hits and len(batch[0]) == 5
    assert r.batch_search([], 5) == [] and r.search("q1", 0) == []
    with pytest.raises(ValueError, match=r"\(B, 32\)"):
        idx.search_vectors(np.zeros((2, 31), np.float32), 3)
