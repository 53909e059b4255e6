"""The decoder-only (causal LM) generator: re2g.models.causal.CausalGenerator on a tiny Llama built from
config over the project's byte-level BPE tokenizer (re2g.data.tokenizers.train_bpe).

Numbers are compared in float64 against hand loops that call the model on every prompt + target prefix
separately (no padding, no cache)."""

from __future__ import annotations

import math

import pytest
import torch

from re2g.config import ModelsConfig, TinyModelConfig
from re2g.errors import ArtifactError, ConfigError
from re2g.models.causal import DEFAULT_PROMPT_TEMPLATE, CausalGenerator, checkpoint_kind, load_any_generator
from re2g.models.factory import build_tiny_generator, load_generator
from re2g.models.generator import Generator
from re2g.models.marginalize import marginal_nll

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=400,
                       max_position_embeddings=256, generator_arch="llama")
SENTENCES = [f"the city of town{i} lies on the river{i % 7} and was founded in {1200 + 7 * i} by king{i % 5}"
             for i in range(40)] + ["Title: Passage: Question: Answer:", "who founded the city",
                                    "which river flows through the town", "when was it founded"]
QUERIES = ["who founded town3", "which river flows through town12"]
DOCS = [[("Town3", "the city of town3 lies on the river3 and was founded by king3"), ("", "a passage without a title")],
        [("Town12", "town12 was founded in 1284 by king2"), ("River5", "the river5 flows through town12")]]
