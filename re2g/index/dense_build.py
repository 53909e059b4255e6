"""Building a dense index: validate the embeddings, build one faiss shard per Ray task, write the
manifest last into a temporary directory that is renamed into place (:func:`build_dense_index`).
The artifact and searching it: :mod:`re2g.index.dense`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from re2g.artifacts import Manifest, sha256_file, staged_dir, write_manifest
from re2g.config import IndexConfig, save_config
from re2g.errors import DataFormatError
from re2g.index.dense_format import (KIND, PQ_KINDS, DenseIndexInfo, file_records, manifest_view,
                                    mips_to_l2_passages, plan_pq_shards, shard_bounds, shard_file_names)


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


def make_faiss_index(dim: int, cfg: IndexConfig, factory: str | None = None):
    """An empty faiss index for vectors of width ``dim`` (already transformed for mips_l2).

    exact: ``IndexFlatL2``/``IndexFlatIP`` (``IndexScalarQuantizer`` with sq8); else
    ``IndexHNSWFlat`` (``IndexHNSWSQ`` 8-bit with sq8) with M and efConstruction from ``cfg``.
    pq/opq: ``faiss.index_factory(dim, factory)`` with the shard's factory string from
    :func:`~re2g.index.dense_format.plan_pq_shards` (``IVF{nlist},PQ{m}x{nbits}``, with an ``OPQ{m},``
    rotation first for opq, or ``HNSW{M}_PQ{m}x{nbits}``).
    """
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT if cfg.metric == "ip" else faiss.METRIC_L2
    if cfg.quantization in PQ_KINDS:
        if factory is None:
            raise ValueError(f"quantization {cfg.quantization!r} needs the shard's factory string (plan_pq_shards)")
        index = faiss.index_factory(dim, factory, metric)
        hnsw = hnsw_graph(index)
        if hnsw is not None:
            hnsw.efConstruction = cfg.ef_construction
            hnsw.efSearch = cfg.ef_search
            base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
            # HNSW{M}_PQ's IndexPQ storage: no polysemous training (as "np" for IVF; see pq_factory)
            faiss.downcast_index(base.storage).do_polysemous_training = False
        return index
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


def hnsw_graph(index):
    """The ``faiss.HNSW`` graph of an HNSW index (through an OPQ ``IndexPreTransform``), else None."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return getattr(index, "hnsw", None)


