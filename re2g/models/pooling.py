"""How an encoder's token states become one vector: pooling, normalization, prefixes, passage format.

One :class:`EncoderSettings` travels with every bi-encoder (saved in its ``re2g_model.json`` and part
of its fingerprint), and :func:`pool` is the one place token states become vectors — for indexing,
shard search, mining, every training stage and serving alike.

* ``pooling``: ``pooler`` — the model's ``pooler_output`` (DPR: the [CLS] state through the optional
  projection; BERT: tanh(W·[CLS])); ``cls`` — the first token's last hidden state; ``mean`` — the mean
  of the last hidden states over the attention mask (sentence-transformers' mean pooling).
* ``normalize``: L2-normalize the pooled vector (inner product = cosine).
* ``query_prefix`` / ``passage_prefix``: text put before each query / passage (E5's ``"query: "`` and
  ``"passage: "``; BGE's query instruction).
* ``title_separator``: ``None`` encodes a passage as the tokenizer pair ``(title, text)`` — DPR's
  ``[CLS] title [SEP] text [SEP]``; a string joins them into one text ``title + sep + text`` (how
  sentence-transformers models see a document).
* ``score_scale``: the factor on ``q . p`` before a softmax in training (:attr:`EncoderSettings.logit_scale`).

Defaults come from the checkpoint: a DPR encoder is ``pooler`` without normalization and with the
title pair (DPR's own recipe); a directory with sentence-transformers files (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``)
gives its pooling, its ``Normalize`` module, its max length and its ``query``/``passage`` prompts,
and joins title and text with ``" "`` (a single text, as sentence-transformers encodes); any other
Hugging Face encoder is ``cls`` pooled with the title pair. Config fields override every one of them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from re2g.errors import ArtifactError

PoolingMode = Literal["cls", "mean", "pooler"]
POOLING_MODES: tuple[str, ...] = ("cls", "mean", "pooler")


@dataclass(frozen=True)
class EncoderSettings:
    """Everything besides the weights that decides a bi-encoder's vectors (see the module docstring)."""

    pooling: PoolingMode = "pooler"
    normalize: bool = False
    query_prefix: str = ""
    passage_prefix: str = ""
    title_separator: str | None = None
    score_scale: float | None = None

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling: got {self.pooling!r}: expected one of {', '.join(POOLING_MODES)}")

    @property
    def logit_scale(self) -> float:
        """What relevance scores ``q . p`` are multiplied by before any softmax in training (stage 1's
        NLL, stage 2's passage weights, stage 4's distillation, joint training): ``score_scale``, else
        20 for normalized vectors (cosines in [-1, 1] would give a near-uniform softmax; 20 is
        sentence-transformers' MultipleNegativesRankingLoss scale) and 1 for raw inner products (DPR).
        Rankings do not depend on it, so it is not part of the fingerprint."""
        if self.score_scale is not None:
            return float(self.score_scale)
        return 20.0 if self.normalize else 1.0

    def identity(self) -> "EncoderSettings":
        """The settings that decide the vectors (what the fingerprint hashes): all but ``score_scale``."""
        return replace(self, score_scale=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "EncoderSettings":
        """From a saved dict; unknown keys are refused, missing ones take the defaults (DPR's)."""
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ArtifactError(f"unknown encoder settings {sorted(unknown)}")
        return cls(**d)

    def override(self, **changes: Any) -> "EncoderSettings":
        """A copy with the given fields changed; ``None`` values keep the current ones
        (``title_separator`` is changed with the string ``"pair"`` meaning None)."""
        kept = {k: v for k, v in changes.items() if v is not None}
        if kept.get("title_separator") == "pair":
            kept["title_separator"] = None
        return replace(self, **kept) if kept else self

    def describe(self) -> str:
        """One line for error messages: ``mean pooling, normalized, prefixes 'query: '/'passage: ', pair``."""
        parts = [f"{self.pooling} pooling", "normalized" if self.normalize else "not normalized"]
        if self.query_prefix or self.passage_prefix:
            parts.append(f"prefixes {self.query_prefix!r}/{self.passage_prefix!r}")
        parts.append("title/text pair" if self.title_separator is None else f"title{self.title_separator!r}text")
        return ", ".join(parts)

    def passage_text(self, title: str, text: str) -> tuple[str, str] | str:
        """The tokenizer input for one passage: a ``(title, text)`` pair or one string, with the prefix."""
        if self.title_separator is None:
            return self.passage_prefix + (title or ""), text
        joined = f"{title}{self.title_separator}{text}" if title else text
        return self.passage_prefix + joined


DPR_SETTINGS = EncoderSettings()


def pool(mode: str, last_hidden_state: torch.Tensor | None, attention_mask: torch.Tensor,
         pooler_output: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
    """Token states -> one vector per row.

    ``last_hidden_state`` (B, L, H), ``attention_mask`` (B, L), ``pooler_output`` (B, D) -> (B, D).
    ``mean`` divides by the number of unmasked tokens (at least 1e-9, as sentence-transformers).
    """
    if mode == "pooler":
        if pooler_output is None:
            raise ArtifactError("pooling 'pooler': this encoder has no pooler output (use 'cls' or 'mean')")
        v = pooler_output
    elif mode == "cls":
        v = last_hidden_state[:, 0]
    elif mode == "mean":
        m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, L, 1)
        v = (last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
    else:
        raise ValueError(f"pooling: got {mode!r}: expected one of {', '.join(POOLING_MODES)}")
    return torch.nn.functional.normalize(v, p=2, dim=-1) if normalize else v


def sentence_transformers_defaults(directory: str | Path) -> tuple[dict[str, Any], int | None] | None:
    """``(settings fields, max_seq_length)`` read from a sentence-transformers directory, or None when
    ``directory`` has no ``modules.json``."""
    d = Path(directory)
    modules_file = d / "modules.json"
    if not modules_file.is_file():
        return None

    def _json(p: Path) -> Any:
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{p}: cannot read the sentence-transformers file: {e}") from None

    modules = _json(modules_file)
    if not isinstance(modules, list):
        raise ArtifactError(f"{modules_file}: expected a list of modules")
    fields: dict[str, Any] = {"title_separator": " ", "normalize": False, "pooling": "cls"}
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith(".Normalize"):
            fields["normalize"] = True
        elif kind.endswith(".Pooling"):
            cfg = _json(d / m.get("path", "1_Pooling") / "config.json")
            if cfg.get("pooling_mode_mean_tokens"):
                fields["pooling"] = "mean"
            elif cfg.get("pooling_mode_cls_token"):
                fields["pooling"] = "cls"
            else:
                modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
                raise ArtifactError(f"{d}: sentence-transformers pooling {modes} is not supported "
                                    "(re2g pools with cls, mean or pooler)")
    max_len = None
    if (d / "sentence_bert_config.json").is_file():
        max_len = _json(d / "sentence_bert_config.json").get("max_seq_length")
    if (d / "config_sentence_transformers.json").is_file():
        prompts = _json(d / "config_sentence_transformers.json").get("prompts") or {}
        fields["query_prefix"] = str(prompts.get("query", "") or "")
        fields["passage_prefix"] = str(prompts.get("passage", prompts.get("document", "")) or "")
    return fields, (int(max_len) if max_len else None)
