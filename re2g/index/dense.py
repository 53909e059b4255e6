"""Dense passage index: faiss shards (HNSW or flat) over DPR passage embeddings.

The artifact is a directory::

    manifest.json                 format version, dim, metric, transform (incl. the MIPS max norm),
                                  quantization, HNSW params, shards, counts, checksums,
                                  encoder fingerprint, config
    config.yaml                   the IndexConfig that built it
    shard_00000.faiss             one faiss index per shard (shard-local ids 0..count-1)
    shard_00000.pids.parquet      the shard's pids, in shard-local id order
    shard_00000.vectors.npy       the shard's original vectors (N_s, D) float32, for fetch-by-pid

It is written to a temporary sibling directory and renamed at the end, so a crash never leaves a
directory that loads. Each shard is built by its own Ray task over a contiguous slice of the
embeddings (``build_dense_index``); shards are searched together and their top-k merged
(``DenseIndex.search_vectors``; ``re2g.index.shards.ActorShardedIndex`` does the same with one Ray
actor per shard).

Metrics: ``mips_l2`` (DPR's MIPS->L2 transform: passages get one extra dimension
sqrt(max_norm_sq - |v|^2), queries get 0; the global max norm is computed in a first pass over all
embeddings) or ``ip`` (faiss inner-product metric). Hit scores are always inner products.

Paths are local (or a shared file system that every Ray worker sees at the same path).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from re2g.config import IndexConfig, save_config
from re2g.errors import ArtifactError, DataFormatError
from re2g.types import Hit

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_KIND = "re2g-dense-index"

PassageInfo = tuple[str, str, "str | None"]  # (title, text, wikipedia_id)


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# =========================================================================== embeddings input


@dataclass(frozen=True)
class EmbeddingsStats:
    """What the validation pass learned about an embeddings Parquet (file or directory)."""

    path: str
    files: tuple[str, ...]  # the Parquet files, in row order
    file_rows: tuple[int, ...]  # rows per file
    count: int  # total rows N
    dim: int  # D
    max_norm_sq: float  # max |v|^2 over all rows (the MIPS transform's constant)


def _parquet_files(path: str | Path) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet") if f.is_file() and not f.name.startswith((".", "_")))
        if not files:
            raise DataFormatError(str(p), "no embeddings: the directory holds no .parquet files")
        return files
    if not p.exists():
        raise DataFormatError(str(p), "embeddings file not found")
    return [str(p)]


def _check_schema(path: str, schema) -> None:
    import pyarrow as pa

    names = schema.names
    for col in ("pid", "vector"):
        if col not in names:
            raise DataFormatError(path, f"missing column (expected columns pid: string, vector: list<float32>; "
                                  f"found {names})", field=col)
    t = schema.field("pid").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataFormatError(path, f"expected string, got {t}", field="pid")
    t = schema.field("vector").type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
            or not pa.types.is_floating(t.value_type):
        raise DataFormatError(path, f"expected list<float32>, got {t}", field="vector")


def _batch_arrays(path: str, batch, row0: int, dim: int | None) -> tuple[list, np.ndarray]:
    """Decode one record batch: pids (n,) list[str], vectors (n, D) float32; validated.

    ``row0`` is the 0-based row of the batch in its file (for 1-based row numbers in errors)."""
    import pyarrow.compute as pc

    pid_col = batch.column(batch.schema.get_field_index("pid"))
    vec_col = batch.column(batch.schema.get_field_index("vector"))
    n = len(batch)
    if pid_col.null_count:
        bad = int(np.flatnonzero(pc.is_null(pid_col).to_numpy(zero_copy_only=False))[0])
        raise DataFormatError(path, "pid is null", line=row0 + bad + 1, field="pid")
    if vec_col.null_count:
        bad = int(np.flatnonzero(pc.is_null(vec_col).to_numpy(zero_copy_only=False))[0])
        raise DataFormatError(path, "vector is null", line=row0 + bad + 1, field="vector")
    lengths = pc.list_value_length(vec_col).to_numpy(zero_copy_only=False)
    d = int(lengths[0]) if dim is None and n else dim
    if n and d == 0:
        raise DataFormatError(path, "vector is empty", line=row0 + 1, field="vector")
    if n and (lengths != d).any():
        bad = int(np.flatnonzero(lengths != d)[0])
        raise DataFormatError(path, f"vector has {int(lengths[bad])} values, expected {d} like the rows before it "
                              "(inconsistent dimension)", line=row0 + bad + 1, field="vector")
    values = vec_col.flatten()  # respects the batch's slice offset
    X = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, d if n else 0)
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise DataFormatError(path, "vector has non-finite values (NaN or inf)", line=row0 + bad + 1, field="vector")
    return pid_col.to_pylist(), X


def _iter_file_batches(path: str, batch_size: int = 65536) -> Iterator[tuple[int, Any]]:
    """(row0, RecordBatch) over a Parquet file, columns pid and vector."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # not Parquet, truncated, ...
        raise DataFormatError(path, f"not a readable Parquet file: {e}") from None
    _check_schema(path, pf.schema_arrow)
    row0 = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=["pid", "vector"]):
        yield row0, batch
        row0 += len(batch)


