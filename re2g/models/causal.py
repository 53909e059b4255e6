"""A decoder-only (causal LM) generator behind the same interface as the seq2seq :class:`Generator`.

For query x and passage z_j = (title, text) the source is a *prompt* rendered from a template over
``{title}``, ``{text}`` and ``{query}`` (:data:`DEFAULT_PROMPT_TEMPLATE`), optionally wrapped as the
user turn of the tokenizer's chat template; the target y is scored as its continuation:

    ids_j = [bos] + tok(prompt_j) + tok(target_prefix + y) + [eos]
    log p(y_t | s_j, y_<t) = log_softmax(LM(ids_j)[|prompt_j| + t - 1])[y_t]

so the prompt tokens are never scored (masked out of the loss) and EOS is the last target token, as
in the seq2seq path. Prompts longer than ``source_max_length`` tokens lose the end of the PASSAGE
text, never the title, question or answer cue; targets are capped at ``target_max_length`` tokens
(EOS included). Batches are left-padded (generation needs it; :meth:`forward_logprobs` also takes
right padding), with position ids counted from each row's first real token, so a row's numbers do
not depend on its padding.

Public API (:class:`CausalGenerator`, the same as :class:`re2g.models.generator.Generator` where the
names match):

* ``CausalGenerator(model, tokenizer, *, prompt_template=None, chat_template=False,
  source_max_length=256, target_max_length=32, target_prefix=" ")``; attributes ``model``,
  ``tokenizer``, ``device``, ``kind == "causal"``, the settings above;
* ``build_source(query, passage)`` / ``build_sources(queries, passages_per_query)``: prompt texts
  (query-major, B * n_docs); ``prompt_ids(query, passage)``: its token ids, truncated as above;
* ``tokenize_prompts(queries, passages_per_query)``: left-padded ``input_ids``/``attention_mask``
  (B * n_docs, S); ``tokenize_sources(texts)``: the same for ready prompt texts (cut on the left);
* ``tokenize_targets(targets)``: right-padded ``input_ids``/``attention_mask`` (B, T) with EOS;
* ``forward_logprobs(queries, passages_per_query, targets, *, padding_side="left")`` -> (B, n_docs, T)
  log p(y_t | s_j, y_<t), exactly 0 at target padding, keeps autograd;
* ``generate(queries, passages_per_query, *, num_beams, num_return_sequences, max_new_tokens)`` ->
  texts (B, n_docs, r) (HF ``generate`` on the left-padded prompts);
* ``save_pretrained(dir)`` (HF files + ``re2g_model.json`` with ``generator_kind: causal``) and
  ``CausalGenerator.from_pretrained(dir_or_name, **overrides)``: also a plain Hugging Face causal-LM
  directory with no ``re2g_model.json`` (the defaults apply);
* ``copy_kwargs(ids) -> {}``;
* what :mod:`re2g.models.decoding` calls on either generator kind: ``prepare_sources``,
  ``beam_search``, ``score_targets``, ``token_steps`` (a next-token stepper over a KV cache).

:func:`load_any_generator` picks the class of a checkpoint (the saved ``generator_kind``, else
``config.is_encoder_decoder``); ``Generator.from_pretrained`` calls it, so every loader of a
generator directory reads either kind.
"""

from __future__ import annotations

import copy
import inspect
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from re2g.errors import ArtifactError, ConfigError
from re2g.models.encoders import (check_source, eval_mode, load_tokenizer, module_device, quiet_transformers,
                                  title_text)
from re2g.models.fingerprint import read_model_meta, write_model_meta
from re2g.models.generator import DEFAULT_SOURCE_MAX_LENGTH, DEFAULT_TARGET_MAX_LENGTH, _n_docs, decode_texts

DEFAULT_PROMPT_TEMPLATE = "Title: {title}\nPassage: {text}\nQuestion: {query}\nAnswer:"
TEMPLATE_FIELDS = ("title", "text", "query")
GENERATOR_KINDS = ("seq2seq", "causal")
_SETTINGS = ("prompt_template", "chat_template", "source_max_length", "target_max_length", "target_prefix")


