"""re2g.models: bi-encoder, cross-encoder, generator, factory and fingerprints, on tiny models.

Tokenizers are trained here on a few dozen sentences (WordPiece for BERT/DPR, byte-level BPE for
BART); "paper-class" models are tiny models of the paper checkpoints' classes saved in the Hugging
Face layout those checkpoints have, loaded by path through the same ``from_pretrained``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from re2g.config import ModelsConfig, TinyModelConfig
from re2g.errors import ArtifactError, ConfigError
from re2g.models.encoders import BiEncoder
from re2g.models.factory import (build_tiny_biencoder, build_tiny_generator, build_tiny_reranker,
                                 load_biencoder, load_generator, load_reranker)
from re2g.models.fingerprint import MODEL_META_FILE, encoder_fingerprint, module_fingerprint, read_model_meta
from re2g.models.generator import Generator
from re2g.models.reranker import CrossEncoder
from re2g.types import Passage

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=400,
                       max_position_embeddings=128)

SENTENCES = [f"the city of town{i} lies on the river{i % 7} and was founded in {1200 + 7 * i} by king{i % 5}"
             for i in range(40)] + [
    "who founded the city", "which river flows through the town", "when was it founded",
    "paris is the capital of france", "the eiffel tower stands in paris", "answer the question",
]
QUERIES = ["who founded town3", "which river flows through town12"]
TITLES = ["Town3", "Town12", ""]
TEXTS = ["the city of town3 lies on the river3", "town12 was founded in 1284 by king2", "a passage without a title"]


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory):
    """(wordpiece_dir, bpe_dir): AutoTokenizer-loadable tokenizers trained on SENTENCES."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizers")
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls_id, sep_id = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    wp.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(root / "wordpiece")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                      ("<s>", bpe.token_to_id("<s>")))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", mask_token="<mask>").save_pretrained(root / "bpe")
    return root / "wordpiece", root / "bpe"


@pytest.fixture(scope="session")
def wp_dir(tok_dirs):
    return tok_dirs[0]


@pytest.fixture(scope="session")
def bpe_dir(tok_dirs):
    return tok_dirs[1]


def _close(a, b, tol=1e-6):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol, rtol=0), (a - b).abs().max()


def _bienc(wp_dir, shared=False, seed=0):
    torch.manual_seed(seed)
    return build_tiny_biencoder(wp_dir, TINY, shared=shared).eval()


# --------------------------------------------------------------------------- bi-encoder


@pytest.mark.parametrize("shared", [False, True])
def test_biencoder_round_trip(wp_dir, tmp_path, shared):
    be = _bienc(wp_dir, shared)
    assert be.shared is shared and (be.query_encoder is be.ctx_encoder) is shared
    with torch.inference_mode():
        q, p = be.encode_queries(QUERIES), be.encode_passages(TITLES, TEXTS)
    assert q.shape == (2, TINY.hidden_size) and p.shape == (3, TINY.hidden_size) and be.dim == TINY.hidden_size
    _close(be.score(q, p), q @ p.T)

    be.query_max_length, be.passage_max_length = 32, 96
    be.save_pretrained(tmp_path / "be")
    assert (tmp_path / "be" / "query_encoder").is_dir() and (tmp_path / "be" / "tokenizer").is_dir()
    assert (tmp_path / "be" / "ctx_encoder").is_dir() is not shared
    assert (tmp_path / "be" / MODEL_META_FILE).is_file()
    meta = read_model_meta(tmp_path / "be")  # the one manifest schema (fingerprints.encoder -> fingerprint)
    assert meta["kind"] == "biencoder" and meta["shared"] is shared and meta["fingerprint"] == be.fingerprint()

    be2 = BiEncoder.from_pretrained(tmp_path / "be").eval()
    assert be2.shared is shared and (be2.query_max_length, be2.passage_max_length) == (32, 96)
    with torch.inference_mode():
        q2, p2 = be2.encode_queries(QUERIES), be2.encode_passages(TITLES, TEXTS)
    _close(q2, q)
    _close(p2, p)
    _close(be2.score(q2, p2), be.score(q, p))
    np.testing.assert_allclose(be2.embed_passages(TITLES, TEXTS, batch_size=2), p.numpy(), atol=1e-6, rtol=0)


