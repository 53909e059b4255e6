"""Config loading: presets, files, overrides, and errors that name the field, value and expectation."""

from __future__ import annotations

import pytest

from re2g.config import (
    Re2GConfig,
    config_to_yaml,
    load_config,
    load_saved_config,
    save_config,
)
from re2g.errors import ConfigError


def test_presets_load_and_differ():
    tiny = load_config(preset="tiny")
    paper = load_config(preset="paper")
    assert tiny.models.query_encoder is None  # built from config
    assert paper.models.query_encoder == "facebook/dpr-question_encoder-multiset-base"
    assert paper.models.ctx_encoder == "facebook/dpr-ctx_encoder-multiset-base"
    assert paper.models.reranker == "nboost/pt-bert-base-uncased-msmarco"
    assert paper.models.generator == "facebook/bart-large"
    # Re2G defaults: DPR top-12 + BM25 top-12, reranker keeps 5; HNSW efConstruction 200, efSearch 128
    for c in (tiny, paper):
        assert (c.retrieval.dpr_top_k, c.retrieval.bm25_top_k, c.retrieval.rerank_top_k) == (12, 12, 5)
        assert (c.index.ef_construction, c.index.ef_search) == (200, 128)
    assert paper.index.hnsw_m == 128


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: paper\nindex:\n  num_shards: 3\nretrieval:\n  fusion: rrf\n")
    c = load_config(f, overrides=["index.num_shards=5", "models.generator=/models/bart"])
    assert c.preset == "paper"
    assert c.index.num_shards == 5
    assert c.retrieval.fusion == "rrf"
    assert c.models.generator == "/models/bart"
    assert c.models.query_encoder == "facebook/dpr-question_encoder-multiset-base"  # from the preset


def test_error_names_file_field_value_and_expectation(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("index:\n  hnsw_m: -4\nretrieval:\n  fusion: magic\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg
    assert "index.hnsw_m" in msg and "-4" in msg and "greater than or equal to 2" in msg
    assert "retrieval.fusion" in msg and "'magic'" in msg and "concat" in msg


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match=r"index\.num_shard'.*unknown field"):
        load_config(overrides=["index.num_shard=2"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="min_words"):
        load_config(overrides=["passages.min_words=200", "passages.max_words=100"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(overrides=["models.tiny.hidden_size=30", "models.tiny.num_heads=4"])


def test_bad_yaml_and_bad_override(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("index:\n  num_shards: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(overrides=["index.num_shards"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected one of tiny, small, paper"):
        load_config(preset="huge")


def test_saved_config_round_trip(tmp_path):
    c = load_config(preset="paper", overrides=["index.num_shards=4"])
    path = save_config(c, tmp_path / "artifact")
    assert path.name == "config.yaml"
    back = load_saved_config(tmp_path / "artifact")
    assert isinstance(back, Re2GConfig)
    assert back == c
    assert config_to_yaml(back) == path.read_text()


def test_local_paths_become_absolute_names_and_uris_stay(tmp_path, monkeypatch):
    """Ray Train workers do not run in the driver's cwd: existing relative paths are resolved at load
    (and on assignment); hub names, URIs and paths not there yet are kept as given."""
    (tmp_path / "models" / "dpr").mkdir(parents=True)
    (tmp_path / "dev.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset="tiny", overrides=["run_dir=runs/x", "models.query_encoder=models/dpr",
                                                "models.generator=facebook/bart-base", "data.dev_file=dev.jsonl",
                                                "train.e2e.reranker=s3://bucket/reranker",
                                                "train.generator.biencoder=not/yet/there"])
    assert cfg.run_dir == str(tmp_path / "runs" / "x")
    assert cfg.models.query_encoder == str(tmp_path / "models" / "dpr")
    assert cfg.data.dev_file == str(tmp_path / "dev.jsonl")
    assert cfg.models.generator == "facebook/bart-base"
    assert cfg.train.e2e.reranker == "s3://bucket/reranker"
    assert cfg.train.generator.biencoder == "not/yet/there"
    cfg.train.reranker.init_from_biencoder = "models/dpr"
    assert cfg.train.reranker.init_from_biencoder == str(tmp_path / "models" / "dpr")


def test_asset_locations_and_the_small_preset(tmp_path, monkeypatch):
    """``asset:NAME`` resolves to the local asset cache; a missing asset is refused with how to fetch it."""
    from re2g.config import load_config
    from re2g.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown asset 'nope'"):
        load_config(preset="tiny", overrides=["models.query_encoder=asset:nope"])
    monkeypatch.setenv("RE2G_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"models.query_encoder.*re2g assets fetch minilm"):
        load_config(preset="small")
    with pytest.raises(ConfigError, match="quickstart"):
        load_config(preset="tiny", overrides=["quickstart.skip=7"])