def check_template(template: str) -> str:
    """``template`` if it names only ``{title}``, ``{text}``, ``{query}`` and has ``{text}`` and
    ``{query}``; else a :class:`ConfigError` saying what is wrong."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"prompt template {template!r}: {e}") from None
    bad = [n for n in names if n not in TEMPLATE_FIELDS]
    if bad:
        raise ConfigError(f"prompt template {template!r}: unknown field(s) {bad}; expected {{title}}, {{text}}, "
                          "{query} (write {{ and }} for literal braces)")
    for need in ("text", "query"):
        if need not in names:
            raise ConfigError(f"prompt template {template!r} has no {{{need}}} field")
    return template


def render_prompt(template: str, title: str, text: str, query: str) -> str:
    """The template filled in. Pure function."""
    return template.format(title=title, text=text, query=query)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Logits in float32, or wider if they are (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (0 on padding), as HF ``generate``. (N, L)"""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass(frozen=True)
class CausalPrompts:
    """Every prompt of a group of queries, tokenized once (query-major: row b * n_docs + j is the prompt of
    passage j of query b): the unpadded ids and the left-padded batch."""

    ids: list[list[int]]           # N rows, N = B * n_docs
    input_ids: torch.Tensor        # (N, S) left-padded
    attention_mask: torch.Tensor   # (N, S)
    n_docs: int


