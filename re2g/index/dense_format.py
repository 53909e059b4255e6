"""The dense index artifact: its manifest and the pure math its builder and its searchers share.

See :mod:`re2g.index.dense` for the artifact (a directory of faiss shards + ``manifest.json``, kind
``dense-index`` of :mod:`re2g.artifacts`). The math: DPR's MIPS->L2 transform and back, merging
per-shard top-k lists, contiguous shard bounds; none of it touches files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from re2g.artifacts import KINDS, Manifest, read_manifest as read_artifact_manifest
from re2g.errors import ArtifactError
from re2g.file_checks import ENDS_BYTES, ends_sha256, file_records  # noqa: F401  (re-exported)

KIND = "dense-index"
MANIFEST_NAME = KINDS[KIND].file
FORMAT_VERSION = KINDS[KIND].version


# =========================================================================== pure math


def mips_to_l2_passages(X: np.ndarray, max_norm_sq: float) -> np.ndarray:
    """MIPS->L2 transform of passage vectors (Bachrach et al. 2014, as in DPR).

    ``X`` (N, D) -> (N, D+1): appends ``sqrt(max_norm_sq - |x|^2)`` so every row has norm
    ``sqrt(max_norm_sq)``. With queries from :func:`mips_to_l2_queries`,
    ``|q' - x'|^2 = |q|^2 + max_norm_sq - 2 q.x``: L2 order is inner-product order.
    ``max_norm_sq`` must be the maximum over the *whole* corpus (not one shard).
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected passage vectors of shape (N, D), got {X.shape}")
    norms_sq = np.einsum("ij,ij->i", X.astype(np.float64), X.astype(np.float64))
    extra = np.sqrt(np.maximum(float(max_norm_sq) - norms_sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([X, extra[:, None]]), dtype=np.float32)


def mips_to_l2_queries(Q: np.ndarray) -> np.ndarray:
    """Query side of the MIPS->L2 transform: ``Q`` (B, D) -> (B, D+1) with a 0 appended."""
    Q = np.asarray(Q, dtype=np.float32)
    if Q.ndim != 2:
        raise ValueError(f"expected query vectors of shape (B, D), got {Q.shape}")
    return np.ascontiguousarray(np.hstack([Q, np.zeros((Q.shape[0], 1), np.float32)]))


def l2_to_ip(dist: np.ndarray, q_norm_sq: np.ndarray, max_norm_sq: float) -> np.ndarray:
    """Squared L2 distances of transformed vectors back to inner products.

    ``dist`` (B, k), ``q_norm_sq`` (B,) -> (B, k) float64: ``(|q|^2 + max_norm_sq - d) / 2``.
    """
    dist = np.asarray(dist, dtype=np.float64)
    return (np.asarray(q_norm_sq, np.float64)[:, None] + float(max_norm_sq) - dist) / 2.0


@dataclass
class ShardResult:
    """Top-k of one shard for a batch of queries.

    ``scores`` (B, k) float64 inner products, ``-inf`` where the shard returned no hit;
    ``pids`` (B, k) object array of pid strings (``None`` where no hit).
    """

    scores: np.ndarray
    pids: np.ndarray


def merge_topk(results: Sequence[ShardResult], k: int) -> list[list[tuple[str, float]]]:
    """Merge per-shard top-k lists into a global top-k per query.

    Returns, for each of the B queries, up to ``k`` ``(pid, score)`` pairs, best first.
    Ties keep shard order, then the shard's own order (a stable sort), so the merge is
    deterministic.
    """
    if not results:
        return []
    scores = np.concatenate([r.scores for r in results], axis=1)  # (B, S*k)
    pids = np.concatenate([r.pids for r in results], axis=1)  # (B, S*k)
    order = np.argsort(-scores, axis=1, kind="stable")
    out: list[list[tuple[str, float]]] = []
    for b in range(scores.shape[0]):
        row: list[tuple[str, float]] = []
        for j in order[b]:
            if len(row) >= k:
                break
            p = pids[b, j]
            if p is None or not np.isfinite(scores[b, j]):
                continue
            row.append((str(p), float(scores[b, j])))
        out.append(row)
    return out


def shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` row ranges of ``n`` rows over ``min(num_shards, n)`` shards."""
    s = max(1, min(num_shards, n))
    return [(i * n // s, (i + 1) * n // s) for i in range(s)]


PQ_KINDS = ("pq", "opq")
KMEANS_POINTS_PER_CENTROID = 39  # faiss's k-means warns below this many training points per centroid


def default_pq_m(index_dim: int) -> int:
    """The largest divisor of ``index_dim`` that is at most ``index_dim / 8`` (1 when there is none:
    e.g. 769 = 768 + the mips_l2 column is prime). 768 -> 96, 384 -> 48, 385 -> 35."""
    best = 1
    for m in range(1, index_dim // 8 + 1):
        if index_dim % m == 0:
            best = m
    return best


def default_ivf_nlist(shard_size: int, train_rows: int) -> int:
    """Inverted lists for a shard: ``round(4 * sqrt(shard_size))`` (the low end of faiss's
    4..16 sqrt(N) guideline), at most ``train_rows / 39`` (k-means points per centroid), at least 1."""
    nlist = int(round(4.0 * np.sqrt(max(shard_size, 1))))
    return max(1, min(nlist, train_rows // KMEANS_POINTS_PER_CENTROID))


def pq_factory(index_dim: int, *, m: int, nbits: int, coarse: str, opq: bool, nlist: int | None = None,
               hnsw_m: int | None = None) -> str:
    """faiss ``index_factory`` string of a PQ shard: ``[OPQ{m},]IVF{nlist},PQ{m}x{nbits}np`` or
    ``[OPQ{m},]HNSW{hnsw_m}_PQ{m}x{nbits}``. ``np``: no polysemous training (a reordering of the codes
    for Hamming pre-filtering, which re2g does not use; it made training 50x slower here)."""
    head = f"OPQ{m}," if opq else ""
    if coarse == "ivf":
        return f"{head}IVF{nlist},PQ{m}x{nbits}np"
    return f"{head}HNSW{hnsw_m}_PQ{m}x{nbits}"


def plan_pq_shards(index_dim: int, dim: int, shard_sizes: Sequence[int], cfg: Any) -> list[dict]:
    """Per-shard build parameters of a ``pq``/``opq`` index (an ``IndexConfig`` as ``cfg``), checked
    before any shard is built: ``pq_m`` divides ``index_dim`` (D, or D+1 = ``dim`` + 1 under
    ``mips_l2``); each shard has at least ``2**pq_nbits`` training rows; an explicit ``ivf_nlist`` is
    at most a shard's training rows. Returns, per shard, ``{"factory", "pq_m", "train_rows",
    "nlist"}``; a bad parameter is a :class:`~re2g.errors.ConfigError` naming the ``index.*`` field."""
    from re2g.errors import ConfigError

    where = f"index dimension {index_dim}" + (f" (D = {dim} + 1 for metric mips_l2)" if index_dim != dim else "")
    m = cfg.pq_m if cfg.pq_m is not None else default_pq_m(index_dim)
    if index_dim % m:
        divisors = [d for d in range(2, index_dim) if index_dim % d == 0]
        raise ConfigError(f"index.pq_m = {m} does not divide the {where}: product quantization splits a vector "
                          f"into pq_m equal parts; divisors: {divisors[:12] or 'none (a prime): use metric ip'}")
    if m < 2:
        raise ConfigError(f"index.pq_m: the {where} has no divisor between 2 and dimension/8; set index.pq_m to "
                          "a divisor, or use metric ip (no extra column)" if index_dim != dim else
                          f"index.pq_m: the {where} has no divisor between 2 and dimension/8; set index.pq_m")
    plans = []
    for i, n in enumerate(shard_sizes):
        train = min(int(cfg.pq_train_size), int(n))
        if train < 2 ** cfg.pq_nbits:
            raise ConfigError(f"index.quantization {cfg.quantization!r}: shard {i} has {n} vectors, fewer than "
                              f"2**pq_nbits = {2 ** cfg.pq_nbits} to train its PQ codebooks: use fewer shards "
                              "(index.num_shards), smaller pq_nbits, or quantization none/sq8")
        nlist = None
        if cfg.pq_coarse == "ivf":
            nlist = cfg.ivf_nlist if cfg.ivf_nlist is not None else default_ivf_nlist(n, train)
            if nlist > train:
                raise ConfigError(f"index.ivf_nlist = {nlist} exceeds the {train} training vectors of shard {i} "
                                  f"({n} vectors, pq_train_size {cfg.pq_train_size}): k-means needs at least "
                                  "one per list; lower ivf_nlist or leave it unset")
        plans.append({"factory": pq_factory(index_dim, m=m, nbits=cfg.pq_nbits, coarse=cfg.pq_coarse,
                                            opq=cfg.quantization == "opq", nlist=nlist, hnsw_m=cfg.hnsw_m),
                      "pq_m": m, "train_rows": train, "nlist": nlist})
    return plans


def shard_file_names(shard_id: int) -> dict[str, str]:
    """File names of one shard inside the index directory."""
    stem = f"shard_{shard_id:05d}"
    return {"file": f"{stem}.faiss", "pid_file": f"{stem}.pids.parquet", "vectors_file": f"{stem}.vectors.npy"}


@dataclass(frozen=True)
class DenseIndexInfo:
    """What ``build_dense_index`` wrote (and what ``DenseIndex.info`` reads back)."""

    path: str
    dim: int  # D of the passage/query vectors (before any transform)
    metric: str
    quantization: str
    exact: bool
    num_shards: int
    total_count: int
    encoder_fingerprint: str
    max_norm_sq: float | None
    manifest: dict = field(repr=False, compare=False)

    @classmethod
    def from_manifest(cls, path: str | Path, m: dict) -> "DenseIndexInfo":
        return cls(str(path), int(m["dim"]), m["metric"], m["quantization"], bool(m["exact"]),
                   len(m["shards"]), int(m["total_count"]), m["encoder_fingerprint"],
                   m["transform"].get("max_norm_sq"), m)


# =========================================================================== files on disk

def checked_file(index_dir: str | Path, name: str, manifest: dict, *, full: bool, what: str) -> Path:
    """The path of file ``name`` of a dense index, checked against its manifest: it exists, has the
    recorded size and :func:`ends_sha256` (a normal load: no file is read whole), and, with ``full``
    or for an index that records no sizes (built before re2g recorded them), its sha256. Anything
    else is an :class:`ArtifactError` naming the file and what is wrong."""
    from re2g.artifacts import sha256_file

    d = Path(index_dir)
    p = d / name
    if not p.is_file():
        raise ArtifactError(f"{p}: {what} file missing from dense index {d}")
    sizes, ends = manifest.get("sizes") or {}, manifest.get("ends_sha256") or {}
    if name in sizes:
        got = p.stat().st_size
        if got != int(sizes[name]):
            raise ArtifactError(f"{p}: {what} file is {got} bytes, the manifest says {sizes[name]} "
                                "(truncated, or replaced by another file)")
        if name in ends and ends_sha256(p, got) != ends[name]:
            raise ArtifactError(f"{p}: {what} file changed on disk: its first/last {ENDS_BYTES // 1024} KiB differ "
                                f"from the build's (swapped with another shard's, or rewritten); "
                                f"`re2g index verify {d}` checks every byte")
    sha = (manifest.get("checksums") or {}).get(name)
    if sha is not None and (full or name not in sizes):
        got_sha = sha256_file(p)
        if got_sha != sha:
            raise ArtifactError(f"{p}: checksum mismatch ({what} file is corrupt or was changed): "
                                f"sha256 {got_sha}, manifest says {sha}")
    return p


# =========================================================================== the manifest


def manifest_view(m: Manifest) -> dict:
    """The manifest as the dict that loaders and callers read: every field of the schema and the
    kind-specific ones, plus ``total_count`` (``counts.vectors``) and ``encoder_fingerprint``
    (``fingerprints.encoder``)."""
    return {**m.to_dict(), "total_count": m.counts["vectors"], "encoder_fingerprint": m.fingerprints["encoder"]}


def read_manifest(index_dir: str | Path) -> dict:
    """The manifest of a dense index directory, checked (:func:`re2g.artifacts.read_manifest`;
    an index built before the one manifest schema loads too), as :func:`manifest_view`;
    :class:`ArtifactError` (with the command that rebuilds it) if it is missing or malformed."""
    return manifest_view(read_artifact_manifest(index_dir, KIND))


def check_fingerprint(index_dir: str | Path, manifest: dict, expected: str | None,
                      expected_settings: Any = None) -> None:
    """Refuse an index built by another encoder than the one that will query it. When both the
    manifest and the caller know the encoder settings and they differ, the error says how
    (``expected_settings``: an :class:`~re2g.models.pooling.EncoderSettings` or its dict)."""
    if expected is None or expected == manifest["encoder_fingerprint"]:
        return
    from re2g.models.pooling import EncoderSettings

    built, want = manifest.get("encoder_settings"), expected_settings
    if built is not None and want is not None:
        built = EncoderSettings.from_dict(built)
        want = want if isinstance(want, EncoderSettings) else EncoderSettings.from_dict(want)
        if built != want:
            raise ArtifactError(
                f"{index_dir}: encoder settings mismatch: the index's passage vectors were made with "
                f"{built.describe()}, but the query encoder uses {want.describe()}; query it with the "
                "same settings (models.pooling, models.normalize, models.*_prefix) or rebuild the index")
    raise ArtifactError(
        f"{index_dir}: encoder fingerprint mismatch: the index was built with "
        f"{manifest['encoder_fingerprint']!r} but the query encoder is {expected!r}; "
        "rebuild the index with this encoder's passage embeddings")
