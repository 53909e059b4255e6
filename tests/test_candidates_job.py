"""Hard-negative mining and the reranker's candidates over Ray Data (a pool of retrieval actors)
give the same files as the in-process computation: same records, same order, same bytes.

The in-process path (``use_ray=False``) is the reference here; ``re2g mine-negatives``,
``re2g candidates``, ``jobs.mine_negatives``, ``jobs.candidates`` and the reranker/joint stages use
the Ray Data one. The JVM behind BM25 starts in this test process only for the references, after
Ray (the ``ray_local`` fixture); the Ray Data path starts it in the actors.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from re2g.train.data import pool_size


def test_pool_size_leaves_a_cpu_for_ray_data():
    assert pool_size(None, 1) == 1
    assert pool_size(None, 2) == 1          # the 2-core machine: one actor, one CPU left
    assert pool_size(None, 3) == 2
    assert pool_size(None, 64) == 2
    assert pool_size(5, 2) == 5             # an explicit size wins (fractional CPUs make it fit)


def test_mining_config_pool_fields():
    from re2g.config import load_config

    m = load_config(preset="tiny").train.mining
    assert m.actors is None and m.actor_cpus is None and m.actor_resources == {} and m.batch_size == 256
    m = load_config(preset="tiny", overrides=["train.mining.actors=2", "train.mining.actor_cpus=0.5",
                                              "train.mining.actor_resources={index_node: 1}"]).train.mining
    assert (m.actors, m.actor_cpus, m.actor_resources) == (2, 0.5, {"index_node": 1.0})


# --------------------------------------------------------------------------- the tiny run


@pytest.fixture(scope="module")
def run(tiny_run_dir, ray_local):
    """(config factory, inputs factory) over the read-only tiny run; outputs go to a fresh directory."""
    from re2g.config import load_config
    from re2g.train.api import prepare_inputs

    def cfg(*extra):
        return load_config(preset="tiny", overrides=[f"run_dir={tiny_run_dir}", "index.exact=true", *extra])

    def inputs(c, work: Path):
        inp = prepare_inputs(c, build=False)
        return dataclasses.replace(inp, work_dir=str(work), negatives=str(work / "negatives.jsonl"))

    return cfg, inputs


def _lines(path) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


def _same_file(a, b) -> int:
    """Both files hold the same records in the same order (byte-equal); returns the count."""
    la, lb = _lines(a), _lines(b)
    assert len(la) == len(lb) and len(la) > 0
    ids_a = [json.loads(x)["id"] for x in la]
    assert ids_a == [json.loads(x)["id"] for x in lb]          # same order
    diff = [i for i, (x, y) in enumerate(zip(la, lb)) if x != y]
    assert not diff, f"{len(diff)} records differ, first: {la[diff[0]]} vs {lb[diff[0]]}"
    assert Path(a).read_bytes() == Path(b).read_bytes()
    return len(la)


def test_mining_over_ray_data_equals_in_process(run, tmp_path):
    from re2g.train.api import mine

    cfg_f, inputs_f = run
    cfg = cfg_f()
    ref, ref_info = mine(cfg, inputs_f(cfg, tmp_path / "local"), use_ray=False)
    assert ref_info["run"]["ray_data"] is False
    # default path: Ray Data (one actor on the 2-CPU test Ray: min(2, CPUs - 1))
    got, info = mine(cfg, inputs_f(cfg, tmp_path / "ray"))
    assert info["run"]["ray_data"] is True and info["run"]["actors"] == 1
    n = _same_file(ref, got)
    assert n == info["mining"]["queries"] > 400
    assert info["mining"] == ref_info["mining"] and info["load"] == ref_info["load"]
    # two actors with fractional CPUs and small batches: many blocks, order still the input's
    cfg2 = cfg_f("train.mining.actors=2", "train.mining.actor_cpus=0.5", "train.mining.batch_size=64")
    got2, info2 = mine(cfg2, inputs_f(cfg2, tmp_path / "ray2"))
    assert info2["run"]["actors"] == 2 and info2["run"]["actor_cpus"] == 0.5 and info2["run"]["blocks"] > 2
    _same_file(ref, got2)
    assert info2["mining"] == ref_info["mining"]
    # the file is only ever renamed into place
    assert not list((tmp_path / "ray2").glob(".*.tmp*"))


def test_candidates_over_ray_data_equal_in_process(run, tmp_path):
    """Without a dense index the hybrid is BM25 alone (train.reranker.dense_index unset). Both splits
    in one Ray Data pass (what train_reranker does) equal each split computed on its own."""
    from re2g.train.api import candidate_files, candidates

    cfg_f, inputs_f = run
    cfg = cfg_f()
    both = candidate_files(cfg, inputs_f(cfg, tmp_path / "ray"), ("train", "dev"))
    for split in ("train", "dev"):
        ref = candidates(cfg, inputs_f(cfg, tmp_path / "local"), split, use_ray=False)
        got = both[split]
        assert Path(got).name == f"candidates-{split}.jsonl"
        _same_file(ref, got)
        recs = [json.loads(x) for x in _lines(got)]
        assert all(0 < len(r["candidates"]) <= 24 for r in recs)


def test_hybrid_candidates_with_dense_index_equal_in_process(run, tiny_run_dir, tmp_path):
    """DPR + BM25 merged: each actor loads the query encoder and the dense index itself."""
    from re2g.train.api import candidates

    cfg_f, inputs_f = run
    cfg = cfg_f(f"models.query_encoder={tiny_run_dir / 'models' / 'biencoder'}", "train.mining.actors=2",
                "train.mining.actor_cpus=0.5", "train.mining.batch_size=128")
    dense = str(tiny_run_dir / "index" / "dense")
    ref = candidates(cfg, inputs_f(cfg, tmp_path / "local"), "dev", dense_index=dense, use_ray=False)
    got = candidates(cfg, inputs_f(cfg, tmp_path / "ray"), "dev", dense_index=dense)
    _same_file(ref, got)
    recs = [json.loads(x) for x in _lines(got)]
    assert sum(len(r["candidates"]) > 12 for r in recs) > len(recs) // 2   # DPR added passages BM25 missed


def test_candidates_and_mining_jobs(tiny_run_dir, ray_local, tmp_path, run, capsys):
    """``python -m jobs.candidates`` / ``jobs.mine_negatives`` (Ray already connected here): the same
    files as the in-process computation, and a job manifest."""
    import jobs.candidates
    import jobs.mine_negatives
    from re2g.train.api import candidates, mine

    work = tmp_path / "run"
    shutil.copytree(tiny_run_dir, work)
    args = ["--preset", "tiny", "--set", f"run_dir={work}", "--set", "index.exact=true"]
    assert jobs.candidates.main([*args, "--split", "dev"]) == 0
    assert jobs.mine_negatives.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["job"] == "mine_negatives" and out["outputs"]["run"]["ray_data"] is True
    manifest = json.loads((work / "jobs" / "candidates.json").read_text())
    assert manifest["outputs"]["paths"] == {"dev": str(work / "train" / "candidates-dev.jsonl")}
    assert not (work / "train" / "candidates-train.jsonl").exists()

    cfg_f, inputs_f = run
    cfg = cfg_f()
    _same_file(candidates(cfg, inputs_f(cfg, tmp_path / "local"), "dev", use_ray=False),
               work / "train" / "candidates-dev.jsonl")
    _same_file(mine(cfg, inputs_f(cfg, tmp_path / "local"), use_ray=False)[0], work / "train" / "negatives.jsonl")