TARGETS = ["king3", "the river5 through the town"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from re2g.data.tokenizers import train_bpe

    return train_bpe(SENTENCES, tmp_path_factory.mktemp("bpe"), vocab_size=400)


def _causal(bpe_dir, seed=0, **kw) -> CausalGenerator:
    torch.manual_seed(seed)
    g = build_tiny_generator(bpe_dir, TINY, **kw)
    with torch.no_grad():   # untrained weights are near-uniform: spread them so positions matter
        for p in g.model.parameters():
            p.mul_(3.0)
    return g.eval()


@pytest.fixture(scope="module")
def causal(bpe_dir):
    return _causal(bpe_dir).double()


def _hand_logprobs(g: CausalGenerator, queries, docs, targets) -> torch.Tensor:
    """log p(y_t | prompt_j, y_<t) by calling the model on each unpadded prompt + target prefix: (B, n_docs, T)."""
    rows = [g.target_ids(t) for t in targets]
    T = max(map(len, rows))
    out = torch.zeros(len(queries), len(docs[0]), T, dtype=torch.float64)
    with torch.no_grad():
        for b, q in enumerate(queries):
            for j, d in enumerate(docs[b]):
                prompt = g.prompt_ids(q, d)
                for t, y in enumerate(rows[b]):
                    ids = torch.tensor([prompt + rows[b][:t]])
                    logits = g.model(input_ids=ids).logits[0, -1].double()
                    out[b, j, t] = torch.log_softmax(logits, -1)[y]
    return out


def test_tiny_causal_lm_from_config(bpe_dir):
    g = _causal(bpe_dir)
    assert isinstance(g, CausalGenerator) and g.kind == "causal" and g.copy_kwargs(torch.zeros(1)) == {}
    assert type(g.model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in g.model.parameters())
    assert 10_000 < n < 1_000_000
    assert g.model.get_input_embeddings().weight.shape[0] == len(g.tokenizer)
    # the default config (64-d, 4000 tokens) is "a few hundred thousand parameters"
    from transformers import LlamaConfig, LlamaForCausalLM

    d = TinyModelConfig()
    big = LlamaForCausalLM(LlamaConfig(vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_hidden_layers=d.num_layers,
                                       num_attention_heads=d.num_heads, intermediate_size=d.intermediate_size,
                                       tie_word_embeddings=True))
    assert 200_000 < sum(p.numel() for p in big.parameters()) < 600_000
    assert TinyModelConfig().generator_arch == "bart" and ModelsConfig().generator_kind == "auto"


def test_prompt_and_target_format(bpe_dir):
    g = _causal(bpe_dir)
    assert g.prompt_template == DEFAULT_PROMPT_TEMPLATE
    assert g.build_source("who?", ("T", "text")) == "Title: T\nPassage: text\nQuestion: who?\nAnswer:"
    ids = g.prompt_ids("who?", ("T", "text"))
    assert ids[0] == g.tokenizer.bos_token_id and g.eos_id not in ids
    t = g.tokenize_targets(["king3", "the river5 flows"])
    assert t["input_ids"][0, int(t["attention_mask"][0].sum()) - 1] == g.eos_id       # EOS ends every target
    assert t["attention_mask"][0, -1] == 0 and t["attention_mask"][1].all()         # right padding
    assert g.tokenizer.decode(g.target_ids("king3")[:-1]) == " king3"              # the target prefix
    assert len(g.target_ids("the river5 " * 50, max_length=5)) == 5
    with pytest.raises(ConfigError, match="unknown field"):
        CausalGenerator(g.model, g.tokenizer, prompt_template="{passage} {query}")
    with pytest.raises(ConfigError, match="no {query}"):
        CausalGenerator(g.model, g.tokenizer, prompt_template="{title} {text}")
    with pytest.raises(ConfigError, match="chat template"):
        CausalGenerator(g.model, g.tokenizer, chat_template=True)


def test_long_prompts_lose_passage_text_only(bpe_dir):
    g = _causal(bpe_dir, source_max_length=40)
    text = " ".join(f"town{i} lies on the river{i % 7}" for i in range(30))
    ids = g.prompt_ids("who founded town3", ("Town3", text))
    assert len(ids) <= 40
    decoded = g.tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.startswith("Title: Town3\nPassage: town0 lies")
    assert decoded.endswith("\nQuestion: who founded town3\nAnswer:")
    assert len(decoded) < len(g.build_source("who founded town3", ("Town3", text)))
    short = g.prompt_ids("q", ("T", "short"))
    assert g.tokenizer.decode(short, skip_special_tokens=True) == g.build_source("q", ("T", "short"))


def test_chat_template_wraps_the_prompt(bpe_dir):
    g = _causal(bpe_dir)
    g.tokenizer.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}bot:"
    try:
        c = CausalGenerator(g.model, g.tokenizer, chat_template=True)
        assert c.build_source("q", ("T", "x")) == "<s>user: Title: T\nPassage: x\nQuestion: q\nAnswer:\nbot:"
        ids = c.prompt_ids("q", ("T", "x"))
        assert ids[0] == g.tokenizer.bos_token_id and ids.count(g.tokenizer.bos_token_id) == 1  # no second BOS
    finally:
        g.tokenizer.chat_template = None


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_forward_logprobs_equal_a_hand_loop_over_passages_and_positions(causal, padding_side):
    enc = causal.tokenize_targets(TARGETS)
    mask = enc["attention_mask"].bool()                                          # (B, T)
    assert not mask.all(), "targets of different lengths leave padding"
    with torch.no_grad():
        lp = causal.forward_logprobs(QUERIES, DOCS, enc, padding_side=padding_side)  # (B, n_docs, T)
    assert lp.dtype == torch.float64 and lp.shape == (2, 2, mask.shape[1])
    want = _hand_logprobs(causal, QUERIES, DOCS, TARGETS)
    assert torch.allclose(lp, want, atol=1e-10, rtol=0), (lp - want).abs().max()
    pad = ~mask[:, None, :].expand_as(lp)
    assert (lp[pad] == 0).all() and (lp[~pad] < 0).all()
    # passage j scores as if it were the only one
    with torch.no_grad():
        second = causal.forward_logprobs(QUERIES, [[d[1]] for d in DOCS], TARGETS, padding_side=padding_side)
    assert torch.allclose(second[:, 0], lp[:, 1], atol=1e-10, rtol=0)


