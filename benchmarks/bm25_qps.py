"""BM25 queries/s: ``BM25Retriever.batch_search`` with 1 and T Lucene threads vs ``search`` one query at
a time, same index, queries and k, in the same run.

Corpus: the first ``--n`` passages of the bench sample (default 100,000; the same subset as the
dense benchmarks), indexed once by ``build_bm25_index`` and cached. Queries: the sample's dev
inputs. The modes run in turn, one untimed round (JVM start, JIT warm-up) then ``--repeats`` rounds;
each one's fastest round is reported. Every mode returns the same hits (checked).

    python -m benchmarks.bm25_qps                  # bench subset, 2,000 queries, k=12

Writes ``bench_out/bm25_qps.json``.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import common

NAME = "bm25_qps"


def bm25_index(corpus: common.Corpus, n: int | None, threads: int) -> tuple[Path, dict]:
    """The BM25 index of the first ``n`` passages, built once (cached); returns its directory and
    ``{"passages", "build_seconds", "cached"}``."""
    from re2g.errors import ArtifactError
    from re2g.index.bm25 import build_bm25_index, read_manifest

    passages, rows = corpus.subset(n)
    out = corpus.root / "bm25" / passages.name
    try:
        m = read_manifest(out)
        if m["count"] + m.get("skipped_empty", 0) == rows and m["passages_path"] == str(passages.resolve()):
            return out, {"passages": m["count"], "build_seconds": m["build_seconds"], "cached": True}
    except ArtifactError:
        pass
    info = build_bm25_index(passages, out, threads=threads, overwrite=True)
    return out, {"passages": info.count, "build_seconds": info.build_seconds, "cached": False}


def run(corpus: common.Corpus, *, n: int | None, n_queries: int, k: int, threads: int, repeats: int,
        result: common.Result) -> common.Result:
    """Time one-by-one search and batch search at 1 and ``threads`` threads, in turn, ``repeats``
    rounds (the fastest round counts); fills ``result``."""
    from re2g.index.bm25 import BM25Retriever

    index_dir, built = bm25_index(corpus, n, threads)
    queries = corpus.dev_queries(n_queries)
    r = BM25Retriever.from_dir(index_dir, threads=threads)

    modes = {"search, one by one": lambda: [r.search(q, k) for q in queries],
             "batch_search, 1 thread": lambda: r.batch_search(queries, k, threads=1)}
    if threads > 1:
        modes[f"batch_search, {threads} threads"] = lambda: r.batch_search(queries, k, threads=threads)
    rounds: dict[str, list[float]] = {label: [] for label in modes}
    hits = {}
    for rnd in range(max(1, repeats) + 1):  # round 0 starts the JVM and warms up its JIT: not counted
        for label, fn in modes.items():
            out, seconds = common.timed(fn)
            hits[label] = [[h.pid for h in hs] for hs in out]
            if rnd:
                rounds[label].append(round(seconds, 3))
    rows = {label: {"seconds": min(r), "all_seconds": r, "queries_per_s": round(len(queries) / min(r), 1)}
            for label, r in rounds.items()}
    r.close()
    same = all(h == hits["search, one by one"] for h in hits.values())

    one = rows["search, one by one"]["queries_per_s"]
    result.params.update(size=corpus.size, passages=built["passages"], queries=len(queries), k=k, threads=threads,
                         repeats=repeats,
                         index=str(index_dir), query_source="dev inputs of the sample's tasks")
    result.results = {"index": built, "modes": rows, "same_hits_in_every_mode": same}
    result.ratios = {f"{label} / search, one by one (q/s)": common.ratio(row["queries_per_s"], one)
                     for label, row in rows.items() if label != "search, one by one"}
    if threads > 1:
        result.ratios[f"batch_search, {threads} threads / batch_search, 1 thread (q/s)"] = common.ratio(
            rows[f"batch_search, {threads} threads"]["queries_per_s"], rows["batch_search, 1 thread"]["queries_per_s"])
    result.notes.append("queries/s include turning Lucene hits into Hit objects (title, text) in Python")
    return result


def table(result: common.Result):
    p = result.params
    t = common.new_table(f"BM25 (Lucene) queries/s, {p['passages']:,} passages, {p['queries']:,} queries, k={p['k']}",
                         ("mode", "seconds (fastest)", "queries/s", "vs one by one", "all rounds"))
    one = result.results["modes"]["search, one by one"]["queries_per_s"]
    for label, r in result.results["modes"].items():
        t.add_row(label, common.fmt(r["seconds"], 2), common.fmt(r["queries_per_s"]),
                  f"{common.ratio(r['queries_per_s'], one):.2f}x",
                  ", ".join(common.fmt(x, 2) for x in r["all_seconds"]))
    return t


def main(argv: list[str] | None = None) -> Path:
    """Command line: ``python -m benchmarks.bm25_qps [--size bench] [--n 100000] [--queries 2000]``."""
    p = common.parser(__doc__.splitlines()[0], default_size="bench")
    p.add_argument("--n", type=int, default=100_000, help="index the first N passages (all when fewer)")
    p.add_argument("--queries", type=int, default=2000, help="the first N dev queries")
    p.add_argument("--k", type=int, default=12)
    p.add_argument("--threads", type=int, default=common.usable_cpus(), help="T: threads of the batch search")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over all modes; the fastest counts")
    args = p.parse_args(argv)
    corpus = common.prepare_corpus(args.size, common.cache_dir(args))
    result = run(corpus, n=args.n, n_queries=args.queries, k=args.k, threads=args.threads, repeats=args.repeats,
                 result=common.Result(NAME))
    return common.finish(result, table(result), args.out)


if __name__ == "__main__":
    main()
