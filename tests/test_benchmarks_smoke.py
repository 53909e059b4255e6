"""Smoke test of benchmarks/: every benchmark's ``main`` runs on the tiny sample and writes JSON with
its figures and same-run ratios. Not a timed test: no figure is compared with a threshold."""

from __future__ import annotations

import json
import math

import pytest


def _load(path):
    data = json.loads(path.read_text())
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["versions"]["ray"]
    assert data["timestamp"] and data["params"]["size"] == "tiny"
    assert data["ratios"], "a benchmark without its same-run comparison"
    for name, value in data["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    return data


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return ["--size", "tiny", "--out", str(root / "out"), "--cache", str(root / "cache"), "--repeats", "1"]


def test_benchmarks_write_figures_and_ratios(bench_dirs, ray_local):
    from benchmarks import bm25_qps, embed_throughput, hnsw_recall, shard_build

    # the test Ray has 2 CPUs: 1 encoder actor leaves Ray Data's read task a CPU
    d = _load(embed_throughput.main(bench_dirs + ["--threads", "1", "--limit", "200", "--no-small-blocks"]))
    runs = d["results"]["runs"]
    assert set(runs) == {"local loop", "ray data 1x1"}
    assert all(r["passages"] == 200 and r["passages_per_s"] > 0 for r in runs.values())
    assert "ray data 1x1 / local loop (passages/s)" in d["ratios"]

    from re2g.config import load_config

    m = load_config(preset="tiny").index.hnsw_m  # the benchmark's default M is the tiny preset's
    path = hnsw_recall.main(bench_dirs + ["--ef", "16", "64", "--metrics", "mips_l2", "ip"])
    d = _load(path)
    views = d["results"]["views"]
    assert set(views) == {"raw", "standardized"}
    for v in views.values():
        assert v["flat"]["queries_per_s"] > 0
        assert {(c["metric"], c["m"]) for c in v["hnsw"]} == {("mips_l2", m), ("ip", m)}
        for c in v["hnsw"]:
            assert set(c["by_ef_search"]) == {"16", "64"}
            assert all(0 <= r["recall@k"] <= 1 and r["queries_per_s"] > 0 for r in c["by_ef_search"].values())
        assert v["presets"]["tiny"]["recall@k"] is None  # efSearch 128 was not measured
    assert f"standardized ip M={m} ef=64: hnsw q/s / flat q/s" in d["ratios"]
    assert path.with_suffix(".png").stat().st_size > 0

    d = _load(shard_build.main(bench_dirs + ["--shards", "2"]))
    assert set(d["results"]["runs"]) == {"1 shard, 1 task", "2 shards, 2 tasks", "1 shard, 1 task x 2 threads"}
    assert "speed-up of 2 shards, 2 tasks over 1 shard, 1 task (seconds ratio)" in d["ratios"]

    d = _load(bm25_qps.main(bench_dirs + ["--queries", "60", "--threads", "2"]))
    assert d["results"]["same_hits_in_every_mode"] is True
    assert d["results"]["modes"]["batch_search, 2 threads"]["queries_per_s"] > 0
    assert "batch_search, 2 threads / search, one by one (q/s)" in d["ratios"]

    from benchmarks import passage_lookup

    d = _load(passage_lookup.main(bench_dirs[:-2] + ["--lookups", "2000"]))  # (no --repeats)
    assert d["results"]["same_texts"] is True
    assert set(d["results"]["variants"]) == {"dict", "PassageLookup", "PassageStore"}
    assert all(v["lookups_per_s"] > 0 and v["passages"] > 400 for v in d["results"]["variants"].values())
    assert "dict / PassageLookup (memory)" in d["ratios"]


def test_readers_benchmark_holds_passages_fixed(tiny_run_dir, tmp_path):
    """benchmarks/readers.py on the session's untrained tiny run: both depths for every reader, over the
    same fixed passages, Gemma left out (CI has no asset)."""
    from benchmarks import readers

    path = readers.main(["--run-dir", str(tiny_run_dir), "--questions", "3", "--batch-size", "2", "--no-gemma",
                         "--out", str(tmp_path)])
    d = _load(path)
    assert d["params"]["questions"] == 3 and d["params"]["task"] == "slot_filling"
    assert [len(q["passages"]) for q in d["results"]["questions"]] == [5, 5, 5]
    rows = d["results"]["readers"]
    assert set(rows) == {"generator"}                     # the run's one (untrained BART) reader
    for k in ("top1", "top5"):
        r = rows["generator"][k]
        assert r["questions_done"] == 3 and len(r["answers"]) == 3 and 0 <= r["em"] <= 1
        assert r["s_per_q_wall"] > 0 and r["s_per_q_cpu"] > 0
    assert "generator: s/question top-5 / top-1 (wall)" in d["ratios"]


def test_slot_question_and_scores():
    from benchmarks.readers import contains_of, em_of, slot_question

    assert slot_question("Ann Lee [SEP] place of birth") == "What is the place of birth of Ann Lee?"
    assert slot_question("When was Ann Lee born?") == "When was Ann Lee born?"
    with pytest.raises(ValueError, match="Name \\[SEP\\] relation"):
        slot_question(" [SEP] employer")
    assert em_of(["The Physician.", "Rome"], [["physician"], ["Paris", "Lyon"]]) == 0.5
    assert contains_of(["She was a physician.", "Romeo"], [["physician"], ["Rome"]]) == 0.5
