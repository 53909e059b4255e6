"""Locally trained tokenizers: they load through AutoTokenizer, round-trip text, encode pairs right."""

from __future__ import annotations

import pytest

from re2g.data.tokenizers import BPE_SPECIALS, WORDPIECE_SPECIALS, train_bpe, train_tokenizers, train_wordpiece

TEXTS = [
    "Ana Kelvo was born in Tarsiven in 1923.",
    "She hails from Mirelo, and works as an architect for the Velmora Institute.",
    "Where was Ana Kelvo born?",
    "Kelvo [SEP] place of birth",
    "Desstor Mamfa is a citizen of Drethnaia; her alma mater is Nosroum Polytechnic.",
    "SUPPORTS",
    "REFUTES",
] * 20


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    return train_tokenizers(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=600)


def test_layout(tok_dirs):
    assert set(tok_dirs) == {"wordpiece", "bpe"}
    for d in tok_dirs.values():
        assert (d / "tokenizer.json").is_file()
        assert (d / "tokenizer_config.json").is_file()


def test_wordpiece_loads_and_lowercases(tok_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dirs["wordpiece"]))
    assert type(tok).__name__ in ("BertTokenizer", "BertTokenizerFast")
    assert [tok.convert_tokens_to_ids(t) for t in WORDPIECE_SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == WORDPIECE_SPECIALS
    text = "Ana Kelvo was born in Tarsiven in 1923."
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    # characters never seen in training still get their own token (the alphabet is seeded)
    assert tok.unk_token_id not in tok("who? 42% (x)")["input_ids"]
    assert tok.model_max_length == 512


def test_wordpiece_pair_layout(tok_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dirs["wordpiece"]))
    enc = tok("where was ana born", "ana was born in tarsiven")
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    a = tok.tokenize("where was ana born")
    b = tok.tokenize("ana was born in tarsiven")
    assert toks == ["[CLS]", *a, "[SEP]", *b, "[SEP]"]
    assert enc["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_bpe_loads_and_round_trips(tok_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dirs["bpe"]))
    assert type(tok).__name__ in ("BartTokenizer", "BartTokenizerFast", "RobertaTokenizer", "RobertaTokenizerFast")
    assert [tok.convert_tokens_to_ids(t) for t in BPE_SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.bos_token, tok.pad_token, tok.eos_token, tok.unk_token, tok.mask_token) == BPE_SPECIALS
    for text in ["Ana Kelvo was born in Tarsiven in 1923.",
                 "Kelvo  ,double  spaces , odd punctuation ?!\nand a newline",
                 "Über café naïve — 東京 🙂"]:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_bpe_pair_layout(tok_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dirs["bpe"]))
    a, b = "Ana was born in Tarsiven", "Where was Ana born?"
    toks = tok.convert_ids_to_tokens(tok(a, b)["input_ids"])
    assert toks == ["<s>", *tok.tokenize(a), "</s>", "</s>", *tok.tokenize(b), "</s>"]
    assert tok.convert_ids_to_tokens(tok(a)["input_ids"]) == ["<s>", *tok.tokenize(a), "</s>"]


def test_deterministic(tmp_path):
    a = train_wordpiece(TEXTS, tmp_path / "a", 600)
    b = train_wordpiece(TEXTS, tmp_path / "b", 600)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    a = train_bpe(TEXTS, tmp_path / "c", 600)
    b = train_bpe(TEXTS, tmp_path / "d", 600)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_vocab_size_bounds(tmp_path):
    with pytest.raises(ValueError):
        train_bpe(TEXTS, tmp_path / "bpe", vocab_size=100)
    with pytest.raises(ValueError):
        train_wordpiece(TEXTS, tmp_path / "wp", vocab_size=50)
    big = train_wordpiece(TEXTS * 3, tmp_path / "wp2", vocab_size=300)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(big))) <= 300
