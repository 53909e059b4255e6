"""Compressed dense shards (issue 16): recall@10 against exact search, bytes per vector on disk and
resident, and queries/s per shard kind and parameter, in one run; and the memory of each kind at
Wikipedia-like width (768-d) and 1M vectors, to check docs/scaling.md's layout arithmetic.

Two parts:

* ``recall`` (REAL vectors only): an embeddings Parquet (``re2g embed``; e.g. all-MiniLM-L6-v2 over
  the 12,382 vital-articles passages) and the queries of a KILT task file (the vital_qa dev
  descriptions) embedded by the same model (``--model``; cached beside the embeddings). Every kind is
  built by ``build_dense_index`` (in process, one shard, the library's code path) and searched through
  ``DenseIndex.search_vectors``; recall@k = |top-k ∩ exact top-k| / k against a flat float32 index.
  For PQ kinds also the error of their reconstruction (``sa_decode(sa_encode(x))``) on the exact top-k
  inner products: why stages 2/4 read the stored float32 vectors instead.
* ``memory`` (``--memory-n``; random Gaussian vectors, tiled: bytes do not depend on the values): each
  kind built with ``make_faiss_index`` and the same per-shard plan (``plan_pq_shards``) over N vectors of
  ``--memory-dim`` (flat and IVF kinds: 65,536 vectors repeated, see ``_build_memory_index``), written with ``faiss.write_index`` (file bytes / N) and read back in a fresh
  process (VmRSS after minus before ``faiss.read_index``, / N). HNSW kinds at ``--memory-hnsw-n``
  (graph bytes per vector do not depend on N; building a 1M graph is hours on 2 shared cores).

    python -m benchmarks.compression --embeddings runs/ve --task runs/v/tasks/vital_qa-dev-kilt.jsonl \\
        --model $(python -c "from re2g.assets import asset_path; print(asset_path('minilm'))")
    python -m benchmarks.compression --memory-n 1000000 --skip-recall

Writes ``bench_out/compression.json`` and ``bench_out/compression.png`` (recall@10 vs queries/s and
vs resident bytes per vector).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

NAME = "compression"
K = 10
FP = "benchmark-encoder"


# --------------------------------------------------------------------------- the kinds


def recall_kinds(dim: int) -> list[tuple[str, dict, dict]]:
    """(label, IndexConfig fields, search sweep) of every kind the recall part measures for vectors of
    width ``dim`` (normalized sentence vectors: metric ip, except HNSW-PQ which faiss runs in L2 only:
    mips_l2, index dimension dim + 1)."""
    from re2g.index.dense_format import default_pq_m

    m = default_pq_m(dim)  # 384 -> 48 (8 dims per code)
    nprobe = {"nprobe": [1, 4, 16, 64]}
    kinds = [
        ("flat fp32", dict(exact=True, metric="ip"), {}),
        ("hnsw fp32 M=32", dict(metric="ip", hnsw_m=32, ef_construction=100), {"ef_search": [64, 128]}),
        ("flat sq8", dict(exact=True, metric="ip", quantization="sq8"), {}),
    ]
    for mm in ([m, 2 * m] if dim % (2 * m) == 0 else [m]):
        kinds.append((f"ivf-pq m={mm}", dict(metric="ip", quantization="pq", pq_m=mm), nprobe))
    hm = default_pq_m(dim + 1)  # 385 -> 35
    kinds.append((f"hnsw-pq M=32 m={hm}", dict(metric="mips_l2", quantization="pq", pq_coarse="hnsw", pq_m=hm,
                                               hnsw_m=32, ef_construction=100), {"ef_search": [64, 128, 256]}))
    kinds.append((f"opq+ivf-pq m={m}", dict(metric="ip", quantization="opq", pq_m=m), nprobe))  # slowest to train
    return kinds


def memory_kinds(dim: int) -> list[tuple[str, dict, bool]]:
    """(label, IndexConfig fields, is_graph) of the memory part (metric ip, index dimension ``dim``;
    HNSW-PQ: L2 only, so mips_l2 over ``dim - 1`` columns + 1, to keep index dimension ``dim``: 769 is
    prime). OPQ is left out: its training (50 rotations of 768 x 768) took 8 min for 3,000 vectors on
    the loaded 2 cores; in memory it is IVF-PQ plus the D x D float32 matrix per shard."""
    return [
        ("flat fp32", dict(exact=True, metric="ip"), False),
        ("flat sq8", dict(exact=True, metric="ip", quantization="sq8"), False),
        ("ivf-pq m=64", dict(metric="ip", quantization="pq", pq_m=64), False),
        ("ivf-pq m=96", dict(metric="ip", quantization="pq", pq_m=96), False),
        ("hnsw fp32 M=32", dict(metric="ip", hnsw_m=32, ef_construction=40), True),
        ("hnsw sq8 M=32", dict(metric="ip", hnsw_m=32, ef_construction=40, quantization="sq8"), True),
        ("hnsw-pq M=32 m=96", dict(metric="mips_l2", quantization="pq", pq_coarse="hnsw", pq_m=96, hnsw_m=32,
                                   ef_construction=40), True),
    ]


# --------------------------------------------------------------------------- measuring


_RSS_SCRIPT = """
import sys, faiss, json
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
before = rss()
index = faiss.read_index(sys.argv[1])
after = rss()
print(json.dumps({"bytes": after - before, "ntotal": index.ntotal}))
"""


def resident_bytes(index_file: Path) -> int:
    """VmRSS growth of a fresh Python process (faiss imported) that reads ``index_file``: what the
    loaded index holds in memory."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(index_file)], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(json.loads(out.stdout.strip().splitlines()[-1])["bytes"])


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    """pids and vectors (N, D) float32 of an embeddings Parquet (file or directory)."""
    import pyarrow.dataset as pads

    files = [str(f) for f in sorted(Path(path).rglob("*.parquet")) if not f.name.startswith((".", "_"))] \
        if Path(path).is_dir() else [str(path)]
    t = pads.dataset(files, format="parquet").to_table(columns=["pid", "vector"])
    pids = t.column("pid").to_pylist()
    X = t.column("vector").combine_chunks().flatten().to_numpy().reshape(len(pids), -1)
    return pids, np.ascontiguousarray(X, dtype=np.float32)


