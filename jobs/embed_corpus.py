"""Embed the passages with the DPR context encoder on Ray Data.

    ray job submit --working-dir . -- python -m jobs.embed_corpus --config run.yaml \
        [--passages P] [--model M] [--out E]

Defaults come from the run directory layout (``re2g.layout``): RUN_DIR/passages,
RUN_DIR/models/dpr, RUN_DIR/embeddings.
"""

from __future__ import annotations

import sys

from jobs.common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--passages", help="passages Parquet (default RUN_DIR/passages)")
    p.add_argument("--model", help="bi-encoder directory (default RUN_DIR/models/dpr)")
    p.add_argument("--out", help="embeddings output (default RUN_DIR/embeddings)")
    args = p.parse_args(argv)

    def body(cfg, layout):
        from re2g.index.embed import embed_corpus

        stats = embed_corpus(args.passages or layout.passages, args.model or layout.model("dpr"),
                             args.out or layout.embeddings, batch_size=cfg.index.embed_batch_size,
                             actors=cfg.index.embed_actors, max_length=cfg.models.passage_max_length,
                             overwrite=args.overwrite)
        return stats.to_dict()

    return run_job("embed_corpus", args, body)


if __name__ == "__main__":
    sys.exit(main())
