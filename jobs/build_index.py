"""Build the dense HNSW shards (one Ray task per shard) and the BM25 index.

    ray job submit --working-dir . -- python -m jobs.build_index --config run.yaml \
        [--passages P] [--embeddings E] [--out D] [--no-dense] [--no-bm25]

Defaults come from the run directory layout: RUN_DIR/passages, RUN_DIR/embeddings,
RUN_DIR/index/{dense,bm25}.
"""

from __future__ import annotations

import sys

from jobs.common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--passages", help="passages Parquet (default RUN_DIR/passages)")
    p.add_argument("--embeddings", help="embeddings (default RUN_DIR/embeddings)")
    p.add_argument("--out", help="index directory (default RUN_DIR/index)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense index")
    p.add_argument("--no-bm25", action="store_true", help="skip the BM25 index")
    args = p.parse_args(argv)

    def body(cfg, layout):
        from re2g.index.retrievers import build_indexes
        from re2g.layout import join

        out = args.out or join(cfg.run_dir, "index")
        summary = build_indexes(cfg, passages=args.passages or layout.passages,
                                embeddings=args.embeddings or layout.embeddings,
                                dense_dir=None if args.no_dense else join(out, "dense"),
                                bm25_dir=None if args.no_bm25 else join(out, "bm25"), overwrite=args.overwrite)
        return summary.to_dict()

    return run_job("build_index", args, body)


if __name__ == "__main__":
    sys.exit(main())
