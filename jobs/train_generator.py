"""Stage 2: RAG generation training -- the query encoder and BART on the target outputs, passages
from the fixed dense index held by index-shard Ray actors.

    ray job submit --working-dir . -- python -m jobs.train_generator --config run.yaml [--set train.generator.epochs=3]

Writes RUN_DIR/models/generator/ (the generator + biencoder/), RUN_DIR/train/generator/ (checkpoints
with eval.json, metrics.jsonl, eval.json) and RUN_DIR/jobs/train_generator.json.
"""

from __future__ import annotations

import sys

from jobs._train_common import run_training_job


def main(argv: list[str] | None = None) -> int:
    return run_training_job("train_generator", "generator", argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
