"""RocketQAv2-style joint training of the retriever and the reranker.

    ray job submit --working-dir . -- python -m jobs.train_joint --config run.yaml [--set train.joint.epochs=3]

Writes RUN_DIR/models/joint/ (save_pretrained), RUN_DIR/train/joint/ (checkpoints, metrics.jsonl,
eval.json) and RUN_DIR/jobs/train_joint.json.
"""

from __future__ import annotations

import sys

from jobs._train_common import run_training_job


def main(argv: list[str] | None = None) -> int:
    return run_training_job("train_joint", "joint", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