def scan_embeddings(path: str | Path, *, batch_size: int = 65536) -> EmbeddingsStats:
    """Validation pass over an embeddings Parquet (file or directory), streamed in batches.

    Checks: columns and types, not empty, no null or duplicate pids, no non-finite values, one
    dimension throughout. Raises :class:`DataFormatError` naming the file and the 1-based row.
    Returns counts, the dimension and the global max squared norm. Memory: the set of pids.
    """
    files = _parquet_files(path)
    seen: dict[str, tuple[int, int]] = {}
    dim: int | None = None
    max_norm_sq = 0.0
    rows: list[int] = []
    for fi, f in enumerate(files):
        n_f = 0
        for row0, batch in _iter_file_batches(f, batch_size):
            pids, X = _batch_arrays(f, batch, row0, dim)
            if len(pids) == 0:
                continue
            if dim is None:
                dim = X.shape[1]
            for i, p in enumerate(pids):
                prev = seen.get(p)
                if prev is not None:
                    where = f"row {prev[1] + 1}" + ("" if prev[0] == fi else f" of {files[prev[0]]}")
                    raise DataFormatError(f, f"duplicate pid {p!r} (first at {where})", line=row0 + i + 1, field="pid")
                seen[p] = (fi, row0 + i)
            X64 = X.astype(np.float64)
            max_norm_sq = max(max_norm_sq, float(np.einsum("ij,ij->i", X64, X64).max()))
            n_f += len(pids)
        rows.append(n_f)
    total = sum(rows)
    if total == 0 or dim is None:
        raise DataFormatError(str(path), "no embeddings: zero rows")
    return EmbeddingsStats(str(path), tuple(files), tuple(rows), total, dim, max_norm_sq)


def read_embedding_rows(files: Sequence[str], file_rows: Sequence[int], start: int, end: int,
                        dim: int, *, batch_size: int = 65536) -> tuple[list[str], np.ndarray]:
    """Rows ``[start, end)`` (global row numbers over ``files`` in order) of an embeddings Parquet.

    Streams only the row groups that overlap the range, in batches, so peak memory is the slice
    plus one batch. Returns pids (n,) and vectors (n, D) float32.
    """
    import pyarrow.parquet as pq

    pids: list[str] = []
    parts: list[np.ndarray] = []
    offset = 0  # global row of the file's first row
    for f, n_f in zip(files, file_rows):
        lo, hi = max(start, offset) - offset, min(end, offset + n_f) - offset  # file-local range
        if lo < hi:
            pf = pq.ParquetFile(f)
            groups, row = [], 0  # overlapping row groups; ``first`` = file row of the first one
            first = None
            for rg in range(pf.metadata.num_row_groups):
                n_rg = pf.metadata.row_group(rg).num_rows
                if row < hi and row + n_rg > lo:
                    groups.append(rg)
                    first = row if first is None else first
                row += n_rg
            row = first or 0
            for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=["pid", "vector"]):
                a, b = max(lo, row), min(hi, row + len(batch))
                if a < b:
                    p, X = _batch_arrays(f, batch.slice(a - row, b - a), a, dim)
                    pids.extend(p)
                    parts.append(X)
                row += len(batch)
                if row >= hi:
                    break
        offset += n_f
        if offset >= end:
            break
    X = np.concatenate(parts, axis=0) if parts else np.zeros((0, dim), np.float32)
    return pids, np.ascontiguousarray(X, dtype=np.float32)