def test_forward_logprobs_keep_the_graph(bpe_dir):
    g = _causal(bpe_dir).train()
    lp = g.forward_logprobs(QUERIES, DOCS, TARGETS)
    assert lp.requires_grad
    lp.sum().backward()
    assert g.model.get_input_embeddings().weight.grad is not None


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_rag_nll_through_the_causal_generator_is_the_marginalization_of_its_logprobs(causal, kind):
    """The training path (marginal_nll on forward_logprobs) equals the RAG formulas written out by hand
    over the hand loop's log-probs."""
    enc = causal.tokenize_targets(TARGETS)
    scores = torch.tensor([[1.5, -0.5], [0.2, 0.9]], dtype=torch.float64, requires_grad=True)
    lp = causal.forward_logprobs(QUERIES, DOCS, enc)                              # (B, n_docs, T)
    nll = marginal_nll(lp, enc["attention_mask"], scores, kind=kind)             # (B,)
    hand = _hand_logprobs(causal, QUERIES, DOCS, TARGETS)
    w = torch.softmax(scores.detach(), -1)
    for b in range(2):
        T = int(enc["attention_mask"][b].sum())
        if kind == "sequence":
            p = sum(w[b, j] * math.exp(float(hand[b, j, :T].sum())) for j in range(2))
            want = -math.log(p)
        else:
            want = -sum(math.log(sum(w[b, j] * math.exp(float(hand[b, j, t])) for j in range(2))) for t in range(T))
        assert float(nll[b].detach()) == pytest.approx(want, abs=1e-9)
    nll.sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_save_load_round_trip_and_dispatch(bpe_dir, tmp_path):
    g = _causal(bpe_dir, prompt_template="Q: {query}\nT: {title}\nP: {text}\nA:", target_max_length=12)
    with torch.no_grad():
        lp = g.forward_logprobs(QUERIES, DOCS, TARGETS)
    g.save_pretrained(tmp_path / "gen")
    for loaded in (CausalGenerator.from_pretrained(tmp_path / "gen"), Generator.from_pretrained(tmp_path / "gen"),
                   load_any_generator(tmp_path / "gen"), load_generator(ModelsConfig(generator=str(tmp_path / "gen"),
                                                                                     generator_target_max_length=12))):
        assert isinstance(loaded, CausalGenerator)
        assert loaded.prompt_template == g.prompt_template and loaded.target_max_length == 12
        with torch.no_grad():
            assert torch.equal(loaded.eval().forward_logprobs(QUERIES, DOCS, TARGETS), lp)
    assert checkpoint_kind(tmp_path / "gen") == "causal"
    # seq2seq-only overrides (as the training loaders pass them) are dropped for a causal LM
    assert isinstance(Generator.from_pretrained(tmp_path / "gen", title_sep=" / ", query_sep=None), CausalGenerator)
    with pytest.raises(ArtifactError, match="not a causal"):
        CausalGenerator.from_pretrained(_bart_dir(bpe_dir, tmp_path))
    with pytest.raises(ConfigError, match="generator_kind"):
        load_any_generator(tmp_path / "gen", kind="encoder")


def _bart_dir(bpe_dir, tmp_path):
    d = tmp_path / "bart"
    if not d.exists():
        torch.manual_seed(0)
        build_tiny_generator(bpe_dir, TINY.model_copy(update={"generator_arch": "bart"})).save_pretrained(d)
    return d


def test_plain_hf_directory_loads_with_defaults_and_seq2seq_still_loads_as_before(bpe_dir, tmp_path):
    g = _causal(bpe_dir)
    g.model.save_pretrained(tmp_path / "hf")
    g.tokenizer.save_pretrained(tmp_path / "hf")
    assert checkpoint_kind(tmp_path / "hf") == "causal"
    loaded = load_generator(ModelsConfig(generator=str(tmp_path / "hf"), generator_prompt_template="{text} {query} =",
                                         generator_target_max_length=9)).eval()
    assert isinstance(loaded, CausalGenerator) and loaded.prompt_template == "{text} {query} ="
    assert loaded.target_max_length == 9 and loaded.target_prefix == " "
    plain = CausalGenerator.from_pretrained(tmp_path / "hf").eval()
    assert plain.prompt_template == DEFAULT_PROMPT_TEMPLATE and not plain.chat_template
    with torch.no_grad():
        assert torch.equal(plain.forward_logprobs(QUERIES, DOCS, TARGETS), g.forward_logprobs(QUERIES, DOCS, TARGETS))
    bart = _bart_dir(bpe_dir, tmp_path)
    assert checkpoint_kind(bart) == "seq2seq"
    for s2s in (Generator.from_pretrained(bart), load_any_generator(bart, prompt_template="{text}{query}"),
                load_generator(ModelsConfig(generator=str(bart), generator_kind="seq2seq"))):
        assert type(s2s) is Generator and s2s.kind == "seq2seq"
    with pytest.raises(ArtifactError, match="not a causal"):
        load_generator(ModelsConfig(generator=str(bart), generator_kind="causal"))
    with pytest.raises(ConfigError, match="generator_arch"):
        load_generator(ModelsConfig(generator_kind="seq2seq", tiny=TINY), bpe_dir)


def test_generate_gives_texts_per_passage(causal):
    out = causal.generate(QUERIES, DOCS, num_beams=2, num_return_sequences=2, max_new_tokens=4)
    assert len(out) == 2 and all(len(per_q) == 2 and all(len(r) == 2 for r in per_q) for per_q in out)
    assert all(isinstance(t, str) for per_q in out for r in per_q for t in r)


# --------------------------------------------------------------------------- decoding (RAG-Sequence, RAG-Token)

PASSAGES = [[("Town3", "the city of town3 lies on the river3"), ("", "town3 was founded by king3"),
             ("King3", "king3 founded the city")],
            [("Town12", "town12 was founded in 1284 by king2"), ("River5", "the river5 flows through town12"),
             ("", "which river flows through the town")]]
