"""Shared body of the training jobs: run a stage of ``re2g.train.api`` and return its summary."""

from __future__ import annotations


def run_training_job(name: str, stage: str, argv: list[str] | None, doc: str) -> int:
    """``python -m jobs.train_<stage> --config ... --set ...``: config -> Ray -> train -> manifest."""
    from jobs.common import parser, run_job

    p = parser(doc.splitlines()[0])
    args = p.parse_args(argv)

    def body(cfg, layout):
        from rich.console import Console

        from re2g.train import api, rag_driver
        from re2g.train.rag_eval import results_table

        fn = {"dpr": api.train_dpr, "reranker": api.train_reranker, "joint": api.train_joint,
              "generator": rag_driver.train_generator, "e2e": rag_driver.train_e2e}[stage]
        result = fn(cfg)
        Console().print(results_table(result) if stage in ("generator", "e2e") else result.table())
        return result.to_dict()

    return run_job(name, args, body)
