"""Any Hugging Face encoder as a bi-encoder tower: pooling, normalization, prefixes, sentence-transformers
defaults, the fingerprint over settings, the index refusing mismatched settings, plain encoders as
rerankers; and the real all-MiniLM-L6-v2 against sentence-transformers' own ``encode``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from re2g.config import IndexConfig, ModelsConfig
from re2g.errors import ArtifactError
from re2g.models.encoders import BiEncoder
from re2g.models.factory import load_biencoder
from re2g.models.pooling import DPR_SETTINGS, EncoderSettings, pool, sentence_transformers_defaults
from re2g.models.reranker import CrossEncoder

QUERIES = ["who was born in Rorholm?", "a taxon of carnivorous marsupials"]
TITLES = ["Rorholm", "Dasyuromorphia"]
TEXTS = ["Rorholm is a town where a physician was born.", "Dasyuromorphia is an order of marsupials."]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tiny_sample):
    """A tiny plain ``BertModel`` (with pooler) saved as a Hugging Face directory with its tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tiny_sample / "tokenizers" / "wordpiece")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)).eval()
    d = tmp_path_factory.mktemp("bert")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _st_files(d, *, mean: bool, normalize: bool, max_len: int = 48, prompts: dict | None = None):
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (d / "modules.json").write_text(json.dumps(mods))
    (d / "1_Pooling").mkdir(exist_ok=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": not mean, "pooling_mode_mean_tokens": mean}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len}))
    (d / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts or {}}))


# --------------------------------------------------------------------------- pooling by hand


def test_pool_modes_by_hand():
    torch.manual_seed(0)
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    pooled = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(pool("cls", h, mask), h[:, 0])
    assert torch.equal(pool("pooler", None, mask, pooled), pooled)
    mean = pool("mean", h, mask)
    for i in range(2):
        n = int(mask[i].sum())
        expect = sum(h[i, j] for j in range(n)) / n
        assert torch.allclose(mean[i], expect)
    unit = pool("mean", h, mask, normalize=True)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(unit, mean / mean.norm(dim=-1, keepdim=True))
    with pytest.raises(ArtifactError, match="no pooler"):
        pool("pooler", h, mask, None)


def test_plain_encoder_cls_mean_pooler_match_the_model(bert_dir):
    from transformers import BertModel

    ref = BertModel.from_pretrained(bert_dir).eval()
    for mode in ("cls", "mean", "pooler"):
        enc = BiEncoder.from_pretrained(bert_dir, pooling=mode).eval()
        assert enc.shared and enc.settings.pooling == mode and enc.settings.title_separator is None
        with torch.inference_mode():
            batch = enc.tokenize_queries(QUERIES)
            out = ref(**batch)
            m = batch["attention_mask"].unsqueeze(-1).float()
            expect = {"cls": out.last_hidden_state[:, 0], "pooler": out.pooler_output,
                      "mean": (out.last_hidden_state * m).sum(1) / m.sum(1)}[mode]
            torch.testing.assert_close(enc.encode_queries(QUERIES), expect)
            # passages: the DPR-style title/text pair by default for a plain encoder
            pb = enc.tokenize_passages(TITLES, TEXTS)
            assert int(pb["token_type_ids"].max()) == 1
    # a prefix is tokenized in front of every query; a joined passage is one segment
    enc = BiEncoder.from_pretrained(bert_dir, pooling="mean", query_prefix="query: ", title_separator=" | ")
    ids = enc.tokenize_queries(["abc"])["input_ids"][0].tolist()
    assert enc.tokenizer.decode(ids, skip_special_tokens=True).startswith("query")
    assert int(enc.tokenize_passages(TITLES, TEXTS)["token_type_ids"].max()) == 0


def test_sentence_transformers_files_are_the_defaults_and_config_overrides(bert_dir, tmp_path):
    import shutil

    d = tmp_path / "st"
    shutil.copytree(bert_dir, d)
    _st_files(d, mean=True, normalize=True, max_len=48, prompts={"query": "query: ", "passage": "passage: "})
    fields, max_len = sentence_transformers_defaults(d)
    assert fields == {"pooling": "mean", "normalize": True, "title_separator": " ", "query_prefix": "query: ",
                      "passage_prefix": "passage: "} and max_len == 48
    enc = BiEncoder.from_pretrained(d)
    assert enc.settings == EncoderSettings("mean", True, "query: ", "passage: ", " ")
    assert enc.query_max_length == enc.passage_max_length == 48
    v = enc.embed_queries(QUERIES)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    # config fields override the checkpoint's
    cfg = ModelsConfig(query_encoder=str(d), pooling="cls", normalize=False, title_separator="pair")
    over = load_biencoder(cfg)
    assert over.settings == EncoderSettings("cls", False, "query: ", "passage: ", None)
    assert over.query_max_length == cfg.query_max_length  # the config's lengths apply
    # unsupported pooling is refused, naming it
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ArtifactError, match="pooling_mode_max_tokens"):
        BiEncoder.from_pretrained(d)