SCORES = [[1.0, -0.5, 0.3], [0.0, 2.0, -1.0]]


@pytest.fixture(scope="module")
def readers(bpe_dir):
    """{"causal": the tiny Llama, "seq2seq": the tiny pointer BART}, float32, with seeded noise on the BART
    (and EOS made less likely, as tests/test_decoding.py does) so answers run several tokens."""
    causal = _causal(bpe_dir, seed=1)
    torch.manual_seed(2)
    s2s = build_tiny_generator(bpe_dir, TINY.model_copy(update={"generator_arch": "bart"})).eval()
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in s2s.model.parameters():
            p.add_(torch.randn(p.shape, generator=rng) * 0.3)
        s2s.model.final_logits_bias[0, s2s.model.config.eos_token_id] = -5.0
    return {"causal": causal, "seq2seq": s2s}


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_with_the_kv_cache_equals_rerunning_the_prefix(readers, kind, num_beams):
    from re2g.models.decoding import rag_token_generate

    g = readers[kind]
    kw = dict(num_beams=num_beams, max_new_tokens=6)
    cached = rag_token_generate(g, QUERIES, PASSAGES, SCORES, **kw)
    plain = rag_token_generate(g, QUERIES, PASSAGES, SCORES, use_cache=False, **kw)
    assert [[ids for ids, _ in q] for q in cached] == [[ids for ids, _ in q] for q in plain]
    for cq, pq in zip(cached, plain):
        assert [s for _, s in cq] == pytest.approx([s for _, s in pq], abs=1e-5)
    assert all(len(q) == num_beams for q in cached)
    assert max(len(ids) for q in cached for ids, _ in q) >= 3, "answers of several tokens"


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("fast", [False, True])
def test_rag_sequence_with_the_kv_cache_equals_without(readers, kind, fast):
    from re2g.models.decoding import rag_sequence_decode

    g = readers[kind]
    kw = dict(num_beams=2, max_new_tokens=5, fast=fast)
    cached = rag_sequence_decode(g, QUERIES, PASSAGES, SCORES, **kw)
    plain = rag_sequence_decode(g, QUERIES, PASSAGES, SCORES, use_cache=False, **kw)
    for a, b in zip(cached, plain):
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates] and a.answer == b.answer
        assert [c.logprob for c in a.candidates] == pytest.approx([c.logprob for c in b.candidates], abs=1e-5)
        assert len(a.candidates) >= 2 and all(math.isfinite(c.logprob) for c in a.candidates)


def test_causal_rag_token_with_one_passage_is_hf_greedy_decoding(readers):
    from re2g.models.decoding import rag_token_generate

    g = readers["causal"]
    docs = [[PASSAGES[0][0]], [PASSAGES[1][1]]]
    got = rag_token_generate(g, QUERIES, docs, None, num_beams=1, max_new_tokens=6)
    enc = g.tokenize_prompts(QUERIES, docs)                                # left-padded (B, S)
    with torch.no_grad():
        out = g.model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=6, pad_token_id=g.pad_id)
    for b in range(2):
        want = out[b, enc["input_ids"].shape[1]:].tolist()
        while want and want[-1] == g.pad_id:
            want.pop()
        (ids, score), = got[b]
        assert ids == want and score <= 0


def test_causal_rag_sequence_scores_are_the_marginalization_of_forward_logprobs(readers):
    from re2g.models.decoding import rag_sequence_decode
    from re2g.models.marginalize import rag_sequence_logprob

    g = readers["causal"]
    (ans,) = rag_sequence_decode(g, QUERIES[1:], PASSAGES[1:], SCORES[1:], num_beams=2, max_new_tokens=5)
    texts = [c.text for c in ans.candidates]
    enc = g.tokenize_targets(texts)
    with torch.no_grad():
        lp = g.forward_logprobs(QUERIES[1:] * len(texts), PASSAGES[1:] * len(texts), enc)
    want = rag_sequence_logprob(lp, enc["attention_mask"], torch.tensor(SCORES[1:] * len(texts)))
    assert [c.logprob for c in ans.candidates] == pytest.approx(want.tolist(), abs=1e-4)
    assert [p.weight for p in ans.provenance] == pytest.approx(torch.softmax(torch.tensor(SCORES[1]), -1).tolist())


