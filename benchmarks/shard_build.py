"""Dense index build time: S HNSW shards built by S Ray tasks vs one shard built by one task, over
the same vectors, in the same run (plus one shard by one task with S faiss threads, for reference).

Vectors: the first ``--n`` (default 50,000) of the cached bench embeddings of
``benchmarks.hnsw_recall`` (100,000 passages, tiny encoder), by default in their standardized view
(see that module; ``--view raw`` for the encoder's own). Every run is
``build_dense_index(use_ray=True)`` with the tiny preset's HNSW parameters; each task gets
``threads`` CPUs and that many faiss threads. Seconds include the validation pass over the
embeddings (measured alone too) and writing the shards. The ways are built in turn, ``--repeats``
rounds; each one's fastest round is reported (the machine may be shared), all rounds are kept.

    python -m benchmarks.shard_build                 # S = usable CPUs (2 here), 50k vectors

Writes ``bench_out/shard_build.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks import common
from benchmarks.hnsw_recall import standardized_embeddings

NAME = "shard_build"


def head_embeddings(emb: Path, n: int | None) -> tuple[Path, int]:
    """The first ``n`` rows of the embeddings at ``emb``, written once beside them (all: ``emb``)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    files = sorted(str(f) for f in emb.glob("*.parquet"))
    total = pads.dataset(files, format="parquet").count_rows()
    if n is None or n >= total:
        return emb, total
    out = emb.with_name(f"{emb.name}_first{n}")
    part = out / "part-00000.parquet"
    if part.is_file() and pq.ParquetFile(part).metadata.num_rows == n and part.stat().st_mtime >= max(
            Path(f).stat().st_mtime for f in files):
        return out, n
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pads.dataset(files, format="parquet").head(n), part)
    return out, n


def run(corpus: common.Corpus, *, n: int | None, from_n: int | None, passage_max_length: int, view: str,
        shards: int, repeats: int, result: common.Result) -> common.Result:
    """Build the index three ways (1 shard/1 task, S shards/S tasks, 1 shard/1 task x S threads)."""
    from re2g.config import load_config
    from re2g.index.dense import build_dense_index, scan_embeddings

    emb, meta = corpus.embeddings(from_n, max_length=passage_max_length)
    if view == "standardized":
        emb = standardized_embeddings(emb)
    emb, count = head_embeddings(emb, n)
    common.connect_ray()
    base = load_config(preset="tiny").index
    _, scan_s = common.timed(lambda: scan_embeddings(emb))
    scratch = corpus.root / "shard_build"
    runs = [("1 shard, 1 task", 1, 1), (f"{shards} shards, {shards} tasks", shards, 1)]
    if shards > 1:
        runs.append((f"1 shard, 1 task x {shards} threads", 1, shards))
    rounds: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    try:
        for _ in range(max(1, repeats)):
            for label, s, threads in runs:
                cfg = base.model_copy(update={"num_shards": s})
                info, seconds = common.timed(lambda: build_dense_index(
                    emb, scratch / f"s{s}_t{threads}", cfg, encoder_fingerprint=meta["fingerprint"], use_ray=True,
                    overwrite=True, store_vectors=False, threads=threads))
                rounds[label].append(round(seconds, 3))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = {label: {"shards": s, "tasks": s, "threads_per_task": threads, "seconds": min(rounds[label]),
                    "all_seconds": rounds[label], "vectors": count} for label, s, threads in runs}

    one = rows["1 shard, 1 task"]["seconds"]
    result.params.update(size=corpus.size, vectors=count, dim=meta["dim"], view=view, shards=shards,
                         hnsw_m=base.hnsw_m, ef_construction=base.ef_construction, metric=base.metric,
                         passage_max_length=passage_max_length, embeddings=str(emb), ray_cpus=common.ray_cpus(),
                         repeats=repeats)
    result.results = {"runs": rows, "validation_pass_seconds": round(scan_s, 3)}
    result.ratios = {f"speed-up of {label} over 1 shard, 1 task (seconds ratio)": common.ratio(one, r["seconds"])
                     for label, r in rows.items() if label != "1 shard, 1 task"}
    result.notes.append("S shards of N/S vectors do slightly less graph work than one of N (HNSW insertion "
                        "cost grows with the graph), so the ratio can exceed S a little on an idle machine")
    result.notes.append("each build includes the serial validation pass (validation_pass_seconds) before the tasks")
    return result


def table(result: common.Result):
    p = result.params
    t = common.new_table(f"dense index build, {p['vectors']:,} vectors ({p['view']}), HNSW M={p['hnsw_m']} "
                         f"efConstruction={p['ef_construction']} {p['metric']}",
                         ("run", "tasks x threads", "seconds (fastest)", "speed-up", "all rounds"))
    one = result.results["runs"]["1 shard, 1 task"]["seconds"]
    for label, r in result.results["runs"].items():
        t.add_row(label, f"{r['tasks']} x {r['threads_per_task']}", common.fmt(r["seconds"]),
                  f"{common.ratio(one, r['seconds']):.2f}x", ", ".join(common.fmt(x) for x in r["all_seconds"]))
    t.add_row("[dim]validation pass alone[/dim]", "1 x 1", common.fmt(result.results["validation_pass_seconds"]), "")
    return t


def main(argv: list[str] | None = None) -> Path:
    """Command line: ``python -m benchmarks.shard_build [--size bench] [--n 100000] [--shards 2]``."""
    p = common.parser(__doc__.splitlines()[0], default_size="bench")
    p.add_argument("--n", type=int, default=50_000,
                   help="vectors: the first N rows of the cached embeddings (50k keeps a run to a few minutes here)")
    p.add_argument("--repeats", type=int, default=2, help="build each way this many times (rounds); report the fastest")
    p.add_argument("--from-n", type=int, default=100_000,
                   help="the cached embeddings to take them from: of the first N passages (as hnsw_recall)")
    p.add_argument("--shards", type=int, default=common.usable_cpus(), help="S: shards and Ray tasks")
    p.add_argument("--view", choices=["raw", "standardized"], default="standardized")
    p.add_argument("--passage-max-length", type=int, default=64)
    args = p.parse_args(argv)
    corpus = common.prepare_corpus(args.size, common.cache_dir(args))
    result = run(corpus, n=args.n, from_n=args.from_n, passage_max_length=args.passage_max_length, view=args.view,
                 shards=args.shards, repeats=args.repeats, result=common.Result(NAME))
    return common.finish(result, table(result), args.out)


if __name__ == "__main__":
    main()