def test_settings_are_saved_and_part_of_the_fingerprint(bert_dir, tmp_path):
    mean = BiEncoder.from_pretrained(bert_dir, pooling="mean", normalize=True)
    cls_ = BiEncoder.from_pretrained(bert_dir, pooling="cls")
    assert mean.fingerprint() != cls_.fingerprint()
    assert BiEncoder.from_pretrained(bert_dir, pooling="mean", normalize=True).fingerprint() == mean.fingerprint()
    mean.save_pretrained(tmp_path / "be")
    back = BiEncoder.from_pretrained(tmp_path / "be")
    assert back.settings == mean.settings and back.fingerprint() == mean.fingerprint()
    from re2g.models.fingerprint import read_model_meta

    meta = read_model_meta(tmp_path / "be")
    assert meta["encoder_settings"]["pooling"] == "mean" and meta["fingerprint"] == mean.fingerprint()
    torch.testing.assert_close(torch.from_numpy(back.embed_queries(QUERIES)),
                               torch.from_numpy(mean.embed_queries(QUERIES)))
    # DPR's recipe keeps the weights-only fingerprint (indexes built before settings existed)
    assert DPR_SETTINGS == EncoderSettings()


def test_index_refuses_a_query_encoder_with_other_pooling(bert_dir, tmp_path):
    """An index built from mean-pooled vectors refuses a CLS-pooled query encoder over the same
    weights, and says so in plain words."""
    from re2g.data.passages import write_passages
    from re2g.index.dense import build_dense_index
    from re2g.index.embed import embed_corpus_local, read_embeddings_meta
    from re2g.index.retrievers import open_retrievers
    from re2g.config import Re2GConfig
    from re2g.types import Passage

    passages = tmp_path / "passages"
    write_passages([Passage(pid=f"p{i}", title=t, text=x) for i, (t, x) in enumerate(zip(TITLES * 3, TEXTS * 3))],
                   str(passages))
    emb = tmp_path / "emb"
    embed_corpus_local(str(passages), str(bert_dir), str(emb), encoding={"pooling": "mean"}, progress=False)
    meta = read_embeddings_meta(str(emb))
    assert meta["encoder_settings"]["pooling"] == "mean"
    build_dense_index(str(emb), tmp_path / "dense", IndexConfig(num_shards=1, exact=True, metric="ip"),
                      encoder_fingerprint=meta["fingerprint"], encoder_settings=meta["encoder_settings"],
                      use_ray=False)
    cfg = Re2GConfig()
    good = BiEncoder.from_pretrained(bert_dir, pooling="mean")
    hits = open_retrievers(cfg, passages=str(passages), dense_dir=str(tmp_path / "dense"), bm25_dir=None,
                           query_encoder=good)["dpr"].batch_search(QUERIES, 2)
    assert len(hits) == 2 and all(len(h) == 2 for h in hits)
    with pytest.raises(ArtifactError, match=r"mean pooling.*but the query encoder uses cls pooling"):
        open_retrievers(cfg, passages=str(passages), dense_dir=str(tmp_path / "dense"), bm25_dir=None,
                        query_encoder=BiEncoder.from_pretrained(bert_dir, pooling="cls"))


def test_plain_encoder_becomes_a_one_logit_reranker(bert_dir):
    rr = CrossEncoder.from_pretrained(bert_dir)
    assert rr.num_labels == 1
    scores = rr.score(QUERIES[0], list(zip(TITLES, TEXTS)))
    assert scores.shape == (2,)


# --------------------------------------------------------------------------- the real MiniLM


@pytest.fixture(scope="module")
def minilm_dir():
    from re2g.assets import AssetMissingError, asset_path

    try:
        return asset_path("minilm")
    except AssetMissingError as e:
        pytest.skip(str(e))


def test_minilm_vectors_equal_sentence_transformers(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    enc = BiEncoder.from_pretrained(minilm_dir)
    assert enc.settings == EncoderSettings(pooling="mean", normalize=True, title_separator=" ")
    assert enc.dim == 384 and enc.query_max_length == 256
    model = st.SentenceTransformer(str(minilm_dir), device="cpu")
    texts = QUERIES + ["The quick brown fox jumps over the lazy dog. " * 8]
    np.testing.assert_allclose(enc.embed_queries(texts), model.encode(texts), atol=1e-5)
    joined = [f"{t} {x}" for t, x in zip(TITLES, TEXTS)]
    np.testing.assert_allclose(enc.embed_passages(TITLES, TEXTS), model.encode(joined), atol=1e-5)


def test_minilm_reranker_trains(minilm_dir):
    """A real BERT-family checkpoint gets a new one-logit head and learns (a few steps of stage 3's
    loss): the loss falls well below its untrained value (~log 3 for a new head) and the right
    passage comes first for every query."""
    from re2g.models.losses import multi_positive_nll  # stage 3's loss

    torch.manual_seed(0)
    rr = CrossEncoder.from_pretrained(minilm_dir, max_length=48)
    queries = ["order of carnivorous marsupials", "capital city of France", "largest planet in the solar system"]
    cands = [("Dasyuromorphia", "Dasyuromorphia is an order of marsupials that includes quolls."),
             ("Paris", "Paris is the capital and largest city of France."),
             ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System.")]
    opt = torch.optim.AdamW(rr.parameters(), lr=1e-4)
    rr.train()
    losses = []
    for _ in range(8):
        z = torch.stack([rr.score(q, cands) for q in queries])  # (3 queries, 3 candidates)
        loss = multi_positive_nll(z, torch.eye(3, dtype=torch.bool))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    rr.eval()
    with torch.inference_mode():
        top = [int(rr.score(q, cands).argmax()) for q in queries]
    assert top == [0, 1, 2]
    assert losses[-1] < 0.8 * losses[0], losses  # measured 1.11 -> 0.83 in 8 steps
