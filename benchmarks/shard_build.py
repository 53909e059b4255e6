"""Dense index build time: S HNSW shards built by S Ray tasks vs one shard built by one task, over
the same vectors, in the same run (plus one shard by one task with S faiss threads, for reference).

Vectors: the cached bench embeddings of ``benchmarks.hnsw_recall`` (first ``--n`` passages, tiny
encoder), by default in their standardized view (see that module; ``--view raw`` for the encoder's
own). Every run is ``build_dense_index(use_ray=True)`` with the tiny preset's HNSW parameters; each
task gets ``threads`` CPUs and that many faiss threads. Seconds include the validation pass over
the embeddings (measured alone too) and writing the shards.

    python -m benchmarks.shard_build                 # S = usable CPUs (2 here), 100k vectors

Writes ``bench_out/shard_build.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks import common
from benchmarks.hnsw_recall import standardized_embeddings

NAME = "shard_build"


def run(corpus: common.Corpus, *, n: int | None, passage_max_length: int, view: str, shards: int,
        result: common.Result) -> common.Result:
    """Build the index three ways (1 shard/1 task, S shards/S tasks, 1 shard/1 task x S threads)."""
    from re2g.config import load_config
    from re2g.index.dense import build_dense_index, scan_embeddings

    emb, meta = corpus.embeddings(n, max_length=passage_max_length)
    if view == "standardized":
        emb = standardized_embeddings(emb)
    common.connect_ray()
    base = load_config(preset="tiny").index
    _, scan_s = common.timed(lambda: scan_embeddings(emb))
    scratch = corpus.root / "shard_build"
    runs = [("1 shard, 1 task", 1, 1), (f"{shards} shards, {shards} tasks", shards, 1)]
    if shards > 1:
        runs.append((f"1 shard, 1 task x {shards} threads", 1, shards))
    rows = {}
    try:
        for label, s, threads in runs:
            cfg = base.model_copy(update={"num_shards": s})
            info, seconds = common.timed(lambda: build_dense_index(
                emb, scratch / f"s{s}_t{threads}", cfg, encoder_fingerprint=meta["fingerprint"], use_ray=True,
                overwrite=True, store_vectors=False, threads=threads))
            rows[label] = {"shards": s, "tasks": s, "threads_per_task": threads, "seconds": round(seconds, 3),
                           "vectors": info.total_count}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    one = rows["1 shard, 1 task"]["seconds"]
    result.params.update(size=corpus.size, vectors=meta["passages"], dim=meta["dim"], view=view, shards=shards,
                         hnsw_m=base.hnsw_m, ef_construction=base.ef_construction, metric=base.metric,
                         passage_max_length=passage_max_length, embeddings=str(emb), ray_cpus=common.ray_cpus())
    result.results = {"runs": rows, "validation_pass_seconds": round(scan_s, 3)}
    result.ratios = {f"speed-up of {label} over 1 shard, 1 task (seconds ratio)": common.ratio(one, r["seconds"])
                     for label, r in rows.items() if label != "1 shard, 1 task"}
    result.notes.append("S shards of N/S vectors do slightly less graph work than one of N (HNSW insertion "
                        "cost grows with the graph), so the ratio can exceed S a little on an idle machine")
    result.notes.append("each build includes the serial validation pass (validation_pass_seconds) before the tasks")
    return result


def table(result: common.Result):
    from rich.table import Table

    p = result.params
    t = Table(title=f"dense index build, {p['vectors']:,} vectors ({p['view']}), HNSW M={p['hnsw_m']} "
                    f"efConstruction={p['ef_construction']} {p['metric']}")
    for col in ("run", "tasks x threads", "seconds", "speed-up"):
        t.add_column(col, justify="left" if col == "run" else "right")
    one = result.results["runs"]["1 shard, 1 task"]["seconds"]
    for label, r in result.results["runs"].items():
        t.add_row(label, f"{r['tasks']} x {r['threads_per_task']}", common.fmt(r["seconds"]),
                  f"{common.ratio(one, r['seconds']):.2f}x")
    t.add_row("[dim]validation pass alone[/dim]", "1 x 1", common.fmt(result.results["validation_pass_seconds"]), "")
    return t


def main(argv: list[str] | None = None) -> Path:
    """Command line: ``python -m benchmarks.shard_build [--size bench] [--n 100000] [--shards 2]``."""
    p = common.parser(__doc__.splitlines()[0], default_size="bench")
    p.add_argument("--n", type=int, default=100_000, help="vectors: the first N passages (all when fewer)")
    p.add_argument("--shards", type=int, default=common.usable_cpus(), help="S: shards and Ray tasks")
    p.add_argument("--view", choices=["raw", "standardized"], default="standardized")
    p.add_argument("--passage-max-length", type=int, default=64)
    args = p.parse_args(argv)
    corpus = common.prepare_corpus(args.size, common.cache_dir(args))
    result = run(corpus, n=args.n, passage_max_length=args.passage_max_length, view=args.view, shards=args.shards,
                 result=common.Result(NAME))
    common.print_table(table(result))
    path = result.write(args.out)
    common.print_written(path)
    return path


if __name__ == "__main__":
    main()
