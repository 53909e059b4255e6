"""The cross-encoder reranker: a sequence-classification model over (query, passage) pairs.

Input is the pair ``[CLS] query [SEP] title text [SEP]`` (the passage side is ``title + " " + text``).
The score z_r of a pair is one number:

* ``num_labels == 1`` (what re2g trains): the single logit;
* ``num_labels == 2`` (MS MARCO checkpoints such as ``nboost/pt-bert-base-uncased-msmarco``,
  label 1 = relevant): ``logit[1] - logit[0]``, the log-odds of relevance,
  ``log p(rel) - log p(not rel)``. It ranks like p(rel), and it is a logit of the same kind as the
  1-label head, so Re2G's softmax over candidates and its loss apply unchanged.

Exact-match token type (tiny rerankers): a model with ``type_vocab_size >= 3`` gets token type 2
on every passage token whose id also occurs in the query (special tokens aside), the exact-match
feature of DrQA-style readers. A 64-d BERT trained from scratch on a few hundred queries did not
learn lexical matching across the two segments by itself (measured on the sample task: dev page
Recall@1 fell below BM25's); with the feature it ranks the right page first after one epoch. Real
checkpoints (``type_vocab_size == 2``) are unaffected.

Other label counts are refused. Saved layout: the Hugging Face model and tokenizer files in the
directory itself (so ``AutoModelForSequenceClassification`` loads it too) + ``re2g_model.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from re2g.errors import ArtifactError
from re2g.models.encoders import check_source, load_tokenizer, module_device, title_text
from re2g.models.fingerprint import read_model_meta, write_model_meta

DEFAULT_RERANKER_MAX_LENGTH = 128


def passage_side(title: str, text: str) -> str:
    """The second segment of a reranker pair: ``title + " " + text`` (just the text without a title)."""
    return f"{title} {text}" if title else text


def lengths_mask(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """(B, C) bool, True on the first ``lengths[b]`` entries of row b; C = max(lengths) (0 when none)."""
    n = torch.as_tensor(list(lengths), dtype=torch.long, device=device).reshape(-1)   # (B,)
    width = int(n.max()) if n.numel() else 0
    return torch.arange(width, device=device)[None, :] < n[:, None]


def rerank_top(z: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reranker's top-``k`` of each row: positions (B, k') sorted by ``z`` descending (ties keep
    list order), real entries first, and their mask (B, k'); k' = min(k, longest row's real count).
    A row with fewer than ``k`` real entries keeps all of them (its tail is masked), so a row's result
    never depends on the other rows of the batch. No gradient (positions only).

    (B, C) float, (B, C) bool -> (B, k') long, (B, k') bool
    """
    mask = mask.bool()
    by_score = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices    # (B, C)
    real_first = torch.sort(mask.gather(1, by_score).to(torch.uint8), dim=-1, descending=True,
                            stable=True).indices                                   # (B, C)
    order = by_score.gather(1, real_first)                                         # (B, C)
    count = mask.sum(-1)                                                           # (B,)
    width = min(int(k), int(count.max()) if count.numel() else 0)
    top = order[:, :width]                                                         # (B, k')
    return top, torch.arange(width, device=z.device)[None, :] < count[:, None]