class CausalGenerator(torch.nn.Module):
    """Any ``AutoModelForCausalLM`` + tokenizer + the prompt format (module docstring)."""

    kind = "causal"

    def __init__(self, model: torch.nn.Module, tokenizer, *, prompt_template: str | None = None,
                 chat_template: bool = False, source_max_length: int = DEFAULT_SOURCE_MAX_LENGTH,
                 target_max_length: int = DEFAULT_TARGET_MAX_LENGTH, target_prefix: str = " "):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_template = check_template(prompt_template or DEFAULT_PROMPT_TEMPLATE)
        self.chat_template = bool(chat_template)
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("generator chat_template is true but the tokenizer has no chat template")
        self.source_max_length = int(source_max_length)
        self.target_max_length = int(target_max_length)
        if self.target_max_length < 1:
            raise ConfigError(f"target_max_length must be >= 1, got {self.target_max_length}")
        self.target_prefix = target_prefix
        if tokenizer.eos_token_id is None:
            raise ConfigError("a causal generator's tokenizer needs an eos token (it ends every target)")

    # ---- special tokens

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @property
    def eos_id(self) -> int:
        """The EOS appended to every target."""
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        """Padding id (the tokenizer's pad, else its EOS; padding is always masked)."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def eos_ids(self) -> set[int]:
        """Every id that ends a generation: the tokenizer's EOS and the generation config's."""
        ids = {self.eos_id}
        gen = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if gen is not None:
            ids |= set(gen) if isinstance(gen, (list, tuple)) else {int(gen)}
        return ids

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [] if bos is None or self.chat_template else [int(bos)]   # a chat template writes its own

    # ---- inputs

    def build_source(self, query: str, passage: Any) -> str:
        """The prompt text of one query and passage (``Passage``/``Hit``, dict, or (title, text)), before
        any truncation; with ``chat_template`` the user turn wrapped by the tokenizer's template."""
        title, text = title_text(passage)
        return self._wrap(render_prompt(self.prompt_template, title, text, query))

    def build_sources(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]]) -> list[str]:
        """Prompts for every (query, passage), query-major: B * n_docs strings."""
        n_docs = _n_docs(queries, passages_per_query)
        return [self.build_source(q, p) for q, ps in zip(queries, passages_per_query) for p in ps[:n_docs]]

    def _wrap(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self._bos() + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, query: str, passage: Any) -> list[int]:
        """Token ids of the prompt, at most ``source_max_length`` long by cutting the end of the passage
        text (never the title, question or answer cue; if those alone are longer, they are kept whole)."""
        title, text = title_text(passage)
        ids = self._encode(self.build_source(query, (title, text)))
        over = len(ids) - self.source_max_length
        if over <= 0:
            return ids
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - over
        while keep > 0:
            cut = self.tokenizer.decode(text_ids[:keep], skip_special_tokens=True)
            ids = self._encode(self.build_source(query, (title, cut)))
            if len(ids) <= self.source_max_length:
                return ids
            keep -= len(ids) - self.source_max_length   # a token boundary moved: cut what is still over
        return self._encode(self.build_source(query, (title, "")))

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        S = max(map(len, rows))
        ids = torch.full((len(rows), S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), S), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, S - len(r):] = torch.tensor(r)
                mask[i, S - len(r):] = 1
        return ids, mask

    def tokenize_prompts(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]]) -> dict:
        """``input_ids``/``attention_mask`` (B * n_docs, S), left-padded, each prompt cut as :meth:`prompt_ids`."""
        n_docs = _n_docs(queries, passages_per_query)
        rows = [self.prompt_ids(q, p) for q, ps in zip(queries, passages_per_query) for p in ps[:n_docs]]
        ids, mask = self._left_pad(rows)
        return {"input_ids": ids, "attention_mask": mask}

    def tokenize_sources(self, sources: Sequence[str], max_length: int | None = None) -> dict:
        """Ready prompt texts as ``input_ids``/``attention_mask`` (N, S), left-padded; a prompt over
        ``max_length`` (default ``source_max_length``) loses its beginning (:meth:`tokenize_prompts`
        cuts the passage instead)."""
        cap = int(max_length or self.source_max_length)
        rows = [ids[max(0, len(ids) - cap):] for ids in map(self._encode, sources)]
        ids, mask = self._left_pad(rows)
        return {"input_ids": ids, "attention_mask": mask}

    def target_ids(self, target: str, max_length: int | None = None) -> list[int]:
        """Token ids of one target: ``target_prefix + target``, cut to ``max_length - 1``, then EOS."""
        cap = int(max_length or self.target_max_length)
        ids = list(self.tokenizer(self.target_prefix + target, add_special_tokens=False)["input_ids"])
        return ids[:cap - 1] + [self.eos_id]

    def tokenize_targets(self, targets: Sequence[str], max_length: int | None = None) -> dict:
        """``input_ids``/``attention_mask`` (B, T), right-padded: the labels (EOS last) and the target mask."""
        rows = [self.target_ids(t, max_length) for t in targets]
        T = max(map(len, rows)) if rows else 0
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def copy_kwargs(self, source_ids: torch.Tensor) -> dict:
        """Nothing: a causal LM reads its prompt from its own cache (interface of ``Generator``)."""
        return {}

    # ---- scoring

    def _keeps_logits(self) -> bool:
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "logits_to_keep" in inspect.signature(model.forward).parameters

    def pair_logprobs(self, prompts: Sequence[Sequence[int]], labels: torch.Tensor, target_mask: torch.Tensor, *,
                      padding_side: str = "left") -> torch.Tensor:
        """log p(labels[i, t] | prompts[i], labels[i, <t]) for N (prompt, target) pairs, (N, T), 0 at target
        padding; one model pass over prompt + target. ``labels``/``target_mask`` (N, T) right-padded.

        ``padding_side="left"``: rows are [pad, prompt, target, target padding], so every target starts
        in the same column and only the last T + 1 positions' logits are computed; ``"right"``: rows are
        [prompt, target, padding] and the target positions are gathered per row."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        dev = self.device
        labels, tmask = labels.to(dev), target_mask.to(dev).bool()                      # (N, T)
        N, T = labels.shape
        lens = [len(p) for p in prompts]
        if min(lens, default=1) < 1:
            raise ValueError("every prompt needs at least one token (a BOS, a template)")
        P = max(lens)
        L = P + T
        ids = torch.full((N, L), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((N, L), dtype=torch.long, device=dev)
        tlen = tmask.sum(-1)
        for i, p in enumerate(prompts):
            start = P - len(p) if padding_side == "left" else 0
            ids[i, start:start + len(p)] = torch.tensor(p, device=dev)
            mask[i, start:start + len(p)] = 1
            t0 = P if padding_side == "left" else len(p)
            ids[i, t0:t0 + T] = torch.where(tmask[i], labels[i], torch.full_like(labels[i], self.pad_id))
            mask[i, t0:t0 + int(tlen[i])] = 1
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
        if padding_side == "left":
            if self._keeps_logits():
                kwargs["logits_to_keep"] = T + 1
            logits = self.model(**kwargs).logits[:, -(T + 1):-1]                          # (N, T, V)
        else:
            full = self.model(**kwargs).logits                                            # (N, L, V)
            pos = torch.tensor(lens, device=dev)[:, None] - 1 + torch.arange(T, device=dev)  # (N, T)
            logits = full.gather(1, pos[:, :, None].expand(-1, -1, full.shape[-1]))       # (N, T, V)
        logits = _wide(logits)
        token_lp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (N, T)
        return torch.where(tmask, token_lp, torch.zeros_like(token_lp))

    def forward_logprobs(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]],
                         targets: Sequence[str] | Mapping[str, torch.Tensor], *,
                         padding_side: str = "left") -> torch.Tensor:
        """Per-token log p(y_t | s_j, y_<t), shape (B, n_docs, T), exactly 0 where the target is padding.

        ``targets``: strings or the output of :meth:`tokenize_targets` (its ``attention_mask`` (B, T) is
        the target mask). Keeps the autograd graph; dropout follows the model's train/eval mode."""
        enc_t = self.tokenize_targets(targets) if not isinstance(targets, Mapping) else targets
        labels, tmask = enc_t["input_ids"], enc_t["attention_mask"]                     # (B, T)
        n_docs = _n_docs(queries, passages_per_query)
        if labels.shape[0] != len(queries):
            raise ValueError(f"{labels.shape[0]} targets for {len(queries)} queries")
        prompts = [self.prompt_ids(q, p) for q, ps in zip(queries, passages_per_query) for p in ps[:n_docs]]
        lp = self.pair_logprobs(prompts, labels.repeat_interleave(n_docs, 0), tmask.repeat_interleave(n_docs, 0),
                                padding_side=padding_side)                              # (B*n_docs, T)
        return lp.view(len(queries), n_docs, -1)

    # ---- generation

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_beams: int,
                  num_return_sequences: int, max_new_tokens: int | None, use_cache: bool = True,
                  **generate_kwargs) -> torch.Tensor:
        """HF ``generate`` on left-padded prompts (N, S): the new tokens only, (N * r, L).

        With the cache, the prompts but their last token run once here (N rows) and ``generate`` gets
        that cache copied per beam: it would otherwise run every prompt once per beam (it repeats the
        inputs ``num_beams`` times before its first pass)."""
        r = int(num_return_sequences)
        K = max(int(num_beams), r)
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        with eval_mode(self), torch.inference_mode():
            if use_cache and ids.shape[1] > 1 and "past_key_values" not in generate_kwargs:
                generate_kwargs["past_key_values"] = self._prefill(ids[:, :-1], mask[:, :-1], repeat=K)
            out = self.model.generate(input_ids=ids, attention_mask=mask, num_beams=K, num_return_sequences=r,
                                      max_new_tokens=max_new_tokens or self.target_max_length, do_sample=False,
                                      pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids),
                                      use_cache=use_cache, **generate_kwargs)
        return out[:, input_ids.shape[1]:]

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, *, repeat: int = 1):
        """The KV cache of left-padded ``ids`` (N, S'), each row repeated ``repeat`` times (N * repeat rows)."""
        from transformers.cache_utils import DynamicCache

        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                      past_key_values=DynamicCache(), use_cache=True)
        if self._keeps_logits():
            kwargs["logits_to_keep"] = 1
        cache = self.model(**kwargs).past_key_values
        if repeat > 1:
            cache = select_cache_rows(cache, torch.arange(ids.shape[0], device=ids.device).repeat_interleave(repeat))
        return cache

    def generate(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]], *,
                 num_beams: int = 4, num_return_sequences: int = 1, max_new_tokens: int | None = None,
                 **generate_kwargs) -> list[list[list[str]]]:
        """Beam search on every prompt: texts shaped (B, n_docs, num_return_sequences), best beam first.
        Extra keyword arguments go to ``model.generate``."""
        n_docs = _n_docs(queries, passages_per_query)
        enc = self.tokenize_prompts(queries, passages_per_query)
        out = self._generate(enc["input_ids"], enc["attention_mask"], num_beams=num_beams,
                             num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                             **generate_kwargs)
        texts = decode_texts(self.tokenizer, out)
        r = num_return_sequences
        return [[texts[(b * n_docs + j) * r:(b * n_docs + j + 1) * r] for j in range(n_docs)]
                for b in range(len(queries))]

    # ---- what re2g.models.decoding calls (the seq2seq Generator has the same methods)

    def prepare_sources(self, queries: Sequence[str], passages_per_query: Sequence[Sequence[Any]]) -> CausalPrompts:
        """Every prompt of the group tokenized once (the model runs them in :meth:`beam_search` /
        :meth:`token_steps`)."""
        n_docs = _n_docs(queries, passages_per_query)
        rows = [self.prompt_ids(q, p) for q, ps in zip(queries, passages_per_query) for p in ps[:n_docs]]
        ids, mask = self._left_pad(rows)
        return CausalPrompts(rows, ids.to(self.device), mask.to(self.device), n_docs)

    def beam_search(self, src: CausalPrompts, *, num_beams: int, num_return_sequences: int = 1,
                    max_new_tokens: int | None = None, use_cache: bool = True) -> list[list[str]]:
        """Beam search on every prompt (HF ``generate``: the prompt runs once, then one token per step
        over the KV cache): texts (N, num_return_sequences), best beam first."""
        r = int(num_return_sequences)
        out = self._generate(src.input_ids, src.attention_mask, num_beams=num_beams, num_return_sequences=r,
                             max_new_tokens=max_new_tokens, use_cache=use_cache)
        texts = decode_texts(self.tokenizer, out)
        return [texts[i * r:(i + 1) * r] for i in range(len(src.ids))]

    def score_targets(self, src: CausalPrompts, rows: Sequence[int], targets: Sequence[str], *,
                      batch_size: int = 128, use_cache: bool = True) -> torch.Tensor:
        """log p(targets[p] | prompt_{rows[p]}) for every pair p, (P,), teacher-forced, no gradient,
        ``batch_size`` pairs per pass. The prompts run once (their KV cache and the first target token's
        distribution kept) and each pair runs only its target over its prompt's cache;
        ``use_cache=False``: prompt + target in one pass per pair (:meth:`pair_logprobs`)."""
        P = len(targets)
        out = torch.empty(P)
        if P == 0:
            return out
        unique = {t: i for i, t in enumerate(dict.fromkeys(targets))}
        enc_t = self.tokenize_targets(list(unique))
        which = torch.tensor([unique[t] for t in targets], dtype=torch.long)
        labels_all, tmask_all = enc_t["input_ids"][which], enc_t["attention_mask"][which]  # (P, T)
        rows = list(rows)
        bs = max(1, int(batch_size))
        with eval_mode(self), torch.inference_mode():
            first, cache = self._prompt_states(src) if use_cache else (None, None)
            for s in range(0, P, bs):
                tmask = tmask_all[s:s + bs]
                T = int(tmask.sum(-1).max())
                labels = labels_all[s:s + bs, :T]
                if use_cache:
                    lp = self._continuation_logprobs(src, first, cache, rows[s:s + bs], labels, tmask[:, :T])
                else:
                    lp = self.pair_logprobs([src.ids[r] for r in rows[s:s + bs]], labels, tmask[:, :T])
                out[s:s + len(tmask)] = lp.sum(-1).float().cpu()
        return out

    def _prompt_states(self, src: CausalPrompts):
        """The prompts through the model once: log p(first token | prompt) (N, V) and the KV cache (N rows)."""
        from transformers.cache_utils import DynamicCache

        kwargs = dict(input_ids=src.input_ids, attention_mask=src.attention_mask,
                      position_ids=_positions(src.attention_mask), past_key_values=DynamicCache(), use_cache=True)
        if self._keeps_logits():
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return torch.log_softmax(_wide(out.logits[:, -1]), -1), out.past_key_values

    def _continuation_logprobs(self, src: CausalPrompts, first: torch.Tensor, cache, rows: Sequence[int],
                               labels: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
        """log p(labels[i, t] | prompt_{rows[i]}, labels[i, <t]) (p, T), 0 at padding, over the prompts'
        ``cache`` (its rows selected into a new cache, the original unchanged)."""
        dev = self.device
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=dev)
        labels, tmask = labels.to(dev), tmask.to(dev).bool()                          # (p, T)
        token_lp = first[idx].gather(-1, labels[:, :1])                               # (p, 1)
        T = labels.shape[1]
        if T > 1:
            pmask = src.attention_mask[idx]                                           # (p, S)
            mask = torch.cat([pmask, tmask[:, :-1].long()], 1)                        # (p, S + T - 1)
            pos = pmask.sum(-1, keepdim=True) + torch.arange(T - 1, device=dev)       # (p, T - 1)
            logits = self.model(input_ids=labels[:, :-1], attention_mask=mask, position_ids=pos,
                                past_key_values=select_cache_rows(cache, idx), use_cache=True).logits
            rest = torch.log_softmax(_wide(logits), -1).gather(-1, labels[:, 1:, None]).squeeze(-1)  # (p, T - 1)
            token_lp = torch.cat([token_lp, rest], 1)
        return torch.where(tmask, token_lp, torch.zeros_like(token_lp))

    def token_steps(self, src: CausalPrompts, *, use_cache: bool = True) -> CausalSteps:
        """A next-token stepper over the prompts (RAG-Token decoding), see :class:`CausalSteps`."""
        return CausalSteps(self, src, use_cache=use_cache)

    # ---- save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """Model + tokenizer files in ``directory``, then ``re2g_model.json`` (``generator_kind: causal``)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        write_model_meta(d, {"kind": "generator", "generator_kind": "causal",
                             **{k: getattr(self, k) for k in _SETTINGS}})
        return d

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, tokenizer: Any = None, dtype: Any = None,
                        **overrides) -> CausalGenerator:
        """Load from a hub name or a local directory: a ``save_pretrained`` one, or a plain Hugging Face
        causal-LM directory (no ``re2g_model.json``: the defaults apply). ``overrides`` (prompt_template,
        chat_template, source_max_length, target_max_length, target_prefix; None: keep) win over the
        saved values; ``dtype`` goes to ``AutoModelForCausalLM.from_pretrained``."""
        from transformers import AutoModelForCausalLM

        src = check_source(name_or_path, "generator")
        meta = read_model_meta(src) if Path(src).is_dir() else None
        if meta is not None and meta.get("kind") != "generator":
            raise ArtifactError(f"{src}: a saved {meta.get('kind')!r}, not a generator")
        if meta is not None and meta.get("generator_kind", "seq2seq") != "causal":
            raise ArtifactError(f"{src}: a saved {meta.get('generator_kind', 'seq2seq')} generator, not a causal LM")
        unknown = set(overrides) - set(_SETTINGS)
        if unknown:
            raise TypeError(f"unknown causal generator setting(s) {sorted(unknown)}; expected {list(_SETTINGS)}")
        from re2g.models.lora import load_adapter_model  # a kept LoRA adapter directory: base + adapter, merged
        try:
            with quiet_transformers():
                model = load_adapter_model(src, dtype=dtype)
                if model is None:
                    model = AutoModelForCausalLM.from_pretrained(src, **({"dtype": dtype} if dtype is not None else {}))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{src}: cannot load the causal-LM generator: {e}") from None
        tok = load_tokenizer(tokenizer if tokenizer is not None else src, "generator tokenizer")
        kwargs = {k: meta[k] for k in _SETTINGS if meta and k in meta}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model, tok, **kwargs)


