"""Run every benchmark in order (what ``make bench`` calls): embedding throughput, HNSW recall,
shard build, BM25 queries/s. Each writes its JSON (and plots) under ``--out``.

    python -m benchmarks.run_all                 # the real sizes (a few minutes each on 2 CPUs)
    python -m benchmarks.run_all --size tiny     # everything on the tiny sample (seconds)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import bm25_qps, common, embed_throughput, hnsw_recall, passage_lookup, shard_build

BENCHMARKS = (embed_throughput, hnsw_recall, shard_build, bm25_qps, passage_lookup)


def main(argv: list[str] | None = None) -> list[Path]:
    """Command line: ``python -m benchmarks.run_all [--size tiny] [--out bench_out] [--only NAME ...]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=common.SIZES, default=None,
                   help="one sample size for all (default: each benchmark's own: demo for embedding, bench else)")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--only", nargs="+", choices=[b.NAME for b in BENCHMARKS], default=None)
    args = p.parse_args(argv)
    shared = ["--out", str(args.out)] + (["--cache", str(args.cache)] if args.cache else []) + \
        (["--size", args.size] if args.size else [])
    written = []
    for bench in BENCHMARKS:
        if args.only is None or bench.NAME in args.only:
            written.append(bench.main(shared))
    common.print_written(*written)
    return written


if __name__ == "__main__":
    main()
