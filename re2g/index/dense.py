"""Dense passage index: faiss shards (HNSW or flat) over DPR passage embeddings.

The artifact is a directory::

    manifest.json                 kind ``dense-index`` in the one manifest schema (re2g.artifacts):
                                  config, fingerprints.encoder, counts.vectors, checksums (sha256 of
                                  every shard file), sizes and ends_sha256 (bytes, and a hash of the
                                  size and first/last 64 KiB, per file: what a normal load checks),
                                  and dim, metric, transform (incl. the MIPS max norm), quantization,
                                  HNSW params, shards
    config.yaml                   the IndexConfig that built it
    shard_00000.faiss             one faiss index per shard (shard-local ids 0..count-1)
    shard_00000.pids.parquet      the shard's pids, in shard-local id order
    shard_00000.vectors.npy       sq8, pq and opq shards only: the original vectors (N_s, D) float32, for
                                  fetch-by-pid (a float32 shard gives them back from its own storage,
                                  ``reconstruct_batch``; indexes built before that have the file for
                                  every shard and still use it)

It is written to a temporary sibling directory and renamed at the end, so a crash never leaves a
directory that loads. Each shard is built by its own Ray task over a contiguous slice of the
embeddings (``build_dense_index``); shards are searched together and their top-k merged
(``DenseIndex.search_vectors``; ``re2g.index.shards.ActorShardedIndex`` does the same with one Ray
actor per shard).

Shard kinds (``index.exact``, ``index.quantization``, ``index.pq_coarse``): flat, HNSW-Flat, SQ8
(flat or HNSW), and product quantization: IVF-PQ, OPQ + IVF-PQ, HNSW over PQ codes (faiss
``index_factory`` strings ``[OPQ{m},]IVF{nlist},PQ{m}x{nbits}`` / ``HNSW{M}_PQ{m}x{nbits}``; nlist per
shard from its size; the manifest's ``pq`` block and each shard's ``factory`` record them). PQ codes
give vectors back only approximately, so stages 2 and 4 read PQ shards' original vectors from their
``.vectors.npy`` (docs/scaling.md has the measured error).

Metrics: ``mips_l2`` (DPR's MIPS->L2 transform: passages get one extra dimension
sqrt(max_norm_sq - |v|^2), queries get 0; the global max norm is computed in a first pass over all
embeddings) or ``ip`` (faiss inner-product metric). Hit scores are always inner products.

Paths are local (or a shared file system that every Ray worker sees at the same path).

Modules: :mod:`re2g.index.dense_format` (the manifest and the pure math), :mod:`re2g.index.dense_build`
(building), this one (loading and searching; it re-exports the names of the other two, and the
passage lookup of :mod:`re2g.data.passage_files`, so callers import everything from here).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from re2g.data.passage_files import PassageInfo, PassageLookup, load_passage_lookup  # noqa: F401  (re-exported)
from re2g.errors import ArtifactError
from re2g.index.dense_build import (  # noqa: F401  (re-exported)
    EmbeddingsStats,
    hnsw_graph,
    build_dense_index,
    build_shard,
    make_faiss_index,
    read_embedding_rows,
    scan_embeddings,
)
from re2g.index.dense_format import (  # noqa: F401  (re-exported)
    ENDS_BYTES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    DenseIndexInfo,
    ShardResult,
    check_fingerprint,
    checked_file,
    ends_sha256,
    l2_to_ip,
    manifest_view,
    merge_topk,
    mips_to_l2_passages,
    mips_to_l2_queries,
    read_manifest,
    shard_bounds,
    shard_file_names,
)
from re2g.types import Hit

log = logging.getLogger(__name__)
_WARNED_NO_SIZES: set[str] = set()


def _checked_path(index_dir: Path, name: str, manifest: dict, verify: bool, what: str) -> Path:
    if not manifest.get("sizes") and str(index_dir) not in _WARNED_NO_SIZES:
        _WARNED_NO_SIZES.add(str(index_dir))
        log.warning("dense index %s records no file sizes (built before re2g recorded them): every file's "
                    "sha256 is checked at load, which is slow at scale; rebuild the index for fast loads", index_dir)
    return checked_file(index_dir, name, manifest, full=verify, what=what)


class DenseShard:
    """One loaded shard: the faiss index, its pids (shard-local id order), optional vectors.

    Used in-process by :class:`DenseIndex` and inside each ``ShardActor``.
    """

    def __init__(self, index, pids: np.ndarray, entry: dict, manifest: dict, vectors_path: Path | None):
        self.index = index
        self.pids = pids  # (N_s,) object
        self.entry = entry
        self.metric = manifest["metric"]
        self.max_norm_sq = float(manifest["transform"].get("max_norm_sq") or 0.0)
        self.dim = int(manifest["dim"])
        self.quantization = manifest.get("quantization")
        self._vectors_path = vectors_path
        self._vectors: np.ndarray | None = None
        self._row_of: dict[str, int] | None = None

    @classmethod
    def load(cls, index_dir: str | Path, entry: dict, manifest: dict, *, verify: bool = False,
             ef_search: int | None = None, nprobe: int | None = None) -> "DenseShard":
        """Load shard ``entry`` of the manifest; checks its files exist with the recorded sizes and
        ends (:func:`~re2g.index.dense_format.checked_file`), and with ``verify`` their sha256 too.
        ``ef_search`` / ``nprobe`` override the manifest's (HNSW / IVF shards)."""
        import faiss
        import pyarrow.parquet as pq

        d = Path(index_dir)
        fpath = _checked_path(d, entry["file"], manifest, verify, "shard index")
        ppath = _checked_path(d, entry["pid_file"], manifest, verify, "shard pid")
        vpath = None
        if entry.get("vectors_file"):
            vpath = _checked_path(d, entry["vectors_file"], manifest, verify, "shard vectors")
        try:
            index = faiss.read_index(str(fpath))
        except Exception as e:
            raise ArtifactError(f"{fpath}: cannot read faiss index (corrupt?): {e}") from None
        try:
            pids = np.asarray(pq.read_table(ppath, columns=["pid"]).column("pid").to_pylist(), dtype=object)
        except Exception as e:
            raise ArtifactError(f"{ppath}: cannot read shard pids (corrupt?): {e}") from None
        if entry.get("faiss_index") and not _is_faiss_type(index, entry["faiss_index"]):
            raise ArtifactError(f"{fpath}: is a faiss {type(index).__name__}, the manifest says {entry['faiss_index']}")
        if index.ntotal != entry["count"] or len(pids) != entry["count"]:
            raise ArtifactError(f"{fpath}: holds {index.ntotal} vectors and {len(pids)} pids, manifest says "
                                f"{entry['count']}")
        shard = cls(index, pids, entry, manifest, vpath)
        hnsw = manifest.get("hnsw") or {}
        shard.set_ef_search(ef_search if ef_search is not None else hnsw.get("ef_search"))
        shard.set_nprobe(nprobe if nprobe is not None else (manifest.get("pq") or {}).get("nprobe"))
        return shard

    def set_ef_search(self, ef: int | None) -> None:
        """Set HNSW efSearch (no-op for flat and IVF shards or ``None``; through an OPQ rotation)."""
        hnsw = hnsw_graph(self.index)
        if ef is not None and hnsw is not None:
            hnsw.efSearch = int(ef)

    def set_nprobe(self, nprobe: int | None) -> None:
        """Set IVF nprobe, the inverted lists searched per query (no-op for other shards or ``None``)."""
        import faiss

        if nprobe is None:
            return
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:  # not an IVF index
            return
        ivf.nprobe = int(nprobe)

    def __len__(self) -> int:
        return len(self.pids)

    def search(self, Q: np.ndarray, k: int) -> ShardResult:
        """Top-``k`` of this shard for queries ``Q`` (B, D); scores are inner products."""
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        B = Q.shape[0]
        kk = min(k, len(self.pids))
        if kk <= 0 or B == 0:
            return ShardResult(np.full((B, 0), -np.inf), np.empty((B, 0), dtype=object))
        if self.metric == "mips_l2":
            dist, ids = self.index.search(mips_to_l2_queries(Q), kk)  # (B, kk)
            q_norm_sq = np.einsum("ij,ij->i", Q.astype(np.float64), Q.astype(np.float64))
            scores = l2_to_ip(dist, q_norm_sq, self.max_norm_sq)
        else:
            dist, ids = self.index.search(Q, kk)
            scores = dist.astype(np.float64)
        valid = ids >= 0
        scores = np.where(valid, scores, -np.inf)
        pids = np.empty(ids.shape, dtype=object)
        pids[valid] = self.pids[ids[valid]]
        return ShardResult(scores, pids)

    @property
    def vectors_in_index(self) -> bool:
        """The faiss index holds the original float32 vectors (flat or HNSW-Flat storage; the
        ``mips_l2`` column is appended after them), so ``reconstruct_batch`` returns them exactly."""
        return self.quantization in (None, "none")

    def lookup_vectors(self, pids: Iterable[str]) -> dict[str, np.ndarray]:
        """The original vectors (D,) of those ``pids`` that live in this shard: from the shard's
        ``.npy`` where it has one (sq8 shards; indexes built before issue 16), else from the faiss
        index's own float32 storage (``reconstruct_batch``, the first D columns)."""
        if self._vectors_path is None and not self.vectors_in_index:
            raise ArtifactError(f"shard {self.entry['file']}: a {self.quantization} index built without its "
                                "vectors (build_dense_index(store_vectors=True) to fetch vectors by pid)")
        if self._row_of is None:
            self._row_of = {p: i for i, p in enumerate(self.pids)}
        found = [p for p in pids if p in self._row_of]
        if not found:
            return {}
        rows = np.fromiter((self._row_of[p] for p in found), dtype=np.int64, count=len(found))  # (n,)
        if self._vectors_path is not None:
            if self._vectors is None:
                self._vectors = np.load(self._vectors_path, mmap_mode="r")
            V = np.asarray(self._vectors[rows], dtype=np.float32)  # (n, D)
        else:
            V = self.index.reconstruct_batch(rows)[:, :self.dim]  # (n, D') -> (n, D)
        return {p: V[i].copy() for i, p in enumerate(found)}