def training_rows(n: int, train_rows: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a seeded uniform sample of ``train_rows`` out of ``n`` (all when
    ``train_rows >= n``): the vectors a PQ shard trains on. (train_rows,) int64."""
    if train_rows >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=train_rows, replace=False)).astype(np.int64)


def build_shard(files: Sequence[str], file_rows: Sequence[int], start: int, end: int, dim: int,
                shard_id: int, out_dir: str, cfg_dict: dict, max_norm_sq: float,
                store_vectors: bool = True, threads: int = 1,
                plan: dict | None = None) -> tuple[dict, dict[str, str]]:
    """Build one shard over embedding rows ``[start, end)`` and write its files into ``out_dir``.

    Runs in a Ray task (``build_dense_index``) or in-process; reads its own slice of the Parquet.
    ``threads``: faiss OpenMP threads (1 makes HNSW construction reproducible byte for byte).
    Returns the shard's manifest entry and the sha256 of each of its files (by file name).
    ``store_vectors``: fetch-by-pid possible; only a quantized (sq8) shard writes its original vectors
    beside the index (``.vectors.npy``): a float32 one returns them from its own storage (measured in
    docs/scaling.md), so they are stored once. ``plan``: a pq/opq shard's entry of
    :func:`~re2g.index.dense_format.plan_pq_shards` (factory string, training rows); the shard trains on
    a seeded sample of its rows (seed = ``shard_id``) and always writes its vectors when
    ``store_vectors`` (PQ codes reconstruct them only approximately).
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
    is_pq = cfg.quantization in PQ_KINDS
    if is_pq and plan is None:
        raise ValueError(f"shard {shard_id}: quantization {cfg.quantization!r} needs its plan (plan_pq_shards)")
    index = make_faiss_index(Xi.shape[1], cfg, plan["factory"] if is_pq else None)
    if not index.is_trained:
        index.train(Xi[training_rows(len(Xi), plan["train_rows"], shard_id)] if is_pq else Xi)
    index.add(Xi)
    names = shard_file_names(shard_id)
    out = Path(out_dir)
    faiss.write_index(index, str(out / names["file"]))
    pq.write_table(pa.table({"pid": pa.array(pids, pa.string())}), out / names["pid_file"])
    entry = {"shard": shard_id, "start": start, "end": end, "count": len(pids),
             "file": names["file"], "pid_file": names["pid_file"]}
    if is_pq:  # what this shard was built with (nlist depends on its size)
        entry.update(faiss_index=type(index).__name__, factory=plan["factory"], train_rows=plan["train_rows"],
                     nlist=plan["nlist"])
    if store_vectors and cfg.quantization != "none":  # float32 storage gives them back (reconstruct_batch)
        np.save(out / names["vectors_file"], X)
        entry["vectors_file"] = names["vectors_file"]
    checksums = {entry[k]: sha256_file(out / entry[k]) for k in ("file", "pid_file", "vectors_file") if k in entry}
    return entry, checksums


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
    if not encoder_fingerprint or not isinstance(encoder_fingerprint, str):
        raise ValueError("encoder_fingerprint must be a non-empty string identifying the passage encoder")
    with staged_dir(out, overwrite=overwrite) as stage:  # refuses an existing index before any work
        stats = scan_embeddings(embeddings_path)
        bounds = shard_bounds(stats.count, cfg.num_shards)
        cfg_dict = cfg.model_dump(mode="json")
        max_norm_sq = stats.max_norm_sq if cfg.metric == "mips_l2" else 0.0
        index_dim = stats.dim + 1 if cfg.metric == "mips_l2" else stats.dim
        is_pq = cfg.quantization in PQ_KINDS  # checked here, before any shard task starts
        plans = plan_pq_shards(index_dim, stats.dim, [e - s for s, e in bounds], cfg) if is_pq else [None] * len(bounds)
        args = [(stats.files, stats.file_rows, s, e, stats.dim, i, stage.path, cfg_dict, max_norm_sq,
                 store_vectors, threads, plan) for i, ((s, e), plan) in enumerate(zip(bounds, plans))]
        if use_ray:
            import ray

            opts = {"num_cpus": threads, "max_retries": 0, **(task_options or {})}
            remote = ray.remote(build_shard).options(**opts)
            built = ray.get([remote.remote(*a) for a in args])
        else:
            built = [build_shard(*a) for a in args]
        checksums = {name: sha for _, sums in built for name, sha in sums.items()}
        sizes, ends = file_records(stage.local, sorted(checksums))  # what a normal load checks
        manifest = Manifest(
            kind=KIND,
            config=cfg_dict,
            fingerprints={"encoder": encoder_fingerprint},
            counts={"vectors": stats.count},
            checksums=checksums,
            sizes=sizes,
            ends_sha256=ends,
            index_id=uuid.uuid4().hex,
            dim=stats.dim,
            index_dim=stats.dim + 1 if cfg.metric == "mips_l2" else stats.dim,
            metric=cfg.metric,
            transform=({"type": "mips_l2", "max_norm_sq": stats.max_norm_sq, "query_extra": 0.0}
                       if cfg.metric == "mips_l2" else {"type": "none"}),
            quantization=cfg.quantization,
            exact=cfg.exact,
            faiss_index=built[0][0]["faiss_index"] if is_pq else type(make_faiss_index(2, cfg)).__name__,
            hnsw=None if cfg.exact or (is_pq and cfg.pq_coarse == "ivf") else {
                "m": cfg.hnsw_m, "ef_construction": cfg.ef_construction, "ef_search": cfg.ef_search},
            **({"pq": {"m": plans[0]["pq_m"], "nbits": cfg.pq_nbits, "coarse": cfg.pq_coarse,
                       "opq": cfg.quantization == "opq",
                       "nprobe": cfg.ivf_nprobe if cfg.pq_coarse == "ivf" else None,
                       "train_size": cfg.pq_train_size,
                       "code_bytes": (plans[0]["pq_m"] * cfg.pq_nbits + 7) // 8}} if is_pq else {}),
            shards=[entry for entry, _ in built],
            encoder_settings=encoder_settings,
            embeddings={"path": str(Path(embeddings_path).absolute()), "files": len(stats.files)},
            has_vectors=store_vectors,
        )
        save_config(cfg, stage.local)
        write_manifest(stage.local, manifest)
    return DenseIndexInfo.from_manifest(out, manifest_view(manifest))
