"""Passage lookup (pid -> title, text): memory and lookups/s of the Arrow-backed PassageLookup against a dict.

    python -m benchmarks.passage_lookup [--size bench] [--lookups 200000]

Every Serve replica and every training worker holds a pid -> passage lookup. The comparison is the
``dict`` of ``(title, text, wikipedia_id)`` tuples that ``load_passage_lookup`` returned before
:class:`re2g.index.dense.PassageLookup`. Each variant is built in a fresh process from the same
Parquet; memory is the process's resident set after building minus before reading (the Arrow table
read is part of both). Writes bench_out/passage_lookup.json and prints a table.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from pathlib import Path

from benchmarks import common

NAME = "passage_lookup"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _as_dict(table) -> dict:
    """The previous representation: one tuple of Python strings per passage."""
    pids, titles, texts = (table.column(c).to_pylist() for c in ("pid", "title", "text"))
    wids = table.column("wikipedia_id").to_pylist() if "wikipedia_id" in table.column_names else [None] * len(pids)
    return {p: (t or "", x or "", None if w is None else str(w)) for p, t, x, w in zip(pids, titles, texts, wids)}


def _measure(kind: str, passages: str, n_lookups: int, queue) -> None:
    import gc

    import pyarrow.dataset as ds

    from re2g.index.dense import load_passage_lookup

    gc.collect()
    before = _rss_bytes()
    t0 = time.perf_counter()
    if kind == "dict":
        table = ds.dataset(passages, format="parquet").to_table()
        lookup = _as_dict(table)
        del table
    else:
        lookup = load_passage_lookup(passages)
    gc.collect()
    build = time.perf_counter() - t0
    memory = _rss_bytes() - before
    pids = list(lookup)
    rng = random.Random(0)
    sample = [pids[rng.randrange(len(pids))] for _ in range(n_lookups)]
    del pids
    t0 = time.perf_counter()
    chars = sum(len(lookup[p][1]) for p in sample)
    seconds = time.perf_counter() - t0
    queue.put({"passages": len(lookup), "build_seconds": round(build, 2), "memory_bytes": memory,
               "bytes_per_passage": round(memory / max(1, len(lookup)), 1),
               "lookups_per_s": round(n_lookups / seconds), "checksum_chars": chars})


def run(corpus: common.Corpus, *, n_lookups: int, result: common.Result) -> common.Result:
    ctx = mp.get_context("spawn")
    rows = {}
    for kind in ("dict", "PassageLookup"):
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(kind, str(corpus.passages), n_lookups, q))
        p.start()
        rows[kind] = q.get()
        p.join()
    result.params.update(size=corpus.size, passages=rows["dict"]["passages"], lookups=n_lookups,
                         source=str(corpus.passages))
    result.results = {"variants": rows,
                      "same_texts": rows["dict"]["checksum_chars"] == rows["PassageLookup"]["checksum_chars"]}
    d, a = rows["dict"], rows["PassageLookup"]
    result.ratios = {"dict / PassageLookup (memory)": common.ratio(d["memory_bytes"], a["memory_bytes"]),
                     "PassageLookup / dict (lookups/s)": common.ratio(a["lookups_per_s"], d["lookups_per_s"]),
                     "PassageLookup / dict (build seconds)": common.ratio(a["build_seconds"], d["build_seconds"])}
    result.notes.append("memory: resident set after building minus before reading the Parquet, each in a "
                        "fresh process; lookups: random pids, the text fetched")
    return result


def table(result: common.Result):
    p = result.params
    t = common.new_table(f"pid -> passage lookup, {p['passages']:,} passages, {p['lookups']:,} random lookups",
                         ("variant", "memory (MB)", "bytes/passage", "build (s)", "lookups/s"))
    for kind, r in result.results["variants"].items():
        t.add_row(kind, common.fmt(r["memory_bytes"] / 1e6), common.fmt(r["bytes_per_passage"]),
                  common.fmt(r["build_seconds"], 2), f"{r['lookups_per_s']:,}")
    return t


def main(argv: list[str] | None = None) -> Path:
    """Command line: ``python -m benchmarks.passage_lookup [--size bench] [--lookups 200000]``."""
    p = common.parser(__doc__.splitlines()[0], default_size="bench")
    p.add_argument("--lookups", type=int, default=200_000, help="random lookups timed per variant")
    args = p.parse_args(argv)
    corpus = common.prepare_corpus(args.size, common.cache_dir(args))
    result = run(corpus, n_lookups=args.lookups, result=common.Result(NAME))
    return common.finish(result, table(result), args.out)


if __name__ == "__main__":
    main()
