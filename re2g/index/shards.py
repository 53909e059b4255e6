"""Dense index shards held by Ray actors: scatter a query batch to every shard, gather, merge top-k.

The same code serves training workers (retrieval during training, KD over BM25 hits) and Serve
replicas: the actors are *named*, so any process in the cluster can attach to them with
``ActorShardedIndex.attach(name_prefix, num_shards, namespace=...)`` (``ray.get_actor`` under the
hood), and an ``ActorShardedIndex`` pickles (it holds only actor handles and the manifest).

``ActorShardedIndex.search_vectors`` returns exactly what ``DenseIndex.search_vectors`` returns
for the same directory: each actor runs ``DenseShard.search`` and the driver runs ``merge_topk``.
The library never calls ``ray.init``; connect first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import ray

from re2g.errors import ArtifactError
from re2g.index.dense import (
    DenseIndexInfo,
    DenseShard,
    PassageInfo,
    ShardResult,
    _check_queries,
    check_fingerprint,
    hits_from_merged,
    load_passage_lookup,
    merge_topk,
    read_manifest,
    stack_vectors,
)
from re2g.types import Hit


@ray.remote
class ShardActor:
    """A Ray actor holding one ``DenseShard`` (a thin wrapper: load once, then search)."""

    def __init__(self, index_dir: str, entry: dict, manifest: dict, verify: bool = False,
                 ef_search: int | None = None, threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))
        self._error: BaseException | None = None
        self._shard: DenseShard | None = None
        try:
            self._shard = DenseShard.load(index_dir, entry, manifest, verify=verify, ef_search=ef_search)
        except BaseException as e:  # reported by ready(), so the caller sees the real error
            self._error = e

    def ready(self) -> int:
        """Raise the load error, if any; else the shard's vector count."""
        if self._error is not None:
            raise self._error
        return len(self._shard)

    def search(self, Q: np.ndarray, k: int) -> ShardResult:
        """This shard's top-``k`` for ``Q`` (B, D)."""
        return self._shard.search(Q, k)

    def set_ef_search(self, ef: int) -> None:
        self._shard.set_ef_search(ef)

    def lookup_vectors(self, pids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors (D,) of those ``pids`` stored in this shard."""
        return self._shard.lookup_vectors(pids)


def default_name_prefix(manifest: dict) -> str:
    """Actor name prefix for an index: stable for one build (the manifest's ``index_id``)."""
    return f"re2g-dense-{manifest['index_id'][:12]}-shard-"


class ActorShardedIndex:
    """A dense index whose shards live in Ray actors; same ``search_vectors``/``get_vectors`` as
    :class:`re2g.index.dense.DenseIndex`, with identical results."""

    def __init__(self, actors: list, manifest: dict, path: str | None, names: list[str],
                 namespace: str | None, passages: Mapping[str, PassageInfo] | None = None):
        self.actors = actors
        self.manifest = manifest
        self.path = path
        self.names = names
        self.namespace = namespace
        self.passages = passages

    @classmethod
    def start(cls, index_dir: str | Path, *, expected_fingerprint: str | None = None, verify: bool = False,
              ef_search: int | None = None, num_cpus: float = 0.25, threads: int = 1,
              resources: dict[str, float] | None = None, spread: bool = True,
              name_prefix: str | None = None, namespace: str | None = None,
              get_if_exists: bool = True, detached: bool = False, max_restarts: int = 0,
              actor_options: dict[str, Any] | None = None,
              passages: Mapping[str, PassageInfo] | str | Path | None = None) -> "ActorShardedIndex":
        """One named ``ShardActor`` per shard of ``index_dir``, loaded and checked before returning.

        ``num_cpus`` (fractional is fine) and ``resources`` per actor; ``spread`` uses Ray's SPREAD
        scheduling so shards land on different nodes; names are ``{name_prefix}{i:03d}``
        (default prefix from the index id) in ``namespace`` (default: the job's). With
        ``get_if_exists`` an actor of that name already running is reused. ``detached`` actors
        outlive this driver. ``max_restarts``: Ray restarts a shard actor that died (its node lost,
        out of memory) up to that many times (-1: always), reloading the shard, and retries the
        searches sent meanwhile (they only read). Each actor checks its shard's files by size and ends
        (``verify``: by sha256 too; ``re2g index verify`` checks them on demand). Raises
        :class:`ArtifactError` (missing/truncated/changed shard, fingerprint mismatch); on error the
        actors started here are killed.
        """
        d = Path(index_dir).absolute()
        m = read_manifest(d)
        check_fingerprint(d, m, expected_fingerprint)
        prefix = name_prefix or default_name_prefix(m)
        actors, names = [], []
        try:
            for i, entry in enumerate(m["shards"]):
                name = f"{prefix}{i:03d}"
                opts: dict[str, Any] = {"name": name, "num_cpus": num_cpus, "get_if_exists": get_if_exists}
                if namespace is not None:
                    opts["namespace"] = namespace
                if resources:
                    opts["resources"] = resources
                if spread:
                    opts["scheduling_strategy"] = "SPREAD"
                if detached:
                    opts["lifetime"] = "detached"
                if max_restarts:
                    opts["max_restarts"] = opts["max_task_retries"] = max_restarts
                opts.update(actor_options or {})
                actors.append(ShardActor.options(**opts).remote(str(d), entry, m, verify, ef_search, threads))
                names.append(name)
            counts = ray.get([a.ready.remote() for a in actors])
        except BaseException as e:
            for a in actors:
                ray.kill(a)
            cause = getattr(e, "cause", None)  # a RayTaskError wraps the actor's own exception
            if isinstance(cause, ArtifactError):
                raise ArtifactError(str(cause)) from None
            raise
        if sum(counts) != m["total_count"]:
            for a in actors:
                ray.kill(a)
            raise ArtifactError(f"{d}: shard actors hold {sum(counts)} vectors, manifest says {m['total_count']}")
        idx = cls(actors, m, str(d), names, namespace)
        if passages is not None:
            idx.attach_passages(passages)
        return idx

    @classmethod
    def attach(cls, name_prefix: str, num_shards: int, *, namespace: str | None = None,
               manifest: dict | None = None, index_dir: str | Path | None = None) -> "ActorShardedIndex":
        """Look up running shard actors by name (from a training worker or a Serve replica).

        The manifest comes from ``manifest`` or ``index_dir`` (needed for the query dimension)."""
        if manifest is None:
            if index_dir is None:
                raise ValueError("attach needs the index manifest or its directory")
            manifest = read_manifest(index_dir)
        names = [f"{name_prefix}{i:03d}" for i in range(num_shards)]
        actors = []
        for n in names:
            try:
                actors.append(ray.get_actor(n, namespace=namespace))
            except ValueError:
                raise ArtifactError(f"shard actor {n!r} not found in namespace {namespace!r} "
                                    "(start it with ActorShardedIndex.start)") from None
        return cls(actors, manifest, None if index_dir is None else str(index_dir), names, namespace)

    @property
    def info(self) -> DenseIndexInfo:
        return DenseIndexInfo.from_manifest(self.path or "", self.manifest)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def encoder_fingerprint(self) -> str:
        return self.manifest["encoder_fingerprint"]

    @property
    def name_prefix(self) -> str:
        return self.names[0][:-3] if self.names else ""

    def __len__(self) -> int:
        return int(self.manifest["total_count"])

    def attach_passages(self, passages: Mapping[str, PassageInfo] | str | Path) -> None:
        """Fill hits' title/text/wikipedia_id (resolved in the caller, not in the actors; a path opens
        the memory-mapped passage store, which pickles as its path)."""
        self.passages = passages if isinstance(passages, Mapping) else load_passage_lookup(passages)

    def set_ef_search(self, ef: int) -> None:
        """Override HNSW efSearch in every shard actor."""
        ray.get([a.set_ef_search.remote(ef) for a in self.actors])

    def search_vectors(self, Q: np.ndarray, k: int) -> list[list[Hit]]:
        """Scatter ``Q`` (B, D) to every shard actor, gather, merge: B lists of top-``k`` ``Hit``."""
        Q = _check_queries(Q, self.dim)
        if k <= 0:
            return [[] for _ in range(Q.shape[0])]
        q_ref = ray.put(Q)
        results = ray.get([a.search.remote(q_ref, k) for a in self.actors])
        return hits_from_merged(merge_topk(results, k), self.passages)

    def get_vectors(self, pids: Sequence[str]) -> np.ndarray:
        """Stored passage vectors (len(pids), D) float32; ``KeyError`` naming an unknown pid."""
        pids = list(pids)
        found: dict[str, np.ndarray] = {}
        for part in ray.get([a.lookup_vectors.remote(pids) for a in self.actors]):
            found.update(part)
        return stack_vectors(pids, found, self.dim)

    def shutdown(self) -> None:
        """Kill the shard actors (also for other processes attached to them)."""
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
