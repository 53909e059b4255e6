"""Passage splitting (pure), the Ray Data split of a knowledge source, the passages Parquet, and
provenance -> positive passages."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from re2g.config import PassageConfig
from re2g.data.kilt import KiltExample, KiltOutput, KnowledgePage, Provenance, RowError, write_knowledge_source
from re2g.data.passages import (
    MANIFEST,
    PASSAGE_COLUMNS,
    _chunk_lines,
    count_passages,
    iter_passages,
    make_pid,
    parse_pid,
    passages_table,
    plan_chunks,
    read_passages,
    split_knowledge_source,
    staged_output_dir,
    split_page,
    write_passages,
)
from re2g.data.provenance import PassageLocator, overlap, page_ids, positive_pids
from re2g.errors import ArtifactError, DataFormatError


def _para(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{k}" for k in range(n))


def _page(wid: str, sizes: list[int], title: str | None = None) -> dict:
    title = title or f"Page {wid}"
    return {"_id": wid, "wikipedia_id": wid, "wikipedia_title": title,
            "text": [title + "\n"] + [_para(n, f"p{i}w") + "\n" for i, n in enumerate(sizes, start=1)]}


def _random_pages(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_page(str(100 + i), [rng.choice([0, 3, 20, 45, 60, 99, 100, 101, 250]) for _ in range(rng.randint(0, 9))])
            for i in range(n)]


def _words(page: dict, cfg: PassageConfig) -> list[str]:
    paras = page["text"] if cfg.include_title_paragraph else page["text"][1:]
    return [w for p in paras for w in p.split()]


# --------------------------------------------------------------------------- ids


def test_pid_round_trip():
    assert make_pid("12", 3, 5) == "12::[3,5]"
    assert make_pid("12", 3, 3, 2) == "12::[3,3]#2"
    assert parse_pid("12::[3,5]") == ("12", 3, 5)
    assert parse_pid("12::[3,3]#2") == ("12", 3, 3)
    assert parse_pid("a::b::[0,1]") == ("a::b", 0, 1)  # the id itself may contain '::'
    for bad in ["12", "12::[3]", "12::[a,b]", "::[1,2]", "12::[1,2]#0", 5]:
        with pytest.raises(ValueError):
            parse_pid(bad)


# --------------------------------------------------------------------------- split_page


def test_short_paragraphs_are_grown_to_min_words():
    cfg = PassageConfig(min_words=50, max_words=100)
    got = split_page(_page("7", [30, 30, 10, 45, 5]), cfg)
    assert [p["pid"] for p in got] == ["7::[1,2]", "7::[3,4]", "7::[5,5]"]
    assert [len(p["text"].split()) for p in got] == [60, 55, 5]
    assert {p["title"] for p in got} == {"Page 7"} and {p["wikipedia_id"] for p in got} == {"7"}


def test_title_paragraph_skipped_unless_asked():
    page = _page("7", [60])
    assert [p["pid"] for p in split_page(page, PassageConfig())] == ["7::[1,1]"]
    got = split_page(page, PassageConfig(include_title_paragraph=True))
    assert [p["pid"] for p in got] == ["7::[0,1]"]
    assert got[0]["text"].startswith("Page 7 p1w0")
    assert split_page(_page("8", []), PassageConfig()) == []  # a page with only its title


def test_long_paragraph_is_cut_into_unique_pieces():
    cfg = PassageConfig(min_words=50, max_words=100)
    got = split_page(_page("9", [250, 60]), cfg)
    assert [p["pid"] for p in got] == ["9::[1,1]", "9::[1,1]#1", "9::[1,1]#2", "9::[2,2]"]
    assert [len(p["text"].split()) for p in got] == [100, 100, 50, 60]
    assert [parse_pid(p["pid"]) for p in got][:3] == [("9", 1, 1)] * 3
    # the tail of a long paragraph shorter than min_words goes on with the next paragraph
    got = split_page(_page("9", [230, 60]), cfg)
    assert [(p["pid"], len(p["text"].split())) for p in got] == [
        ("9::[1,1]", 100), ("9::[1,1]#1", 100), ("9::[1,2]", 90)]


def test_paragraph_that_does_not_fit_tops_up_the_passage():
    cfg = PassageConfig(min_words=50, max_words=100)
    got = split_page(_page("5", [40, 80, 0, 70]), cfg)
    # 40 + first 60 words of p2 -> [1,2]; the other 20 of p2 (p3 empty) + 70 of p4 -> [2,4]
    assert [(p["pid"], len(p["text"].split())) for p in got] == [("5::[1,2]", 100), ("5::[2,4]", 90)]


@pytest.mark.parametrize("min_words, max_words, title",
                         [(50, 100, False), (1, 1, False), (10, 30, True), (100, 100, False)])
def test_split_invariants(min_words, max_words, title):
    cfg = PassageConfig(min_words=min_words, max_words=max_words, include_title_paragraph=title)
    for page in _random_pages(60):
        got = split_page(page, cfg)
        sizes = [len(p["text"].split()) for p in got]
        assert all(0 < s <= max_words for s in sizes)
        assert all(s >= min_words for s in sizes[:-1])  # only a page's last passage may be short
        assert " ".join(p["text"] for p in got).split() == _words(page, cfg)  # no text lost
        pids = [p["pid"] for p in got]
        assert len(set(pids)) == len(pids)
        spans = [parse_pid(p)[1:] for p in pids]
        assert spans == sorted(spans) and all(s <= e for s, e in spans)
        assert split_page(KnowledgePage(page["wikipedia_id"], page["wikipedia_title"], page["text"]), cfg) == got


# --------------------------------------------------------------------------- byte-range chunks (no Ray)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 50, 10_000])
def test_chunks_cover_every_line_once(tmp_path, chunk_bytes):
    path = tmp_path / "ks.jsonl"
    lines = [b"a" * (i % 13) for i in range(40)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    chunks = plan_chunks(str(path), chunk_bytes)
    got = [raw.rstrip(b"\n") for c in chunks for _, raw in _chunk_lines(c)]
    assert got == lines


# --------------------------------------------------------------------------- Ray Data


@pytest.fixture()
def source(tmp_path):
    pages = _random_pages(30, seed=1)
    path = tmp_path / "ks.jsonl"
    write_knowledge_source(str(path), pages)
    return str(path), pages


def test_split_knowledge_source_matches_split_page(ray_local, source, tmp_path):
    path, pages = source
    cfg = PassageConfig(min_words=20, max_words=60)
    out = tmp_path / "passages"
    stats = split_knowledge_source(path, str(out), cfg, chunk_bytes=2_000)  # several chunks
    expected = [p for page in pages for p in split_page(page, cfg)]
    table = read_passages(str(out))
    assert table.column_names == list(PASSAGE_COLUMNS)
    assert all(pa.types.is_string(f.type) for f in table.schema)
    assert table.to_pylist() == expected  # same passages, in source order
    assert count_passages(str(out)) == len(expected)
    sizes = [len(p["text"].split()) for p in expected]
    assert (stats.pages, stats.passages, stats.skipped) == (30, len(expected), 0)
    assert (stats.words_min, stats.words_max) == (min(sizes), max(sizes))
    assert stats.words_mean == pytest.approx(sum(sizes) / len(sizes), abs=0.01)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["config"] == cfg.model_dump() and manifest["stats"]["passages"] == len(expected)
    assert stats.to_dict()["passages"] == len(expected) and stats.table().row_count >= 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ks.jsonl", "passages"]  # no temporary left
    # the memory-mapped passage store is built with the artifact (and Parquet readers skip it)
    from re2g.data.passage_store import PassageStore

    store = PassageStore(out / "_store")
    assert manifest["store"] == {"dir": "_store", "passages_fingerprint": store.manifest.fingerprints["passages"]}
    assert list(store) == [p["pid"] for p in expected]
    assert store[expected[3]["pid"]] == (expected[3]["title"], expected[3]["text"], expected[3]["wikipedia_id"])

    # an existing output is refused and left alone; overwrite replaces it
    with pytest.raises(ArtifactError, match="overwrite=True"):
        split_knowledge_source(path, str(out), cfg)
    assert read_passages(str(out)).num_rows == len(expected)
    stats2 = split_knowledge_source(path, str(out), PassageConfig(), overwrite=True)
    assert read_passages(str(out)).num_rows == stats2.passages != len(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ks.jsonl", "passages"]


def test_bad_row_leaves_no_output(ray_local, source, tmp_path):
    path, pages = source
    lines = open(path).read().splitlines()
    lines[11] = lines[11][:40]                       # line 12: truncated JSON
    lines[20] = json.dumps({**pages[20], "text": "not a list"})  # line 21
    lines.insert(25, json.dumps(pages[3]))           # line 26: duplicate wikipedia_id
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "passages"
    with pytest.raises(RowError) as info:
        split_knowledge_source(str(bad), str(out), PassageConfig(), chunk_bytes=1_500)
    assert (info.value.line, info.value.kind) == (12, "bad_json")
    assert "3 bad rows" in str(info.value)
    assert str(info.value).startswith(f"{bad}:12: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ks.jsonl"]  # nothing written

    stats = split_knowledge_source(str(bad), str(out), PassageConfig(), chunk_bytes=1_500, skip_bad_rows=True)
    good = [p for i, p in enumerate(pages) if i not in (11, 20)]
    expected = [p for page in good for p in split_page(page, PassageConfig())]
    assert read_passages(str(out)).to_pylist() == expected
    assert (stats.pages, stats.skipped) == (28, 3)
    assert stats.report["by_kind"] == {"bad_json": 1, "wrong_type": 1, "duplicate_id": 1}
    assert stats.report["first_lines"] == {"bad_json": [12], "wrong_type": [21], "duplicate_id": [26]}
    assert "first on line 4" in " ".join(stats.report["messages"])


def test_duplicate_page_id_names_the_id(ray_local, tmp_path):
    path = tmp_path / "ks.jsonl"
    write_knowledge_source(str(path), [_page("1", [60]), _page("2", [60])])
    path.write_text(path.read_text() + json.dumps(_page("1", [70])) + "\n")
    with pytest.raises(DataFormatError, match=r"duplicate wikipedia_id '1' \(first on line 1\)") as info:
        split_knowledge_source(str(path), str(tmp_path / "out"), PassageConfig())
    assert (info.value.line, info.value.field) == (3, "wikipedia_id")
    assert not (tmp_path / "out").exists()


def test_directory_of_files_with_a_compressed_one(ray_local, tmp_path):
    src = tmp_path / "ks"
    a, b = [_page("1", [60]), _page("2", [30, 30])], [_page("3", [120]), _page("1", [70])]
    write_knowledge_source(str(src / "a.jsonl"), a)
    write_knowledge_source(str(src / "b.jsonl.gz"), b)
    with pytest.raises(RowError) as info:
        split_knowledge_source(str(src), str(tmp_path / "out"), PassageConfig())
    assert (info.value.path, info.value.line) == (str(src / "b.jsonl.gz"), 2)
    assert f"duplicate wikipedia_id '1' (first on line 1 of {src / 'a.jsonl'})" in str(info.value)
    stats = split_knowledge_source(str(src), str(tmp_path / "out"), PassageConfig(), skip_bad_rows=True)
    expected = [p for page in a + b[:1] for p in split_page(page, PassageConfig())]
    assert read_passages(str(tmp_path / "out")).to_pylist() == expected
    assert (stats.pages, stats.passages, stats.skipped) == (3, len(expected), 1)


# --------------------------------------------------------------------------- reading the artifact


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"pid": f"1::[{i},{i}]", "title": "T", "text": f"text {i}", "wikipedia_id": "1"}
            for i in range(start, start + n)]


def test_write_and_read_passages(tmp_path):
    out = tmp_path / "p"
    assert write_passages(_rows(5), str(out), batch_rows=2) == 5
    assert read_passages(str(out)).to_pylist() == _rows(5)
    assert [p.pid for p in iter_passages(str(out), batch_size=2)] == [r["pid"] for r in _rows(5)]
    with pytest.raises(ArtifactError):
        write_passages(_rows(1), str(out))
    # wikipedia_id is optional in the contract: added as nulls
    pq.write_table(pa.table({"pid": ["a"], "title": ["t"], "text": ["x"]}), tmp_path / "one.parquet")
    assert read_passages(str(tmp_path / "one.parquet")).to_pylist() == [
        {"pid": "a", "title": "t", "text": "x", "wikipedia_id": None}]


def test_staged_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "p"
    with pytest.raises(RuntimeError):
        with staged_output_dir(str(out)) as stage:
            (tmp_path / stage.path.rsplit("/", 1)[-1] / "part.parquet").write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    write_passages(_rows(2), str(out))
    with pytest.raises(RuntimeError):
        with staged_output_dir(str(out), overwrite=True):
            raise RuntimeError("crash")
    assert read_passages(str(out)).num_rows == 2 and [p.name for p in tmp_path.iterdir()] == ["p"]
    empty = tmp_path / "empty"  # an existing empty directory is fine to write into
    empty.mkdir()
    assert write_passages(_rows(1), str(empty)) == 1


def test_read_passages_errors(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    with pytest.raises(DataFormatError, match="no Parquet files"):
        read_passages(str(d))
    pq.write_table(passages_table(_rows(3)), d / "a.parquet")
    pq.write_table(passages_table(_rows(3, start=2)), d / "b.parquet")
    with pytest.raises(DataFormatError) as info:
        read_passages(str(d))
    assert (info.value.path.endswith("b.parquet"), info.value.line, info.value.field) == (True, 1, "pid")
    assert "duplicate passage id '1::[2,2]' (first at row 3 of" in str(info.value)

    rows = _rows(3)
    rows[1]["text"] = "  "
    pq.write_table(passages_table(rows), d / "b.parquet")
    with pytest.raises(DataFormatError, match=r"b.parquet:2: field 'text': empty passage text \(pid '1::\[1,1\]'\)"):
        read_passages(str(d))
    with pytest.raises(DataFormatError, match="empty passage text"):
        list(iter_passages(str(d)))

    pq.write_table(pa.table({"pid": ["x"], "text": ["y"]}), d / "b.parquet")
    with pytest.raises(DataFormatError, match="field 'title': missing column"):
        read_passages(str(d))


# --------------------------------------------------------------------------- provenance


def _prov(wid: str, start: int | None, end: int | None = None) -> Provenance:
    return Provenance(wikipedia_id=wid, start_paragraph_id=start, end_paragraph_id=end if end is not None else start)


def test_overlap():
    assert overlap((1, 3), (2, 5)) == 0.5
    assert overlap((4, 6), (1, 2)) == 0
    assert overlap((1, 9), (3, 3)) == 1


def test_positive_pids_by_coverage():
    pids = ["1::[1,2]", "1::[3,3]", "1::[3,3]#1", "1::[4,7]", "2::[1,4]", "dpr-17"]
    table = passages_table([{"pid": p, "title": "", "text": "x", "wikipedia_id": None} for p in pids])
    loc = PassageLocator.from_table(table)
    assert (len(loc), loc.pages, "1" in loc) == (5, 2, True)
    # paragraph 3 alone: both pieces of it
    assert loc.positive_pids([_prov("1", 3)]) == ["1::[3,3]", "1::[3,3]#1"]
    # span 2..5 (4 paragraphs): [1,2] covers 1/4, [3,3] 1/4, [4,7] 2/4 -> none at 0.75
    assert loc.positive_pids([_prov("1", 2, 5)]) == []
    assert loc.positive_pids([_prov("1", 2, 5)], threshold=0.5) == ["1::[4,7]"]
    # threshold edge: [4,7] covers paragraphs 4..6 of 3..6, exactly 0.75
    assert loc.positive_pids([_prov("1", 3, 6)]) == ["1::[4,7]"]
    assert loc.positive_pids([_prov("1", 3, 6)], threshold=0.76) == []
    # several provenance entries, pages unknown to the locator, page-level only entries
    prov = [_prov("2", 2, 3), _prov("1", 1, 1), _prov("1", 1, 2), _prov("404", 1), Provenance(wikipedia_id="1")]
    assert loc.positive_pids(prov) == ["2::[1,4]", "1::[1,2]"]
    assert page_ids(prov) == ["2", "1", "404"]
    with pytest.raises(ValueError):
        loc.positive_pids(prov, threshold=0)


def test_positives_of_an_example_and_other_inputs():
    ex = KiltExample(id="q", input="?", output=[
        KiltOutput(answer="a", provenance=[_prov("1", 3)]), KiltOutput(answer="b", provenance=[_prov("2", 1, 2)]),
        KiltOutput(answer="c")])
    pids = ["1::[1,2]", "1::[3,4]", "2::[1,1]", "2::[2,2]"]
    pos = PassageLocator.from_pids(pids).positives(ex)
    assert (pos.pids, pos.page_ids) == (["1::[3,4]"], ["1", "2"])
    mapping = {"2": [(1, 1, "2::[1,1]"), (2, 2, "2::[2,2]")]}
    dicts = [{"wikipedia_id": "2", "start_paragraph_id": 1, "end_paragraph_id": 2}]
    assert positive_pids(dicts, mapping, threshold=0.5) == ["2::[1,1]", "2::[2,2]"]
    assert positive_pids(dicts, pids, threshold=0.5) == ["2::[1,1]", "2::[2,2]"]
