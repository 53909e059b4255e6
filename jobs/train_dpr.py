"""Stage 1: train the DPR bi-encoder (BM25 hard negatives, in-batch negatives across workers).

    ray job submit --working-dir . -- python -m jobs.train_dpr --config run.yaml [--set train.dpr.epochs=3]

Writes RUN_DIR/models/dpr/ (save_pretrained), RUN_DIR/train/dpr/ (checkpoints, metrics.jsonl,
eval.json) and RUN_DIR/jobs/train_dpr.json.
"""

from __future__ import annotations

import sys

from jobs._train_common import run_training_job


def main(argv: list[str] | None = None) -> int:
    return run_training_job("train_dpr", "dpr", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
