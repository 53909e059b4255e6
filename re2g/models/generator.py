"""The generator: BART over one input per (query, passage), as in RAG and Re2G.

For query x and passage z_j = (title, text) the source is

    s_j = title + title_sep + text + query_sep + x        (defaults " / " and " // ", as HF RAG)

(without ``title + title_sep`` when the title is empty). :meth:`Generator.forward_logprobs` gives
the per-token log p(y_t | s_j, y_<t) of a target y for every passage, shape (B, n_docs, T), 0 at
padding; the marginalization over passages (RAG-Sequence / RAG-Token, weighted by DPR or reranker
scores) is built on it elsewhere. Targets are tokenized as BART labels (``<s> … </s>``) and the
decoder is fed them shifted right, exactly as ``BartForConditionalGeneration(labels=...)`` does.

``target_prefix`` is put before every target when it is tokenized (the tiny generator's: a space).
A byte-level BPE tokenizes a word inside a passage with its leading space (``Ġ1867``) and the same
word at the start of a target without (``1867``): two different tokens, so a reader could not copy an
answer token from the passage. Decoded answers are stripped, so the prefix never shows.

The model may be a :class:`~re2g.models.pointer.PointerBartForConditionalGeneration` (the tiny
generator's default: a BART that can copy from its source); :meth:`Generator.copy_kwargs` gives what
a hand-written decoding loop must pass it besides ``encoder_outputs``.

Decoding (:mod:`re2g.models.decoding`) calls :meth:`Generator.prepare_sources` (the encoder once per
source), :meth:`~Generator.beam_search`, :meth:`~Generator.score_targets` and :meth:`~Generator.token_steps`
(:class:`Seq2SeqSteps`: the decoder one token per step over a KV cache); the decoder-only
:class:`re2g.models.causal.CausalGenerator` has the same methods.

Saved layout: the Hugging Face model and tokenizer files in the directory itself + ``re2g_model.json``
(``generator_kind: seq2seq``, separators, lengths, target prefix). :meth:`Generator.from_pretrained` hands a
causal-LM checkpoint to :func:`re2g.models.causal.load_any_generator`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from re2g.errors import ArtifactError
from re2g.models.encoders import (check_source, eval_mode, load_tokenizer, module_device, quiet_transformers,
                                  title_text)
from re2g.models.fingerprint import read_model_meta, write_model_meta

DEFAULT_TITLE_SEP = " / "
DEFAULT_QUERY_SEP = " // "
DEFAULT_SOURCE_MAX_LENGTH = 256
DEFAULT_TARGET_MAX_LENGTH = 32
SEQ2SEQ_SETTINGS = ("title_sep", "query_sep", "source_max_length", "target_max_length", "target_prefix")
REPLACEMENT_CHAR = "\ufffd"     # what a tokenizer's decoder puts where bytes are not whole UTF-8 characters
_SPACES = re.compile(r"[ \t]{2,}")


def whole_chars(text: str) -> str:
    """``text`` without U+FFFD, stripped.

    A byte-level BPE (BART's) can generate a token sequence that starts or ends inside a multi-byte
    UTF-8 character (or holds stray bytes); its decoder turns each such piece into U+FFFD. Those
    pieces are dropped here (as ``bytes.decode(errors="ignore")`` would), and the spaces a dropped
    piece leaves doubled are merged."""
    if REPLACEMENT_CHAR in text:
        text = _SPACES.sub(" ", text.replace(REPLACEMENT_CHAR, ""))
    return text.strip()


def decode_text(tokenizer, ids: Sequence[int] | torch.Tensor) -> str:
    """Generated token ids as text: special tokens skipped, whole characters only (:func:`whole_chars`)."""
    return whole_chars(tokenizer.decode(ids, skip_special_tokens=True))


def decode_texts(tokenizer, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
    """:func:`decode_text` for every row of ``batch`` (N, L)."""
    return [whole_chars(t) for t in tokenizer.batch_decode(batch, skip_special_tokens=True)]


@dataclass(frozen=True)
class EncodedSources:
    """Every source s_j of a group of queries through the encoder, once (query-major: row b * n_docs + j
    is s_j of query b). Beam search and rescoring both read these states instead of encoding again."""

    input_ids: torch.Tensor        # (N, S)  N = B * n_docs
    attention_mask: torch.Tensor   # (N, S)
    memory: torch.Tensor           # (N, S, d) the encoder's last hidden state
    n_docs: int


@functools.cache
def _beam_cache_class():
    """An ``EncoderDecoderCache`` whose cross-attention part beam search does not reorder.

    At every step the model's beam search reorders the cache by the chosen beams; every beam of one
    source holds the same cross-attention keys and values (the source's encoder states, copied
    ``num_beams`` times), so reordering that part copies it onto itself: (N * beams, heads, S, d_head)
    per layer and step, about a third of a batched search's CPU with the tiny model. The
    self-attention part is reordered as before, so the search is the same."""
    from transformers.cache_utils import EncoderDecoderCache

    class SharedCrossAttentionCache(EncoderDecoderCache):
        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    return SharedCrossAttentionCache


def decoder_start_id(model) -> int:
    """The decoder's first input token (config, else generation config)."""
    start = model.config.decoder_start_token_id
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    return start


class Generator(torch.nn.Module):
    """``BartForConditionalGeneration`` (or any HF seq2seq LM) + tokenizer + the source format."""

    kind = "seq2seq"

    def __init__(self, model: torch.nn.Module, tokenizer, *, title_sep: str = DEFAULT_TITLE_SEP,
                 query_sep: str = DEFAULT_QUERY_SEP, source_max_length: int = DEFAULT_SOURCE_MAX_LENGTH,
                 target_max_length: int = DEFAULT_TARGET_MAX_LENGTH, target_prefix: str = ""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.title_sep = title_sep
        self.query_sep = query_sep
        self.source_max_length = int(source_max_length)
        self.target_max_length = int(target_max_length)
        self.target_prefix = target_prefix

    @property
    def device(self) -> torch.device:
        return module_device(self)

    # ---- inputs

    def build_source(self, query: str, passage: Any) -> str:
        """s_j for one query and one passage (``Passage``/``Hit``, dict, or (title, text))."""
        title, text = title_text(passage)
        body = f"{title}{self.title_sep}{text}" if title else text
        return f"{body}{self.query_sep}{query}"

    def build_sources(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]]) -> list[str]:
        """Sources for every (query, passage), query-major: B * n_docs strings, entry b * n_docs + j is s_j
        of query b. Every query needs the same number of passages (n_docs >= 1)."""
        n_docs = _n_docs(queries, passages_per_query)
        return [self.build_source(q, p) for q, ps in zip(queries, passages_per_query) for p in ps[:n_docs]]

    def tokenize_sources(self, sources: Sequence[str], max_length: int | None = None):
        """``BatchEncoding`` input_ids/attention_mask (N, S), truncated to ``source_max_length``."""
        return self.tokenizer(list(sources), max_length=max_length or self.source_max_length, truncation=True,
                              padding=True, return_tensors="pt")

    def tokenize_targets(self, targets: Sequence[str], max_length: int | None = None):
        """``BatchEncoding`` input_ids/attention_mask (B, T): the labels and the target mask."""
        return self.tokenizer(text_target=[self.target_prefix + t for t in targets], max_length=max_length or self.target_max_length,
                              truncation=True, padding=True, return_tensors="pt")

    def copy_kwargs(self, source_ids: torch.Tensor) -> dict:
        """What a call of the model with ``encoder_outputs`` (no ``input_ids``) needs besides: the source
        ids (N, S) for a pointer-generator, nothing for any other model."""
        from re2g.models.pointer import is_pointer

        return {"source_ids": source_ids} if is_pointer(self.model) else {}

    # ---- scoring

    def forward_logprobs(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]],
                         targets: Sequence[str] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log p(y_t | s_j, y_<t), shape (B, n_docs, T), exactly 0 where the target is padding.

        ``targets`` are strings, or the output of :meth:`tokenize_targets` (its ``attention_mask`` (B, T)
        is the target mask the marginalization needs: tokenize once, pass it here, keep the mask).
        Keeps the autograd graph; dropout follows the model's train/eval mode.
        """
        enc_t = self.tokenize_targets(targets) if not isinstance(targets, Mapping) else targets
        labels = enc_t["input_ids"].to(self.device)                      # (B, T)
        mask = enc_t["attention_mask"].to(self.device).bool()            # (B, T)
        n_docs = _n_docs(queries, passages_per_query)
        if labels.shape[0] != len(queries):
            raise ValueError(f"{labels.shape[0]} targets for {len(queries)} queries")
        enc_s = self.tokenize_sources(self.build_sources(queries, passages_per_query))
        labels_rep = labels.repeat_interleave(n_docs, dim=0)              # (B*n_docs, T)
        from transformers.models.bart.modeling_bart import shift_tokens_right

        cfg = self.model.config
        start = cfg.decoder_start_token_id
        if start is None:
            start = getattr(getattr(self.model, "generation_config", None), "decoder_start_token_id", None)
        decoder_input_ids = shift_tokens_right(labels_rep, cfg.pad_token_id, start)  # (B*n_docs, T)
        logits = self.model(input_ids=enc_s["input_ids"].to(self.device),
                            attention_mask=enc_s["attention_mask"].to(self.device),
                            decoder_input_ids=decoder_input_ids, use_cache=False).logits  # (B*n_docs, T, V)
        logits = logits.float()
        token_lp = logits.gather(-1, labels_rep.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (B*n_docs, T)
        token_lp = token_lp.view(len(queries), n_docs, -1)                # (B, n_docs, T)
        return torch.where(mask[:, None, :], token_lp, torch.zeros_like(token_lp))

    # ---- generation

    def generate(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]], *,
                 num_beams: int = 4, num_return_sequences: int = 1, max_new_tokens: int | None = None,
                 **generate_kwargs) -> list[list[list[str]]]:
        """Beam search on every s_j: texts shaped (B, n_docs, num_return_sequences), best beam first.
        Extra keyword arguments go to ``model.generate``."""
        n_docs = _n_docs(queries, passages_per_query)
        enc = self.tokenize_sources(self.build_sources(queries, passages_per_query))
        with torch.no_grad():
            out = self.model.generate(input_ids=enc["input_ids"].to(self.device),
                                      attention_mask=enc["attention_mask"].to(self.device),
                                      num_beams=max(num_beams, num_return_sequences),
                                      num_return_sequences=num_return_sequences,
                                      max_new_tokens=max_new_tokens or self.target_max_length,
                                      **generate_kwargs)  # (B*n_docs*r, L)
        texts = decode_texts(self.tokenizer, out)          # whole characters only
        r = num_return_sequences
        return [[texts[(b * n_docs + j) * r:(b * n_docs + j + 1) * r] for j in range(n_docs)]
                for b in range(len(queries))]

    # ---- what re2g.models.decoding calls (the CausalGenerator has the same methods)

    def prepare_sources(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]]) -> EncodedSources:
        """Tokenize every s_j (padded to the group's longest) and run the encoder on them once, no
        gradient. Every query needs the same passage count."""
        n_docs = len(passages_per_query[0]) if passages_per_query else 0
        enc = self.tokenize_sources(self.build_sources(queries, passages_per_query))
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        with eval_mode(self), torch.inference_mode():
            memory = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return EncodedSources(ids, mask, memory, n_docs)

    def beam_search(self, src: EncodedSources, *, num_beams: int, num_return_sequences: int = 1,
                    max_new_tokens: int | None = None, use_cache: bool = True) -> list[list[str]]:
        """Beam search on every source over its encoder states (the model's own ``generate``, which does
        not encode again when handed them): texts (N, num_return_sequences), best beam first.
        ``use_cache=False``: the decoder reruns the whole prefix each step (the reference)."""
        from transformers.cache_utils import DynamicCache
        from transformers.modeling_outputs import BaseModelOutput

        r = int(num_return_sequences)
        cache = dict(past_key_values=_beam_cache_class()(DynamicCache(), DynamicCache())) if use_cache else \
            dict(use_cache=False)
        with eval_mode(self), torch.inference_mode():
            out = self.model.generate(
                input_ids=src.input_ids, attention_mask=src.attention_mask,
                encoder_outputs=BaseModelOutput(last_hidden_state=src.memory),  # a fresh one: generate expands it in place
                num_beams=max(int(num_beams), r), num_return_sequences=r,
                max_new_tokens=max_new_tokens or self.target_max_length,
                **cache, **self.copy_kwargs(src.input_ids))   # (N * r, L)
        texts = decode_texts(self.tokenizer, out)          # whole characters only
        return [texts[i * r:(i + 1) * r] for i in range(src.input_ids.shape[0])]

    def score_targets(self, src: EncodedSources, rows: Sequence[int], targets: Sequence[str], *,
                      batch_size: int = 128, use_cache: bool = True) -> torch.Tensor:
        """log p(targets[p] | s_{rows[p]}) for every pair p, (P,): teacher-forced, the decoder alone over
        the encoder states ``src`` (the same numbers as :meth:`forward_logprobs` summed over the target).
        ``batch_size`` pairs per decoder pass, each pass cut to its longest source and target. (The
        cross-attention keys/values are projected per pair: projecting them once per source and gathering
        them per pair measured slower with the tiny model, the copies costing what it saved.) ``use_cache``
        is the causal generator's switch: teacher forcing over encoder states has no cache to use."""
        from transformers.models.bart.modeling_bart import shift_tokens_right

        model = self.model
        cfg = model.config
        start = decoder_start_id(model)
        P = len(targets)
        out = torch.empty(P)
        if P == 0:
            return out
        unique = {t: i for i, t in enumerate(dict.fromkeys(targets))}          # each text tokenized once
        enc_t = self.tokenize_targets(list(unique))
        which = torch.tensor([unique[t] for t in targets], dtype=torch.long)
        labels_all = enc_t["input_ids"][which].to(self.device)                  # (P, T)
        tmask_all = enc_t["attention_mask"][which].to(self.device).bool()       # (P, T)
        rows_all = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        with eval_mode(self), torch.inference_mode():
            for s in range(0, P, max(1, int(batch_size))):
                idx = rows_all[s:s + batch_size]
                tmask = tmask_all[s:s + batch_size]
                T = int(tmask.any(0).nonzero().max()) + 1                          # targets padded on the right
                labels, tmask = labels_all[s:s + batch_size, :T], tmask[:, :T]
                smask, sids = src.attention_mask[idx], src.input_ids[idx]          # (p, S)
                keep = smask.any(0)                                                # columns some source uses
                memory = src.memory[idx]
                if not bool(keep.all()):
                    memory, smask, sids = memory[:, keep], smask[:, keep], sids[:, keep]
                dec = shift_tokens_right(labels, cfg.pad_token_id, start)           # (p, T)
                logits = model(encoder_outputs=(memory,), attention_mask=smask, decoder_input_ids=dec,
                               use_cache=False, **self.copy_kwargs(sids)).logits.float()  # (p, T, V)
                token_lp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (p, T)
                out[s:s + len(idx)] = torch.where(tmask, token_lp, torch.zeros_like(token_lp)).sum(-1).cpu()
        return out

    def token_steps(self, src: EncodedSources, *, use_cache: bool = True) -> Seq2SeqSteps:
        """A next-token stepper over the encoded sources (RAG-Token decoding), see :class:`Seq2SeqSteps`."""
        return Seq2SeqSteps(self, src, use_cache=use_cache)

    @property
    def eos_ids(self) -> set[int]:
        """The ids that end a hypothesis (the generation config's EOS, else the model config's)."""
        gen = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = gen if gen is not None else self.model.config.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}

    # ---- save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """Model + tokenizer files in ``directory``, then ``re2g_model.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        write_model_meta(d, {"kind": "generator", "generator_kind": "seq2seq", "title_sep": self.title_sep, "query_sep": self.query_sep,
                             "source_max_length": self.source_max_length,
                             "target_max_length": self.target_max_length, "target_prefix": self.target_prefix})
        return d

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, tokenizer: Any = None, _dispatch: bool = True,
                        **overrides):
        """Load from a hub name (``facebook/bart-large``) or a local directory; ``overrides``
        (title_sep, query_sep, source_max_length, target_max_length, target_prefix) win over the saved
        values (a directory saved before ``target_prefix`` existed: no prefix).

        A causal-LM checkpoint (a saved ``generator_kind: causal``, or a config that is not
        encoder-decoder) is handed to :func:`re2g.models.causal.load_any_generator`, which returns a
        :class:`~re2g.models.causal.CausalGenerator` (the seq2seq-only overrides are dropped): every
        loader of a generator directory reads either kind."""
        from transformers import AutoModelForSeq2SeqLM

        import re2g.models.pointer  # noqa: F401  (registers the pointer-generator BART with the Auto classes)

        src = check_source(name_or_path, "generator")
        meta = read_model_meta(src) if Path(src).is_dir() else None
        if meta is not None and meta.get("kind") != "generator":
            raise ArtifactError(f"{src}: a saved {meta.get('kind')!r}, not a generator")
        if _dispatch and cls is Generator:
            from re2g.models.causal import checkpoint_kind, load_any_generator

            if checkpoint_kind(src) == "causal":
                return load_any_generator(src, kind="causal", tokenizer=tokenizer, **overrides)
        try:
            with quiet_transformers():  # no "Loading weights" bar per load
                model = AutoModelForSeq2SeqLM.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{src}: cannot load the generator: {e}") from None
        tok = load_tokenizer(tokenizer if tokenizer is not None else src, "generator tokenizer")
        kwargs = {k: meta[k] for k in SEQ2SEQ_SETTINGS if meta and k in meta}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model, tok, **kwargs)


