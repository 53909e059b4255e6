"""DPR tsv and BEIR readers, conversion into the passages Parquet, malformed rows by line."""

from __future__ import annotations

import json

import pytest

from re2g.data.corpora import (
    Qrel,
    Query,
    convert_corpus,
    iter_beir_corpus,
    iter_dpr_tsv,
    qrels_by_query,
    read_beir_qrels,
    read_beir_queries,
)
from re2g.data.kilt import RowError, RowReport
from re2g.data.passages import MANIFEST, read_passages
from re2g.errors import ArtifactError, DataFormatError
from re2g.types import Passage

DPR = (
    "id\ttext\ttitle\n"
    '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
    '2\t"a field with a\ttab inside quotes"\t"Quoted Title"\n'
    "3\tplain text without quotes\tPlain\n"
)


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- DPR


def test_dpr_tsv_reads_quoted_fields(tmp_path):
    got = list(iter_dpr_tsv(_write(tmp_path / "psgs.tsv", DPR)))
    assert got == [
        Passage("1", "Aaron", 'Aaron Aaron ( or ; "Ahärôn") is a prophet'),
        Passage("2", "Quoted Title", "a field with a\ttab inside quotes"),
        Passage("3", "Plain", "plain text without quotes"),
    ]
    # columns in another order are found by the header
    other = "title\tid\ttext\nT\t9\tsome text\n"
    assert list(iter_dpr_tsv(_write(tmp_path / "o.tsv", other))) == [Passage("9", "T", "some text")]


@pytest.mark.parametrize("row, field, reason", [
    ("4\tonly two fields", None, "expected 3 tab-separated fields (id, text, title), got 2"),
    ("4\ttoo\tmany\tfields", None, "got 4"),
    ("\ttext\ttitle", "id", "empty (expected a passage id)"),
    ("4\t \ttitle", "text", "empty passage text (id '4')"),
    ("2\tagain\tDup", "id", "duplicate '2' (first on line 3)"),
    ('4\t"unbalanced" quote\tT', None, "malformed row"),
])
def test_dpr_bad_rows_name_the_line(tmp_path, row, field, reason):
    path = _write(tmp_path / "psgs.tsv", DPR + "\n" + row + "\n5\tlast\tL\n")  # line 5 blank, bad row line 6
    with pytest.raises(DataFormatError) as info:
        list(iter_dpr_tsv(path))
    assert (info.value.line, info.value.field) == (6, field)
    assert reason in info.value.reason
    report = RowReport()
    assert [p.pid for p in iter_dpr_tsv(path, skip_bad_rows=True, report=report)] == ["1", "2", "3", "5"]
    assert (report.skipped, report.first_lines) == (1, {info.value.kind: [6]})


def test_dpr_multiline_quoted_row_reports_its_first_line(tmp_path):
    text = DPR + '4\t"spans\ntwo lines"\tT\n5\t\tT\n'
    with pytest.raises(DataFormatError) as info:
        list(iter_dpr_tsv(_write(tmp_path / "psgs.tsv", text)))
    assert (info.value.line, info.value.field) == (7, "text")


def test_dpr_header_is_checked(tmp_path):
    with pytest.raises(DataFormatError, match=r"psgs.tsv:1: field 'title': header \['id', 'text'\]"):
        list(iter_dpr_tsv(_write(tmp_path / "psgs.tsv", "id\ttext\n1\tx\n")))
    with pytest.raises(DataFormatError, match="empty file"):
        list(iter_dpr_tsv(_write(tmp_path / "empty.tsv", "")))


def test_convert_dpr(tmp_path):
    out = tmp_path / "passages"
    stats = convert_corpus(_write(tmp_path / "psgs.tsv", DPR), str(out), "dpr")
    table = read_passages(str(out))
    assert table.to_pylist() == [
        {"pid": "1", "title": "Aaron", "text": 'Aaron Aaron ( or ; "Ahärôn") is a prophet', "wikipedia_id": None},
        {"pid": "2", "title": "Quoted Title", "text": "a field with a\ttab inside quotes", "wikipedia_id": None},
        {"pid": "3", "title": "Plain", "text": "plain text without quotes", "wikipedia_id": None},
    ]
    assert (stats.passages, stats.words_min, stats.words_max, stats.skipped) == (3, 4, 9, 0)
    assert json.loads((out / MANIFEST).read_text())["source_format"] == "dpr"
    with pytest.raises(ArtifactError):
        convert_corpus(str(tmp_path / "psgs.tsv"), str(out), "dpr")


