"""The sample knowledge task: KILT formats, determinism, zero-shot split, provenance, hardness."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from re2g.config import SampleConfig
from re2g.data.sample import (
    ENTITIES_FILE,
    FACT_TEMPLATES,
    KNOWLEDGE_SOURCE,
    RELATIONS,
    SPLITS,
    SUMMARY_FILE,
    TASKS,
    _article,
    estimate_passages,
    expected_passages,
    generate_sample,
    load_sample_summary,
    task_file,
)
from re2g.errors import ArtifactError, ConfigError

TINY = SampleConfig(size="tiny", seed=13)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "tiny"
    summary = generate_sample(out, TINY, vocab_size=1000, progress=False)
    return out, summary


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pages(out: Path) -> dict[str, dict]:
    return {p["wikipedia_id"]: p for p in _jsonl(out / KNOWLEDGE_SOURCE)}


def _entities(out: Path) -> list[dict]:
    return _jsonl(out / ENTITIES_FILE)


def _tasks(out: Path):
    for task in TASKS:
        for split in SPLITS:
            yield task, split, _jsonl(out / task_file(task, split))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_summary(sample):
    out, summary = sample
    files = set(_files(out))
    assert {SUMMARY_FILE, KNOWLEDGE_SOURCE, ENTITIES_FILE} <= files
    assert {task_file(t, s) for t in TASKS for s in SPLITS} <= files
    for kind in ("wordpiece", "bpe"):
        assert f"tokenizers/{kind}/tokenizer.json" in files
    assert not list(out.parent.glob(".tiny.*")), "temporary directory left behind"

    meta = json.loads((out / SUMMARY_FILE).read_text())
    assert meta["config"] == TINY.model_dump(mode="json")
    assert {f["path"] for f in meta["files"]} == files - {SUMMARY_FILE}
    assert summary.pages == summary.entities == 120
    assert 200 <= summary.estimated_passages <= 1000          # "a few hundred passages"
    assert summary.estimated_passages >= summary.expected_passages
    for task, split, recs in _tasks(out):
        assert summary.queries[task][split] == len(recs) > 0
    assert {x["task"] for x in summary.examples} == set(TASKS)
    assert json.loads(json.dumps(summary.to_dict()))["queries"] == summary.queries

    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(summary.table())
    text = console.export_text()
    assert "slot_filling" in text and "120" in text


def test_kilt_schema(sample):
    out, _ = sample
    pages = _pages(out)
    for p in _jsonl(out / KNOWLEDGE_SOURCE):
        assert list(p) == ["_id", "wikipedia_id", "wikipedia_title", "text"]
        assert p["_id"] == p["wikipedia_id"] and isinstance(p["wikipedia_id"], str)
        assert isinstance(p["text"], list) and all(isinstance(t, str) and t for t in p["text"])
        assert p["text"][0] == p["wikipedia_title"]
        assert len(p["text"]) >= 4
    ids = []
    for task, split, recs in _tasks(out):
        for r in recs:
            assert list(r) == ["id", "input", "output"]
            assert isinstance(r["id"], str) and isinstance(r["input"], str) and r["input"]
            assert isinstance(r["output"], list) and len(r["output"]) == 1
            o = r["output"][0]
            assert list(o) == ["answer", "provenance"] and isinstance(o["answer"], str) and o["answer"]
            assert o["provenance"]
            for pr in o["provenance"]:
                assert list(pr) == ["wikipedia_id", "title", "start_paragraph_id", "end_paragraph_id"]
                assert isinstance(pr["wikipedia_id"], str) and isinstance(pr["title"], str)
                assert isinstance(pr["start_paragraph_id"], int) and isinstance(pr["end_paragraph_id"], int)
                assert pr["title"] == pages[pr["wikipedia_id"]]["wikipedia_title"]
            if task == "slot_filling":
                assert " [SEP] " in r["input"]
            if task == "fact_verification":
                assert o["answer"] in ("SUPPORTS", "REFUTES")
            ids.append(r["id"])
    assert len(ids) == len(set(ids))


def test_provenance_points_at_the_fact(sample):
    out, _ = sample
    pages = _pages(out)
    truth = {e["wikipedia_id"]: e for e in _entities(out)}
    for task, split, recs in _tasks(out):
        for r in recs:
            o = r["output"][0]
            for pr in o["provenance"]:
                page = pages[pr["wikipedia_id"]]
                assert 1 <= pr["start_paragraph_id"] <= pr["end_paragraph_id"] < len(page["text"])
                para = " ".join(page["text"][pr["start_paragraph_id"]:pr["end_paragraph_id"] + 1])
                if o["answer"] == "REFUTES":
                    # the cited paragraph states the true value, which the claim does not
                    facts = truth[pr["wikipedia_id"]]["facts"]
                    stated = [v for v in facts.values() if v in para]
                    assert stated and any(v not in r["input"] for v in stated)
                elif o["answer"] != "SUPPORTS":
                    assert o["answer"] in para, (r, para)
                else:
                    fp = truth[pr["wikipedia_id"]]["fact_paragraphs"]
                    assert pr["start_paragraph_id"] in fp.values()
    # and the entities file agrees with the pages
    for e in _entities(out):
        page = pages[e["wikipedia_id"]]
        assert page["wikipedia_title"] == e["name"]
        for rel, v in e["facts"].items():
            assert v in page["text"][e["fact_paragraphs"][rel]]


def test_zero_shot_split(sample):
    out, summary = sample
    ents = _entities(out)
    split_of = {e["name"]: e["split"] for e in ents}
    assert Counter(split_of.values()) == Counter(summary.entities_per_split)
    assert summary.entities_per_split == {"train": 84, "dev": 18, "test": 18}
    train_inputs = "\n".join(r["input"] for t, s, recs in _tasks(out) if s == "train" for r in recs)
    held_out = [n for n, s in split_of.items() if s != "train"]
    for name in held_out:
        assert not re.search(rf"\b{re.escape(name)}\b", train_inputs), name
    # every query of a split is about a person of that split
    by_wid = {e["wikipedia_id"]: e["split"] for e in ents}
    for task, split, recs in _tasks(out):
        for r in recs:
            assert by_wid[r["output"][0]["provenance"][0]["wikipedia_id"]] == split


def test_fact_verification_balance(sample):
    out, _ = sample
    for split in SPLITS:
        labels = Counter(r["output"][0]["answer"] for r in _jsonl(out / task_file("fact_verification", split)))
        assert set(labels) == {"SUPPORTS", "REFUTES"}
        assert 0.4 <= labels["SUPPORTS"] / sum(labels.values()) <= 0.6


def _template_regex(template: str, value: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    rx = ""
    for part in parts:
        if part == "{v}":
            rx += re.escape(value)
        elif part == "{av}":
            rx += re.escape(_article(value))
        elif part.startswith("{"):
            rx += r"[\w' ]+?"
        else:
            rx += re.escape(part)
    return re.compile(rx)


def test_paraphrased_relations(sample):
    out, _ = sample
    pages = _pages(out)
    used: dict[str, set[int]] = {r: set() for r in RELATIONS}
    for e in _entities(out):
        for rel in RELATIONS:
            para = pages[e["wikipedia_id"]]["text"][e["fact_paragraphs"][rel]]
            for i, tpl in enumerate(FACT_TEMPLATES[rel]):
                if _template_regex(tpl, e["facts"][rel]).search(para):
                    used[rel].add(i)
    for rel in RELATIONS:
        assert len(used[rel]) >= 2, (rel, used[rel])
    # the QA wording is not the passage wording
    qa = _jsonl(out / task_file("qa", "train"))
    assert not any("hails from" in r["input"] or "native of" in r["input"] for r in qa)


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_distractors(sample):
    out, _ = sample
    ents = _entities(out)
    names = [e["name"] for e in ents]
    firsts = Counter(n.split()[0] for n in names)
    lasts = Counter(n.split()[1] for n in names)
    assert sum(c for c in firsts.values() if c > 1) >= len(names) // 2      # shared first names
    assert sum(c for c in lasts.values() if c > 1) >= len(names) // 4       # shared last names
    # shared attribute values
    for rel in ("place_of_birth", "employer", "occupation", "country_of_citizenship"):
        values = Counter(e["facts"][rel] for e in ents)
        assert max(values.values()) >= 2, rel
    # other people's full names in a page
    pages = _pages(out)
    mentioned = sum(1 for e in ents for p in pages.values()
                    if p["wikipedia_id"] != e["wikipedia_id"] and e["name"] in " ".join(p["text"][1:]))
    assert mentioned >= len(ents) // 2
    # near-duplicate last names (a syllable apart)
    uniq = sorted(lasts)
    near = sum(1 for i, a in enumerate(uniq) for b in uniq[i + 1:] if _edit_distance(a, b) <= 2)
    assert near >= 3


def test_tokenizers_in_sample(sample):
    from transformers import AutoTokenizer

    out, summary = sample
    wp = AutoTokenizer.from_pretrained(str(out / "tokenizers" / "wordpiece"))
    bpe = AutoTokenizer.from_pretrained(str(out / "tokenizers" / "bpe"))
    assert summary.vocab["wordpiece"] == len(wp) <= 1000
    assert summary.vocab["bpe"] == len(bpe) <= 1000
    rec = _jsonl(out / task_file("qa", "dev"))[0]
    assert wp.unk_token_id not in wp(rec["input"], rec["output"][0]["answer"])["input_ids"]
    text = rec["input"] + " " + rec["output"][0]["answer"]
    assert bpe.decode(bpe(text)["input_ids"], skip_special_tokens=True) == text


def test_deterministic(sample, tmp_path):
    out, _ = sample
    again = tmp_path / "again"
    generate_sample(again, TINY, vocab_size=1000, progress=False)
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    generate_sample(other, SampleConfig(size="tiny", seed=14), vocab_size=1000, progress=False)
    a, b = _files(out), _files(other)
    assert a[KNOWLEDGE_SOURCE] != b[KNOWLEDGE_SOURCE]
    assert a[task_file("qa", "train")] != b[task_file("qa", "train")]


def test_refuses_non_empty_dir_unless_overwrite(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = SampleConfig(size="tiny", n_entities=20)
    with pytest.raises(ArtifactError, match="not empty"):
        generate_sample(out, cfg, vocab_size=500, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]        # no temp dir left
    summary = generate_sample(out, cfg, vocab_size=500, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / KNOWLEDGE_SOURCE).is_file()
    assert summary.entities == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    # an empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_sample(empty, cfg, vocab_size=500, progress=False)


def test_load_sample_summary(sample, tmp_path):
    out, summary = sample
    loaded = load_sample_summary(out, TINY)
    assert loaded is not None and loaded.queries == summary.queries and loaded.files == summary.files[:-1]
    assert load_sample_summary(out, TINY, vocab_size=1000) is not None
    assert load_sample_summary(out, TINY, vocab_size=4000) is None
    assert load_sample_summary(out, SampleConfig(size="tiny", seed=99)) is None
    assert load_sample_summary(tmp_path / "nothing", TINY) is None


def test_bad_fractions():
    with pytest.raises(ConfigError, match="train_fraction"):
        generate_sample("/nonexistent/never", SampleConfig(size="tiny", n_entities=10, train_fraction=0.9,
                                                           dev_fraction=0.1), progress=False)


def test_bench_passage_arithmetic(tmp_path):
    assert expected_passages(SampleConfig(size="bench")) >= 1_000_000
    assert expected_passages(SampleConfig(size="bench", n_entities=1000)) == 3000
    # the premise of that arithmetic, checked on a small bench-shaped sample: exactly 3 content
    # paragraphs per page, each longer than half a 100-word passage; only a small dev task
    cfg = SampleConfig(size="bench", n_entities=300)
    summary = generate_sample(tmp_path / "b", cfg, vocab_size=800, progress=False)
    for p in _jsonl(tmp_path / "b" / KNOWLEDGE_SOURCE):
        assert len(p["text"]) == 4
        assert all(100 >= len(t.split()) > 50 for t in p["text"][1:])
    assert summary.estimated_passages == summary.expected_passages == 900
    assert set(summary.queries["qa"]) == {"dev"}
    assert not (tmp_path / "b" / task_file("qa", "train")).exists()


def test_estimate_passages():
    assert estimate_passages([60, 60, 60]) == 3
    assert estimate_passages([30, 30, 30, 30]) == 2
    assert estimate_passages([30, 80]) == 2
    assert estimate_passages([250]) == 3
    assert estimate_passages([]) == 0
    assert estimate_passages([40, 90, 40]) == 2        # passages fill across paragraph boundaries


def test_estimate_matches_the_splitter(sample):
    passages = pytest.importorskip("re2g.data.passages")
    from re2g.config import PassageConfig

    out, summary = sample
    n = sum(len(passages.split_page(p, PassageConfig())) for p in _jsonl(out / KNOWLEDGE_SOURCE))
    assert n == summary.estimated_passages