# =========================================================================== search over all shards


def _is_faiss_type(index, name: str) -> bool:
    return type(index).__name__ == name


def _check_queries(Q: np.ndarray, dim: int) -> np.ndarray:
    Q = np.asarray(Q, dtype=np.float32)
    if Q.ndim != 2 or Q.shape[1] != dim:
        raise ValueError(f"expected query vectors of shape (B, {dim}), got {Q.shape}")
    if not np.isfinite(Q).all():
        raise ValueError("query vectors contain NaN or inf")
    return np.ascontiguousarray(Q)


def hits_from_merged(merged: list[list[tuple[str, float]]],
                     passages: Mapping[str, PassageInfo] | None) -> list[list[Hit]]:
    """``(pid, score)`` lists -> ``Hit`` lists (source ``dpr``, 0-based ranks, passage fields when
    ``passages`` is given; a pid missing from it is an :class:`ArtifactError`)."""
    if passages is None:
        return [[Hit(pid, score, r, "dpr") for r, (pid, score) in enumerate(row)] for row in merged]
    pids = [pid for row in merged for pid, _ in row]
    if hasattr(passages, "get_many"):  # the passage store: one batched lookup for all the hits
        infos = passages.get_many(pids)
    else:
        infos = [passages.get(pid) for pid in pids]
    missing = [p for p, info in zip(pids, infos) if info is None]
    if missing:
        raise ArtifactError(f"pid {missing[0]!r} from the dense index is not in the passage lookup "
                            "(index and passages come from different corpora?)")
    it = iter(infos)
    return [[Hit(pid, score, r, "dpr", *next(it)) for r, (pid, score) in enumerate(row)] for row in merged]


