"""The DPR bi-encoder: a query encoder and a context encoder (or one shared encoder) + tokenizer.

Vectors are DPR's: the ``pooler_output`` of ``DPRQuestionEncoder`` / ``DPRContextEncoder``, i.e. the
[CLS] hidden state (through the projection when ``projection_dim > 0``). Passages are encoded as in
DPR: title and text as a tokenizer *pair* (``[CLS] title [SEP] text [SEP]``, token_type_ids 0/1).
Relevance is the inner product ``q @ p.T``.

Saved layout (``BiEncoder.save_pretrained(dir)``)::

    dir/query_encoder/   DPRQuestionEncoder (the one encoder when shared)
    dir/ctx_encoder/     DPRContextEncoder  (absent when shared)
    dir/tokenizer/
    dir/re2g_model.json  {"kind": "biencoder", "shared", "query_max_length", "passage_max_length",
                          "fingerprint"}   # fingerprint: see re2g.models.fingerprint

``BiEncoder.from_pretrained`` reads that layout, or the Hugging Face one of the paper checkpoints
(``facebook/dpr-question_encoder-multiset-base`` + ``facebook/dpr-ctx_encoder-multiset-base``, hub
names or local directories, the tokenizer taken from the query encoder's).
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


def load_dpr_encoder(name_or_path: str | Path, role: str):
    """Load a DPR encoder. The class comes from the checkpoint's ``architectures``
    (``DPRQuestionEncoder`` or ``DPRContextEncoder``; loading a checkpoint with the other class
    would silently re-initialize it), else from ``role`` (``"query"`` or ``"ctx"``)."""
    from transformers import AutoConfig, DPRContextEncoder, DPRQuestionEncoder

    src = check_source(name_or_path, f"{role} encoder")
    try:
        config = AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}: cannot load the {role} encoder's config: {e}") from None
    if getattr(config, "model_type", None) != "dpr":
        raise ArtifactError(f"{src}: expected a DPR encoder (model_type 'dpr'), got {config.model_type!r}")
    archs = set(getattr(config, "architectures", None) or ())
    if "DPRContextEncoder" in archs:
        cls = DPRContextEncoder
    elif "DPRQuestionEncoder" in archs:
        cls = DPRQuestionEncoder
    else:
        cls = DPRContextEncoder if role == "ctx" else DPRQuestionEncoder
    try:
        return cls.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{src}: cannot load the {role} encoder: {e}") from None


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# --------------------------------------------------------------------------- the bi-encoder


class BiEncoder(torch.nn.Module):
    """DPR query and context encoders (``ctx_encoder=None``: one encoder shared by both) + tokenizer.

    Cheap to build from modules; load with :meth:`from_pretrained` or ``re2g.models.factory``.
    ``encode_*`` keep the autograd graph (training) and also run under ``torch.inference_mode``;
    ``embed_*`` are the batched numpy helpers for indexing and search.
    """

    def __init__(self, query_encoder: torch.nn.Module, ctx_encoder: torch.nn.Module | None, tokenizer,
                 *, query_max_length: int = DEFAULT_QUERY_MAX_LENGTH,
                 passage_max_length: int = DEFAULT_PASSAGE_MAX_LENGTH):
        super().__init__()
        self.query_encoder = query_encoder
        self.ctx_encoder = query_encoder if ctx_encoder is None else ctx_encoder
        self.tokenizer = tokenizer
        self.query_max_length = int(query_max_length)
        self.passage_max_length = int(passage_max_length)

    # ---- properties

    @property
    def shared(self) -> bool:
        """True when queries and passages go through the same encoder."""
        return self.ctx_encoder is self.query_encoder

    @property
    def dim(self) -> int:
        """Vector size D: the projection size when the encoder has one, else the hidden size."""
        cfg = self.ctx_encoder.config
        return int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def fingerprint(self) -> str:
        """The context encoder's fingerprint (what a dense index records; see ``fingerprint.py``)."""
        return module_fingerprint(self.ctx_encoder)

    # ---- tokenization

    def tokenize_queries(self, texts: Sequence[str], max_length: int | None = None):
        """``BatchEncoding`` of ``[CLS] query [SEP]``, padded: input_ids/attention_mask/token_type_ids (B, L)."""
        return self.tokenizer(list(texts), max_length=max_length or self.query_max_length, truncation=True,
                              padding=True, return_token_type_ids=True, return_tensors="pt")

    def tokenize_passages(self, titles: Sequence[str], texts: Sequence[str], max_length: int | None = None):
        """``BatchEncoding`` of the pair ``[CLS] title [SEP] text [SEP]`` (token_type_ids 0 then 1), (B, L)."""
        if len(titles) != len(texts):
            raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
        return self.tokenizer([t or "" for t in titles], list(texts),
                              max_length=max_length or self.passage_max_length, truncation="longest_first",
                              padding=True, return_token_type_ids=True, return_tensors="pt")

    @staticmethod
    def _pool(encoder: torch.nn.Module, batch, device: torch.device) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        return encoder(**inputs).pooler_output  # (B, D)

    # ---- encoding (tensors; with grad unless the caller turns it off)

    def encode_queries(self, texts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Query vectors (B, D)."""
        return self._pool(self.query_encoder, self.tokenize_queries(texts, max_length), self.device)

    def encode_passages(self, titles: Sequence[str], texts: Sequence[str],
                        max_length: int | None = None) -> torch.Tensor:
        """Passage vectors (B, D) from title/text pairs."""
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
            "fingerprint": self.fingerprint(),
        })
        return d

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, ctx_name_or_path: str | Path | None = None, *,
                        shared: bool = False, tokenizer: Any = None, query_max_length: int | None = None,
                        passage_max_length: int | None = None) -> "BiEncoder":
        """Load a bi-encoder.

        * ``name_or_path`` is a directory written by :meth:`save_pretrained`: load it (the saved
          fingerprint is checked against the loaded weights);
        * otherwise it is a DPR question encoder (hub name or local dir) and ``ctx_name_or_path`` the
          context encoder; ``shared=True`` without ``ctx_name_or_path`` uses the one encoder for both.
          The tokenizer is ``tokenizer`` (object, name or path) or the query encoder's.

        ``*_max_length`` override the saved (or default) lengths.
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
            query = load_dpr_encoder(path / "query_encoder", role="query")
            ctx = None if meta.get("shared") else load_dpr_encoder(path / "ctx_encoder", role="ctx")
            tok = load_tokenizer(tokenizer if tokenizer is not None else path / "tokenizer")
            model = cls(query, ctx, tok,
                        query_max_length=query_max_length or meta.get("query_max_length", DEFAULT_QUERY_MAX_LENGTH),
                        passage_max_length=passage_max_length
                        or meta.get("passage_max_length", DEFAULT_PASSAGE_MAX_LENGTH))
            saved = meta.get("fingerprint")
            if saved is not None and saved != model.fingerprint():
                raise ArtifactError(f"{path}: the context encoder's weights do not match the fingerprint "
                                    f"{saved} in re2g_model.json (files replaced or corrupt)")
            return model
        if ctx_name_or_path is None and not shared:
            raise ValueError("a context encoder is needed: pass ctx_name_or_path, or shared=True")
        if ctx_name_or_path is not None and shared:
            raise ValueError("shared=True takes one encoder; do not pass ctx_name_or_path")
        query = load_dpr_encoder(name_or_path, role="query")
        ctx = None if ctx_name_or_path is None else load_dpr_encoder(ctx_name_or_path, role="ctx")
        tok = load_tokenizer(tokenizer if tokenizer is not None else name_or_path)
        return cls(query, ctx, tok, query_max_length=query_max_length or DEFAULT_QUERY_MAX_LENGTH,
                   passage_max_length=passage_max_length or DEFAULT_PASSAGE_MAX_LENGTH)