def select_cache_rows(cache, idx: torch.Tensor):
    """A cache holding rows ``idx`` (R,) of ``cache`` (rows may repeat); ``cache`` itself is left as it is
    (its layers are copied shallowly and reordered: reordering replaces their tensors, never writes them)."""
    if hasattr(cache, "layers"):
        c = copy.copy(cache)
        c.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        c = copy.deepcopy(cache)
    c.reorder_cache(idx)
    return c


class CausalSteps:
    """Next-token log-probabilities for a growing set of (hypothesis, prompt) rows over one KV cache.

    :meth:`first` runs the prompts once, (N, V); :meth:`advance` ``(parent, tokens)`` makes row i of the
    next step the continuation of row ``parent[i]`` of the previous one by ``tokens[i]`` (rows may be
    repeated or dropped: the cache is reordered with them) and returns (R, V). ``use_cache=False``
    reruns every row's whole sequence instead (the reference the cached path is tested against)."""

    def __init__(self, generator: CausalGenerator, src: CausalPrompts, *, use_cache: bool = True):
        self.g = generator
        self.use_cache = use_cache
        self.ids = src.input_ids                 # (R, L) the sequences so far, left-padded
        self.mask = src.attention_mask           # (R, L)
        self.cache = None

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=self.use_cache)
        if self.use_cache:
            kwargs["past_key_values"] = self.cache
        if self.g._keeps_logits():
            kwargs["logits_to_keep"] = 1
        out = self.g.model(**kwargs)
        if self.use_cache:
            self.cache = out.past_key_values
        return torch.log_softmax(_wide(out.logits[:, -1]), -1)                   # (R, V)

    def first(self) -> torch.Tensor:
        """log p(first token | prompt) for every prompt row, (N, V)."""
        from transformers.cache_utils import DynamicCache

        self.cache = DynamicCache() if self.use_cache else None
        return self._run(self.ids, self.mask, _positions(self.mask))

    def advance(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Rows ``parent`` (R,) of the previous step extended by ``tokens`` (R,): log p(next | row), (R, V)."""
        dev = self.ids.device
        parent, tokens = parent.to(dev), tokens.to(dev)
        self.mask = torch.cat([self.mask[parent], torch.ones_like(tokens)[:, None]], 1)   # (R, L+1)
        self.ids = torch.cat([self.ids[parent], tokens[:, None]], 1)                       # (R, L+1)
        pos = _positions(self.mask)
        if not self.use_cache:
            return self._run(self.ids, self.mask, pos)
        self.cache.reorder_cache(parent)
        return self._run(tokens[:, None], self.mask, pos[:, -1:])


# --------------------------------------------------------------------------- which class a checkpoint needs


def checkpoint_kind(name_or_path: str | Path) -> str:
    """``"seq2seq"`` or ``"causal"``: the ``generator_kind`` of a saved re2g generator (a save without
    one is seq2seq), else the checkpoint's ``config.is_encoder_decoder``."""
    src = check_source(name_or_path, "generator")
    meta = read_model_meta(src) if Path(src).is_dir() else None
    if meta is not None:
        if meta.get("kind") != "generator":
            raise ArtifactError(f"{src}: a saved {meta.get('kind')!r}, not a generator")
        kind = meta.get("generator_kind", "seq2seq")
        if kind not in GENERATOR_KINDS:
            raise ArtifactError(f"{src}/re2g_model.json: generator_kind {kind!r}, expected one of {GENERATOR_KINDS}")
        return kind
    from transformers import AutoConfig

    import re2g.models.pointer  # noqa: F401  (registers the pointer-generator BART's config)

    try:
        cfg = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}: cannot read the generator's config: {e}") from None
    return "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal"


def load_any_generator(name_or_path: str | Path, *, kind: str = "auto", tokenizer: Any = None, **overrides):
    """The generator of a checkpoint: :class:`~re2g.models.generator.Generator` (seq2seq) or
    :class:`CausalGenerator`, as ``kind`` says (``auto``: :func:`checkpoint_kind`). ``overrides`` (None
    values ignored) go to the class that takes them: settings of the other kind (``title_sep`` /
    ``query_sep`` for a causal LM, ``prompt_template`` / ``chat_template`` for a seq2seq one) are dropped."""
    from re2g.models.generator import SEQ2SEQ_SETTINGS, Generator

    if kind not in ("auto", *GENERATOR_KINDS):
        raise ConfigError(f"models.generator_kind must be auto, seq2seq or causal, got {kind!r}")
    if kind == "auto":
        kind = checkpoint_kind(name_or_path)
    keys = _SETTINGS if kind == "causal" else SEQ2SEQ_SETTINGS
    kept = {k: v for k, v in overrides.items() if k in keys and v is not None}
    if kind == "causal":
        return CausalGenerator.from_pretrained(name_or_path, tokenizer=tokenizer, **kept)
    return Generator.from_pretrained(name_or_path, tokenizer=tokenizer, _dispatch=False, **kept)