class Seq2SeqSteps:
    """Next-token log-probabilities for a growing set of (hypothesis, source) rows, the decoder over the
    encoded sources with one self-attention KV cache (and the cross-attention keys/values projected once).

    :meth:`first` feeds the decoder start token to every source row, (N, V); :meth:`advance`
    ``(parent, tokens)`` makes row i of the next step the continuation of row ``parent[i]`` of the previous
    one by ``tokens[i]`` (rows may repeat or be dropped; the cache is reordered with them), (R, V).
    ``use_cache=False`` reruns every row's whole prefix instead (the reference for tests)."""

    def __init__(self, generator: Generator, src: EncodedSources, *, use_cache: bool = True):
        self.g = generator
        self.src = src
        self.use_cache = use_cache
        dev = src.input_ids.device
        self.rows = torch.arange(src.input_ids.shape[0], device=dev)           # (R,) source row of each row
        self.dec = torch.full((len(self.rows), 1), decoder_start_id(generator.model), dtype=torch.long, device=dev)
        self.cache = None

    def _run(self, dec_in: torch.Tensor) -> torch.Tensor:
        src, r = self.src, self.rows
        out = self.g.model(encoder_outputs=(src.memory[r],), attention_mask=src.attention_mask[r],
                           decoder_input_ids=dec_in, past_key_values=self.cache, use_cache=self.use_cache,
                           **self.g.copy_kwargs(src.input_ids[r]))
        if self.use_cache:
            self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), -1)                 # (R, V)

    def first(self) -> torch.Tensor:
        """log p(first token | s_j) for every source row, (N, V)."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if self.use_cache else None
        return self._run(self.dec)

    def advance(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Rows ``parent`` (R,) of the previous step extended by ``tokens`` (R,): log p(next | row), (R, V)."""
        dev = self.rows.device
        parent, tokens = parent.to(dev), tokens.to(dev)
        self.rows = self.rows[parent]
        self.dec = torch.cat([self.dec[parent], tokens[:, None]], 1)
        if not self.use_cache:
            return self._run(self.dec)
        self.cache.reorder_cache(parent)
        return self._run(tokens[:, None])


def _n_docs(queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]]) -> int:
    if len(queries) != len(passages_per_query):
        raise ValueError(f"{len(queries)} queries but {len(passages_per_query)} passage lists")
    counts = {len(ps) for ps in passages_per_query}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every query needs the same number (>= 1) of passages, got {sorted(counts)}")
    return counts.pop()
