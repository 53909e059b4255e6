"""Stage 3: train the cross-encoder reranker on merged DPR + BM25 candidates.

    ray job submit --working-dir . -- python -m jobs.train_reranker --config run.yaml [--set train.reranker.epochs=3]

Writes RUN_DIR/models/reranker/ (save_pretrained), RUN_DIR/train/reranker/ (checkpoints, metrics.jsonl,
eval.json) and RUN_DIR/jobs/train_reranker.json.
"""

from __future__ import annotations

import sys

from jobs._train_common import run_training_job


def main(argv: list[str] | None = None) -> int:
    return run_training_job("train_reranker", "reranker", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