class CrossEncoder(torch.nn.Module):
    """Scores (query, passage) pairs with a ``*ForSequenceClassification`` model of 1 or 2 labels."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int = DEFAULT_RERANKER_MAX_LENGTH):
        super().__init__()
        n = int(getattr(model.config, "num_labels", 1))
        if n not in (1, 2):
            raise ArtifactError(f"a reranker needs 1 label (a score) or 2 (not relevant, relevant); "
                                f"this model has {n}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @property
    def exact_match(self) -> bool:
        """True when passage tokens that occur in the query get token type 2 (``type_vocab_size >= 3``)."""
        return int(getattr(self.model.config, "type_vocab_size", 2)) >= 3

    def mark_exact_matches(self, enc) -> None:
        """Token type 2 (in place) for segment-B tokens whose id occurs in segment A of the same pair;
        special tokens and padding never match. ``enc``: a tokenized batch with ``token_type_ids`` (n, L)."""
        ids, types = enc["input_ids"], enc["token_type_ids"]
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=ids.dtype)
        real = enc["attention_mask"].bool() & ~torch.isin(ids, special)  # (n, L)
        query, passage = real & (types == 0), real & (types == 1)
        same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (n, L, L): token j of the passage == token k
        hit = (same & query.unsqueeze(1)).any(dim=2) & passage  # (n, L)
        enc["token_type_ids"] = torch.where(hit, torch.full_like(types, 2), types)

    def tokenize(self, queries: Sequence[str], passages: Sequence[str], max_length: int | None = None):
        """``BatchEncoding`` of (query, passage text) pairs, padded, (n, L); a pair that is too long
        loses tokens from its longer side first (passages, in practice)."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        use_types = getattr(self.model.config, "type_vocab_size", 2) > 1
        enc = self.tokenizer(list(queries), list(passages), max_length=max_length or self.max_length,
                             truncation="longest_first", padding=True,
                             return_token_type_ids=use_types or None, return_tensors="pt")
        if self.exact_match:
            self.mark_exact_matches(enc)
        return enc

    def logits_to_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, num_labels) -> (n,): the logit, or logit[1] - logit[0] for a 2-label head."""
        if logits.shape[-1] == 1:
            return logits[:, 0]
        return logits[:, 1] - logits[:, 0]

    def score_pairs(self, queries: Sequence[str], titles: Sequence[str], texts: Sequence[str], *,
                    batch_size: int | None = None, max_length: int | None = None) -> torch.Tensor:
        """Scores z_r (n,) of pairs (queries[i], titles[i] + " " + texts[i]).

        ``batch_size=None`` runs one forward pass (keeps the graph, for training); otherwise pairs go
        ``batch_size`` at a time and the scores are concatenated (wrap in ``torch.inference_mode``
        and call ``.eval()`` for serving).
        """
        if not (len(queries) == len(titles) == len(texts)):
            raise ValueError(f"lengths differ: {len(queries)} queries, {len(titles)} titles, {len(texts)} texts")
        sides = [passage_side(t or "", x) for t, x in zip(titles, texts)]
        n = len(sides)
        if n == 0:
            return torch.zeros(0, device=self.device)
        step = n if batch_size is None else max(1, int(batch_size))
        out = []
        for start in range(0, n, step):
            enc = self.tokenize(queries[start:start + step], sides[start:start + step], max_length)
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits  # (b, num_labels)
            out.append(self.logits_to_scores(logits))
        return torch.cat(out)  # (n,)

    def score(self, query: str, passages: Sequence[Any], *, batch_size: int | None = None,
              max_length: int | None = None) -> torch.Tensor:
        """Scores (n,) of one query against passages (``Passage``/``Hit`` objects, dicts with
        title/text, or (title, text) pairs)."""
        pairs = [title_text(p) for p in passages]
        return self.score_pairs([query] * len(pairs), [t for t, _ in pairs], [x for _, x in pairs],
                                batch_size=batch_size, max_length=max_length)

    def score_lists(self, queries: Sequence[str], candidate_lists: Sequence[Sequence[Any]], *,
                    batch_size: int | None = None, max_length: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of each query against its own list of passages (lists of any lengths, passages as
        :meth:`score` takes them), padded: z (B, C) float with 0 on padding and mask (B, C) bool,
        C the longest list. The pairs are scored by :meth:`score_pairs` (same ``batch_size`` meaning);
        differentiable when gradients are on."""
        if len(queries) != len(candidate_lists):
            raise ValueError(f"{len(queries)} queries for {len(candidate_lists)} candidate lists")
        lengths = [len(c) for c in candidate_lists]
        pairs = [title_text(p) for c in candidate_lists for p in c]
        flat_q = [q for q, n in zip(queries, lengths) for _ in range(n)]
        z = self.score_pairs(flat_q, [t for t, _ in pairs], [x for _, x in pairs],
                             batch_size=batch_size, max_length=max_length)  # (n,)
        mask = lengths_mask(lengths, device=z.device)                        # (B, C)
        return torch.zeros(mask.shape, dtype=z.dtype, device=z.device).masked_scatter(mask, z), mask

    # ---- save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """Model + tokenizer files in ``directory``, then ``re2g_model.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        write_model_meta(d, {"kind": "reranker", "max_length": self.max_length, "num_labels": self.num_labels,
                             "score": "logit" if self.num_labels == 1 else "logit[1]-logit[0]",
                             "exact_match_token_type": self.exact_match})
        return d

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, tokenizer: Any = None,
                        max_length: int | None = None) -> "CrossEncoder":
        """Load a reranker from a hub name or a local directory (re2g's or a plain Hugging Face one):
        a ``*ForSequenceClassification`` checkpoint as it is (1 or 2 labels), or a plain encoder
        checkpoint (``BertModel``, a sentence-transformers model, ...) with a new one-logit head to
        train. The tokenizer is ``tokenizer`` (object, name or path) or the model's own."""
        from transformers import AutoModelForSequenceClassification

        from re2g.models.encoders import _config_of, quiet_transformers

        src = check_source(name_or_path, "reranker")
        meta = read_model_meta(src) if Path(src).is_dir() else None
        if meta is not None and meta.get("kind") != "reranker":
            raise ArtifactError(f"{src}: a saved {meta.get('kind')!r}, not a reranker")
        config = _config_of(src, "reranker")
        archs = getattr(config, "architectures", None) or ()
        head = {} if any(a.endswith("ForSequenceClassification") for a in archs) else {"num_labels": 1}
        try:
            with quiet_transformers():  # a plain encoder's new head is expected, not news
                model = AutoModelForSequenceClassification.from_pretrained(src, **head)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{src}: cannot load the reranker: {e}") from None
        tok = load_tokenizer(tokenizer if tokenizer is not None else src, "reranker tokenizer")
        length = max_length or (meta or {}).get("max_length", DEFAULT_RERANKER_MAX_LENGTH)
        return cls(model, tok, max_length=length)