def test_causal_beams_are_hf_beam_search_on_the_prompts(readers):
    from re2g.models.decoding import beam_search, encode_sources

    g = readers["causal"]
    src = encode_sources(g, QUERIES, PASSAGES)
    got = beam_search(g, src, num_beams=3, num_return_sequences=2, max_new_tokens=4)   # (B*n_docs, 2)
    assert got[:3] == g.generate(QUERIES[:1], PASSAGES[:1], num_beams=3, num_return_sequences=2, max_new_tokens=4)[0]
    assert len(got) == 6 and all(len(r) == 2 for r in got)
    # the prompts' cache handed to generate (run once, copied per beam) changes nothing: plain HF generate
    from re2g.models.generator import decode_texts

    with torch.no_grad():
        out = g.model.generate(input_ids=src.input_ids, attention_mask=src.attention_mask, num_beams=3,
                               num_return_sequences=2, max_new_tokens=4, do_sample=False, pad_token_id=g.pad_id)
    texts = decode_texts(g.tokenizer, out[:, src.input_ids.shape[1]:])
    assert got == [texts[i * 2:(i + 1) * 2] for i in range(6)]


# --------------------------------------------------------------------------- the stage object, the pipeline, `re2g answer`


@pytest.fixture(scope="module")
def causal_dir(tiny_sample, tmp_path_factory):
    """A tiny Llama reader of the ``tiny`` preset's sizes over the sample task's BPE tokenizer, written as
    ``re2g init-models`` writes models (``--set models.tiny.generator_arch=llama``)."""
    from re2g.config import load_config
    from re2g.models.init import init_models

    cfg = load_config(preset="tiny", overrides=["models.tiny.generator_arch=llama"])
    out = init_models(cfg.models, tmp_path_factory.mktemp("causal-reader"), tokenizers_dir=tiny_sample / "tokenizers",
                      which=("generator",))["generator"]
    assert checkpoint_kind(out) == "causal"
    return out


def test_stage_object_and_pipeline_answer_with_a_causal_reader(tiny_run_dir, causal_dir):
    from re2g import stages
    from re2g.config import GenerationConfig
    from re2g.models.decoding import Answer
    from re2g.pipeline import Re2GPipeline

    pipe = Re2GPipeline.from_run_dir(tiny_run_dir, generator=causal_dir)
    assert isinstance(pipe.generator, stages.Generator) and isinstance(pipe.generator.model, CausalGenerator)
    assert not pipe.generator.model.training
    q = "Where was Palgo Drainne born?"
    ans = pipe.answer(q)                                                    # RAG-Sequence (the run's config)
    assert isinstance(ans, Answer) and ans.candidates and ans.answer == ans.candidates[0].text
    assert len(ans.provenance) == 5 and sum(p.weight for p in ans.provenance) == pytest.approx(1.0, abs=1e-5)
    reranked = pipe.rerank([q], pipe.retrieve([q]))
    token = stages.Generator(pipe.generator.model, GenerationConfig(marginalization="token", token_num_beams=2,
                                                                    max_new_tokens=6))
    (t,) = token.generate([q], reranked)
    assert t.candidates and t.answer == t.candidates[0].text and all(c.logprob <= 0 for c in t.candidates)
    assert [p.pid for p in t.provenance] == [p.pid for p in ans.provenance]


def test_re2g_answer_with_a_causal_reader(tiny_run_dir, causal_dir, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from re2g.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("generator"))
    shutil.copytree(causal_dir, run / "models" / "generator")
    res = CliRunner().invoke(app, ["answer", "Who employed the banker?", "--run", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["query"] == "Who employed the banker?" and isinstance(out["answer"], str)
    assert out["candidates"] and len(out["provenance"]) == 5
    from re2g.pipeline import Re2GPipeline        # the answer is the causal reader's (the pipeline's, in process)

    want = Re2GPipeline.from_run_dir(tiny_run_dir, generator=causal_dir).answer("Who employed the banker?")
    assert [c["text"] for c in out["candidates"]] == [c.text for c in want.candidates]


def test_causal_scoring_over_the_prompts_cache_equals_one_pass_per_pair(causal):
    from re2g.models.decoding import encode_sources, score_targets

    src = encode_sources(causal, QUERIES, DOCS)                       # 4 prompts of different lengths
    rows = [0, 1, 2, 3, 3, 0, 2]                                      # rows repeat: the cache rows are copied
    targets = ["king3", "the river5", "town12 was founded", "king2", "", "king3 founded the city", "river"]
    cached = score_targets(causal, src, rows, targets, batch_size=3)
    plain = score_targets(causal, src, rows, targets, batch_size=3, use_cache=False)
    assert torch.allclose(cached, plain, atol=1e-10, rtol=0) and (cached < 0).all()
    hand = _hand_logprobs(causal, [QUERIES[r // 2] for r in rows], [[DOCS[r // 2][r % 2]] for r in rows], targets)
    assert torch.allclose(cached, hand.sum((1, 2)).float(), atol=1e-5)
