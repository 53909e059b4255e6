"""Corpus embedding throughput: Ray Data (``embed_corpus``, a pool of encoder actors) vs a plain
single-process loop (``embed_corpus_local``) with the same model, batch size, passage length and
number of threads, in the same run.

Ray Data runs T actors x 1 thread and 1 actor x T threads (T = ``--threads``, default the usable
CPUs) as ``embed_corpus`` does by default, and T x 1 again with Ray Data's blocks capped at 256 KiB
(``--no-small-blocks`` skips it): read as is, a corpus under 128 MiB is one block, so one actor
does all the work. Seconds are the library's own (``EmbedStats``): model loading and, for Ray Data,
actor start-up included. The configurations run in turn, ``--repeats`` rounds, and each one's
fastest round is reported (the machine may be shared); all rounds are in the JSON. Writes
``bench_out/embed_throughput.json``::

    python -m benchmarks.embed_throughput            # demo sample (~5k passages), tiny encoder
    python -m benchmarks.embed_throughput --model minilm --limit 1000   # the real all-MiniLM-L6-v2
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks import common

NAME = "embed_throughput"


def run(corpus: common.Corpus, *, limit: int | None, batch_size: int, max_length: int, threads: int,
        small_blocks: bool, repeats: int, result: common.Result, model_dir: str | None = None) -> common.Result:
    """Embed the first ``limit`` passages with every configuration in turn, ``repeats`` rounds;
    each configuration's fastest round is its figure. Fills ``result``. ``model_dir``: the encoder
    (default: the corpus's tiny one)."""
    from re2g.index.embed import embed_corpus, embed_corpus_local

    passages, n = corpus.subset(limit)
    model_dir = str(model_dir or corpus.model_dir)
    scratch = corpus.root / "embed_throughput"
    common.connect_ray()
    ray_cpus = common.ray_cpus()
    if threads >= ray_cpus:
        raise SystemExit(f"--threads {threads} needs a Ray with more than {threads} CPUs (this one has {ray_cpus}): "
                         "Ray Data's read task needs a CPU slot beside the encoder actors")
    runs = [("local loop", 0, threads, None)]
    runs.append((f"ray data {threads}x1", threads, 1, None))
    if threads > 1:
        runs.append((f"ray data 1x{threads}", 1, threads, None))
    if small_blocks:
        runs.append((f"ray data {threads}x1, small blocks", threads, 1, common.SMALL_BLOCK_BYTES))
    rounds: dict[str, list[float]] = {label: [] for label, *_ in runs}
    try:
        for _ in range(max(1, repeats)):
            for label, actors, per_actor, block_bytes in runs:
                out = scratch / label.replace(" ", "_").replace(",", "")
                if actors == 0:
                    stats = embed_corpus_local(str(passages), model_dir, str(out), batch_size=batch_size,
                                               max_length=max_length, device="cpu", threads=per_actor,
                                               overwrite=True, progress=False)
                else:
                    with common.ray_data_block_size(block_bytes):
                        stats = embed_corpus(str(passages), model_dir, str(out), batch_size=batch_size,
                                             actors=actors, max_length=max_length, device="cpu",
                                             threads_per_actor=per_actor, overwrite=True)
                rounds[label].append(stats.seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = {}
    for label, actors, per_actor, block_bytes in runs:
        best = min(rounds[label])
        rows[label] = {"actors": actors, "threads_per_actor": per_actor, "passages": n,
                       "ray_data_max_block_bytes": block_bytes, "seconds": best, "all_seconds": rounds[label],
                       "passages_per_s": round(n / best, 2)}

    local = rows["local loop"]["passages_per_s"]
    result.params.update(size=corpus.size, passages=n, batch_size=batch_size, passage_max_length=max_length,
                         threads=threads, model=model_dir, device="cpu", ray_cpus=ray_cpus,
                         repeats=repeats)
    if ray_cpus > common.usable_cpus():
        result.notes.append(common.RAY_EXTRA_CPU_NOTE)
    result.results["runs"] = rows
    result.ratios = {f"{label} / local loop (passages/s)": common.ratio(r["passages_per_s"], local)
                     for label, r in rows.items() if label != "local loop"}
    result.notes.append("seconds include model loading (and Ray actor start-up for Ray Data); Ray itself "
                        "was started before timing")
    if small_blocks:
        result.notes.append(f"'small blocks': Ray Data's target_max_block_size capped at {common.SMALL_BLOCK_BYTES} "
                            "bytes in the driver; by default a corpus this small is read as one block, which one "
                            "encoder actor embeds while the others idle")
    return result


def table(result: common.Result):
    from rich.table import Table

    t = Table(title=f"embedding throughput ({Path(result.params['model']).name}, {result.params['passages']:,} passages, batch "
                    f"{result.params['batch_size']}, length {result.params['passage_max_length']})")
    for col in ("run", "actors x threads", "seconds (fastest)", "passages/s", "vs local loop", "all rounds"):
        t.add_column(col, justify="right" if col != "run" else "left")
    local = result.results["runs"]["local loop"]["passages_per_s"]
    for label, r in result.results["runs"].items():
        shape = f"1 process x {r['threads_per_actor']}" if r["actors"] == 0 else \
            f"{r['actors']} x {r['threads_per_actor']}"
        t.add_row(label, shape, common.fmt(r["seconds"]), common.fmt(r["passages_per_s"]),
                  f"{common.ratio(r['passages_per_s'], local):.2f}x",
                  ", ".join(common.fmt(x) for x in r["all_seconds"]))
    return t


def main(argv: list[str] | None = None) -> Path:
    """Command line: ``python -m benchmarks.embed_throughput [--size demo] [--limit N] ...``."""
    from re2g.config import load_config

    p = common.parser(__doc__.splitlines()[0], default_size="demo")
    p.add_argument("--limit", type=int, default=None, help="embed only the first N passages (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None,
                   help="passage max length (default: the tiny preset's passage_max_length; 128 for minilm)")
    p.add_argument("--model", default="tiny",
                   help="tiny (the corpus's tiny encoder) | minilm (all-MiniLM-L6-v2: `re2g assets fetch minilm`) "
                        "| a bi-encoder or encoder directory")
    p.add_argument("--threads", type=int, default=common.usable_cpus(), help="threads in all, per configuration")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all configurations; the fastest counts")
    p.add_argument("--no-small-blocks", dest="small_blocks", action="store_false",
                   help="skip the run with Ray Data's block size capped")
    args = p.parse_args(argv)
    model_dir = None
    if args.model == "minilm":
        from re2g.assets import asset_path

        model_dir = str(asset_path("minilm"))
    elif args.model != "tiny":
        model_dir = args.model
    max_length = args.max_length or (128 if args.model == "minilm" else load_config(preset="tiny").models.passage_max_length)
    corpus = common.prepare_corpus(args.size, common.cache_dir(args))
    result = run(corpus, limit=args.limit, batch_size=args.batch_size, max_length=max_length,
                 threads=args.threads, small_blocks=args.small_blocks,
                 repeats=args.repeats, result=common.Result(NAME), model_dir=model_dir)
    return common.finish(result, table(result), args.out)


if __name__ == "__main__":
    main()