def test_shared_vs_separate_encoders(wp_dir):
    sep, shared = _bienc(wp_dir, False), _bienc(wp_dir, True)
    assert sum(1 for _ in shared.parameters()) * 2 == sum(1 for _ in sep.parameters())
    with torch.inference_mode():
        for be, same in ((shared, True), (sep, False)):
            batch = be.tokenize_queries(QUERIES)
            via_q = be._pool(be.query_encoder, batch, be.device)
            via_c = be._pool(be.ctx_encoder, batch, be.device)
            assert torch.allclose(via_q, via_c) is same


def test_passage_encoding_uses_title_text_pair(wp_dir):
    be = _bienc(wp_dir)
    batch = be.tokenize_passages(["Town3"], ["the city of town3 lies on the river3"])
    types, ids = batch["token_type_ids"][0], batch["input_ids"][0]
    sep_id = be.tokenizer.sep_token_id
    first_sep = (ids == sep_id).nonzero()[0].item()
    assert types[: first_sep + 1].eq(0).all() and types[first_sep + 1:].eq(1).all() and types.sum() > 0
    with torch.inference_mode():
        pair = be.encode_passages(["Town3"], ["the city of town3 lies on the river3"])
        flat = be._pool(be.ctx_encoder, be.tokenize_queries(["Town3 the city of town3 lies on the river3"]), be.device)
        other_title = be.encode_passages(["Town12"], ["the city of town3 lies on the river3"])
    assert not torch.allclose(pair, flat) and not torch.allclose(pair, other_title)
    assert be.tokenize_passages(["t"] * 2, ["word " * 500] * 2, max_length=20)["input_ids"].shape == (2, 20)


def test_biencoder_grad_and_embed_helpers(wp_dir):
    be = _bienc(wp_dir).train()
    loss = be.score(be.encode_queries(QUERIES), be.encode_passages(TITLES, TEXTS)).logsumexp(-1).sum()
    loss.backward()
    assert be.query_encoder.question_encoder.bert_model.embeddings.word_embeddings.weight.grad is not None
    assert be.ctx_encoder.ctx_encoder.bert_model.embeddings.word_embeddings.weight.grad is not None
    emb = be.embed_queries(QUERIES * 3, batch_size=4)
    assert be.training, "embed_* restore the training flag"
    assert emb.dtype == np.float32 and emb.shape == (6, TINY.hidden_size)
    be.eval()
    with torch.inference_mode():
        np.testing.assert_allclose(emb, be.encode_queries(QUERIES * 3).numpy(), atol=1e-6, rtol=0)
    assert be.embed_passages([], []).shape == (0, TINY.hidden_size)


