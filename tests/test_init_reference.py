"""re2g.models.init: a pretrained generator the config names is referenced, not copied, when asked
(the quickstart asks, so a 1 GB reader such as Gemma is not copied into every run). A tiny causal LM
built from config and saved as a plain Hugging Face directory stands in for the real one; nothing is
downloaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from re2g.config import ModelsConfig, TinyModelConfig
from re2g.models.causal import CausalGenerator
from re2g.models.factory import build_tiny_generator, load_generator
from re2g.models.init import (
    REFERENCES_FILE,
    checkpoint_files_fingerprint,
    init_models,
    model_reference,
)

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=400,
                       max_position_embeddings=256, generator_arch="llama")
QUERIES = ["who founded the city"]
DOCS = [[("Town3", "the city lies on the river and was founded by a king"), ("River", "the river flows")]]
TARGETS = ["a king"]


@pytest.fixture(scope="module")
def hf_causal(tiny_sample, tmp_path_factory):
    """A tiny causal LM saved as a plain HF directory (model + tokenizer, no re2g files), as an asset is."""
    torch.manual_seed(0)
    g = build_tiny_generator(tiny_sample / "tokenizers" / "bpe", TINY)
    out = tmp_path_factory.mktemp("pretrained") / "causal-lm"
    g.model.save_pretrained(out)
    g.tokenizer.save_pretrained(out)
    return out


def _cfg(generator) -> ModelsConfig:
    return ModelsConfig(generator=str(generator), generator_kind="causal", tiny=TINY)


def test_named_generator_is_referenced_with_its_fingerprint_and_loads_from_there(tiny_sample, hf_causal, tmp_path):
    written = init_models(_cfg(hf_causal), tmp_path / "init", tokenizers_dir=tiny_sample / "tokenizers",
                          reference=("generator",))
    assert (tmp_path / "init" / "biencoder").is_dir() and (tmp_path / "init" / "reranker").is_dir()
    assert not (tmp_path / "init" / "generator").exists()                 # nothing copied
    assert written["generator"] == hf_causal
    refs = json.loads((tmp_path / "init" / REFERENCES_FILE).read_text())
    assert set(refs) == {"generator"}
    assert refs["generator"] == {"model": str(hf_causal), "path": str(hf_causal.resolve()),
                                 "fingerprint": checkpoint_files_fingerprint(hf_causal)}
    assert len(refs["generator"]["fingerprint"]) == 16
    # what the run's readers load (models.generator) is the referenced model itself
    ref = load_generator(_cfg(refs["generator"]["path"])).eval()
    orig = CausalGenerator.from_pretrained(hf_causal).eval()
    assert isinstance(ref, CausalGenerator)
    with torch.no_grad():
        assert torch.equal(ref.forward_logprobs(QUERIES, DOCS, TARGETS), orig.forward_logprobs(QUERIES, DOCS, TARGETS))


def test_without_reference_the_named_generator_is_still_saved(tiny_sample, hf_causal, tmp_path):
    written = init_models(_cfg(hf_causal), tmp_path / "init", tokenizers_dir=tiny_sample / "tokenizers",
                          which=("generator",))
    assert written["generator"] == tmp_path / "init" / "generator" and written["generator"].is_dir()
    assert not (tmp_path / "init" / REFERENCES_FILE).exists()


def test_an_unnamed_generator_is_built_and_saved_even_when_referencing(tiny_sample, tmp_path):
    cfg = ModelsConfig(tiny=TINY)                          # models.generator None: the tiny one from config
    written = init_models(cfg, tmp_path / "init", tokenizers_dir=tiny_sample / "tokenizers", which=("generator",),
                          reference=("generator",))
    assert isinstance(load_generator(ModelsConfig(generator=str(written["generator"]))), CausalGenerator)
    assert not (tmp_path / "init" / REFERENCES_FILE).exists()


def test_fingerprint_follows_the_files_not_the_place(hf_causal, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(hf_causal, copy)
    assert checkpoint_files_fingerprint(copy) == checkpoint_files_fingerprint(hf_causal)
    (copy / ".cache").mkdir()                              # hidden files (download caches) do not count
    (copy / ".cache" / "x").write_text("x")
    assert checkpoint_files_fingerprint(copy) == checkpoint_files_fingerprint(hf_causal)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_files_fingerprint(copy) != checkpoint_files_fingerprint(hf_causal)
    with pytest.raises(NotADirectoryError, match="not a checkpoint directory"):
        checkpoint_files_fingerprint(tmp_path / "missing")


def test_a_hub_name_is_recorded_without_loading_it(tiny_sample, tmp_path):
    name = "nobody-org/never-downloaded-lm"                # not a local path: only the name is recorded
    assert model_reference(name) == {"model": name}
    written = init_models(ModelsConfig(generator=name), tmp_path / "init", which=("generator",),
                          reference=("generator",))
    assert str(written["generator"]) == name
    assert json.loads((tmp_path / "init" / REFERENCES_FILE).read_text()) == {"generator": {"model": name}}


def test_only_the_generator_can_be_referenced(tmp_path):
    with pytest.raises(ValueError, match="only 'generator'"):
        init_models(ModelsConfig(), tmp_path, reference=("reranker",))