def test_convert_with_a_bad_row_leaves_no_output(tmp_path):
    src = _write(tmp_path / "psgs.tsv", DPR + "1\tdup\tD\n")
    with pytest.raises(RowError, match=r"psgs.tsv:5: field 'id': duplicate '1'"):
        convert_corpus(src, str(tmp_path / "out"), "dpr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psgs.tsv"]
    stats = convert_corpus(src, str(tmp_path / "out"), "dpr", skip_bad_rows=True)
    assert (stats.passages, stats.skipped, stats.report["by_kind"]) == (3, 1, {"duplicate_id": 1})
    with pytest.raises(ValueError, match="expected one of"):
        convert_corpus(src, str(tmp_path / "x"), "csv")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- BEIR


@pytest.fixture()
def beir(tmp_path):
    d = tmp_path / "scifact"
    (d / "qrels").mkdir(parents=True)
    docs = [{"_id": "d1", "title": "Cells", "text": "Cells divide.", "metadata": {}},
            {"_id": "d2", "text": "No title here."}]
    (d / "corpus.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    queries = [{"_id": "q1", "text": "do cells divide?", "metadata": {"src": "x"}}, {"_id": "q2", "text": "why?"}]
    (d / "queries.jsonl").write_text("".join(json.dumps(x) + "\n" for x in queries))
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq2\td2\t2\n")
    return d


def test_beir_readers(beir):
    assert list(iter_beir_corpus(str(beir))) == [Passage("d1", "Cells", "Cells divide."),
                                                  Passage("d2", "", "No title here.")]
    assert read_beir_queries(str(beir / "queries.jsonl")) == [Query("q1", "do cells divide?"), Query("q2", "why?")]
    assert read_beir_queries(str(beir))[0].metadata == {"src": "x"}
    qrels = read_beir_qrels(str(beir / "qrels" / "test.tsv"))
    assert qrels == [Qrel("q1", "d1", 1), Qrel("q1", "d2", 0), Qrel("q2", "d2", 2)]
    assert qrels_by_query(qrels) == {"q1": {"d1": 1, "d2": 0}, "q2": {"d2": 2}}


def test_convert_beir(beir, tmp_path):
    stats = convert_corpus(str(beir), str(tmp_path / "p"), "beir")
    assert [r["pid"] for r in read_passages(str(tmp_path / "p")).to_pylist()] == ["d1", "d2"]
    assert (stats.pages, stats.passages) == (2, 2)


@pytest.mark.parametrize("row, field, reason", [
    ('{"_id": "d3", "text": ', None, "malformed JSON"),
    (json.dumps({"_id": 3, "text": "x"}), "_id", "expected a string, got int 3"),
    (json.dumps({"_id": "d3", "title": "t"}), "text", "missing"),
    (json.dumps({"_id": "d3", "text": ""}), "text", "empty"),
    (json.dumps({"_id": "d3", "text": "x", "title": 1}), "title", "expected a string"),
    (json.dumps({"_id": "d1", "text": "x"}), "_id", "duplicate 'd1' (first on line 1)"),
])
def test_beir_corpus_bad_rows(beir, row, field, reason):
    path = beir / "corpus.jsonl"
    path.write_text(path.read_text() + row + "\n")
    with pytest.raises(DataFormatError) as info:
        list(iter_beir_corpus(str(path)))
    assert (info.value.line, info.value.field) == (3, field)
    assert reason in info.value.reason


def test_beir_queries_and_qrels_bad_rows(beir):
    q = beir / "queries.jsonl"
    q.write_text(q.read_text() + json.dumps({"_id": "q3"}) + "\n")
    with pytest.raises(DataFormatError, match=r"queries.jsonl:3: field 'text': missing"):
        read_beir_queries(str(beir))

    qrels = beir / "qrels" / "test.tsv"
    base = qrels.read_text()
    for extra, line, field, reason in [
        ("q3\td1\thigh\n", 5, "score", "expected an integer score, got 'high'"),
        ("q3\td1\n", 5, None, "expected 3 tab-separated fields"),
        ("q1\td1\t2\n", 5, "corpus-id", "duplicate ('q1', 'd1') (first on line 2)"),
        ("\td1\t1\n", 5, "query-id", "empty"),
    ]:
        qrels.write_text(base + extra)
        with pytest.raises(DataFormatError) as info:
            read_beir_qrels(str(qrels))
        assert (info.value.line, info.value.field) == (line, field), extra
        assert reason in info.value.reason
        report = RowReport()
        assert len(read_beir_qrels(str(qrels), skip_bad_rows=True, report=report)) == 3
        assert report.skipped == 1
    qrels.write_text("qid\tdid\tscore\nq1\td1\t1\n")
    with pytest.raises(DataFormatError, match=r"test.tsv:1: field 'query-id'"):
        read_beir_qrels(str(qrels))