def test_paper_layout_biencoder(wp_dir, tmp_path):
    """Two DPR checkpoints, each with its own tokenizer (the hub layout of facebook/dpr-*-multiset-base)."""
    from transformers import AutoTokenizer, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    tok = AutoTokenizer.from_pretrained(wp_dir)
    cfg = DPRConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(1)
    q_model, c_model = DPRQuestionEncoder(cfg).eval(), DPRContextEncoder(cfg).eval()
    for model, name in ((q_model, "dpr-question_encoder"), (c_model, "dpr-ctx_encoder")):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    be = BiEncoder.from_pretrained(str(tmp_path / "dpr-question_encoder"), str(tmp_path / "dpr-ctx_encoder")).eval()
    assert type(be.query_encoder) is DPRQuestionEncoder and type(be.ctx_encoder) is DPRContextEncoder
    with torch.inference_mode():
        batch = be.tokenize_passages(TITLES, TEXTS)
        _close(be.encode_passages(TITLES, TEXTS), c_model(**batch).pooler_output)
        _close(be.encode_queries(QUERIES), q_model(**be.tokenize_queries(QUERIES)).pooler_output)
    assert be.fingerprint() == module_fingerprint(c_model) == encoder_fingerprint(tmp_path / "dpr-ctx_encoder")
    # a shared encoder from a context-encoder checkpoint keeps its class (no silent re-initialization)
    one = BiEncoder.from_pretrained(tmp_path / "dpr-ctx_encoder", shared=True)
    assert one.shared and type(one.query_encoder) is DPRContextEncoder
    # ... and the same checkpoints through a config
    cfg_models = ModelsConfig(query_encoder=str(tmp_path / "dpr-question_encoder"),
                              ctx_encoder=str(tmp_path / "dpr-ctx_encoder"), query_max_length=16)
    loaded = load_biencoder(cfg_models).eval()
    assert loaded.query_max_length == 16 and loaded.fingerprint() == be.fingerprint()
    with pytest.raises(ValueError):
        BiEncoder.from_pretrained(tmp_path / "dpr-question_encoder")  # no ctx encoder, not shared


# --------------------------------------------------------------------------- reranker


def test_reranker_tiny_scores_and_round_trip(wp_dir, tmp_path):
    torch.manual_seed(0)
    rr = build_tiny_reranker(wp_dir, TINY).eval()
    passages = [Passage(pid=str(i), title=t, text=x) for i, (t, x) in enumerate(zip(TITLES, TEXTS))]
    with torch.inference_mode():
        s = rr.score(QUERIES[0], passages)
        assert s.shape == (3,)
        _close(rr.score_pairs([QUERIES[0]] * 3, TITLES, TEXTS, batch_size=2), s)
        _close(rr.score(QUERIES[0], [{"title": t, "text": x} for t, x in zip(TITLES, TEXTS)]), s)
        enc = rr.tokenize([QUERIES[0]], ["Town3 the city of town3 lies on the river3"])
        _close(rr.model(**enc).logits[:, 0], s[:1])  # passage side is title + " " + text
    rr.save_pretrained(tmp_path / "rr")
    rr2 = CrossEncoder.from_pretrained(tmp_path / "rr").eval()
    with torch.inference_mode():
        _close(rr2.score(QUERIES[0], passages), s)
    assert rr2.num_labels == 1 and rr2.max_length == rr.max_length
    assert rr.score_pairs([], [], []).shape == (0,)


def test_reranker_score_lists_pads_ragged_lists(wp_dir):
    """``score_lists``: each query against its own list (lengths 3, 1, 0), padded with a mask; the
    real entries equal ``score_pairs`` of the same pairs, whatever the batch size; gradient flows."""
    torch.manual_seed(0)
    rr = build_tiny_reranker(wp_dir, TINY).eval()
    lists = [list(zip(TITLES, TEXTS)), [Passage(pid="x", title=TITLES[1], text=TEXTS[1])], []]
    queries = [QUERIES[0], QUERIES[1], QUERIES[0]]
    z, mask = rr.score_lists(queries, lists)
    assert z.shape == mask.shape == (3, 3) and mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    with torch.inference_mode():
        ref = rr.score_pairs([QUERIES[0]] * 3 + [QUERIES[1]], TITLES + [TITLES[1]], TEXTS + [TEXTS[1]])
        small, _ = rr.score_lists(queries, lists, batch_size=2)
    _close(z[mask].detach(), ref, 1e-5)
    _close(small[mask], ref, 1e-5)
    assert z[~mask].tolist() == [0.0] * 5
    z[mask].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rr.parameters())
    empty, em = rr.score_lists([], [])
    assert empty.shape == em.shape == (0, 0)


