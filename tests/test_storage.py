"""Remote run directories through a local mirror (fsspec's in-memory filesystem stands in for s3://)."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from re2g.storage import RunDirMirror, is_remote, to_local_path


def test_uri_helpers():
    assert is_remote("s3://b/run") and is_remote("memory://x")
    assert not is_remote("/tmp/run") and not is_remote("file:///tmp/run")
    assert to_local_path("file:///tmp/run") == "/tmp/run" and to_local_path("runs/x") == "runs/x"


def test_mirror_pull_push_markers_last(tmp_path, monkeypatch):
    fs = fsspec.filesystem("memory")
    root = "memory://mirror-test/run"
    fs.pipe({f"{root}/passages/part-0.parquet": b"x" * 10, f"{root}/passages/_manifest.json": b"{}"})
    m = RunDirMirror(root, cache_root=tmp_path)
    assert m.pull() == 2 and m.pull() == 0  # nothing downloaded twice
    assert Path(m.localize(f"{root}/passages/part-0.parquet")).read_bytes() == b"x" * 10
    assert m.localize("s3://other/x") == "s3://other/x" and m.localize(None) is None

    out = Path(m.local, "index", "dense")
    out.mkdir(parents=True)
    (out / "shard_00000.faiss").write_bytes(b"f" * 5)
    (out / "manifest.json").write_text("{}")
    Path(m.local, ".index.building-1").mkdir()
    Path(m.local, ".index.building-1", "junk").write_text("tmp")
    Path(m.local, "index", ".bm25.tmp-123-abcd1234").mkdir()  # a nested build's temporary, and a file's
    Path(m.local, "index", ".bm25.tmp-123-abcd1234", "segments_1").write_text("tmp")
    (out / ".manifest.json.tmp-123-abcd1234").write_text("{")
    order = []
    orig = m.fs.put_file
    monkeypatch.setattr(m.fs, "put_file", lambda src, dst, **kw: (order.append(dst), orig(src, dst, **kw)))
    assert m.push() == 2  # the two new files; unchanged pulled files and temporary dirs stay
    assert order[-1].endswith("index/dense/manifest.json") and order[0].endswith("shard_00000.faiss")
    assert fs.cat(f"{root}/index/dense/shard_00000.faiss") == b"f" * 5
    assert not fs.exists(f"{root}/.index.building-1/junk") and not fs.exists(f"{root}/index/.bm25.tmp-123-abcd1234")


def test_build_index_job_on_a_remote_run_dir(tiny_passages, tiny_models, tmp_path, monkeypatch, ray_local):
    """The job pulls passages + embeddings from the 'bucket', builds on the mirror, pushes the indexes."""
    from jobs import build_index
    from re2g.index.embed import embed_corpus_local

    monkeypatch.setenv("RE2G_CACHE", str(tmp_path / "cache"))
    emb = tmp_path / "emb"
    embed_corpus_local(str(tiny_passages), str(tiny_models["biencoder"]), str(emb), progress=False)
    fs = fsspec.filesystem("memory")
    root = "memory://bucket-job/run"
    fs.put(str(tiny_passages), f"{root}/passages", recursive=True)
    fs.put(str(emb), f"{root}/embeddings", recursive=True)
    assert build_index.main(["--preset", "tiny", "--set", f"run_dir={root}", "--set", "index.num_shards=2",
                             "--set", "index.hnsw_m=16"]) == 0
    manifest = json.loads(fs.cat(f"{root}/index/dense/manifest.json"))
    assert len(manifest["shards"]) == 2
    for s in manifest["shards"]:
        assert fs.exists(f"{root}/index/dense/{s['file']}")
    assert fs.exists(f"{root}/index/bm25/re2g_bm25.json")
    assert fs.exists(f"{root}/config.yaml") and fs.exists(f"{root}/jobs/build_index.json")
    assert "run_dir: memory://bucket-job/run" in fs.cat(f"{root}/config.yaml").decode()


@pytest.mark.parametrize("missing", ["embeddings"])
def test_remote_run_dir_missing_input_is_a_clear_error(tmp_path, monkeypatch, missing, ray_local, capsys):
    from jobs import build_index

    monkeypatch.setenv("RE2G_CACHE", str(tmp_path / "cache"))
    fsspec.filesystem("memory").pipe("memory://bucket-empty/run/passages/_manifest.json", b"{}")
    assert build_index.main(["--preset", "tiny", "--set", "run_dir=memory://bucket-empty/run", "--no-bm25"]) == 2
    assert missing in capsys.readouterr().err


def test_pull_verifies_checksummed_files_it_downloads(tmp_path):
    """A passage store (or dense index) file that arrives different from its manifest's sha256 is
    refused by name and removed from the mirror; the next pull downloads it again."""
    from re2g.data.passage_files import load_passage_lookup, write_passages
    from re2g.errors import ArtifactError

    src = tmp_path / "src" / "passages"
    write_passages([{"pid": f"p{i}", "title": f"T{i}", "text": f"text {i}", "wikipedia_id": None} for i in range(50)],
                   str(src))
    fs = fsspec.filesystem("memory")
    root = "memory://verify-test/run"
    files = {f"{root}/passages/{p.relative_to(src).as_posix()}": p.read_bytes() for p in src.rglob("*") if p.is_file()}
    good = files[f"{root}/passages/_store/pids.npy"]
    bad = bytearray(good)
    bad[-1] ^= 0x01  # same size
    fs.pipe({**files, f"{root}/passages/_store/pids.npy": bytes(bad)})
    m = RunDirMirror(root, cache_root=tmp_path / "cache")
    with pytest.raises(ArtifactError, match=r"passages/_store/pids\.npy does not match its manifest \(mismatch: sha256"):
        m.pull()
    assert not Path(m.local, "passages", "_store", "pids.npy").exists()
    fs.pipe(f"{root}/passages/_store/pids.npy", good)
    assert m.pull() == 1
    assert load_passage_lookup(m.localize(f"{root}/passages"))["p7"] == ("T7", "text 7", None)
