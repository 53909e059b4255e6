"""Loading a run directory's pieces for the Serve deployments, and checking that they belong together.

The deployments are thin wrappers over re2g's classes; this module finds and loads those classes the
way :meth:`re2g.pipeline.Re2GPipeline.from_run_dir` does (same directories, same order), one piece at
a time, because each deployment holds only its own piece:

* :func:`preflight` -- cheap checks on files only, run where the app is built (so ``re2g serve`` and
  ``serve run`` fail at once with a clear message): the run directory, passages, indexes and models
  exist; the dense index was built with the bi-encoder that will encode queries (fingerprints); the
  indexes hold as many passages as the passages Parquet.
* :func:`load_retriever`, :func:`load_reranker`, :func:`load_generator` -- run in the replicas; each
  also checks that its tokenizer fits its model's vocabulary (:func:`check_vocab`).
* :func:`start_shard_index` / :func:`stop_shard_actors` -- the dense shards in named Ray actors
  (``re2g.index.shards.ActorShardedIndex``) shared by every retriever replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from re2g.config import CONFIG_FILENAME, Re2GConfig, load_config
from re2g.errors import ArtifactError
from re2g.layout import RunLayout

SHARD_NAMESPACE = "re2g-serve"   # Ray namespace of the shard actors the retriever replicas share


def resolve_config(run_dir: str | Path, config: str | Path | None = None,
                   overrides: Sequence[str] = ()) -> Re2GConfig:
    """The run's config: ``config`` when given, else ``RUN_DIR/config.yaml``, else the ``tiny`` preset;
    then ``overrides`` (``section.field=value``)."""
    if config is not None:
        return load_config(config, overrides=list(overrides))
    saved = Path(run_dir) / CONFIG_FILENAME
    if saved.is_file():
        return load_config(saved, overrides=list(overrides))
    return load_config(preset="tiny", overrides=list(overrides))


def _dir(layout: RunLayout, name: str) -> str | None:
    p = Path(layout.model(name))
    return str(p) if p.is_dir() else None


@dataclass(frozen=True)
class RunPieces:
    """What a run directory provides, as found by :func:`preflight`."""

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


def count_passages(passages: str) -> int:
    """Rows of a passages Parquet directory (metadata only)."""
    import pyarrow.dataset as ds

    try:
        return int(ds.dataset(passages, format="parquet").count_rows())
    except Exception as e:
        raise ArtifactError(f"{passages}: not a readable passages Parquet: {e}") from None


def preflight(run_dir: str | Path, cfg: Re2GConfig) -> RunPieces:
    """Check a run directory on files alone (no model is loaded) and say what it provides.

    Raises :class:`ArtifactError` naming the problem and the fix: missing run directory, passages,
    index or model; a dense index built with another encoder than the query encoder found; an index
    with a different passage count than the passages."""
    from re2g.index.dense import read_manifest
    from re2g.models.fingerprint import read_model_meta
    from re2g.pipeline import BIENCODER_DIRS, GENERATOR_DIR, RERANKER_DIR, pick_biencoder_dir

    run = Path(run_dir)
    if not run.is_dir():
        raise ArtifactError(f"{run}: run directory not found (make one with the quickstart, or pass another)")
    layout = RunLayout(str(run))
    passages = Path(layout.passages)
    if not passages.is_dir():
        raise ArtifactError(f"{passages}: passages not found (run `re2g passages` for this run)")
    dense_dir = Path(layout.dense_index)
    bm25_dir = Path(layout.bm25_index)
    has_dense = (dense_dir / "manifest.json").is_file()
    has_bm25 = bm25_dir.is_dir()
    if not (has_dense or has_bm25):
        raise ArtifactError(f"{run}: no index: neither {dense_dir} nor {bm25_dir} exists (run `re2g index`)")
    n_passages = count_passages(str(passages))

    biencoder = fingerprint = None
    if has_dense:
        manifest = read_manifest(dense_dir)
        fingerprint = manifest.get("encoder_fingerprint")
        biencoder = pick_biencoder_dir(layout) or cfg.models.query_encoder
        if biencoder is None:
            raise ArtifactError(f"{run}: a dense index but no query encoder: none of "
                                f"{', '.join(layout.model(n) for n in BIENCODER_DIRS)} exists and "
                                "models.query_encoder is not set")
        meta = read_model_meta(biencoder) if Path(biencoder).is_dir() else None
        saved = (meta or {}).get("fingerprint")
        if fingerprint and saved and saved != fingerprint:
            raise ArtifactError(
                f"{dense_dir} was built with the encoder {fingerprint}, but the query encoder {biencoder} is "
                f"{saved}: they do not belong together (re-embed and re-index with this encoder: `re2g embed`, "
                "`re2g index`; or put the encoder the index was built with in RUN_DIR/models/)")
        if int(manifest["total_count"]) != n_passages:
            raise ArtifactError(f"{dense_dir} holds {manifest['total_count']} vectors but {passages} has "
                                f"{n_passages} passages: index and passages come from different corpora "
                                "(rebuild the index)")
    if has_bm25:
        from re2g.index.bm25 import read_manifest as read_bm25_manifest

        count = int(read_bm25_manifest(bm25_dir)["count"])
        if count != n_passages:
            raise ArtifactError(f"{bm25_dir} holds {count} passages but {passages} has {n_passages}: index "
                                "and passages come from different corpora (rebuild the index)")

    m = cfg.models
    reranker = _dir(layout, RERANKER_DIR) or m.reranker
    generator = _dir(layout, GENERATOR_DIR) or m.generator
    for what, src, sub in (("reranker", reranker, RERANKER_DIR), ("generator", generator, GENERATOR_DIR)):
        if src is None:
            raise ArtifactError(f"{run}: no {what}: {layout.model(sub)} does not exist and models.{what} is not set")
    return RunPieces(run_dir=str(run), passages=str(passages), dense_dir=str(dense_dir) if has_dense else None,
                     bm25_dir=str(bm25_dir) if has_bm25 else None, biencoder=biencoder, reranker=str(reranker),
                     generator=str(generator), passage_count=n_passages, fingerprint=fingerprint)


# --------------------------------------------------------------------------- checks on loaded models


def check_vocab(tokenizer: Any, model: Any, what: str) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding matrix (a tokenizer and a model from
    different checkpoints would fail on the first rare token, or silently read the wrong rows)."""
    n_tok = len(tokenizer)
    rows = int(model.get_input_embeddings().num_embeddings)
    if n_tok > rows:
        raise ArtifactError(f"{what}: the tokenizer has {n_tok} tokens but the model's embedding matrix has "
                            f"{rows} rows: tokenizer and model come from different checkpoints")


