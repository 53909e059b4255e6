"""The memory-mapped passage store: the same answers as the in-memory lookup, built with the
passages artifact or once for older ones, checked at open, verified on demand, pickled as a path,
and its pages shared by two processes (the OS's own counters)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from re2g.data.passage_files import (
    PassageLookup,
    count_passages,
    load_passage_lookup,
    read_passages,
    write_passages,
)
from re2g.data.passage_store import STORE_DIR, PassageStore, open_passage_store, store_location
from re2g.errors import ArtifactError, DataFormatError

# duplicates with other content (the first row wins), a NUL-free non-ASCII pid, a null title, a missing page
ROWS = [{"pid": "b", "title": "B", "text": "tb", "wikipedia_id": "2"},
        {"pid": "a", "title": "A", "text": "ta", "wikipedia_id": "1"},
        {"pid": "c::[1,2]", "title": None, "text": "tc", "wikipedia_id": None},
        {"pid": "a", "title": "A2", "text": "second a", "wikipedia_id": "9"},
        {"pid": "é::[1,1]", "title": "E", "text": "te", "wikipedia_id": "5"}]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RE2G_CACHE", str(tmp_path / "cache"))


def _single_file(path: Path, rows) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in rows[0]])), path)
    return path


def test_store_answers_like_the_in_memory_lookup(tmp_path):
    """Over many batches: every pid, get_many's order and misses, corpus-order iteration."""
    rows = [{"pid": f"{i}::[{i % 7},{i % 7}]", "title": f"T{i}", "text": f"text of passage {i}",
             "wikipedia_id": str(i) if i % 3 else None} for i in range(150_000)]  # 3 record batches
    write_passages(rows, str(tmp_path / "p"))
    store, old = load_passage_lookup(str(tmp_path / "p")), PassageLookup.from_table(read_passages(str(tmp_path / "p")))
    assert isinstance(store, PassageStore) and store.path == str(tmp_path / "p" / STORE_DIR)
    assert len(store._batches) == 3 and len(store) == len(old) == 150_000
    assert list(store) == list(old)
    pids = [r["pid"] for r in rows]
    assert store.get_many(pids) == [old[p] for p in pids]
    assert store.get_many(["nope", pids[7], "x" * 500, pids[149_999], ""]) == [None, old[pids[7]], None,
                                                                             old[pids[149_999]], None]


def test_mapping_interface_duplicates_and_pickling(tmp_path):
    write_passages(ROWS, str(tmp_path / "p"))
    store = load_passage_lookup(str(tmp_path / "p"))
    want = {"b": ("B", "tb", "2"), "a": ("A", "ta", "1"), "c::[1,2]": ("", "tc", None), "é::[1,1]": ("E", "te", "5")}
    assert dict(store) == want == dict(PassageLookup.from_table(read_passages(str(tmp_path / "p"), validate=False)))
    assert list(store) == ["b", "a", "c::[1,2]", "é::[1,1]"] and len(store) == 4
    assert store.manifest.counts == {"passages": 4, "rows": 5, "duplicates": 1}
    assert "a" in store and "c::[1,2]x" not in store and "" not in store and 3 not in store and "a\0" not in store
    with pytest.raises(KeyError, match="zz"):
        store["zz"]
    assert store.get("zz") is None and store.get("a") == ("A", "ta", "1")
    blob = pickle.dumps(store)
    assert len(blob) < 300  # the path, not the passages (Ray actors reopen the files)
    assert dict(pickle.loads(blob)) == want


def test_parquet_readers_skip_the_store(tmp_path):
    write_passages(ROWS[:3], str(tmp_path / "p"))
    assert (tmp_path / "p" / STORE_DIR / "_store.json").is_file()
    assert pads.dataset(str(tmp_path / "p"), format="parquet").count_rows() == 3
    assert pq.read_table(str(tmp_path / "p")).num_rows == 3 == count_passages(str(tmp_path / "p"))
    assert read_passages(str(tmp_path / "p"), validate=False).num_rows == 3


