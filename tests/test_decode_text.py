"""Generated ids become text of whole characters only: a byte-level BPE sequence that starts or ends
inside a multi-byte UTF-8 character never shows as U+FFFD in a candidate or an answer."""

from __future__ import annotations

import pytest
import torch

from re2g.models.generator import REPLACEMENT_CHAR, Generator, decode_text, decode_texts, whole_chars

WORD = "日本"            # two 3-byte characters: byte-level BPE pieces that split them


@pytest.fixture(scope="module")
def bpe(tiny_sample):
    """The sample task's byte-level BPE (trained on English text: CJK characters are single bytes)."""
    from re2g.models.encoders import load_tokenizer

    return load_tokenizer(str(tiny_sample / "tokenizers" / "bpe"), "bpe")


@pytest.fixture(scope="module")
def split_ids(bpe):
    """Ids of " Roustad 日本": the last character is 3 byte tokens; the word starts with a whole one."""
    ids = bpe(" Roustad " + WORD, add_special_tokens=False)["input_ids"]
    tail = bpe(WORD, add_special_tokens=False)["input_ids"]
    assert len(tail) >= 4 and bpe.decode(tail) == WORD          # byte pieces, whole when complete
    assert REPLACEMENT_CHAR in bpe.decode(ids[:-1])             # the raw decoder shows U+FFFD
    return ids


def test_whole_chars_drops_replacement_chars():
    assert whole_chars(" a\ufffd\ufffd ") == "a"
    assert whole_chars("\ufffd\ufffd\ufffd") == ""
    assert whole_chars("Ro \ufffd stad") == "Ro stad"
    assert whole_chars("  plain  text ") == "plain  text"      # text without U+FFFD keeps its spaces


def test_decode_drops_incomplete_leading_and_trailing_characters(bpe, split_ids):
    ids = split_ids
    assert decode_text(bpe, ids) == "Roustad " + WORD
    assert decode_text(bpe, ids[:-1]) == "Roustad 日"          # the last character cut after 2 of 3 bytes
    assert decode_text(bpe, ids[:-2]) == "Roustad 日"
    n_word = len(bpe(WORD, add_special_tokens=False)["input_ids"])
    tail = ids[-n_word:]
    assert decode_text(bpe, tail[1:]) == "本"                  # starts inside the first character
    assert decode_text(bpe, tail[1:-1]) == ""                  # nothing whole left
    # special tokens are skipped as before; rows of a batch likewise
    eos, pad = bpe.eos_token_id, bpe.pad_token_id
    rows = [[bpe.bos_token_id, *ids[:-1], eos], [bpe.bos_token_id, *tail[1:-1], eos, pad]]
    width = max(map(len, rows))
    batch = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    assert decode_texts(bpe, batch) == ["Roustad 日", ""]


def test_generator_candidates_have_whole_characters(tiny_models, split_ids, monkeypatch):
    """Generator.generate (RAG-Sequence's beams) and RAG-Token's hypotheses, with the model's output
    replaced by ids that split a character: no U+FFFD in a candidate or the answer."""
    import re2g.models.decoding as decoding

    g = Generator.from_pretrained(tiny_models["generator"]).eval()
    tok = g.tokenizer
    start = g.model.config.decoder_start_token_id
    bad = [start, tok.bos_token_id, *split_ids[:-1], tok.eos_token_id]

    def fake_generate(input_ids, num_return_sequences=1, **_):
        return torch.tensor([bad] * (input_ids.shape[0] * num_return_sequences))

    monkeypatch.setattr(g.model, "generate", fake_generate)
    beams = g.generate(["q"], [[("t", "a passage")]], num_beams=2, num_return_sequences=2)
    assert beams == [[["Roustad 日", "Roustad 日"]]]

    answers = decoding.rag_sequence_decode(g, ["q"], [[("t", "a passage"), ("u", "another")]], num_beams=2)
    texts = [c.text for a in answers for c in a.candidates] + [a.answer for a in answers]
    assert texts and not any(REPLACEMENT_CHAR in t for t in texts)

    def fake_token_generate(generator, queries, passages_per_query, scores, **_):
        return [[(bad[1:], -1.0), ([tok.bos_token_id, *split_ids[-2:], tok.eos_token_id], -2.0)] for _ in queries]

    monkeypatch.setattr(decoding, "rag_token_generate", fake_token_generate)
    answers = decoding.rag_token_decode(g, ["q"], [[("t", "a passage")]])
    assert answers[0].answer == "Roustad 日"
    assert not any(REPLACEMENT_CHAR in c.text for c in answers[0].candidates)
