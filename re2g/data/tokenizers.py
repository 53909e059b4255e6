"""Tokenizers trained locally on the corpus text, saved so ``AutoTokenizer.from_pretrained(dir)`` loads them.

Two kinds, matching the two model families of Re2G:

* **WordPiece** (BERT-style, lowercased; ``[PAD] [UNK] [CLS] [SEP] [MASK]`` with ids 0-4) for the DPR
  encoders and the cross-encoder reranker. Pairs encode as ``[CLS] a [SEP] b [SEP]`` with
  ``token_type_ids`` 0 for ``a`` and 1 for ``b``. Loads as ``BertTokenizer`` (``BertTokenizerFast`` in
  transformers < 5).
* **Byte-level BPE** (BART-style; ``<s> <pad> </s> <unk> <mask>`` with ids 0-4) for the generator.
  Pairs encode as ``<s> a </s></s> b </s>``; ``decode(encode(x), skip_special_tokens=True) == x`` for any
  text. Loads as ``BartTokenizerFast`` (an alias of ``RobertaTokenizer`` in transformers 5).

Training uses the ``tokenizers`` library, then the vocabulary (and merges) are handed to the
transformers class, which builds the same pipeline and writes ``tokenizer.json`` and
``tokenizer_config.json`` with ``save_pretrained``. Nothing is downloaded. The vocabulary can come out
smaller than ``vocab_size`` on a small corpus (the trainers stop when nothing is left to merge); read
``len(tokenizer)`` for the embedding size.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BERT_MAX_LENGTH = 512
BART_MAX_LENGTH = 1024

# Characters that always get a WordPiece entry, so punctuation and digits that happen to be missing
# from a small training corpus (a "?" in a user's question) still do not map to [UNK].
_WORDPIECE_ALPHABET = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
_WORD_START = "\u2581"   # marks a word's first piece while the WordPiece vocabulary is learned


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4000) -> Path:
    """Train a lowercased BERT WordPiece tokenizer on ``texts`` and ``save_pretrained`` it into
    ``out_dir`` (created). Returns ``out_dir``; load with ``AutoTokenizer.from_pretrained``.

    ``tokenizers``' own ``WordPieceTrainer`` is not deterministic (the ids of its ``##`` alphabet
    follow a hash map's order, and merge ties then break differently from run to run), so the
    vocabulary is learned as a character-level BPE over BERT-normalized, BERT-pre-tokenized words
    that carry a word-start marker (deterministic), then turned into WordPiece entries: a learned
    piece with the marker is a word-initial piece ``abc``, one without is a continuation ``##abc``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    if vocab_size <= len(WORDPIECE_SPECIALS) + 2 * len(_WORDPIECE_ALPHABET):
        raise ValueError(f"vocab_size {vocab_size} is too small for a WordPiece vocabulary "
                         f"(needs more than {len(WORDPIECE_SPECIALS) + 2 * len(_WORDPIECE_ALPHABET)})")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.BertPreTokenizer(),
        pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="always", split=True)])
    # the conversion adds a "##" twin of every character: learn that many merges more, then truncate
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256,
                                  initial_alphabet=[_WORD_START, *_WORDPIECE_ALPHABET], show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    learned = json.loads(bpe.to_str())["model"]

    vocab: dict[str, int] = {t: i for i, t in enumerate(WORDPIECE_SPECIALS)}

    def add(token: str) -> None:
        if token and token not in vocab and len(vocab) < vocab_size:
            vocab[token] = len(vocab)

    chars = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])
             if len(t) == 1 and t != _WORD_START]
    for c in chars:
        add(c)
    for c in chars:
        add("##" + c)
    for merge in learned["merges"]:
        piece = "".join(merge) if isinstance(merge, list) else merge.replace(" ", "", 1)
        add(piece[1:] if piece.startswith(_WORD_START) else "##" + piece)

    hf = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=BERT_MAX_LENGTH)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def train_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4000) -> Path:
    """Train a BART-style byte-level BPE tokenizer on ``texts`` and ``save_pretrained`` it into
    ``out_dir`` (created). Returns ``out_dir``; load with ``AutoTokenizer.from_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BartTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(BPE_SPECIALS) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE "
                         f"(needs more than {len(BPE_SPECIALS) + len(alphabet)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS),
        initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)

    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    hf = BartTokenizerFast(vocab=tok.get_vocab(), merges=merges, add_prefix_space=False,
                           model_max_length=BART_MAX_LENGTH, clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def train_tokenizers(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4000) -> dict[str, Path]:
    """Train both tokenizers on the same texts: ``out_dir/wordpiece`` and ``out_dir/bpe``.

    ``texts`` is read once into memory (pass a sample of a large corpus)."""
    texts = list(texts)
    out = Path(out_dir)
    return {
        "wordpiece": train_wordpiece(texts, out / "wordpiece", vocab_size),
        "bpe": train_bpe(texts, out / "bpe", vocab_size),
    }