def test_older_passages_get_a_store_once_with_a_warning(tmp_path, caplog):
    """Passages written before the store: built on first open (a warning says so), then opened as is;
    a passages directory rewritten in place (other fingerprint) gets its store rebuilt."""
    import shutil

    write_passages(ROWS[:3], str(tmp_path / "p"))
    shutil.rmtree(tmp_path / "p" / STORE_DIR)
    with caplog.at_level(logging.WARNING, logger="re2g.data.passage_store"):
        store = open_passage_store(str(tmp_path / "p"))
    assert "no passage store yet" in caplog.text and "building the memory-mapped passage store once" in caplog.text
    assert dict(store)["b"] == ("B", "tb", "2")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="re2g.data.passage_store"):
        assert len(open_passage_store(str(tmp_path / "p"))) == 3
    assert caplog.text == ""
    write_passages(ROWS[:2], str(tmp_path / "q"))
    shutil.rmtree(tmp_path / "q" / STORE_DIR)
    with pytest.raises(ArtifactError, match="no passage store yet"):
        open_passage_store(str(tmp_path / "q"), build=False)

    # the Parquet replaced behind the store's back: a fingerprint mismatch, rebuilt
    part = tmp_path / "p" / "part-00000.parquet"
    _single_file(part, [{**r, "text": r["text"] + " changed"} for r in ROWS[:3]])
    with caplog.at_level(logging.WARNING, logger="re2g.data.passage_store"):
        assert open_passage_store(str(tmp_path / "p"))["b"] == ("B", "tb changed", "2")
    assert "built from other passages" in caplog.text


