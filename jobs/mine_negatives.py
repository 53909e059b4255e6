"""Mine hard negatives for the training queries (BM25 top-k, filtered) into RUN_DIR/train/negatives.jsonl.

    ray job submit --working-dir . -- python -m jobs.mine_negatives --config run.yaml [--out F] [--dense-index DIR]

Ray Data over a pool of retrieval actors (``train.mining.actors``, ``train.mining.actor_cpus``,
``train.mining.actor_resources``); each actor opens BM25 (Lucene) itself, so the driver never starts a JVM.
"""

from __future__ import annotations

import sys

from jobs.common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", help="output jsonl (default RUN_DIR/train/negatives.jsonl)")
    p.add_argument("--dense-index", help="mine from this dense index (second round) with models.query_encoder "
                   "instead of BM25")
    args = p.parse_args(argv)

    def body(cfg, layout):
        from re2g.train import api

        inputs = api.prepare_inputs(cfg)
        path, info = api.mine(cfg, inputs, dense_index=args.dense_index, out=args.out, overwrite=args.overwrite)
        return {"path": path, **info}

    return run_job("mine_negatives", args, body)


if __name__ == "__main__":
    sys.exit(main())