# =========================================================================== building


def make_faiss_index(dim: int, cfg: IndexConfig):
    """An empty faiss index for vectors of width ``dim`` (already transformed for mips_l2).

    exact: ``IndexFlatL2``/``IndexFlatIP`` (``IndexScalarQuantizer`` with sq8); else
    ``IndexHNSWFlat`` (``IndexHNSWSQ`` 8-bit with sq8) with M and efConstruction from ``cfg``.
    """
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT if cfg.metric == "ip" else faiss.METRIC_L2
    if cfg.exact:
        if cfg.quantization == "sq8":
            return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, metric)
        return faiss.IndexFlatIP(dim) if cfg.metric == "ip" else faiss.IndexFlatL2(dim)
    if cfg.quantization == "sq8":
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, cfg.hnsw_m, metric)
    else:
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, metric)
    index.hnsw.efConstruction = cfg.ef_construction
    index.hnsw.efSearch = cfg.ef_search
    return index


def shard_file_names(shard_id: int) -> dict[str, str]:
    """File names of one shard inside the index directory."""
    stem = f"shard_{shard_id:05d}"
    return {"file": f"{stem}.faiss", "pid_file": f"{stem}.pids.parquet", "vectors_file": f"{stem}.vectors.npy"}


def build_shard(files: Sequence[str], file_rows: Sequence[int], start: int, end: int, dim: int,
                shard_id: int, out_dir: str, cfg_dict: dict, max_norm_sq: float,
                store_vectors: bool = True, threads: int = 1) -> dict:
    """Build one shard over embedding rows ``[start, end)`` and write its files into ``out_dir``.

    Runs in a Ray task (``build_dense_index``) or in-process; reads its own slice of the Parquet.
    ``threads``: faiss OpenMP threads (1 makes HNSW construction reproducible byte for byte).
    Returns the shard's manifest entry.
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = IndexConfig.model_validate(cfg_dict)
    faiss.omp_set_num_threads(max(1, int(threads)))
    pids, X = read_embedding_rows(files, file_rows, start, end, dim)  # (n,), (n, D)
    if len(pids) != end - start:
        raise DataFormatError(str(files[0]), f"shard {shard_id}: expected {end - start} rows in [{start}, {end}), "
                              f"read {len(pids)} (did the embeddings change during the build?)")
    Xi = mips_to_l2_passages(X, max_norm_sq) if cfg.metric == "mips_l2" else X  # (n, D+1) | (n, D)
    index = make_faiss_index(Xi.shape[1], cfg)
    if not index.is_trained:
        index.train(Xi)
    index.add(Xi)
    names = shard_file_names(shard_id)
    out = Path(out_dir)
    faiss.write_index(index, str(out / names["file"]))
    pq.write_table(pa.table({"pid": pa.array(pids, pa.string())}), out / names["pid_file"])
    entry = {
        "shard": shard_id, "start": start, "end": end, "count": len(pids),
        "file": names["file"], "sha256": sha256_file(out / names["file"]),
        "pid_file": names["pid_file"], "pid_sha256": sha256_file(out / names["pid_file"]),
    }
    if store_vectors:
        np.save(out / names["vectors_file"], X)
        entry["vectors_file"] = names["vectors_file"]
        entry["vectors_sha256"] = sha256_file(out / names["vectors_file"])
    return entry


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


def _write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False))


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` directory to ``out`` (replacing an old index when allowed)."""
    from re2g.storage import replace_dir

    if out.exists() and not overwrite:
        raise ArtifactError(f"{out}: already exists (pass overwrite=True to replace it)")
    replace_dir(tmp, out)