def test_single_file_store_lives_in_the_cache(tmp_path):
    f = _single_file(tmp_path / "one.parquet", ROWS)
    where = store_location(str(f))
    assert where.startswith(str(tmp_path / "cache" / "passage_stores"))
    assert load_passage_lookup(str(f))["a"] == ("A", "ta", "1")
    assert Path(where, "_store.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "one.parquet"]


def test_bad_pids_are_refused_at_build(tmp_path):
    f = _single_file(tmp_path / "bad.parquet", [ROWS[0], {**ROWS[1], "pid": ""}])
    with pytest.raises(DataFormatError, match=r"bad\.parquet:2: field 'pid'"):
        load_passage_lookup(str(f))
    with pytest.raises(DataFormatError, match="passages not found"):
        load_passage_lookup(str(tmp_path / "missing"))


def test_truncated_or_changed_store_files(tmp_path):
    """A truncated file or one swapped in from another store is refused at open (sizes, ends); a byte
    changed in place is found by ``re2g index verify`` on the passages directory, naming the file."""
    from typer.testing import CliRunner

    from re2g.cli import app
    from re2g.index.verify import verify_artifacts

    rows = [{"pid": f"p{i}", "title": f"T{i}", "text": f"text {i} " * 20, "wikipedia_id": None} for i in range(2000)]
    write_passages(rows, str(tmp_path / "p"))
    arrow = tmp_path / "p" / STORE_DIR / "passages.arrow"
    raw = bytearray(arrow.read_bytes())
    raw[len(raw) // 2] ^= 0x20  # inside a text: same size, the store still opens
    arrow.write_bytes(bytes(raw))
    assert len(PassageStore(tmp_path / "p" / STORE_DIR)) == 2000
    checks = verify_artifacts(tmp_path / "p")
    assert [(c.file, c.status) for c in checks] == [("passages.arrow", "mismatch"), ("pids.npy", "ok"), ("rows.npy", "ok")]
    res = CliRunner().invoke(app, ["index", "verify", str(tmp_path / "p")])
    assert res.exit_code == 1 and "mismatch _store/passages.arrow  (sha256" in res.output, res.output

    other = [{**r, "pid": "q" + r["pid"][1:]} for r in rows]  # another store of the same shape
    write_passages(other, str(tmp_path / "q"))
    pids = tmp_path / "p" / STORE_DIR / "pids.npy"
    pids.write_bytes((tmp_path / "q" / STORE_DIR / "pids.npy").read_bytes())  # same size: swapped in
    with pytest.raises(ArtifactError, match=r"pids\.npy: changed on disk: its first/last 64 KiB differ"):
        PassageStore(tmp_path / "p" / STORE_DIR)
    pids.write_bytes(pids.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"pids\.npy: \d+ bytes, the store's manifest says \d+ \(truncated"):
        PassageStore(tmp_path / "p" / STORE_DIR)


_TOUCH = textwrap.dedent("""
    import gc, json, sys
    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
        return out
    def arrow_mapping():  # Rss, Pss and shared pages of the mapping of passages.arrow (smaps)
        out, inside = {}, False
        for line in open("/proc/self/smaps"):
            if not line[0].isupper() or "-" in line.split()[0]:
                inside = line.rstrip().endswith("passages.arrow")
                continue
            k, _, v = line.partition(":")
            if inside and k in ("Rss", "Pss", "Shared_Clean", "Shared_Dirty"):  # dirty: not yet written back
                k = "Shared" if k.startswith("Shared") else k
                out[k] = out.get(k, 0) + int(v.split()[0]) * 1024
        return out
    import itertools
    from re2g.data.passage_store import PassageStore
    PassageStore(sys.argv[1]).get_many(["0::[1,1]"])  # warm-up: the lazy imports of the first open
    gc.collect()
    before = status()
    store = PassageStore(sys.argv[1])
    pids, chars = iter(store), 0
    while chunk := list(itertools.islice(pids, 1000)):
        chars += sum(len(info[1]) for info in store.get_many(chunk))
    gc.collect()
    after = status()
    print(json.dumps({"anon_growth": after["RssAnon"] - before["RssAnon"], "chars": chars, **arrow_mapping()}),
          flush=True)
    sys.stdin.readline()
""")


def test_two_processes_share_the_store_pages(tmp_path):
    """The second process that reads every passage maps the first one's pages: its private (anonymous)
    memory grows by a small fraction of the file, and the file's pages count half to each (Pss)."""
    rows = [{"pid": f"{i}::[1,1]", "title": f"Title {i}", "text": f"word{i % 97} " * 120, "wikipedia_id": str(i)}
            for i in range(30_000)]  # ~25 MB of text
    write_passages(rows, str(tmp_path / "p"))
    store_dir = tmp_path / "p" / STORE_DIR
    size = (store_dir / "passages.arrow").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start():
        return subprocess.Popen([sys.executable, "-c", _TOUCH, str(store_dir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)

    first = start()
    try:
        a = json.loads(first.stdout.readline())
        second = start()
        try:
            b = json.loads(second.stdout.readline())
        finally:
            second.communicate("\n", timeout=60)
    finally:
        first.communicate("\n", timeout=60)
    assert a["chars"] == b["chars"] == sum(len(r["text"]) for r in rows)
    assert b["Rss"] > 0.9 * size  # the second process did read every page of the file...
    assert b["Shared"] > 0.9 * size and b["Pss"] < 0.6 * b["Rss"]  # ...the first one's pages, shared
    assert b["anon_growth"] < 0.2 * size, (b, size)  # its own memory: a small fraction of the file


def test_a_stale_store_in_a_read_only_directory_is_rebuilt_in_the_cache(tmp_path, monkeypatch):
    """Passages rewritten in a directory this process may not write (os.access says so; tests run as
    root, which may write anywhere): the stale store is left alone and a fresh one built in the cache."""
    from re2g.data import passage_store

    write_passages(ROWS[:3], str(tmp_path / "p"))
    _single_file(tmp_path / "p" / "part-00000.parquet", [{**r, "text": "new " + r["text"]} for r in ROWS[:3]])
    real = os.access
    monkeypatch.setattr(passage_store.os, "access",
                        lambda p, mode: False if Path(p) == tmp_path / "p" else real(p, mode))
    store = open_passage_store(str(tmp_path / "p"))
    assert store.path.startswith(str(tmp_path / "cache" / "passage_stores")) and store["b"][1] == "new tb"
    assert PassageStore(tmp_path / "p" / STORE_DIR)["b"][1] == "tb"  # the old store untouched