# --------------------------------------------------------------------------- loaders (in the replicas)


def load_query_encoder(pieces: RunPieces, cfg: Re2GConfig, device: str):
    """The bi-encoder whose query side encodes queries (None for a BM25-only run), vocabulary checked."""
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


def start_shard_index(pieces: RunPieces, cfg: Re2GConfig, fingerprint: str | None):
    """Start (or attach to, when a replica started them already) one named, detached Ray actor per
    dense shard; every retriever replica searches the same actors. Stop them with
    :func:`stop_shard_actors`."""
    from re2g.index.shards import ActorShardedIndex

    return ActorShardedIndex.start(pieces.dense_dir, expected_fingerprint=fingerprint, ef_search=cfg.index.ef_search,
                                   num_cpus=cfg.serve.shard_actor_cpus, namespace=SHARD_NAMESPACE,
                                   resources=cfg.serve.shard_actor_resources or None,
                                   max_restarts=cfg.serve.shard_actor_max_restarts, get_if_exists=True, detached=True)


def stop_shard_actors(run_dir: str | Path) -> int:
    """Kill the shard actors serving ``RUN_DIR/index/dense`` (if running); returns how many were found."""
    from re2g.index.dense import read_manifest
    from re2g.index.shards import ActorShardedIndex, default_name_prefix

    dense = Path(RunLayout(str(run_dir)).dense_index)
    if not (dense / "manifest.json").is_file():
        return 0
    m = read_manifest(dense)
    try:
        idx = ActorShardedIndex.attach(default_name_prefix(m), len(m["shards"]), namespace=SHARD_NAMESPACE, manifest=m)
    except ArtifactError:
        return 0
    n = len(idx.actors)
    idx.shutdown()
    return n


