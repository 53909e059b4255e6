"""HNSW recall@10 against exact (flat) search on the same vectors, at several efSearch values, with
queries/s at each and flat search's queries/s (the ratio), in the same run.

Vectors: the first ``--n`` passages of the bench sample (default 100,000) embedded once with the
untrained tiny context encoder through Ray Data and cached (``--passage-max-length``, default 64 to
keep that one-off step to a few minutes on 2 CPUs). Queries: the bench sample's dev inputs (slot
filling, QA, fact verification) embedded with the query encoder. Indexes are built by
``build_dense_index`` (in process, ``--threads`` faiss threads) and cached by their parameters;
search goes through ``DenseIndex.search_vectors`` (the library's path: faiss search, MIPS transform,
top-k merge). Recall@k = |HNSW top-k ∩ exact top-k| / k, averaged over queries.

Two views of the vectors (``--views``), each with its own flat and HNSW indexes:

* ``raw``: the vectors as the untrained encoder makes them. They are degenerate: every vector has
  norm sqrt(hidden) and all point almost the same way (mean pairwise cosine ~0.99999), so nearly
  every query has the same exact top-10 (``diagnostics`` in the JSON says how many distinct ones):
  recall there measures a handful of queries, not the index.
* ``standardized``: each side z-scored per dimension (passages by the passages' mean and standard
  deviation, queries by the queries'): a fixed affine map per side, as a final normalization layer
  of the encoder would be. The vectors spread out (cosine ~0, varying norms, so the MIPS transform
  matters) and queries have distinct neighbours: the stand-in for a trained encoder's vectors
  until one exists. Base decisions about M and efSearch on this view.

    python -m benchmarks.hnsw_recall                       # M=32 (tiny preset), mips_l2 and ip
    python -m benchmarks.hnsw_recall --m 32 128            # also the paper's M=128

Writes ``bench_out/hnsw_recall.json`` and ``bench_out/hnsw_recall.png`` (recall and queries/s vs
efSearch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from benchmarks import common

NAME = "hnsw_recall"
TARGET = 0.98


def _topk(hits) -> tuple[list[set[str]], np.ndarray]:
    """Hit lists -> per-query pid sets and scores (B, k) (-inf where fewer than k hits)."""
    k = max((len(h) for h in hits), default=0)
    scores = np.full((len(hits), k), -np.inf)
    for i, hs in enumerate(hits):
        scores[i, :len(hs)] = [h.score for h in hs]
    return [{h.pid for h in hs} for hs in hits], scores


def recall_at_k(found: list[set[str]], exact: list[set[str]], k: int) -> float:
    """Mean over queries of |found ∩ exact| / k."""
    return float(np.mean([len(f & e) / k for f, e in zip(found, exact)])) if exact else float("nan")


def score_recall_at_k(found_scores: np.ndarray, exact_scores: np.ndarray, k: int) -> float:
    """Share of the returned top-k whose inner product reaches the exact k-th best (ties and
    near-ties count as found; a small tolerance absorbs the MIPS transform's rounding)."""
    kth = exact_scores[:, k - 1:k]  # (B, 1)
    tol = 1e-4 * np.maximum(1.0, np.abs(kth))
    return float(np.mean((found_scores[:, :k] >= kth - tol).sum(axis=1) / k))


def _build_cached(emb: Path, out: Path, cfg, fingerprint: str, threads: int, rebuild: bool) -> dict:
    """Build (or reuse) a dense index at ``out``; returns ``{"seconds", "cached"}``."""
    from re2g.index.dense import build_dense_index, read_manifest

    side = out.with_name(out.name + ".build.json")
    want = cfg.model_dump(mode="json")
    stamp = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(emb.glob("_*.json")))).hexdigest()
    if not rebuild and side.is_file():
        try:
            m = read_manifest(out)
            info = json.loads(side.read_text())
            if m["config"] == want and m["encoder_fingerprint"] == fingerprint and info.get("stamp") == stamp:
                return {"seconds": info["seconds"], "cached": True}
        except Exception:  # missing or broken: build again
            pass
    _, seconds = common.timed(lambda: build_dense_index(emb, out, cfg, encoder_fingerprint=fingerprint,
                                                        use_ray=False, overwrite=True, store_vectors=False,
                                                        threads=threads))
    side.write_text(json.dumps({"seconds": round(seconds, 3), "embeddings": str(emb), "stamp": stamp,
                                "threads": threads}))
    return {"seconds": round(seconds, 3), "cached": False}


