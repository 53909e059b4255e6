"""The whole Re2G pipeline as one Ray job: passages -> BM25 -> DPR -> embedding + HNSW shards ->
generation -> reranker -> end-to-end (distillation) -> KILT evaluation -> report.

    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/cluster-paper.yaml

The same steps as `re2g quickstart` (``re2g.quickstart``), without serving; each stage scales by the
config (Ray Train workers/GPUs, embedding actors, index shards). A config naming a KILT knowledge
source and task files (``data.*``) and real checkpoints (``models.*``) runs on them; without them it
runs on the sample task. Finished steps are skipped when the job is submitted again.
"""

from __future__ import annotations

import sys

from jobs.common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", action="append", help="run only these steps (repeatable): sample, passages, bm25, "
                   "init_models, mine, dpr, index, retrieval, generator, reranker, e2e, evaluate")
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev/test queries")
    args = p.parse_args(argv)

    def body(cfg, layout):
        from rich.console import Console

        from re2g.eval.report import stages_table, write_report
        from re2g.quickstart import run_quickstart

        console = Console(stderr=True)
        summary = run_quickstart(cfg, console=console, fresh=args.overwrite, only=args.only,
                                 dev_limit=args.dev_limit, test_limit=args.dev_limit)
        files = write_report(summary, layout.reports)
        console.print(stages_table(summary))
        return {"report": str(files["markdown"]), "stages": summary["stages"]}

    return run_job("pipeline", args, body)


if __name__ == "__main__":
    sys.exit(main())