class DenseIndex:
    """A loaded sharded dense index, searched in this process (all shards, top-k merged)."""

    def __init__(self, path: Path, manifest: dict, shards: list[DenseShard],
                 passages: Mapping[str, PassageInfo] | None = None):
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.passages = passages

    @classmethod
    def load(cls, index_dir: str | Path, *, expected_fingerprint: str | None = None, verify: bool = False,
             ef_search: int | None = None, nprobe: int | None = None, expected_settings: Any = None,
             passages: Mapping[str, PassageInfo] | str | Path | None = None) -> "DenseIndex":
        """Load an index directory.

        Checks the manifest, that every shard file exists with the size and ends recorded at build
        time (no file is hashed whole: a load stays fast at 60 GB), the vector counts, and refuses an
        index whose encoder fingerprint is not ``expected_fingerprint`` (when given). ``verify``:
        also every file's sha256 (what ``re2g index verify`` does; an index built before re2g
        recorded sizes is always checked that way). efSearch (HNSW) and nprobe (IVF-PQ) come
        from the manifest unless ``ef_search`` / ``nprobe`` override them. ``passages``: a lookup
        ``pid -> (title, text, wikipedia_id)`` or a passages Parquet path, to fill hits' text.
        """
        d = Path(index_dir)
        m = read_manifest(d)
        check_fingerprint(d, m, expected_fingerprint, expected_settings)
        shards = [DenseShard.load(d, e, m, verify=verify, ef_search=ef_search, nprobe=nprobe) for e in m["shards"]]
        total = sum(len(s) for s in shards)
        if total != m["total_count"]:
            raise ArtifactError(f"{d}: shards hold {total} vectors, manifest says {m['total_count']}")
        idx = cls(d, m, shards)
        if passages is not None:
            idx.attach_passages(passages)
        return idx

    @property
    def info(self) -> DenseIndexInfo:
        return DenseIndexInfo.from_manifest(self.path, self.manifest)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def encoder_fingerprint(self) -> str:
        return self.manifest["encoder_fingerprint"]

    def __len__(self) -> int:
        return int(self.manifest["total_count"])

    def attach_passages(self, passages: Mapping[str, PassageInfo] | str | Path) -> None:
        """Fill hits' title/text/wikipedia_id from a lookup or a passages Parquet path."""
        self.passages = passages if isinstance(passages, Mapping) else load_passage_lookup(passages)

    def set_ef_search(self, ef: int) -> None:
        """Override HNSW efSearch on every shard."""
        for s in self.shards:
            s.set_ef_search(ef)

    def set_nprobe(self, nprobe: int) -> None:
        """Override IVF nprobe on every shard (IVF-PQ / OPQ shards; others ignore it)."""
        for s in self.shards:
            s.set_nprobe(nprobe)

    def search_vectors(self, Q: np.ndarray, k: int) -> list[list[Hit]]:
        """Global top-``k`` for query vectors ``Q`` (B, D): B lists of ``Hit`` (scores = inner
        products, source ``dpr``, ranks 0..k-1)."""
        Q = _check_queries(Q, self.dim)
        if k <= 0:
            return [[] for _ in range(Q.shape[0])]
        results = [s.search(Q, k) for s in self.shards]
        return hits_from_merged(merge_topk(results, k), self.passages)

    def get_vectors(self, pids: Sequence[str]) -> np.ndarray:
        """Stored passage vectors for ``pids``: (len(pids), D) float32, in the order given.
        An unknown pid raises ``KeyError`` naming it."""
        found: dict[str, np.ndarray] = {}
        for s in self.shards:
            found.update(s.lookup_vectors(pids))
        return stack_vectors(pids, found, self.dim)


