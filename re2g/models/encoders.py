"""The bi-encoder: a query encoder and a context encoder (or one shared encoder) + tokenizer.

Any Hugging Face encoder can be a tower: DPR checkpoints (``DPRQuestionEncoder`` /
``DPRContextEncoder``, the paper's) or any ``AutoModel`` encoder (BERT, MiniLM, BGE, E5, GTE,
Contriever, ...). How token states become a vector — pooling ``cls | mean | pooler``, L2
normalization, query/passage prefixes, title/text as a pair or one text — is an
:class:`~re2g.models.pooling.EncoderSettings`, read from the checkpoint (DPR's recipe for DPR,
sentence-transformers' files where present) and overridable by config; :meth:`BiEncoder._pool` is the
one place any re2g code turns text into vectors. DPR's own recipe: the ``pooler_output`` (the [CLS]
state, through the projection when ``projection_dim > 0``), passages as the tokenizer pair
``[CLS] title [SEP] text [SEP]`` (token_type_ids 0/1). Relevance is the inner product ``q @ p.T``.

Saved layout (``BiEncoder.save_pretrained(dir)``)::

    dir/query_encoder/   the query tower (the one encoder when shared)
    dir/ctx_encoder/     the context tower (absent when shared)
    dir/tokenizer/
    dir/re2g_model.json  {"kind": "biencoder", "shared", "query_max_length", "passage_max_length",
                          "encoder_settings", "fingerprint"}   # fingerprint: see re2g.models.fingerprint

``BiEncoder.from_pretrained`` reads that layout, or Hugging Face checkpoints: the paper's pair
(``facebook/dpr-question_encoder-multiset-base`` + ``facebook/dpr-ctx_encoder-multiset-base``), or one
encoder directory or hub name used for both towers (sentence-transformers' all-MiniLM-L6-v2, say);
the tokenizer is the query encoder's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from re2g.errors import ArtifactError
from re2g.models.fingerprint import module_fingerprint, read_model_meta, write_model_meta
from re2g.models.pooling import DPR_SETTINGS, EncoderSettings, pool, sentence_transformers_defaults

DEFAULT_QUERY_MAX_LENGTH = 64
DEFAULT_PASSAGE_MAX_LENGTH = 128


# --------------------------------------------------------------------------- helpers (shared by the models)


def title_text(passage: Any) -> tuple[str, str]:
    """``(title, text)`` of a passage given as an object with ``.title``/``.text`` (``Passage``,
    ``Hit``), a mapping with those keys, or a ``(title, text)`` pair."""
    if isinstance(passage, Mapping):
        return str(passage.get("title") or ""), str(passage.get("text") or "")
    if isinstance(passage, (tuple, list)) and len(passage) == 2:
        return str(passage[0] or ""), str(passage[1] or "")
    if hasattr(passage, "text"):
        return str(getattr(passage, "title", "") or ""), str(passage.text or "")
    raise TypeError(f"a passage must have a title and a text, got {type(passage).__name__}")


def looks_local(name_or_path: str | Path) -> bool:
    """True for something that names a local path rather than a hub id."""
    s = str(name_or_path)
    return isinstance(name_or_path, Path) or Path(s).exists() or s.startswith(("/", ".", "~")) or s.count("/") > 1


def check_source(name_or_path: str | Path, what: str) -> str:
    """Raise :class:`ArtifactError` for a local path that does not exist; return it as a string."""
    s = str(Path(name_or_path).expanduser()) if looks_local(name_or_path) else str(name_or_path)
    if looks_local(name_or_path) and not Path(s).is_dir():
        raise ArtifactError(f"{s}: {what} directory not found")
    return s


def load_tokenizer(tokenizer_or_path: Any, what: str = "tokenizer"):
    """A tokenizer object passes through; a name or path goes to ``AutoTokenizer.from_pretrained``."""
    if tokenizer_or_path is None or not isinstance(tokenizer_or_path, (str, Path)):
        return tokenizer_or_path
    from transformers import AutoTokenizer

    src = check_source(tokenizer_or_path, what)
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}: cannot load the {what}: {e}") from None


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run a block in eval mode, restoring the module's training flag afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _config_of(src: str, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}: cannot load the {what}'s config: {e}") from None


def is_dpr(module: torch.nn.Module) -> bool:
    """True for a ``DPRQuestionEncoder`` / ``DPRContextEncoder`` (model_type ``dpr``)."""
    return getattr(getattr(module, "config", None), "model_type", None) == "dpr"


def load_encoder(name_or_path: str | Path, role: str) -> torch.nn.Module:
    """Load one tower. A DPR checkpoint gets its DPR class from ``architectures``
    (``DPRQuestionEncoder`` or ``DPRContextEncoder``; loading a checkpoint with the other class would
    silently re-initialize it), else from ``role`` (``"query"`` or ``"ctx"``); any other checkpoint
    is loaded with ``AutoModel`` (its encoder, pooler included when it has one)."""
    from transformers import AutoModel, DPRContextEncoder, DPRQuestionEncoder

    src = check_source(name_or_path, f"{role} encoder")
    config = _config_of(src, f"{role} encoder")
    if getattr(config, "model_type", None) == "dpr":
        archs = set(getattr(config, "architectures", None) or ())
        if "DPRContextEncoder" in archs:
            cls = DPRContextEncoder
        elif "DPRQuestionEncoder" in archs:
            cls = DPRQuestionEncoder
        else:
            cls = DPRContextEncoder if role == "ctx" else DPRQuestionEncoder
    else:
        cls = AutoModel
    try:
        with quiet_transformers():
            return cls.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}: cannot load the {role} encoder: {e}") from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load-time notices (unused or newly initialized weights such as a pooler
    the checkpoint does not carry) and its weight-loading progress bar inside the block; errors
    still raise."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers 5 draws a "Loading weights" bar per model
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def checkpoint_settings(name_or_path: str | Path, module: torch.nn.Module) -> tuple[EncoderSettings, int | None]:
    """The settings a checkpoint implies (see :mod:`re2g.models.pooling`) and its max length when
    sentence-transformers states one."""
    if is_dpr(module):
        return DPR_SETTINGS, None
    st = sentence_transformers_defaults(name_or_path) if Path(str(name_or_path)).is_dir() else None
    if st is not None:
        return EncoderSettings(**st[0]), st[1]
    return EncoderSettings(pooling="cls"), None


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# --------------------------------------------------------------------------- the bi-encoder


class BiEncoder(torch.nn.Module):
    """Query and context encoders (``ctx_encoder=None``: one encoder shared by both) + tokenizer,
    with the :class:`EncoderSettings` that turn their token states into vectors.

    Cheap to build from modules; load with :meth:`from_pretrained` or ``re2g.models.factory``.
    ``encode_*`` keep the autograd graph (training) and also run under ``torch.inference_mode``;
    ``embed_*`` are the batched numpy helpers for indexing and search.
    """

    def __init__(self, query_encoder: torch.nn.Module, ctx_encoder: torch.nn.Module | None, tokenizer,
                 *, query_max_length: int = DEFAULT_QUERY_MAX_LENGTH,
                 passage_max_length: int = DEFAULT_PASSAGE_MAX_LENGTH,
                 settings: EncoderSettings | None = None):
        super().__init__()
        self.query_encoder = query_encoder
        self.ctx_encoder = query_encoder if ctx_encoder is None else ctx_encoder
        self.tokenizer = tokenizer
        self.query_max_length = int(query_max_length)
        self.passage_max_length = int(passage_max_length)
        self.settings = settings or (DPR_SETTINGS if is_dpr(query_encoder) else EncoderSettings(pooling="cls"))
        if self.settings.pooling == "pooler" and not (is_dpr(self.ctx_encoder)
                                                     or getattr(self.ctx_encoder, "pooler", None) is not None):
            raise ArtifactError("pooling 'pooler': the encoder has no pooler layer (use cls or mean)")

    # ---- properties

    @property
    def shared(self) -> bool:
        """True when queries and passages go through the same encoder."""
        return self.ctx_encoder is self.query_encoder

    @property
    def dim(self) -> int:
        """Vector size D: DPR's projection size with ``pooler`` pooling when it has one, else the hidden size."""
        cfg = self.ctx_encoder.config
        if self.settings.pooling == "pooler" and getattr(cfg, "projection_dim", 0):
            return int(cfg.projection_dim)
        return int(cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def fingerprint(self) -> str:
        """What a dense index records: the context encoder's weights (see ``fingerprint.py``) and,
        unless they are DPR's recipe, the settings (an index built with mean pooling refuses a
        CLS-pooled query encoder over the same weights)."""
        return settings_fingerprint(module_fingerprint(self.ctx_encoder), self.settings)

    @property
    def logit_scale(self) -> float:
        """The factor on ``q . p`` before a softmax in training (see ``EncoderSettings.logit_scale``)."""
        return self.settings.logit_scale

    def backbone(self, role: str = "query") -> torch.nn.Module:
        """The transformer under a tower (DPR wraps a ``BertModel``; other encoders are one)."""
        enc = self.query_encoder if role == "query" else self.ctx_encoder
        if is_dpr(enc):
            inner = getattr(enc, "question_encoder", None) or getattr(enc, "ctx_encoder")
            return inner.bert_model
        return enc

    # ---- tokenization

    def _uses_token_types(self, encoder: torch.nn.Module) -> bool:
        return is_dpr(encoder) or int(getattr(encoder.config, "type_vocab_size", 0) or 0) > 1

    def tokenize_queries(self, texts: Sequence[str], max_length: int | None = None):
        """``BatchEncoding`` of ``[CLS] prefix+query [SEP]``, padded: input_ids/attention_mask(/token_type_ids) (B, L)."""
        prefix = self.settings.query_prefix
        return self.tokenizer([prefix + t for t in texts], max_length=max_length or self.query_max_length,
                              truncation=True, padding=True, return_tensors="pt",
                              return_token_type_ids=self._uses_token_types(self.query_encoder) or None)

    def tokenize_passages(self, titles: Sequence[str], texts: Sequence[str], max_length: int | None = None):
        """``BatchEncoding`` of the passages (B, L): the pair ``[CLS] title [SEP] text [SEP]``
        (token_type_ids 0 then 1), or one text ``title + sep + text`` (see :class:`EncoderSettings`)."""
        if len(titles) != len(texts):
            raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
        s = self.settings
        kw = dict(max_length=max_length or self.passage_max_length, padding=True, return_tensors="pt",
                  return_token_type_ids=self._uses_token_types(self.ctx_encoder) or None)
        if s.title_separator is None:
            return self.tokenizer([s.passage_prefix + (t or "") for t in titles], list(texts),
                                  truncation="longest_first", **kw)
        return self.tokenizer([s.passage_text(t or "", x) for t, x in zip(titles, texts)], truncation=True, **kw)

    def _pool(self, encoder: torch.nn.Module, batch, device: torch.device) -> torch.Tensor:
        """Token states of ``encoder`` on a tokenized batch -> vectors (B, D): the one pooling path."""
        inputs = {k: v.to(device) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        mode = self.settings.pooling
        if is_dpr(encoder):  # DPR outputs the pooled vector; token states only through hidden_states
            out = encoder(**inputs, output_hidden_states=mode != "pooler")
            hidden = out.hidden_states[-1] if mode != "pooler" else None
        else:
            out = encoder(**inputs)
            hidden = out.last_hidden_state
        return pool(mode, hidden, inputs["attention_mask"], getattr(out, "pooler_output", None),
                    normalize=self.settings.normalize)

    # ---- encoding (tensors; with grad unless the caller turns it off)

    def encode_queries(self, texts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Query vectors (B, D)."""
        return self._pool(self.query_encoder, self.tokenize_queries(texts, max_length), self.device)

    def encode_passages(self, titles: Sequence[str], texts: Sequence[str],
                        max_length: int | None = None) -> torch.Tensor:
        """Passage vectors (B, D) from titles and texts."""
        return self._pool(self.ctx_encoder, self.tokenize_passages(titles, texts, max_length), self.device)

    @staticmethod
    def score(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Inner products: q (Bq, D), p (Bp, D) -> (Bq, Bp)."""
        return q @ p.T

    # ---- embedding (numpy float32, batched, eval mode, no grad)

    def embed_queries(self, texts: Sequence[str], *, batch_size: int = 64, max_length: int | None = None,
                      progress: bool = False) -> np.ndarray:
        """Query vectors as float32 (N, D), computed ``batch_size`` at a time in eval mode."""
        texts = list(texts)
        return self._embed(len(texts), batch_size, progress, "queries",
                           lambda s: self.encode_queries(texts[s], max_length))

    def embed_passages(self, titles: Sequence[str], texts: Sequence[str], *, batch_size: int = 64,
                       max_length: int | None = None, progress: bool = False) -> np.ndarray:
        """Passage vectors as float32 (N, D), computed ``batch_size`` at a time in eval mode."""
        titles, texts = list(titles), list(texts)
        if len(titles) != len(texts):
            raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
        return self._embed(len(texts), batch_size, progress, "passages",
                           lambda s: self.encode_passages(titles[s], texts[s], max_length))

    def _embed(self, n: int, batch_size: int, progress: bool, desc: str, fn) -> np.ndarray:
        from tqdm.auto import tqdm

        out = np.empty((n, self.dim), dtype=np.float32)
        with eval_mode(self), torch.inference_mode(), tqdm(total=n, desc=f"embed {desc}",
                                                           disable=not progress) as bar:
            for s in _batches(n, max(1, int(batch_size))):
                out[s] = fn(s).float().cpu().numpy()
                bar.update(s.stop - s.start)
        return out

    # ---- save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``query_encoder/``, ``ctx_encoder/`` (unless shared), ``tokenizer/`` and
        ``re2g_model.json`` (written last) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.query_encoder.save_pretrained(d / "query_encoder")
        if not self.shared:
            self.ctx_encoder.save_pretrained(d / "ctx_encoder")
        self.tokenizer.save_pretrained(d / "tokenizer")
        write_model_meta(d, {
            "kind": "biencoder",
            "shared": self.shared,
            "query_max_length": self.query_max_length,
            "passage_max_length": self.passage_max_length,
            "encoder_settings": self.settings.to_dict(),
            "fingerprint": self.fingerprint(),
        })
        return d

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, ctx_name_or_path: str | Path | None = None, *,
                        shared: bool | None = None, tokenizer: Any = None, query_max_length: int | None = None,
                        passage_max_length: int | None = None, **settings: Any) -> "BiEncoder":
        """Load a bi-encoder.

        * ``name_or_path`` is a directory written by :meth:`save_pretrained`: load it (the saved
          fingerprint is checked against the loaded weights and settings);
        * otherwise it is a Hugging Face encoder (hub name or local dir: DPR or any ``AutoModel``
          encoder) and ``ctx_name_or_path`` the context encoder; without ``ctx_name_or_path`` the one
          encoder serves both sides (a DPR checkpoint only with ``shared=True``: its towers differ). The tokenizer is ``tokenizer`` (object, name or
          path) or the query encoder's.

        ``*_max_length`` override the saved (or sentence-transformers', or default) lengths;
        ``settings`` (``pooling``, ``normalize``, ``query_prefix``, ``passage_prefix``,
        ``title_separator``, ``score_scale``; None keeps) override the saved or checkpoint's :class:`EncoderSettings`.
        """
        path = Path(str(name_or_path)).expanduser()
        meta = read_model_meta(path) if path.is_dir() else None
        if meta is None and path.is_dir() and (path / "query_encoder").is_dir():
            raise ArtifactError(f"{path}: incomplete bi-encoder save (no re2g_model.json)")
        if meta is not None:
            if meta.get("kind") != "biencoder":
                raise ArtifactError(f"{path}: a saved {meta.get('kind')!r}, not a bi-encoder")
            if ctx_name_or_path is not None:
                raise ValueError(f"{path} is a saved bi-encoder; it holds its own context encoder")
            query = load_encoder(path / "query_encoder", role="query")
            ctx = None if meta.get("shared") else load_encoder(path / "ctx_encoder", role="ctx")
            tok = load_tokenizer(tokenizer if tokenizer is not None else path / "tokenizer")
            saved_settings = EncoderSettings.from_dict(meta.get("encoder_settings"))
            model = cls(query, ctx, tok,
                        query_max_length=query_max_length or meta.get("query_max_length", DEFAULT_QUERY_MAX_LENGTH),
                        passage_max_length=passage_max_length
                        or meta.get("passage_max_length", DEFAULT_PASSAGE_MAX_LENGTH),
                        settings=saved_settings.override(**settings))
            saved = meta.get("fingerprint")
            if saved is not None and saved != settings_fingerprint(module_fingerprint(model.ctx_encoder),
                                                                   saved_settings):
                raise ArtifactError(f"{path}: the context encoder's weights do not match the fingerprint "
                                    f"{saved} in re2g_model.json (files replaced or corrupt)")
            return model
        if ctx_name_or_path is not None and shared:
            raise ValueError("shared=True takes one encoder; do not pass ctx_name_or_path")
        query = load_encoder(name_or_path, role="query")
        if ctx_name_or_path is None and is_dpr(query) and not shared:
            raise ValueError(f"{name_or_path} is a DPR encoder: DPR's towers differ, so a context encoder is "
                             "needed: pass ctx_name_or_path, or shared=True to use this one for both")
        ctx = None if ctx_name_or_path is None else load_encoder(ctx_name_or_path, role="ctx")
        tok = load_tokenizer(tokenizer if tokenizer is not None else name_or_path)
        base, st_length = checkpoint_settings(name_or_path, query)
        return cls(query, ctx, tok, query_max_length=query_max_length or st_length or DEFAULT_QUERY_MAX_LENGTH,
                   passage_max_length=passage_max_length or st_length or DEFAULT_PASSAGE_MAX_LENGTH,
                   settings=base.override(**settings))


def settings_fingerprint(weights_fingerprint: str, settings: EncoderSettings) -> str:
    """The bi-encoder fingerprint: the weights' alone under DPR's recipe (so indexes built before
    settings existed still match), else a hash of both."""
    settings = settings.identity()
    if settings == DPR_SETTINGS:
        return weights_fingerprint
    import hashlib
    import json

    blob = json.dumps({"weights": weights_fingerprint, "settings": settings.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:len(weights_fingerprint)]
