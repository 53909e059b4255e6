"""A run directory resolved once: what it provides, whether its pieces belong together, and the loaders
that turn those pieces into the stages of :mod:`re2g.stages`.

:func:`resolve_run` checks files only (no model is loaded) and returns :class:`RunPieces`; the
in-process pipeline (:meth:`re2g.pipeline.Re2GPipeline.from_run_dir`), ``re2g predict`` and every
Serve replica (``serve/app.py``) resolve a run with it and load their stages with
:func:`load_retriever`, :func:`load_reranker`, :func:`load_generator`:

* passages: ``RUN_DIR/passages``; dense index ``RUN_DIR/index/dense`` (when it has a manifest); BM25
  ``RUN_DIR/index/bm25`` (whichever exist; both: the hybrid);
* query encoder: the first of ``models/dpr`` (after stage 1), ``models/dpr_init``, ``models/biencoder``
  (``re2g init-models RUN_DIR/models``) whose saved fingerprint is the dense index's; when none matches,
  the first that exists (and the check below refuses it); when none exists, ``models.query_encoder``;
* reranker: ``models/reranker``, else ``models.reranker`` of the config;
* generator: ``models/generator``, else ``models.generator`` of the config.

Checks, each with the fix in its message: the run directory, passages, an index, a query encoder for a
dense index, a reranker and a generator exist; the dense index was built with the query encoder's
fingerprint; each index holds as many passages as the passages Parquet. The loaders check that each
tokenizer fits its model's vocabulary (:func:`check_vocab`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from re2g.config import CONFIG_FILENAME, Re2GConfig, load_config
from re2g.errors import ArtifactError
from re2g.layout import RunLayout
from re2g.stages import Generator, Reranker, Retriever

# model subdirectories of RUN_DIR/models, in the order they are tried
BIENCODER_DIRS = ("dpr", "dpr_init", "biencoder")
RERANKER_DIR = "reranker"
GENERATOR_DIR = "generator"


def run_config(run_dir: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()) -> Re2GConfig:
    """The run's config: ``config`` when given, else ``RUN_DIR/config.yaml``, else the ``tiny`` preset;
    then ``overrides`` (``section.field=value``)."""
    if config is not None:
        return load_config(config, overrides=list(overrides))
    saved = Path(run_dir) / CONFIG_FILENAME
    if saved.is_file():
        return load_config(saved, overrides=list(overrides))
    return load_config(preset="tiny", overrides=list(overrides))


@dataclass(frozen=True)
class RunPieces:
    """What a run directory provides, as found by :func:`resolve_run`."""

    run_dir: str
    passages: str
    dense_dir: str | None        # RUN_DIR/index/dense when it has a manifest
    bm25_dir: str | None         # RUN_DIR/index/bm25 when it exists
    biencoder: str | None        # query encoder: a local directory or a hub name (None: BM25 only)
    reranker: str
    generator: str
    passage_count: int
    fingerprint: str | None      # the dense index's encoder fingerprint

    @property
    def query_tokenizer_source(self) -> str:
        """Where the tokenizer that counts query tokens lives (the query encoder's, else the reranker's)."""
        if self.biencoder is not None and (Path(self.biencoder) / "tokenizer").is_dir():
            return str(Path(self.biencoder) / "tokenizer")
        return self.biencoder or self.reranker


def _model_dir(layout: RunLayout, name: str) -> str | None:
    p = Path(layout.model(name))
    return str(p) if p.is_dir() else None


def pick_biencoder_dir(layout: RunLayout) -> str | None:
    """The first of ``models/{dpr,dpr_init,biencoder}`` whose saved fingerprint equals the dense index's
    encoder fingerprint; else the first that exists; None when none does."""
    from re2g.index.dense import read_manifest
    from re2g.models.fingerprint import read_model_meta

    existing = [d for d in (_model_dir(layout, n) for n in BIENCODER_DIRS) if d is not None]
    try:
        want = read_manifest(layout.dense_index)["encoder_fingerprint"]
    except ArtifactError:
        want = None
    for d in existing:
        meta = read_model_meta(d) or {}
        if want is not None and meta.get("fingerprint") == want:
            return d
    return existing[0] if existing else None


def count_passages(passages: str) -> int:
    """Rows of a passages Parquet directory (metadata only)."""
    import pyarrow.dataset as ds

    try:
        return int(ds.dataset(passages, format="parquet").count_rows())
    except Exception as e:
        raise ArtifactError(f"{passages}: not a readable passages Parquet: {e}") from None


def _check_dense(dense_dir: Path, biencoder: str, passages: Path, n_passages: int) -> str | None:
    """The dense index's encoder fingerprint, after checking it against the query encoder's saved one
    and its vector count against the passages."""
    from re2g.index.dense import read_manifest
    from re2g.models.fingerprint import read_model_meta

    manifest = read_manifest(dense_dir)
    fingerprint = manifest.get("encoder_fingerprint")
    saved = ((read_model_meta(biencoder) if Path(biencoder).is_dir() else None) or {}).get("fingerprint")
    if fingerprint and saved and saved != fingerprint:
        raise ArtifactError(
            f"{dense_dir} was built with the encoder {fingerprint}, but the query encoder {biencoder} is "
            f"{saved}: they do not belong together (re-embed and re-index with this encoder: `re2g embed`, "
            "`re2g index`; or put the encoder the index was built with in RUN_DIR/models/)")
    if int(manifest["total_count"]) != n_passages:
        raise ArtifactError(f"{dense_dir} holds {manifest['total_count']} vectors but {passages} has "
                            f"{n_passages} passages: index and passages come from different corpora "
                            "(rebuild the index)")
    return fingerprint


def resolve_run(run_dir: str | Path, cfg: Re2GConfig, *, biencoder: str | Path | None = None,
                reranker: str | Path | None = None, generator: str | Path | None = None) -> RunPieces:
    """Check a run directory on files alone (no model is loaded) and say what it provides (see the
    module docstring). ``biencoder`` / ``reranker`` / ``generator`` name other model directories (e.g.
    a stage-4 checkpoint's models) instead of the run's.

    Raises :class:`ArtifactError` naming the problem and the fix: missing run directory, passages,
    index or model; a dense index built with another encoder than the query encoder found; an index
    with a different passage count than the passages."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ArtifactError(f"{run}: run directory not found (make one with the quickstart, or pass another)")
    layout = RunLayout(str(run))
    passages = Path(layout.passages)
    if not passages.is_dir():
        raise ArtifactError(f"{passages}: passages not found (run `re2g passages` for this run)")
    dense_dir, bm25_dir = Path(layout.dense_index), Path(layout.bm25_index)
    has_dense, has_bm25 = (dense_dir / "manifest.json").is_file(), bm25_dir.is_dir()
    if not (has_dense or has_bm25):
        raise ArtifactError(f"{run}: no index: neither {dense_dir} nor {bm25_dir} exists (run `re2g index`)")
    n_passages = count_passages(str(passages))

    m = cfg.models
    query_encoder = fingerprint = None
    if has_dense:
        source = biencoder or pick_biencoder_dir(layout) or m.query_encoder
        if source is None:
            raise ArtifactError(f"{run}: a dense index but no query encoder: none of "
                                f"{', '.join(layout.model(n) for n in BIENCODER_DIRS)} exists and "
                                "models.query_encoder is not set")
        query_encoder = str(source)
        fingerprint = _check_dense(dense_dir, query_encoder, passages, n_passages)
    if has_bm25:
        from re2g.index.bm25 import read_manifest as read_bm25_manifest

        count = int(read_bm25_manifest(bm25_dir)["count"])
        if count != n_passages:
            raise ArtifactError(f"{bm25_dir} holds {count} passages but {passages} has {n_passages}: index "
                                "and passages come from different corpora (rebuild the index)")

    found = {}
    for what, given, sub in (("reranker", reranker, RERANKER_DIR), ("generator", generator, GENERATOR_DIR)):
        found[what] = given or _model_dir(layout, sub) or getattr(m, what)
        if found[what] is None:
            raise ArtifactError(f"{run}: no {what}: {layout.model(sub)} does not exist and models.{what} is not set")
    return RunPieces(run_dir=str(run), passages=str(passages), dense_dir=str(dense_dir) if has_dense else None,
                     bm25_dir=str(bm25_dir) if has_bm25 else None, biencoder=query_encoder,
                     reranker=str(found["reranker"]), generator=str(found["generator"]), passage_count=n_passages,
                     fingerprint=fingerprint)


# --------------------------------------------------------------------------- loaders


def check_vocab(tokenizer: Any, model: Any, what: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding matrix (a tokenizer and a model from
    different checkpoints would fail on the first rare token, or silently read the wrong rows)."""
    n_tok = len(tokenizer)
    rows = int(model.get_input_embeddings().num_embeddings)
    if n_tok > rows:
        raise ArtifactError(f"{what}: the tokenizer has {n_tok} tokens but the model's embedding matrix has "
                            f"{rows} rows: tokenizer and model come from different checkpoints")


def load_query_encoder(pieces: RunPieces, cfg: Re2GConfig, device: str = "cpu"):
    """The bi-encoder whose query side encodes queries (None for a BM25-only run), vocabulary checked,
    in eval mode on ``device``."""
    if pieces.biencoder is None:
        return None
    from re2g.models.encoders import BiEncoder
    from re2g.models.factory import load_biencoder

    m = cfg.models
    if Path(pieces.biencoder).is_dir():
        enc = BiEncoder.from_pretrained(pieces.biencoder, query_max_length=m.query_max_length,
                                        passage_max_length=m.passage_max_length)
    else:
        enc = load_biencoder(m)
    check_vocab(enc.tokenizer, enc.query_encoder, f"query encoder {pieces.biencoder}")
    return enc.to(device).eval()


def load_retriever(pieces: RunPieces, cfg: Re2GConfig, device: str = "cpu", *,
                   open_index: Callable[[RunPieces, Re2GConfig, str | None], Any] | None = None) -> Retriever:
    """The :class:`re2g.stages.Retriever` of a run: query encoder + dense index + BM25, fused as
    ``cfg.retrieval`` says. ``open_index(pieces, cfg, fingerprint)`` opens the dense index some other
    way (Serve's shard actors); default: the shards in this process, checked against the encoder."""
    from re2g.index.retrievers import open_retrievers

    enc = load_query_encoder(pieces, cfg, device)
    index = None
    if open_index is not None and pieces.dense_dir is not None:
        index = open_index(pieces, cfg, enc.fingerprint())
    found = open_retrievers(cfg, passages=pieces.passages, dense_dir=pieces.dense_dir, bm25_dir=pieces.bm25_dir,
                            query_encoder=enc, dense_index=index)
    return Retriever(cfg.retrieval, dense=found.get("dpr"), bm25=found.get("bm25"))


def load_reranker(pieces: RunPieces, cfg: Re2GConfig, device: str = "cpu") -> Reranker:
    """The :class:`re2g.stages.Reranker` of a run: the cross-encoder in eval mode, vocabulary checked,
    keeping ``retrieval.rerank_top_k``."""
    from re2g.models.reranker import CrossEncoder

    model = CrossEncoder.from_pretrained(pieces.reranker, max_length=cfg.models.reranker_max_length)
    check_vocab(model.tokenizer, model.model, f"reranker {pieces.reranker}")
    return Reranker(model.to(device).eval(), top_k=cfg.retrieval.rerank_top_k)


def load_generator(pieces: RunPieces, cfg: Re2GConfig, device: str = "cpu") -> Generator:
    """The :class:`re2g.stages.Generator` of a run: the generator in eval mode with the config's lengths
    and separators, vocabulary checked, decoding as ``cfg.generation`` says."""
    from re2g.models.causal import load_any_generator

    m, g = cfg.models, cfg.generation
    model = load_any_generator(pieces.generator, kind=m.generator_kind,   # seq2seq or causal LM
                               source_max_length=m.generator_source_max_length,
                               target_max_length=m.generator_target_max_length, title_sep=g.title_sep,
                               query_sep=g.query_sep, prompt_template=m.generator_prompt_template,
                               chat_template=m.generator_chat_template)
    check_vocab(model.tokenizer, model.model, f"generator {pieces.generator}")
    return Generator(model.to(device).eval(), g)