def build_dense_index(embeddings_path: str | Path, out_dir: str | Path, cfg: IndexConfig, *,
                      encoder_fingerprint: str, use_ray: bool = True, overwrite: bool = False,
                      store_vectors: bool = True, threads: int = 1,
                      task_options: dict | None = None, encoder_settings: dict | None = None) -> DenseIndexInfo:
    """Build a sharded dense index from an embeddings Parquet (``pid: string, vector: list<float32>``).

    1. validation pass (:func:`scan_embeddings`): errors name the file and row; gives the global
       max norm for the MIPS transform;
    2. ``min(cfg.num_shards, N)`` contiguous slices, each built by :func:`build_shard` in its own
       Ray task (``use_ray=False``: in this process; same files byte for byte), each reading its
       own rows of the Parquet;
    3. manifest + ``config.yaml`` written last into a temporary sibling directory, renamed to
       ``out_dir`` at the end; on any error the temporary directory is removed.

    Never calls ``ray.init``: with ``use_ray=True`` the caller has connected to Ray.
    ``threads``: CPUs (faiss threads) per shard build; ``task_options``: extra ``.options()`` for
    the Ray tasks (``memory``, ``resources``, ``scheduling_strategy``, ...). ``encoder_settings``: the
    passage encoder's pooling/normalization/prefixes (recorded, to explain a mismatch in plain words).
    The paths must be visible to every Ray worker (local machine or a shared file system).
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out}: already exists (pass overwrite=True to replace it)")
    if not encoder_fingerprint or not isinstance(encoder_fingerprint, str):
        raise ValueError("encoder_fingerprint must be a non-empty string identifying the passage encoder")
    stats = scan_embeddings(embeddings_path)
    bounds = shard_bounds(stats.count, cfg.num_shards)
    cfg_dict = cfg.model_dump(mode="json")
    max_norm_sq = stats.max_norm_sq if cfg.metric == "mips_l2" else 0.0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        args = [(stats.files, stats.file_rows, s, e, stats.dim, i, str(tmp), cfg_dict, max_norm_sq,
                 store_vectors, threads) for i, (s, e) in enumerate(bounds)]
        if use_ray:
            import ray

            opts = {"num_cpus": threads, "max_retries": 0, **(task_options or {})}
            remote = ray.remote(build_shard).options(**opts)
            entries = ray.get([remote.remote(*a) for a in args])
        else:
            entries = [build_shard(*a) for a in args]
        manifest = {
            "kind": INDEX_KIND,
            "format_version": FORMAT_VERSION,
            "index_id": uuid.uuid4().hex,
            "dim": stats.dim,
            "index_dim": stats.dim + 1 if cfg.metric == "mips_l2" else stats.dim,
            "metric": cfg.metric,
            "transform": ({"type": "mips_l2", "max_norm_sq": stats.max_norm_sq, "query_extra": 0.0}
                          if cfg.metric == "mips_l2" else {"type": "none"}),
            "quantization": cfg.quantization,
            "exact": cfg.exact,
            "faiss_index": type(make_faiss_index(2, cfg)).__name__,
            "hnsw": None if cfg.exact else {"m": cfg.hnsw_m, "ef_construction": cfg.ef_construction,
                                            "ef_search": cfg.ef_search},
            "shards": entries,
            "total_count": stats.count,
            "encoder_fingerprint": encoder_fingerprint,
            "encoder_settings": encoder_settings,
            "embeddings": {"path": str(Path(embeddings_path).absolute()), "files": len(stats.files)},
            "has_vectors": store_vectors,
            "config": cfg_dict,
        }
        save_config(cfg, tmp)
        _write_manifest(tmp, manifest)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DenseIndexInfo.from_manifest(out, manifest)


# =========================================================================== loading


def read_manifest(index_dir: str | Path) -> dict:
    """The manifest of a dense index directory, checked for shape; :class:`ArtifactError` if not."""
    d = Path(index_dir)
    path = d / MANIFEST_NAME
    if not d.is_dir():
        raise ArtifactError(f"{d}: dense index directory not found")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing: {d} is not a complete dense index (an interrupted build?)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(m, dict) or m.get("kind") != INDEX_KIND:
        raise ArtifactError(f"{path}: not a re2g dense index manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {m.get('format_version')!r}, this re2g reads {FORMAT_VERSION}")
    for key in ("dim", "metric", "transform", "shards", "total_count", "encoder_fingerprint", "config"):
        if key not in m:
            raise ArtifactError(f"{path}: manifest lacks {key!r}")
    return m


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


def _verified_path(index_dir: Path, name: str, sha: str | None, verify: bool, what: str) -> Path:
    p = index_dir / name
    if not p.is_file():
        raise ArtifactError(f"{p}: {what} file missing from dense index {index_dir}")
    if verify and sha is not None:
        got = sha256_file(p)
        if got != sha:
            raise ArtifactError(f"{p}: checksum mismatch ({what} file is corrupt or was changed): "
                                f"sha256 {got}, manifest says {sha}")
    return p


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
        self._vectors_path = vectors_path
        self._vectors: np.ndarray | None = None
        self._row_of: dict[str, int] | None = None

    @classmethod
    def load(cls, index_dir: str | Path, entry: dict, manifest: dict, *, verify: bool = True,
             ef_search: int | None = None) -> "DenseShard":
        """Load shard ``entry`` of the manifest; checks files exist and (``verify``) their sha256."""
        import faiss
        import pyarrow.parquet as pq

        d = Path(index_dir)
        fpath = _verified_path(d, entry["file"], entry.get("sha256"), verify, "shard index")
        ppath = _verified_path(d, entry["pid_file"], entry.get("pid_sha256"), verify, "shard pid")
        vpath = None
        if entry.get("vectors_file"):
            vpath = _verified_path(d, entry["vectors_file"], entry.get("vectors_sha256"), verify, "shard vectors")
        try:
            index = faiss.read_index(str(fpath))
        except Exception as e:
            raise ArtifactError(f"{fpath}: cannot read faiss index (corrupt?): {e}") from None
        try:
            pids = np.asarray(pq.read_table(ppath, columns=["pid"]).column("pid").to_pylist(), dtype=object)
        except Exception as e:
            raise ArtifactError(f"{ppath}: cannot read shard pids (corrupt?): {e}") from None
        if index.ntotal != entry["count"] or len(pids) != entry["count"]:
            raise ArtifactError(f"{fpath}: holds {index.ntotal} vectors and {len(pids)} pids, manifest says "
                                f"{entry['count']}")
        shard = cls(index, pids, entry, manifest, vpath)
        hnsw = manifest.get("hnsw") or {}
        shard.set_ef_search(ef_search if ef_search is not None else hnsw.get("ef_search"))
        return shard

    def set_ef_search(self, ef: int | None) -> None:
        """Set HNSW efSearch (no-op for flat shards or ``None``)."""
        if ef is not None and hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = int(ef)

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

    def lookup_vectors(self, pids: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vectors (D,) of those ``pids`` that live in this shard."""
        if self._vectors_path is None:
            raise ArtifactError(f"shard {self.entry['file']}: index was built without vectors "
                                "(build_dense_index(store_vectors=True) to fetch vectors by pid)")
        if self._row_of is None:
            self._row_of = {p: i for i, p in enumerate(self.pids)}
        if self._vectors is None:
            self._vectors = np.load(self._vectors_path, mmap_mode="r")
        return {p: np.array(self._vectors[self._row_of[p]]) for p in pids if p in self._row_of}


