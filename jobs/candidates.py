"""Compute the reranker's candidates (the hybrid retriever's merged DPR + BM25 list of each query) into RUN_DIR/train/candidates-{train,dev}.jsonl.

    ray job submit --working-dir . -- python -m jobs.candidates --config run.yaml [--split train] [--dense-index DIR]

Ray Data over a pool of retrieval actors (``train.mining.actors``, ``train.mining.actor_cpus``,
``train.mining.actor_resources``); each actor opens BM25 (Lucene) and the dense index itself.
"""

from __future__ import annotations

import sys

from jobs.common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--split", action="append", choices=["train", "dev"],
                   help="train and/or dev (repeatable; default both)")
    p.add_argument("--dense-index", help="the DPR part of the hybrid (default train.reranker.dense_index; "
                   "none: BM25 alone)")
    args = p.parse_args(argv)

    def body(cfg, layout):
        from re2g.train import api

        inputs = api.prepare_inputs(cfg)
        dense = args.dense_index or cfg.train.reranker.dense_index
        paths = api.candidate_files(cfg, inputs, args.split or ["train", "dev"], dense_index=dense,
                                    overwrite=args.overwrite)
        return {"paths": paths, "dense_index": dense}

    return run_job("candidates", args, body)


if __name__ == "__main__":
    sys.exit(main())