def test_reranker_exact_match_token_type(wp_dir, tmp_path):
    """Tiny rerankers mark passage tokens that occur in the query with token type 2 (special tokens,
    query tokens and padding keep their type); a 2-type model (a real checkpoint) keeps BERT's types."""
    rr = build_tiny_reranker(wp_dir, TINY)
    assert rr.exact_match and rr.model.config.type_vocab_size == 3
    enc = rr.tokenize(["the river3", "town12"], ["town3 lies on the river3", "paris"])
    ids, types, mask = enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
    special = set(rr.tokenizer.all_special_ids)
    for i in range(2):
        sep = [j for j, t in enumerate(ids[i].tolist()) if t == rr.tokenizer.sep_token_id][0]
        query_ids = set(ids[i, 1:sep].tolist())
        for j in range(ids.shape[1]):
            tok, ty = int(ids[i, j]), int(types[i, j])
            if j <= sep or not mask[i, j] or tok in special:
                assert ty in (0, 1) and ty != 2
            else:
                assert ty == (2 if tok in query_ids else 1)
    assert (types[0] == 2).any() and not (types[1] == 2).any()
    rr.save_pretrained(tmp_path / "rr")
    assert CrossEncoder.from_pretrained(tmp_path / "rr").exact_match
    plain = build_tiny_reranker(wp_dir, TINY.model_copy(update={"reranker_exact_match": False}))
    assert not plain.exact_match and int(plain.tokenize(["the river3"], ["the river3"])["token_type_ids"].max()) == 1