def standardize(X: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None) -> np.ndarray:
    """Per-dimension z-score of ``X`` (N, D) by ``mean``/``std`` (D,) (default: ``X``'s own)."""
    mean = X.mean(axis=0) if mean is None else mean
    std = X.std(axis=0) if std is None else std
    return ((X - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def _read_vectors(path: Path) -> tuple[list[str], np.ndarray]:
    import pyarrow.dataset as pads

    t = pads.dataset(str(path), format="parquet").to_table()
    pids = t.column("pid").to_pylist()
    X = t.column("vector").combine_chunks().flatten().to_numpy().reshape(len(pids), -1)  # (N, D)
    return pids, np.ascontiguousarray(X, dtype=np.float32)


def standardized_embeddings(emb: Path) -> Path:
    """The embeddings at ``emb`` z-scored per dimension, written once beside them (cached)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from re2g.index.embed import _vectors_column

    out = emb.with_name(emb.name + "_standardized")
    src = (emb / "_embeddings.json").read_text()
    marker = out / "_source.json"
    if marker.is_file() and marker.read_text() == src:
        return out
    pids, X = _read_vectors(emb)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    pq.write_table(pa.table({"pid": pa.array(pids, pa.string()), "vector": _vectors_column(standardize(X))}),
                   out / "part-00000.parquet")
    marker.write_text(src)
    return out


def diagnostics(X: np.ndarray, Q: np.ndarray, exact_sets: list[set[str]], sample: int = 2000) -> dict:
    """How spread out the vectors are: mean pairwise cosine (passages, queries), norm range,
    participation ratio of the passage covariance's eigenvalues (effective dimensions), and how
    many distinct exact top-k sets the queries have."""
    rng = np.random.default_rng(0)

    def mean_cos(V):
        V = V[rng.choice(len(V), min(sample, len(V)), replace=False)]
        Vn = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
        S = Vn @ Vn.T
        return round(float(S[np.triu_indices(len(V), 1)].mean()), 5)

    ev = np.linalg.eigvalsh(np.cov(X[rng.choice(len(X), min(20000, len(X)), replace=False)].T.astype(np.float64)))
    norms = np.linalg.norm(X, axis=1)
    return {"passage_mean_cosine": mean_cos(X), "query_mean_cosine": mean_cos(Q),
            "passage_norm_min": round(float(norms.min()), 4), "passage_norm_max": round(float(norms.max()), 4),
            "passage_effective_dims": round(float(ev.sum() ** 2 / (ev ** 2).sum()), 1),
            "distinct_exact_topk_sets": len({frozenset(s) for s in exact_sets}), "queries": len(exact_sets)}


def _timed_search(index, Q: np.ndarray, k: int, repeats: int):
    """Warm up, then search all of ``Q`` ``repeats`` times: (hits, fastest seconds)."""
    index.search_vectors(Q[:min(len(Q), 32)], k)
    best, hits = float("inf"), None
    for _ in range(max(1, repeats)):
        hits, seconds = common.timed(lambda: index.search_vectors(Q, k))
        best = min(best, seconds)
    return hits, best


def _evaluate_view(emb: Path, Q: np.ndarray, fingerprint: str, idx_root: Path, tag: str, *, ms, metrics, efs,
                   shards, ef_construction, k, threads, rebuild, repeats) -> dict:
    """Flat and HNSW indexes over ``emb`` (cached under ``idx_root``), searched with ``Q`` (B, D)."""
    import faiss

    from re2g.config import IndexConfig
    from re2g.index.dense import DenseIndex

    B = len(Q)
    flat_dir = idx_root / f"{tag}_flat"
    flat_build = _build_cached(emb, flat_dir, IndexConfig(exact=True, metric="ip", num_shards=shards), fingerprint,
                               threads, rebuild)
    faiss.omp_set_num_threads(threads)
    flat = DenseIndex.load(flat_dir)
    exact_hits, flat_s = _timed_search(flat, Q, k, repeats)
    exact_sets, exact_scores = _topk(exact_hits)
    flat_qps = B / flat_s
    del flat

    configs = []
    for metric in metrics:
        for m in ms:
            cfg = IndexConfig(hnsw_m=m, ef_construction=ef_construction, metric=metric, num_shards=shards)
            d = idx_root / f"{tag}_{metric}_m{m}_efc{ef_construction}"
            build = _build_cached(emb, d, cfg, fingerprint, threads, rebuild)
            faiss.omp_set_num_threads(threads)
            index = DenseIndex.load(d)
            by_ef = {}
            for ef in efs:
                index.set_ef_search(ef)
                hits, seconds = _timed_search(index, Q, k, repeats)
                sets, scores = _topk(hits)
                by_ef[ef] = {"recall@k": round(recall_at_k(sets, exact_sets, k), 4),
                             "score_recall@k": round(score_recall_at_k(scores, exact_scores, k), 4),
                             "seconds": round(seconds, 3), "queries_per_s": round(B / seconds, 1)}
            reached = [ef for ef in efs if by_ef[ef]["recall@k"] >= TARGET]
            configs.append({"metric": metric, "m": m, "ef_construction": ef_construction, "shards": shards,
                            "build_seconds": build["seconds"], "build_cached": build["cached"],
                            "by_ef_search": by_ef, "min_ef_search_reaching_target": min(reached, default=None)})
            del index
    _, X = _read_vectors(emb)
    return {"flat": {"metric": "ip", "build_seconds": flat_build["seconds"], "build_cached": flat_build["cached"],
                     "seconds": round(flat_s, 3), "queries_per_s": round(flat_qps, 1)},
            "hnsw": configs, "diagnostics": diagnostics(X, Q, exact_sets, sample=2000)}


def _preset_verdicts(view: dict, ef_construction: int) -> dict:
    """Recall@k of the tiny and paper presets' (M, efSearch, metric) where this run measured them."""
    from re2g.config import load_config

    out = {}
    for preset in ("tiny", "paper"):
        ic = load_config(preset=preset).index
        hit = next((c for c in view["hnsw"] if c["m"] == ic.hnsw_m and c["metric"] == ic.metric), None)
        row = hit["by_ef_search"].get(ic.ef_search) if hit and ic.ef_construction == ef_construction else None
        out[preset] = {"hnsw_m": ic.hnsw_m, "ef_search": ic.ef_search, "metric": ic.metric,
                       "ef_construction": ic.ef_construction, "recall@k": row["recall@k"] if row else None,
                       "meets_target": (row["recall@k"] >= TARGET) if row else None}
    return out


def run(corpus: common.Corpus, *, n: int | None, passage_max_length: int, query_max_length: int,
        views: list[str], ms: list[int], metrics: list[str], efs: list[int], shards: int, ef_construction: int,
        k: int, threads: int, n_queries: int | None, rebuild: bool, repeats: int,
        result: common.Result) -> common.Result:
    """Embed (cached), build flat + HNSW indexes (cached), search at every efSearch; fills ``result``."""
    emb, emb_meta = corpus.embeddings(n, max_length=passage_max_length)
    fingerprint = emb_meta["fingerprint"]
    queries = corpus.dev_queries(n_queries)
    Q = corpus.embed_queries(queries, max_length=query_max_length)  # (B, D)
    idx_root = corpus.root / "indexes"
    opts = dict(ms=ms, metrics=metrics, efs=efs, shards=shards, ef_construction=ef_construction, k=k,
                threads=threads, rebuild=rebuild, repeats=repeats)
    out_views = {}
    for view in views:
        if view == "raw":
            v = _evaluate_view(emb, Q, fingerprint, idx_root, f"{emb.name}_s{shards}", **opts)
        else:
            std = standardized_embeddings(emb)
            v = _evaluate_view(std, standardize(Q), fingerprint, idx_root, f"{std.name}_s{shards}", **opts)
        v["presets"] = _preset_verdicts(v, ef_construction)
        out_views[view] = v

    result.params.update(size=corpus.size, vectors=emb_meta["passages"], dim=emb_meta["dim"], queries=len(queries),
                         k=k, views=views, ef_search=efs, hnsw_m=ms, metrics=metrics, ef_construction=ef_construction,
                         shards=shards, faiss_threads=threads, passage_max_length=passage_max_length,
                         query_max_length=query_max_length, embeddings=str(emb),
                         query_source="dev inputs of the sample's tasks, query encoder", search_repeats=repeats,
                         encoder="untrained tiny DPR bi-encoder (tiny preset)")
    result.results = {
        "embeddings": {"passages": emb_meta["passages"], "seconds": emb_meta.get("seconds"),
                       "passages_per_s": emb_meta.get("passages_per_s"), "cached": emb_meta["cached"]},
        "views": out_views,
        "target": {"recall@k": TARGET},
    }
    result.ratios = {f"{view} {c['metric']} M={c['m']} ef={ef}: hnsw q/s / flat q/s":
                     common.ratio(r["queries_per_s"], v["flat"]["queries_per_s"])
                     for view, v in out_views.items() for c in v["hnsw"] for ef, r in c["by_ef_search"].items()}
    result.notes.append(f"each index: {shards} shard(s) over all {emb_meta['passages']:,} vectors; passages embedded "
                        f"at max length {passage_max_length}; faiss threads {threads}; batch search of all queries, "
                        f"fastest of {repeats}")
    result.notes.append("raw vectors of an untrained encoder are degenerate (see diagnostics); base decisions on "
                        "the standardized view")
    result.notes.append("score_recall@k counts a returned passage as found when its inner product reaches the "
                        "exact k-th best (ties)")
    return result


def table(result: common.Result):
    p, r = result.params, result.results
    t = common.new_table(f"HNSW recall@{p['k']} vs exact, {p['vectors']:,} vectors (dim {p['dim']}), "
                         f"{p['queries']:,} queries, {p['faiss_threads']} faiss threads",
                         ("vectors", "index", "efSearch", f"recall@{p['k']}", "score recall", "queries/s", "vs flat",
                          "build s"), left=2)
    for view, v in r["views"].items():
        flat_qps = v["flat"]["queries_per_s"]
        t.add_row(view, "flat (exact, ip)", "-", "1.0000", "1.0000", common.fmt(flat_qps), "1.00x",
                  common.fmt(v["flat"]["build_seconds"]))
        for c in v["hnsw"]:
            first = True
            for ef, row in c["by_ef_search"].items():
                mark = "" if row["recall@k"] >= TARGET else " [red]✗[/red]"
                build = common.fmt(c["build_seconds"]) + (" (cached)" if c["build_cached"] else "")
                t.add_row("", f"HNSW {c['metric']} M={c['m']}" if first else "", str(ef),
                          f"{row['recall@k']:.4f}{mark}", f"{row['score_recall@k']:.4f}",
                          common.fmt(row["queries_per_s"]), f"{common.ratio(row['queries_per_s'], flat_qps):.2f}x",
                          build if first else "")
                first = False
        d = v["diagnostics"]
        t.add_row("", f"[dim]distinct exact top-{p['k']} sets {d['distinct_exact_topk_sets']:,}/{d['queries']:,}, "
                      f"passage cos {d['passage_mean_cosine']}, eff. dims {d['passage_effective_dims']}[/dim]",
                  end_section=True)
    return t


def plot(result: common.Result, path: Path) -> Path:
    """Recall@k and queries/s against efSearch, one row per view, one line per (metric, M);
    flat q/s dashed."""
    plt = common.pyplot()
    p, r = result.params, result.results
    views = list(r["views"])
    fig, axes = plt.subplots(len(views), 2, figsize=(11, 4.0 * len(views)), squeeze=False)
    for (ax1, ax2), view in zip(axes, views):
        v = r["views"][view]
        for c in v["hnsw"]:
            efs = list(c["by_ef_search"])
            label = f"{c['metric']} M={c['m']}"
            ax1.plot(efs, [c["by_ef_search"][e]["recall@k"] for e in efs], marker="o", label=label)
            ax2.plot(efs, [c["by_ef_search"][e]["queries_per_s"] for e in efs], marker="o", label=label)
        ax1.axhline(TARGET, color="grey", linestyle=":", label=f"target {TARGET}")
        ax1.set(xscale="log", xlabel="efSearch", ylabel=f"recall@{p['k']} vs exact",
                title=f"{view}: HNSW recall, {p['vectors']:,} vectors")
        ax2.axhline(v["flat"]["queries_per_s"], color="black", linestyle="--", label="flat (exact)")
        ax2.set(xscale="log", yscale="log", xlabel="efSearch", ylabel="queries/s",
                title=f"{view}: queries/s ({p['faiss_threads']} threads, batch of {p['queries']:,})")
        for ax in (ax1, ax2):
            ax.set_xticks(p["ef_search"], [str(e) for e in p["ef_search"]])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> Path:
    """Command line: ``python -m benchmarks.hnsw_recall [--size bench] [--n 100000] [--m 32 128] ...``."""
    from re2g.config import load_config

    tiny = load_config(preset="tiny")
    p = common.parser(__doc__.splitlines()[0], default_size="bench")
    p.add_argument("--n", type=int, default=100_000, help="vectors: the first N passages (all when fewer)")
    p.add_argument("--queries", type=int, default=None, help="use only the first N dev queries (default: all)")
    p.add_argument("--views", nargs="+", default=["raw", "standardized"], choices=["raw", "standardized"],
                   help="which vectors (see the module docstring)")
    p.add_argument("--m", type=int, nargs="+", default=[tiny.index.hnsw_m], help="HNSW M values")
    p.add_argument("--metrics", nargs="+", default=["mips_l2", "ip"], choices=["mips_l2", "ip"])
    p.add_argument("--ef", type=int, nargs="+", default=[16, 64, 128, 256], help="efSearch values")
    p.add_argument("--ef-construction", type=int, default=tiny.index.ef_construction)
    p.add_argument("--shards", type=int, default=1, help="shards per index (1: one graph over all vectors)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=common.usable_cpus(), help="faiss threads (build and search)")
    p.add_argument("--passage-max-length", type=int, default=64)
    p.add_argument("--query-max-length", type=int, default=tiny.models.query_max_length)
    p.add_argument("--rebuild", action="store_true", help="rebuild cached indexes")
    p.add_argument("--repeats", type=int, default=2, help="searches per setting; the fastest counts")
    p.add_argument("--tag", default=None, help="write hnsw_recall_<tag>.json/.png (keeps the default run's files)")
    args = p.parse_args(argv)
    corpus = common.prepare_corpus(args.size, common.cache_dir(args))
    result = run(corpus, n=args.n, passage_max_length=args.passage_max_length,
                 query_max_length=args.query_max_length, views=args.views, ms=args.m, metrics=args.metrics,
                 efs=sorted(args.ef), shards=args.shards, ef_construction=args.ef_construction, k=args.k,
                 threads=args.threads, n_queries=args.queries, rebuild=args.rebuild, repeats=args.repeats,
                 result=common.Result(f"{NAME}_{args.tag}" if args.tag else NAME))
    common.print_table(table(result))
    path = result.write(args.out)
    plot(result, path.with_suffix(".png"))
    common.print_written(path)
    return path


if __name__ == "__main__":
    main()