# =========================================================================== search over all shards


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
    out: list[list[Hit]] = []
    for row in merged:
        hits = []
        for r, (pid, score) in enumerate(row):
            if passages is None:
                hits.append(Hit(pid, score, r, "dpr"))
            else:
                try:
                    title, text, wid = passages[pid]
                except KeyError:
                    raise ArtifactError(f"pid {pid!r} from the dense index is not in the passage lookup "
                                        "(index and passages come from different corpora?)") from None
                hits.append(Hit(pid, score, r, "dpr", title, text, wid))
        out.append(hits)
    return out


class PassageLookup(Mapping):
    """``pid -> (title, text, wikipedia_id)`` over Arrow columns: no Python object per passage.

    The texts stay in Arrow buffers and the pids in one sorted fixed-width bytes array searched by
    numpy (``np.searchsorted``), so a 21M-passage corpus costs about its raw text plus ~25 bytes per
    pid, where a ``dict`` of tuples of ``str`` costs several times that in every process holding it
    (each Serve replica, each training worker). A pid given twice keeps its first row.
    """

    def __init__(self, pids: "pa.Array", titles: "pa.Array", texts: "pa.Array", wids: "pa.Array | None" = None):
        self._titles, self._texts, self._wids = titles, texts, wids
        keys = np.array([p.encode("utf-8") for p in pids.to_pylist()], dtype=np.bytes_)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        first = np.ones(len(keys), dtype=bool)  # a pid given twice: its first row (the sort is stable)
        first[1:] = keys[1:] != keys[:-1]
        self._keys, self._rows = keys[first], order[first].astype(np.int64)

    @classmethod
    def from_table(cls, table: "pa.Table") -> "PassageLookup":
        """From a table with columns ``pid, title, text`` (+ optional ``wikipedia_id``); chunks are combined."""
        def col(name: str):
            return table.column(name).combine_chunks()

        return cls(col("pid"), col("title"), col("text"), col("wikipedia_id") if "wikipedia_id" in table.column_names else None)

    def _row(self, pid: str) -> int:
        if not isinstance(pid, str):
            raise KeyError(pid)
        key = np.bytes_(pid.encode("utf-8"))
        i = int(np.searchsorted(self._keys, key))
        if i >= len(self._keys) or self._keys[i] != key:
            raise KeyError(pid)
        return int(self._rows[i])

    def __getitem__(self, pid: str) -> PassageInfo:
        r = self._row(pid)
        w = None if self._wids is None else self._wids[r].as_py()
        return (self._titles[r].as_py() or "", self._texts[r].as_py() or "", None if w is None else str(w))

    def __contains__(self, pid: object) -> bool:
        try:
            self._row(pid)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        for i in np.argsort(self._rows):  # corpus order
            yield self._keys[i].decode("utf-8")