def test_reranker_two_label_checkpoint(wp_dir, tmp_path):
    """A 2-label MS MARCO-style checkpoint (nboost/pt-bert-base-uncased-msmarco): score = logit1 - logit0."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(wp_dir)
    torch.manual_seed(2)
    base = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128)
    model = BertForSequenceClassification(BertConfig(num_labels=2, **base)).eval()
    model.save_pretrained(tmp_path / "msmarco")
    tok.save_pretrained(tmp_path / "msmarco")
    rr = load_reranker(ModelsConfig(reranker=str(tmp_path / "msmarco"), reranker_max_length=64)).eval()
    assert rr.num_labels == 2 and rr.max_length == 64
    with torch.inference_mode():
        s = rr.score_pairs(QUERIES[:1] * 3, TITLES, TEXTS)
        logits = model(**rr.tokenize(QUERIES[:1] * 3, [f"{t} {x}" if t else x for t, x in zip(TITLES, TEXTS)])).logits
    _close(s, logits[:, 1] - logits[:, 0])
    with pytest.raises(ArtifactError):
        CrossEncoder(BertForSequenceClassification(BertConfig(num_labels=3, **base)), tok)


# --------------------------------------------------------------------------- generator


def _gen(bpe_dir, seed=0, **kw):
    torch.manual_seed(seed)
    return build_tiny_generator(bpe_dir, TINY, **kw).eval()


DOCS = [[("Town3", "the city of town3 lies on the river3"), ("Town12", "town12 was founded in 1284")],
        [("", "paris is the capital of france"), ("Paris", "the eiffel tower stands in paris")]]
TARGETS = ["king3", "the river12 flows through the town"]


def test_generator_sources_are_configurable(bpe_dir):
    g = _gen(bpe_dir)
    assert g.build_source("who?", ("T", "text")) == "T / text // who?"
    assert g.build_source("who?", Passage(pid="1", title="", text="text")) == "text // who?"
    g2 = _gen(bpe_dir, title_sep=" [T] ", query_sep=" [Q] ")
    assert g2.build_sources(["q1", "q2"], [[("a", "b")], [("c", "d")]]) == ["a [T] b [Q] q1", "c [T] d [Q] q2"]
    with pytest.raises(ValueError):
        g.build_sources(["q1", "q2"], [[("a", "b")], [("c", "d"), ("e", "f")]])


def test_generator_logprobs_match_model_loss(bpe_dir):
    g = _gen(bpe_dir)
    tgt = g.tokenize_targets(TARGETS)
    mask = tgt["attention_mask"].bool()                                   # (B, T)
    assert not mask.all(), "targets of different lengths leave padding"
    with torch.inference_mode():
        lp = g.forward_logprobs(QUERIES, DOCS, tgt)                       # (B, n_docs, T)
        assert lp.shape == (2, 2, mask.shape[1])
        assert (lp[~mask[:, None, :].expand_as(lp)] == 0).all() and (lp[mask[:, None, :].expand_as(lp)] < 0).all()
        # n_docs = 1: the sum over the target is -loss * (number of target tokens)
        one = [[d[0]] for d in DOCS]
        lp1 = g.forward_logprobs(QUERIES, one, TARGETS)                   # (B, 1, T)
        _close(lp1[:, 0], lp[:, 0])
        src = g.tokenize_sources(g.build_sources(QUERIES, one))
        labels = tgt["input_ids"].masked_fill(~mask, -100)
        loss = g.model(input_ids=src["input_ids"], attention_mask=src["attention_mask"], labels=labels).loss
        assert torch.allclose(lp1.sum(), -loss * mask.sum(), atol=1e-4, rtol=1e-5)
        # document j of a query scores as if it were the only one
        second = g.forward_logprobs(QUERIES, [[d[1]] for d in DOCS], TARGETS)
        _close(second[:, 0], lp[:, 1], tol=1e-5)
    g.train()
    g.forward_logprobs(QUERIES[:1], DOCS[:1], TARGETS[:1]).sum().backward()
    assert g.model.model.shared.weight.grad is not None


def test_generator_round_trip_and_generate(bpe_dir, tmp_path):
    g = _gen(bpe_dir, query_sep=" || ")
    with torch.inference_mode():
        lp = g.forward_logprobs(QUERIES, DOCS, TARGETS)
    g.save_pretrained(tmp_path / "gen")
    g2 = Generator.from_pretrained(tmp_path / "gen").eval()
    assert g2.query_sep == " || " and g2.title_sep == " / "
    with torch.inference_mode():
        _close(g2.forward_logprobs(QUERIES, DOCS, TARGETS), lp)
    out = g2.generate(QUERIES, DOCS, num_beams=2, num_return_sequences=2, max_new_tokens=4)
    assert len(out) == 2 and all(len(per_q) == 2 and all(len(r) == 2 for r in per_q) for per_q in out)
    assert all(isinstance(t, str) for per_q in out for r in per_q for t in r)


def test_paper_layout_generator(bpe_dir, tmp_path):
    """A plain Hugging Face BART directory (the layout of facebook/bart-large) loads with the defaults."""
    g = _gen(bpe_dir)
    g.model.save_pretrained(tmp_path / "bart")
    g.tokenizer.save_pretrained(tmp_path / "bart")
    loaded = load_generator(ModelsConfig(generator=str(tmp_path / "bart"), generator_target_max_length=24)).eval()
    assert loaded.target_max_length == 24 and loaded.title_sep == " / " and loaded.query_sep == " // "
    assert loaded.target_prefix == "" and g.target_prefix == " "   # re2g's own setting is not in a plain HF dir
    g.target_prefix = ""
    with torch.inference_mode():
        _close(loaded.forward_logprobs(QUERIES, DOCS, TARGETS), g.forward_logprobs(QUERIES, DOCS, TARGETS))


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(wp_dir, tmp_path):
    be = _bienc(wp_dir)
    fp = encoder_fingerprint(be)
    assert fp == be.fingerprint() and len(fp) == 16 and fp == encoder_fingerprint(be)
    be.save_pretrained(tmp_path / "be")
    assert encoder_fingerprint(tmp_path / "be") == fp
    assert encoder_fingerprint(BiEncoder.from_pretrained(tmp_path / "be")) == fp
    # training the query encoder keeps the index's fingerprint; changing the context encoder does not
    with torch.no_grad():
        next(be.query_encoder.parameters()).add_(0.01)
    assert encoder_fingerprint(be) == fp
    with torch.no_grad():
        be.ctx_encoder.ctx_encoder.bert_model.encoder.layer[0].output.dense.bias[0] += 1e-3
    assert encoder_fingerprint(be) != fp
    assert encoder_fingerprint(_bienc(wp_dir, seed=5)) != fp
    # a saved bi-encoder whose context encoder was swapped for another refuses to load
    _bienc(wp_dir, seed=5).ctx_encoder.save_pretrained(tmp_path / "be" / "ctx_encoder")
    with pytest.raises(ArtifactError, match="fingerprint"):
        BiEncoder.from_pretrained(tmp_path / "be")


# --------------------------------------------------------------------------- factory


def test_tiny_builds_are_deterministic(wp_dir, bpe_dir):
    assert _bienc(wp_dir, seed=3).fingerprint() == _bienc(wp_dir, seed=3).fingerprint()
    torch.manual_seed(3)
    a = build_tiny_reranker(wp_dir, TINY)
    torch.manual_seed(3)
    b = build_tiny_reranker(wp_dir, TINY)
    assert module_fingerprint(a) == module_fingerprint(b)
    assert module_fingerprint(_gen(bpe_dir, seed=3)) == module_fingerprint(_gen(bpe_dir, seed=3))
    g = _gen(bpe_dir)
    tok = g.tokenizer
    cfg = g.model.config
    assert cfg.vocab_size == len(tok) and cfg.d_model == TINY.hidden_size
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.bos_token_id,
                                                                        tok.eos_token_id)
    assert cfg.decoder_start_token_id == tok.eos_token_id


def test_load_from_config_none_and_path(wp_dir, bpe_dir, tmp_path):
    cfg = ModelsConfig(tiny=TINY, query_max_length=20, reranker_max_length=40, generator_source_max_length=50)
    torch.manual_seed(0)
    be = load_biencoder(cfg, wp_dir).eval()
    rr = load_reranker(cfg, wp_dir).eval()
    g = load_generator(cfg, bpe_dir).eval()
    assert not be.shared and be.query_max_length == 20 and rr.max_length == 40 and g.source_max_length == 50
    assert load_biencoder(cfg.model_copy(update={"shared_encoder": True}), wp_dir).shared
    for loader in (load_biencoder, load_reranker, load_generator):
        with pytest.raises(ConfigError):
            loader(cfg)  # None needs a tokenizer directory
    be.save_pretrained(tmp_path / "be")
    rr.save_pretrained(tmp_path / "rr")
    g.save_pretrained(tmp_path / "gen")
    by_path = cfg.model_copy(update={"query_encoder": str(tmp_path / "be"), "reranker": str(tmp_path / "rr"),
                                     "generator": str(tmp_path / "gen")})
    be2, rr2, g2 = load_biencoder(by_path).eval(), load_reranker(by_path).eval(), load_generator(by_path).eval()
    with torch.inference_mode():
        _close(be2.encode_queries(QUERIES), be.encode_queries(QUERIES))
        _close(rr2.score(QUERIES[0], DOCS[0]), rr.score(QUERIES[0], DOCS[0]))
        _close(g2.forward_logprobs(QUERIES, DOCS, TARGETS), g.forward_logprobs(QUERIES, DOCS, TARGETS))
    with pytest.raises(ConfigError):
        load_biencoder(cfg.model_copy(update={"query_encoder": str(tmp_path / "be"), "ctx_encoder": "/elsewhere"}))
    with pytest.raises(ConfigError):
        load_biencoder(cfg.model_copy(update={"ctx_encoder": str(tmp_path / "be")}))
    with pytest.raises(ArtifactError):
        load_reranker(cfg.model_copy(update={"reranker": str(tmp_path / "missing" / "rr")}))
    with pytest.raises(ArtifactError):
        load_generator(cfg.model_copy(update={"generator": str(tmp_path / "rr")}))  # a reranker dir