def stack_vectors(pids: Sequence[str], found: Mapping[str, np.ndarray], dim: int) -> np.ndarray:
    """(len(pids), D) from a pid->vector map; ``KeyError`` naming the first pid not found."""
    missing = [p for p in pids if p not in found]
    if missing:
        raise KeyError(f"pid {missing[0]!r} is not in the dense index" +
                       (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not len(pids):
        return np.zeros((0, dim), np.float32)
    return np.stack([found[p] for p in pids]).astype(np.float32, copy=False)


# =========================================================================== retriever


class QueryEncoder(Protocol):
    def embed_queries(self, texts: list[str]) -> np.ndarray:  # (B, D) float32
        ...


class VectorSearcher(Protocol):
    def search_vectors(self, Q: np.ndarray, k: int) -> list[list[Hit]]:
        ...


class DenseRetriever:
    """DPR retrieval: query text -> query encoder -> sharded index (in-process or actors).

    Shares ``search``/``batch_search`` with the BM25 retriever. ``passages`` (lookup or passages
    Parquet path) fills the hits' title/text; otherwise whatever the index has attached is used.
    """

    def __init__(self, index: VectorSearcher, query_encoder: QueryEncoder,
                 passages: Mapping[str, PassageInfo] | str | Path | None = None):
        self.index = index
        self.query_encoder = query_encoder
        if passages is not None:
            if hasattr(index, "attach_passages"):
                index.attach_passages(passages)
            else:
                raise TypeError(f"{type(index).__name__} cannot attach passages")

    def search(self, query: str, k: int) -> list[Hit]:
        """Top-``k`` hits for one query."""
        return self.batch_search([query], k)[0]

    def batch_search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-``k`` hits for each query (one encoder call for the batch)."""
        queries = list(queries)
        if not queries:
            return []
        Q = np.asarray(self.query_encoder.embed_queries(queries), dtype=np.float32)  # (B, D)
        return self.index.search_vectors(Q, k)
