"""`re2g evaluate ...`: score predictions. A typer sub-app that the front door registers with
``app.add_typer(evaluate_app, name="evaluate")``; each command is a thin call into the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from re2g.errors import Re2GError

evaluate_app = typer.Typer(help="Score predictions (KILT's official metrics).", no_args_is_help=True,
                           add_completion=False, pretty_exceptions_enable=False)


@evaluate_app.callback()
def _evaluate() -> None:
    """Score predictions (KILT's official metrics)."""


def _parse_ks(value: str) -> list[int]:
    try:
        ks = [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated positive integers, got {value!r}") from None
    if not ks or any(k <= 0 for k in ks):
        raise typer.BadParameter(f"expected comma-separated positive integers, got {value!r}")
    return ks


_KILT_HELP = (
    "KILT's official metrics, as KILT's own scorer (kilt/eval_downstream.py) computes them.\n\n"
    "Prints one JSON object with the scorer's keys: kilt (KILT-accuracy, KILT-em, KILT-f1, "
    "KILT-rougel), downstream (accuracy, em, f1, rougel), retrieval (Rprec, recall@k)."
)


@evaluate_app.command("kilt", help=_KILT_HELP)
def kilt(
    gold: Annotated[Path, typer.Option("--gold", help="gold KILT task file (jsonl)")],
    guess: Annotated[Path, typer.Option("--guess", help="predictions: KILT jsonl, one output per id")],
    ks: Annotated[str, typer.Option("--ks", help="k values for page-level recall@k, comma-separated")] = "5",
    table: Annotated[bool, typer.Option("--table", help="print a readable table instead of the JSON")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="refuse predictions for ids not in gold "
                                                         "(KILT's scorer ignores them with a warning)")] = False,
) -> None:
    """Thin call into :func:`re2g.eval.kilt.evaluate_kilt_files`; help text in ``_KILT_HELP``."""
    from re2g.eval.kilt import evaluate_kilt_files, kilt_table

    k_values = _parse_ks(ks)
    try:
        result = evaluate_kilt_files(str(gold), str(guess), k_values, strict=strict)
    except Re2GError as e:
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(code=2) from None
    if table:
        Console().print(kilt_table(result, title=f"KILT: {guess.name} vs {gold.name}"))
    else:
        typer.echo(json.dumps(result, indent=2))