def query_vectors(task: Path, model: str, cache: Path) -> np.ndarray:
    """The task file's inputs embedded by the bi-encoder at ``model`` (B, D); cached in ``cache``."""
    from re2g.data.kilt import read_kilt

    texts = [ex.input for ex in read_kilt(str(task))]
    key = cache / f"queries_{task.stem}.npy"
    if key.is_file():
        Q = np.load(key)
        if Q.shape[0] == len(texts):
            return Q
    from re2g.models.encoders import BiEncoder

    enc = BiEncoder.from_pretrained(model)
    Q = np.asarray(enc.embed_queries(texts, batch_size=128), dtype=np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(key, Q)
    return Q


def _recall(hits, exact: list[set[str]]) -> float:
    return float(np.mean([len({h.pid for h in hs} & e) / K for hs, e in zip(hits, exact)]))


def _timed_search(index, Q: np.ndarray, repeats: int):
    best, hits = float("inf"), None
    for _ in range(repeats):
        hits, s = common.timed(lambda: index.search_vectors(Q, K))
        best = min(best, s)
    return hits, len(Q) / best


def reconstruction_error(shard, X: np.ndarray, Q: np.ndarray, top: np.ndarray) -> dict:
    """How far PQ codes are from the vectors: relative L2 error |x - x̂| / |x| over all rows, and
    the error of the inner products q·x̂ vs q·x on each query's exact top-k (``top`` (B, K) rows),
    absolute and relative to the spread (std) of those top-k scores."""
    Xi = X if shard.metric == "ip" else np.hstack([X, np.zeros((len(X), 1), np.float32)])
    Xh = shard.index.sa_decode(shard.index.sa_encode(np.ascontiguousarray(Xi)))[:, :X.shape[1]]  # (N, D)
    rel = np.linalg.norm(X - Xh, axis=1) / np.maximum(np.linalg.norm(X, axis=1), 1e-12)
    S = np.einsum("bd,bkd->bk", Q, X[top])  # (B, K) exact inner products
    Sh = np.einsum("bd,bkd->bk", Q, Xh[top])  # (B, K) from the codes
    err = np.abs(S - Sh)
    return {"relative_l2_error_mean": round(float(rel.mean()), 4),
            "topk_ip_abs_error_mean": round(float(err.mean()), 5),
            "topk_ip_error_over_topk_score_std": round(float(err.mean() / max(S.std(axis=1).mean(), 1e-12)), 3)}


def run_recall(emb: Path, task: Path, model: str, work: Path, repeats: int, threads: int,
               skip: tuple[str, ...] = ()) -> dict:
    """The recall part (see the module docstring)."""
    import faiss

    from re2g.config import IndexConfig
    from re2g.index.dense import DenseIndex, build_dense_index

    faiss.omp_set_num_threads(threads)
    pids, X = read_embeddings(emb)
    Q = query_vectors(task, model, work)
    ex = np.argsort(-(Q.astype(np.float64) @ X.astype(np.float64).T), axis=1, kind="stable")[:, :K]  # (B, K)
    exact = [{pids[j] for j in row} for row in ex]
    rows = []
    for label, fields, sweep in recall_kinds(X.shape[1]):
        if any(word in label for word in skip):
            continue
        cfg = IndexConfig(num_shards=1, **fields)
        out = work / "idx" / label.replace(" ", "_").replace("=", "").replace("+", "_")
        _, build_s = common.timed(lambda: build_dense_index(emb, out, cfg, encoder_fingerprint=FP, use_ray=False,
                                                            overwrite=True, store_vectors=False, threads=threads))
        index = DenseIndex.load(out)
        shard = index.shards[0]
        fpath = out / shard.entry["file"]
        row = {"kind": label, "config": fields, "build_seconds": round(build_s, 2),
               "factory": shard.entry.get("factory"), "nlist": shard.entry.get("nlist"),
               "disk_bytes_per_vector": round(fpath.stat().st_size / len(pids), 1),
               "resident_bytes_per_vector": round(resident_bytes(fpath) / len(pids), 1), "by_param": {}}
        settings = [(k, v) for k, vs in sweep.items() for v in vs] or [(None, None)]
        for key, value in settings:
            if key == "nprobe":
                index.set_nprobe(value)
            elif key == "ef_search":
                index.set_ef_search(value)
            hits, qps = _timed_search(index, Q, repeats)
            row["by_param"][f"{key}={value}" if key else "-"] = {"recall@10": round(_recall(hits, exact), 4),
                                                                 "queries_per_s": round(qps, 1)}
        if cfg.quantization in ("pq", "opq") and cfg.pq_coarse == "ivf":
            row["reconstruction"] = reconstruction_error(shard, X, Q, ex)
        rows.append(row)
        print(f"  {label}: {row['by_param']}", flush=True)
        (work / "recall_partial.json").write_text(json.dumps(rows, indent=1))  # survives an interrupted run
    return {"vectors": len(pids), "dim": int(X.shape[1]), "queries": int(len(Q)), "kinds": rows}


TILE = 65_536


def _build_memory_index(fields: dict, n: int, dim: int, out: Path, graph: bool, seed: int = 0) -> dict:
    """Build one memory-part index of ``n`` vectors with the library's factory choice (make_faiss_index,
    plan_pq_shards), trained on ``TILE`` random Gaussian vectors. Flat and IVF kinds hold that tile
    repeated up to ``n`` (IVF: its codes, encoded once, added with new ids: the lists' layout of n
    vectors without n assignments, which take hours on 2 shared cores); graph kinds ``n`` distinct
    random vectors. Returns the factory, nlist and seconds."""
    from re2g.config import IndexConfig
    from re2g.index.dense_build import make_faiss_index
    from re2g.index.dense_format import PQ_KINDS, plan_pq_shards

    import faiss

    cfg = IndexConfig(num_shards=1, pq_train_size=65_536, **fields)
    idim = dim + 1 if cfg.metric == "mips_l2" else dim
    plan = plan_pq_shards(idim, dim, [n], cfg)[0] if cfg.quantization in PQ_KINDS else None
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    index = make_faiss_index(idim, cfg, plan["factory"] if plan else None)
    batch = rng.standard_normal((min(TILE, n), idim), dtype=np.float32)  # (TILE, D'): tiled up to n
    if not index.is_trained:
        index.train(batch)
    if plan and cfg.pq_coarse == "ivf":  # encode the tile once, add its codes n/TILE times (new ids)
        codes = index.sa_encode(batch)  # (TILE, list-number bytes + code bytes)
        ivf = faiss.extract_index_ivf(index)
        for a in range(0, n, TILE):
            m = min(TILE, n - a)
            ivf.add_sa_codes(codes[:m], np.arange(a, a + m, dtype=np.int64))
        index.ntotal = ivf.ntotal  # an OPQ IndexPreTransform counts its own
    elif graph:  # a graph needs distinct vectors: no tiling
        index.add(batch)
        for a in range(len(batch), n, TILE):
            index.add(rng.standard_normal((min(TILE, n - a), idim), dtype=np.float32))
    else:
        for a in range(0, n, TILE):
            index.add(batch[:min(TILE, n - a)])
    faiss.write_index(index, str(out))
    return {"factory": plan["factory"] if plan else type(index).__name__, "nlist": plan and plan["nlist"],
            "index_dim": idim, "build_seconds": round(time.perf_counter() - t0, 1)}


def run_memory(n: int, hnsw_n: int, dim: int, work: Path, threads: int) -> dict:
    """The memory part (see the module docstring)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    rows = []
    for label, fields, graph in memory_kinds(dim):
        nn = hnsw_n if graph else n
        f = work / "memory.faiss"
        info = _build_memory_index(fields, nn, dim - 1 if fields["metric"] == "mips_l2" else dim, f, graph)
        row = {"kind": label, "vectors": nn, **info,
               "disk_bytes_per_vector": round(f.stat().st_size / nn, 1),
               "resident_bytes_per_vector": round(resident_bytes(f) / nn, 1)}
        f.unlink()
        rows.append(row)
        print(f"  memory {label}: {row}", flush=True)
    return {"dim": dim, "kinds": rows}


# --------------------------------------------------------------------------- report


def table(result: common.Result):
    t = common.new_table(f"compressed shards: recall@{K} vs exact, bytes per vector, queries/s",
                         ("part", "kind", "param", f"recall@{K}", "q/s", "disk B/vec", "resident B/vec"), left=3)
    rec = result.results.get("recall")
    if rec:
        for row in rec["kinds"]:
            for i, (param, r) in enumerate(row["by_param"].items()):
                t.add_row("recall" if not i else "", row["kind"] if not i else "", param, f"{r['recall@10']:.4f}",
                          common.fmt(r["queries_per_s"]), common.fmt(row["disk_bytes_per_vector"]) if not i else "",
                          common.fmt(row["resident_bytes_per_vector"]) if not i else "")
    mem = result.results.get("memory")
    if mem:
        for row in mem["kinds"]:
            t.add_row("memory", row["kind"], f"N={row['vectors']:,}", "", "", common.fmt(row["disk_bytes_per_vector"]),
                      common.fmt(row["resident_bytes_per_vector"]))
    return t


def plot(result: common.Result, path: Path) -> Path | None:
    """recall@10 against queries/s and against resident bytes per vector, one point per setting."""
    rec = result.results.get("recall")
    if not rec:
        return None
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for row in rec["kinds"]:
        rs = [r["recall@10"] for r in row["by_param"].values()]
        qs = [r["queries_per_s"] for r in row["by_param"].values()]
        ax1.plot(qs, rs, marker="o", label=row["kind"])
        ax2.scatter([row["resident_bytes_per_vector"]] * len(rs), rs, label=row["kind"])
    ax1.set_xscale("log")
    ax1.set_xlabel("queries/s (1 faiss thread, batch of all queries)")
    ax2.set_xscale("log")
    ax2.set_xlabel("resident bytes per vector")
    for ax in (ax1, ax2):
        ax.set_ylabel(f"recall@{K} vs exact")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(f"{rec['vectors']:,} real vectors (dim {rec['dim']}), {rec['queries']:,} queries")
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> Path:
    """Command line (see the module docstring); returns the JSON's path."""
    p = common.parser(__doc__.splitlines()[0], "demo")
    p.add_argument("--embeddings", type=Path, help="embeddings Parquet (re2g embed) of real passages")
    p.add_argument("--task", type=Path, help="KILT task file whose inputs are the queries")
    p.add_argument("--model", help="the bi-encoder that made the embeddings (embeds the queries)")
    p.add_argument("--skip-recall", action="store_true")
    p.add_argument("--memory-n", type=int, default=0, help="vectors of the memory part (0: skip it)")
    p.add_argument("--memory-hnsw-n", type=int, default=100_000, help="vectors of the memory part's HNSW kinds")
    p.add_argument("--memory-dim", type=int, default=768)
    p.add_argument("--threads", type=int, default=1, help="faiss threads (build and search)")
    p.add_argument("--repeats", type=int, default=3, help="searches per setting (the fastest counts)")
    p.add_argument("--skip-kinds", nargs="*", default=[], help="leave out recall kinds whose label contains any "
                   "of these words (e.g. opq: its training is the slowest)")
    args = p.parse_args(argv)
    result = common.Result(NAME)
    result.params.update(size=args.size, k=K, skip_kinds=args.skip_kinds, threads=args.threads, repeats=args.repeats, memory_n=args.memory_n,
                         memory_hnsw_n=args.memory_hnsw_n, memory_dim=args.memory_dim,
                         embeddings=str(args.embeddings) if args.embeddings else None,
                         task=str(args.task) if args.task else None, model=args.model)
    work = common.cache_dir(args) / "compression"
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_recall:
        if not (args.embeddings and args.task and args.model):
            p.error("the recall part needs --embeddings, --task and --model (or --skip-recall)")
        result.results["recall"] = run_recall(args.embeddings, args.task, args.model, work, args.repeats,
                                              args.threads, tuple(args.skip_kinds))
        rec = result.results["recall"]
        flat = rec["kinds"][0]["by_param"]["-"]["queries_per_s"]
        for row in rec["kinds"][1:]:
            for param, r in row["by_param"].items():
                result.ratios[f"{row['kind']} {param}: q/s / flat q/s"] = common.ratio(r["queries_per_s"], flat)
            result.ratios[f"{row['kind']}: resident bytes / flat's"] = common.ratio(
                row["resident_bytes_per_vector"], rec["kinds"][0]["resident_bytes_per_vector"], 4)
        result.notes.append("recall part: one shard per kind over all vectors, built by build_dense_index; queries "
                            "searched as one batch through DenseIndex.search_vectors; resident = VmRSS growth of a "
                            "fresh process reading the shard (includes centroids and codebooks: large per vector at "
                            "this N)")
    if args.memory_n:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            result.results["memory"] = run_memory(args.memory_n, args.memory_hnsw_n, args.memory_dim, Path(tmp),
                                                  args.threads)
        result.notes.append("memory part: 65,536 random Gaussian vectors (bytes per vector do not depend on the "
                            "values), tiled to N for flat and IVF kinds (IVF: codes encoded once, added with new "
                            "ids); HNSW kinds over memory_hnsw_n distinct ones; nlist from plan_pq_shards")
        mem = {r["kind"]: r for r in result.results["memory"]["kinds"]}
        if "flat fp32" in mem:
            for kind, r in mem.items():
                if kind != "flat fp32":
                    result.ratios[f"memory {kind}: resident / flat fp32"] = common.ratio(
                        r["resident_bytes_per_vector"], mem["flat fp32"]["resident_bytes_per_vector"], 4)
    out = common.finish(result, table(result), args.out)
    png = plot(result, args.out / f"{NAME}.png")
    if png:
        common.print_written(png)
    return out


if __name__ == "__main__":
    main()
