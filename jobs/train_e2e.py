"""Stage 4: end-to-end training -- DPR + BM25 candidates, the reranker's top-5 to BART, the reranker's
scores weighting the marginalization; the query encoder ``combined``, ``frozen`` or ``distill``.

    ray job submit --working-dir . -- python -m jobs.train_e2e --config run.yaml --query-encoder distill

Writes RUN_DIR/models/e2e-<option>/ (biencoder/, reranker/, generator/), RUN_DIR/train/e2e-<option>/
(checkpoints with eval.json, metrics.jsonl, eval.json) and RUN_DIR/jobs/train_e2e[-<option>].json.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from jobs.common import parser, run_job

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--query-encoder", choices=["combined", "frozen", "distill"], default=None,
                   help="query-encoder option (default: train.e2e.query_encoder)")
    args = p.parse_args(argv)

    def body(cfg, layout):
        from rich.console import Console

        from re2g.train.rag_driver import train_e2e
        from re2g.train.rag_eval import results_table

        result = train_e2e(cfg, query_encoder=args.query_encoder)
        Console().print(results_table(result))
        return result.to_dict()

    return run_job(f"train_e2e-{args.query_encoder}" if args.query_encoder else "train_e2e", args, body)


if __name__ == "__main__":
    sys.exit(main())
