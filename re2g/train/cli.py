"""`re2g train dpr|reranker|joint`, `re2g mine-negatives` and `re2g candidates`: thin commands over
``re2g.train.api``.

Register with ``app.add_typer(train_app, name="train")``,
``app.command("mine-negatives")(mine_negatives_command)`` and
``app.command("candidates")(candidates_command)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from re2g.errors import Re2GError

console = Console(stderr=True)
train_app = typer.Typer(help="Train on Ray Train + DeepSpeed: DPR, the generator (RAG), the reranker, end to end, joint.",
                        no_args_is_help=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see `re2g config show`)")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="tiny (CPU, built from config) or paper")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a config field: --set train.dpr.epochs=3")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="print Ray's own output (workers, Train, Data, Serve) "
                                          "here instead of RUN_DIR/logs/ray.log")]


def _connect(cfg, verbose: bool) -> None:
    """Ray, its output to RUN_DIR/logs/ray.log unless ``verbose``."""
    from re2g.runtime import connect_ray, log_dir_for

    connect_ray(cfg.ray, log_dir=log_dir_for(cfg.run_dir), verbose=verbose)


def _error(e: Exception) -> None:
    from re2g.runtime import log_hint

    console.print(f"[bold red]error:[/] {e}{log_hint()}", highlight=False)
    raise typer.Exit(code=2)


def _run(stage: str, config, preset, set_, verbose: bool = False) -> None:
    from re2g.config import load_config
    from re2g.train import api

    try:
        cfg = load_config(config, preset=preset, overrides=set_ or [])
        _connect(cfg, verbose)
        fn = {"dpr": api.train_dpr, "reranker": api.train_reranker, "joint": api.train_joint}[stage]
        result = fn(cfg, log=lambda m: console.print(m, markup=False, highlight=False))
    except Re2GError as e:
        _error(e)
    Console().print(result.table())
    console.print(f"model: {result.model_dir}   checkpoint: {result.run.checkpoint_dir}")


@train_app.command("dpr")
def dpr(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None,
        verbose: VerboseOpt = False) -> None:
    """Stage 1: DPR bi-encoder with BM25 hard negatives and in-batch negatives across workers."""
    _run("dpr", config, preset, set_, verbose)


@train_app.command("reranker")
def reranker(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None,
             verbose: VerboseOpt = False) -> None:
    """Stage 3: the cross-encoder reranker on the merged DPR + BM25 candidates."""
    _run("reranker", config, preset, set_, verbose)


@train_app.command("joint")
def joint(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None,
          verbose: VerboseOpt = False) -> None:
    """RocketQAv2-style joint training of the retriever and the reranker."""
    _run("joint", config, preset, set_, verbose)


def _run_generation(stage: str, config, preset, set_, query_encoder: str | None = None,
                    verbose: bool = False) -> None:
    from re2g.config import load_config
    from re2g.train import rag_driver
    from re2g.train.rag_eval import results_table

    try:
        cfg = load_config(config, preset=preset, overrides=set_ or [])
        _connect(cfg, verbose)
        log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
        if stage == "generator":
            result = rag_driver.train_generator(cfg, log=log)
        else:
            result = rag_driver.train_e2e(cfg, query_encoder=query_encoder, log=log)
    except Re2GError as e:
        _error(e)
    Console().print(results_table(result))
    console.print(f"model: {result.model_dir}   checkpoint: {result.run.checkpoint_dir}")


@train_app.command("generator")
def generator(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None,
              verbose: VerboseOpt = False) -> None:
    """Stage 2: RAG -- the query encoder and the generator (BART or a causal LM) on the target outputs
    (DPR passages from the index actors)."""
    _run_generation("generator", config, preset, set_, verbose=verbose)


@train_app.command("e2e")
def e2e(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None,
        query_encoder: Annotated[Optional[str], typer.Option(
            "--query-encoder", help="combined | frozen | distill (default: train.e2e.query_encoder)")] = None,
        verbose: VerboseOpt = False) -> None:
    """Stage 4: end to end -- the reranker's scores weight the marginalization; query encoder per option."""
    _run_generation("e2e", config, preset, set_, query_encoder, verbose=verbose)


@train_app.command("e2e-options")
def e2e_options(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None,
                verbose: VerboseOpt = False) -> None:
    """Stage 4 once per query-encoder option (combined, frozen, distill) from the same start; the
    comparison table goes to RUN_DIR/reports/e2e_options.md."""
    from re2g.config import load_config
    from re2g.train.rag_driver import compare_e2e_options
    from re2g.train.rag_eval import results_table

    try:
        cfg = load_config(config, preset=preset, overrides=set_ or [])
        _connect(cfg, verbose)
        log = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
        out = compare_e2e_options(cfg, log=log)
    except Re2GError as e:
        _error(e)
    for option, result in out["results"].items():
        Console().print(results_table(result))
    Console().print(out["markdown"])
    console.print(f"written: {out['path']}")


def mine_negatives_command(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[str], typer.Option(help="output jsonl (default RUN_DIR/train/negatives.jsonl)")] = None,
    dense_index: Annotated[Optional[str], typer.Option(
        help="mine from this dense index (second round) with models.query_encoder instead of BM25")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing file")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Mine hard negatives for the training queries: retriever top-k minus positives, passages with a
    positive's text and (not for fact verification) passages containing an answer. Runs over Ray
    Data on a pool of retrieval actors (train.mining.actors, train.mining.actor_cpus)."""
    from re2g.config import load_config
    from re2g.train import api

    try:
        cfg = load_config(config, preset=preset, overrides=set_ or [])
        _connect(cfg, verbose)
        inputs = api.prepare_inputs(cfg)
        path, info = api.mine(cfg, inputs, dense_index=dense_index, out=out, overwrite=overwrite)
    except Re2GError as e:
        _error(e)
    Console().print_json(json.dumps({"path": path, **info}, default=str))


def candidates_command(
    config: ConfigOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    split: Annotated[Optional[list[str]], typer.Option(
        help="train and/or dev (repeatable; default both)")] = None,
    dense_index: Annotated[Optional[str], typer.Option(
        help="the DPR part of the hybrid (default train.reranker.dense_index; none: BM25 alone)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing files")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The reranker's training candidates: the hybrid retriever's merged DPR + BM25 list of each
    query, into RUN_DIR/train/candidates-{train,dev}.jsonl. Runs over Ray Data on a pool of
    retrieval actors (train.mining.actors, train.mining.actor_cpus)."""
    from re2g.config import load_config
    from re2g.train import api

    splits = split or ["train", "dev"]
    try:
        cfg = load_config(config, preset=preset, overrides=set_ or [])
        _connect(cfg, verbose)
        inputs = api.prepare_inputs(cfg)
        dense = dense_index or cfg.train.reranker.dense_index
        paths = api.candidate_files(cfg, inputs, splits, dense_index=dense, overwrite=overwrite)
    except Re2GError as e:
        _error(e)
    Console().print_json(json.dumps({"paths": paths, "dense_index": dense}, default=str))
