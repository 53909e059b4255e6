"""What the Serve app needs from a run directory besides :mod:`re2g.run`: the dense shards in named Ray
actors shared by every retriever replica, and the tokenizer the ingress counts query tokens with.

The run directory itself is resolved and checked by :func:`re2g.run.resolve_run` (``preflight`` here,
run where the app is built so ``re2g serve`` and ``serve run`` fail at once with a clear message, and
again in each replica), and each replica loads its one stage with the loaders of :mod:`re2g.run` (the
same the in-process pipeline uses, vocabulary checked).

* :func:`start_shard_index` / :func:`stop_shard_actors` -- the dense shards in named Ray actors
  (``re2g.index.shards.ActorShardedIndex``) shared by every retriever replica;
* :func:`load_query_tokenizer` -- the query encoder's tokenizer, for the ingress's token limit.
"""

from __future__ import annotations

from pathlib import Path

from re2g.config import Re2GConfig
from re2g.errors import ArtifactError
from re2g.layout import RunLayout
from re2g.run import RunPieces, check_vocab  # noqa: F401  (tests and scripts import them from here)
from re2g.run import resolve_run as preflight  # noqa: F401
from re2g.run import run_config as resolve_config  # noqa: F401

SHARD_NAMESPACE = "re2g-serve"   # Ray namespace of the shard actors the retriever replicas share


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


def load_query_tokenizer(pieces: RunPieces):
    """The tokenizer that counts a query's tokens for the token limit (the query encoder's)."""
    from re2g.models.encoders import load_tokenizer

    return load_tokenizer(pieces.query_tokenizer_source, "query tokenizer")
