"""KILT task and knowledge-source files: round trips, malformed rows with their line numbers,
skipping bad rows with a report, atomic writes."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from re2g.data.kilt import (
    KiltExample,
    KiltOutput,
    KnowledgePage,
    Provenance,
    RowError,
    RowReport,
    iter_kilt,
    read_kilt,
    read_knowledge_source,
    write_kilt,
    write_knowledge_source,
)
from re2g.errors import DataFormatError


def _examples() -> list[KiltExample]:
    prov = Provenance(wikipedia_id="123", title="Ada Lovelace", start_paragraph_id=2, end_paragraph_id=3,
                      start_character=0, end_character=41, bleu_score=1.0, section="Section::::Life.",
                      extra={"meta": {"annotator": "x"}})
    return [
        KiltExample(id="q1", input="who wrote the first program?",
                    output=[KiltOutput(answer="Ada Lovelace", provenance=[prov]),
                            KiltOutput(answer="Lovelace"),
                            KiltOutput(provenance=[Provenance(wikipedia_id="9")])],
                    meta={"template": "who wrote [X]"}),
        KiltExample(id="q2", input="Ünïcode input ✓", output=[], extra={"split": "dev"}),
    ]


def _write_lines(path, lines: list[str | bytes]) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return str(path)


def _row(**kw) -> str:
    return json.dumps({"id": "x", "input": "q", "output": [{"answer": "a"}], **kw})


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["dev.jsonl", "dev.jsonl.gz"])
def test_kilt_round_trip(tmp_path, name):
    path = str(tmp_path / name)
    assert write_kilt(path, _examples()) == 2
    back = read_kilt(path)
    assert back == _examples()
    assert back[0].answers == ["Ada Lovelace", "Lovelace"]
    assert [p.wikipedia_id for p in back[0].provenance] == ["123", "9"]
    if name.endswith(".gz"):
        assert json.loads(gzip.open(path).readline())["id"] == "q1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left


def test_kilt_dicts_pass_through_unchanged(tmp_path):
    rows = [{"id": "a", "input": "q", "output": [{"answer": "x", "meta": {"score": 3}, "provenance": [
        {"wikipedia_id": "1", "title": "T", "start_paragraph_id": 1, "end_paragraph_id": 1, "other": [1]}]}],
        "meta": {"k": "v"}, "extra_key": 7}]
    path = str(tmp_path / "a.jsonl")
    write_kilt(path, rows)
    assert [json.loads(line) for line in open(path)] == rows
    assert [e.to_dict() for e in read_kilt(path)] == rows


def test_kilt_fsspec_uri_round_trip():
    path = "memory://re2g-tests/kilt/dev.jsonl"
    write_kilt(path, _examples())
    assert list(iter_kilt(path)) == _examples()


def test_knowledge_source_round_trip(tmp_path):
    pages = [KnowledgePage(wikipedia_id="1", wikipedia_title="Ada", text=["Ada\n", "Ada was a writer.\n"], id="1",
                           extra={"anchors": [{"text": "writer"}], "categories": "People"}),
             KnowledgePage(wikipedia_id="2", wikipedia_title="Bo", text=[])]
    path = str(tmp_path / "ks.jsonl")
    assert write_knowledge_source(path, pages) == 2
    assert read_knowledge_source(path) == pages
    assert json.loads(open(path).readline())["_id"] == "1"


# --------------------------------------------------------------------------- malformed rows


@pytest.mark.parametrize("bad, line, field, reason", [
    ('{"id": "b", "input": ', 3, None, "malformed JSON"),
    ("[1, 2]", 3, None, "expected a JSON object"),
    (json.dumps({"id": "b", "output": []}), 3, "input", "missing (expected a string)"),
    (_row(id=5), 3, "id", "expected a string, got int 5"),
    (_row(id=""), 3, "id", "empty"),
    (_row(output={"answer": "a"}), 3, "output", "expected a list"),
    (_row(output=["a"]), 3, "output[0]", "expected an object"),
    (_row(output=[{"answer": 1}]), 3, "output[0].answer", "expected a string"),
    (_row(output=[{"provenance": [{"title": "T"}]}]), 3, "output[0].provenance[0].wikipedia_id", "missing"),
    (_row(output=[{"provenance": [{"wikipedia_id": "1", "start_paragraph_id": "3"}]}]), 3,
     "output[0].provenance[0].start_paragraph_id", "expected an integer, got str '3'"),
    (_row(output=[{"provenance": [{"wikipedia_id": "1", "start_paragraph_id": True}]}]), 3,
     "output[0].provenance[0].start_paragraph_id", "expected an integer"),
    (_row(output=[{"provenance": [{"wikipedia_id": "1", "start_paragraph_id": 4, "end_paragraph_id": 2}]}]), 3,
     "output[0].provenance[0].end_paragraph_id", "expected >= start_paragraph_id (4), got 2"),
    (_row(meta=[1]), 3, "meta", "expected an object"),
    (b'{"id": "b", "input": "\xff"}', 3, None, "not valid UTF-8"),
    (_row(id="a"), 3, "id", "duplicate 'a' (first on line 1)"),
])
def test_kilt_bad_row_names_line_and_field(tmp_path, bad, line, field, reason):
    # line 2 is blank: line numbers count every physical line
    path = _write_lines(tmp_path / "t.jsonl", [_row(id="a"), "", bad, _row(id="z")])
    with pytest.raises(DataFormatError) as info:
        read_kilt(path)
    err = info.value
    assert (err.path, err.line, err.field) == (path, line, field)
    assert reason in err.reason
    where = f"{path}:{line}: " + (f"field '{field}': " if field else "")
    assert str(err).startswith(where)


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="file not found"):
        read_kilt(str(tmp_path / "nope.jsonl"))


def test_skip_bad_rows_reports_counts(tmp_path, caplog):
    path = _write_lines(tmp_path / "t.jsonl", [
        _row(id="a"), "{oops", _row(id="b"), _row(id="a"), json.dumps({"id": "c"}), "{", _row(id="d")])
    with pytest.raises(RowError):
        read_kilt(path)
    report = RowReport()
    with caplog.at_level(logging.WARNING, logger="re2g.data.kilt"):
        got = read_kilt(path, skip_bad_rows=True, report=report)
    assert [e.id for e in got] == ["a", "b", "d"]
    assert (report.rows, report.skipped) == (7, 4)
    assert report.by_kind == {"bad_json": 2, "duplicate_id": 1, "missing_field": 1}
    assert report.first_lines == {"bad_json": [2, 6], "duplicate_id": [4], "missing_field": [5]}
    assert "skipped 4 of 7 rows" in report.summary()
    assert "skipped 4 of 7 rows" in caplog.text  # never silent
    assert report.to_dict()["by_kind"]["bad_json"] == 2


@pytest.mark.parametrize("page, field, reason", [
    ({"wikipedia_id": 1, "wikipedia_title": "T", "text": []}, "wikipedia_id", "expected a string, got int 1"),
    ({"wikipedia_id": "1", "text": []}, "wikipedia_title", "missing"),
    ({"wikipedia_id": "1", "wikipedia_title": "T", "text": "flat"}, "text", "expected a list"),
    ({"wikipedia_id": "1", "wikipedia_title": "T", "text": ["a", None]}, "text[1]", "expected a string paragraph"),
    ({"wikipedia_id": "0", "wikipedia_title": "Dup", "text": []}, "wikipedia_id", "duplicate '0' (first on line 1)"),
])
def test_knowledge_source_bad_rows(tmp_path, page, field, reason):
    good = json.dumps({"_id": "0", "wikipedia_id": "0", "wikipedia_title": "A", "text": ["A", "x"]})
    path = _write_lines(tmp_path / "ks.jsonl", [good, json.dumps(page)])
    with pytest.raises(DataFormatError) as info:
        read_knowledge_source(path)
    assert (info.value.line, info.value.field) == (2, field)
    assert reason in info.value.reason
    report = RowReport()
    assert len(read_knowledge_source(path, skip_bad_rows=True, report=report)) == 1
    assert report.skipped == 1


# --------------------------------------------------------------------------- writing


def test_write_refuses_duplicates_and_leaves_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    ex = _examples()
    with pytest.raises(DataFormatError, match="duplicate 'q1'") as info:
        write_kilt(str(path), [ex[0], ex[1], ex[0]])
    assert (info.value.line, info.value.field) == (3, "id")
    assert list(tmp_path.iterdir()) == []


def test_write_validates_dicts(tmp_path):
    with pytest.raises(DataFormatError, match="field 'input'"):
        write_kilt(str(tmp_path / "out.jsonl"), [{"id": "a"}])
    assert list(tmp_path.iterdir()) == []


def test_write_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_kilt(str(path), _examples())
    before = path.read_bytes()

    def rows():
        yield _examples()[0]
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_kilt(str(path), rows())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