@dataclass
class LoadedRetriever:
    """The retriever of a replica and its parts (for health checks)."""

    retriever: Any               # HybridRetriever, DenseRetriever or BM25Retriever: batch_search(queries, k)
    query_encoder: Any | None
    dense_index: Any | None      # DenseIndex or ActorShardedIndex
    bm25: Any | None
    retrieve_k: int


def load_retriever(pieces: RunPieces, cfg: Re2GConfig, device: str, *, shard_actors: bool = False) -> LoadedRetriever:
    """Query encoder + dense shards (in this process, or in shard actors) + BM25, fused as
    ``cfg.retrieval`` says (``re2g.index.retrievers.open_retrievers``)."""
    from re2g.index.retrievers import open_retrievers

    enc = load_query_encoder(pieces, cfg, device)
    r = cfg.retrieval
    retrieve_k = (r.dpr_top_k if pieces.dense_dir else 0) + (r.bm25_top_k if pieces.bm25_dir else 0)
    if shard_actors and pieces.dense_dir is not None:
        from re2g.index.dense import DenseRetriever
        from re2g.index.fusion import HybridRetriever

        index = start_shard_index(pieces, cfg, enc.fingerprint())
        dense = DenseRetriever(index, enc, passages=pieces.passages)
        bm25 = None
        if pieces.bm25_dir is not None:
            from re2g.index.bm25 import BM25Retriever

            bm25 = BM25Retriever.from_dir(pieces.bm25_dir, threads=cfg.bm25.threads)
        retriever = HybridRetriever(dense, bm25, r) if bm25 is not None else dense
        return LoadedRetriever(retriever, enc, index, bm25, retrieve_k)
    found = open_retrievers(cfg, passages=pieces.passages, dense_dir=pieces.dense_dir, bm25_dir=pieces.bm25_dir,
                            query_encoder=enc)
    retriever = found.get("hybrid") or found.get("dpr") or found.get("bm25")
    dense = found.get("dpr")
    return LoadedRetriever(retriever, enc, dense.index if dense is not None else None, found.get("bm25"), retrieve_k)


def load_reranker(pieces: RunPieces, cfg: Re2GConfig, device: str):
    """The cross-encoder, in eval mode, vocabulary checked."""
    from re2g.models.reranker import CrossEncoder

    model = CrossEncoder.from_pretrained(pieces.reranker, max_length=cfg.models.reranker_max_length)
    check_vocab(model.tokenizer, model.model, f"reranker {pieces.reranker}")
    return model.to(device).eval()


def load_generator(pieces: RunPieces, cfg: Re2GConfig, device: str):
    """The generator (BART), in eval mode, vocabulary checked."""
    from re2g.models.generator import Generator

    m, g = cfg.models, cfg.generation
    model = Generator.from_pretrained(pieces.generator, source_max_length=m.generator_source_max_length,
                                      target_max_length=m.generator_target_max_length,
                                      title_sep=g.title_sep, query_sep=g.query_sep)
    check_vocab(model.tokenizer, model.model, f"generator {pieces.generator}")
    return model.to(device).eval()


def load_query_tokenizer(pieces: RunPieces):
    """The tokenizer that counts a query's tokens for the token limit (the query encoder's)."""
    from re2g.models.encoders import load_tokenizer

    return load_tokenizer(pieces.query_tokenizer_source, "query tokenizer")