def load_passage_lookup(path: str | Path) -> PassageLookup:
    """``pid -> (title, text, wikipedia_id)`` (a :class:`PassageLookup`) from a passages Parquet
    (file or directory) with columns ``pid, title, text`` (+ optional ``wikipedia_id``)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        table = ds.dataset(str(path), format="parquet").to_table()
    except Exception as e:
        raise DataFormatError(str(path), f"not a readable passages Parquet: {e}") from None
    for col in ("pid", "title", "text"):
        if col not in table.column_names:
            raise DataFormatError(str(path), "missing column", field=col)
    lookup = PassageLookup.from_table(table)
    del table
    pa.default_memory_pool().release_unused()  # the chunks read (combined into one): their pages back
    return lookup


class DenseIndex:
    """A loaded sharded dense index, searched in this process (all shards, top-k merged)."""

    def __init__(self, path: Path, manifest: dict, shards: list[DenseShard],
                 passages: Mapping[str, PassageInfo] | None = None):
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.passages = passages

    @classmethod
    def load(cls, index_dir: str | Path, *, expected_fingerprint: str | None = None, verify: bool = True,
             ef_search: int | None = None, expected_settings: Any = None,
             passages: Mapping[str, PassageInfo] | str | Path | None = None) -> "DenseIndex":
        """Load an index directory.

        Checks the manifest, that every shard file exists, their sha256 (``verify``), and refuses an
        index whose encoder fingerprint is not ``expected_fingerprint`` (when given). efSearch comes
        from the manifest unless ``ef_search`` overrides it. ``passages``: a lookup
        ``pid -> (title, text, wikipedia_id)`` or a passages Parquet path, to fill hits' text.
        """
        d = Path(index_dir)
        m = read_manifest(d)
        check_fingerprint(d, m, expected_fingerprint, expected_settings)
        shards = [DenseShard.load(d, e, m, verify=verify, ef_search=ef_search) for e in m["shards"]]
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
