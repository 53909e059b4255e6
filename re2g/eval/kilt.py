"""KILT's official metrics, computed as the KILT benchmark's own scorer computes them.

The rules follow facebookresearch/KILT ``kilt/eval_downstream.py`` (``evaluate``,
``validate_input``, ``_calculate_metrics`` and the answer metrics) and ``kilt/eval_retrieval.py``
(``_get_ids_list``, ``rprecision``, ``get_rank``, ``compute``) with ``rank_keys=["wikipedia_id"]``,
which is how ``eval_downstream.evaluate`` calls them. The code here is ours; each function's
docstring names the rule it implements.

Per example (gold aligned with its prediction by stripped id):

- answers: the prediction is ``str(answer).strip()``; gold answers are the set of the stripped,
  non-empty ``answer`` values of all gold outputs. An empty prediction scores 0 everywhere (it
  still counts in the denominator). Accuracy is strict membership; EM and F1 use SQuAD
  normalization; ROUGE-L is the ``rouge`` package's ``rouge-l`` F on raw text; each is the max
  over the gold answers.
- pages: each output's provenance gives a list of ``str(wikipedia_id).strip()`` without repeats,
  in order. The prediction's pages are those of its single output.
- R-Precision: the best over gold outputs of (hits among the first R predicted pages) / R, with R
  that output's page count (0 when R is 0).
- KILT-accuracy/em/f1/rougel: the example's downstream value, credited only when R-Precision is
  exactly 1.
- recall@k: every gold output that has a ``provenance`` list is an evidence set (equal sets count
  once); a set counts once all its pages are predicted, at the rank of its last page; recall@k is
  (sets completed within the first k rank points) / (number of sets).

Every mean divides by the number of gold examples. Nothing is rounded.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from re2g.data.kilt import (
    BAD_VALUE,
    MISSING_FIELD,
    WRONG_TYPE,
    KiltExample,
    KiltOutput,
    Provenance,
    RowError,
    RowReport,
    iter_jsonl_rows,
    parse_kilt_example,
    read_kilt,
)
from re2g.errors import DataFormatError

log = logging.getLogger(__name__)

__all__ = [
    "normalize_answer", "exact_match", "f1_score", "rouge_l", "max_over_answers", "gold_answers",
    "output_pages", "gold_page_lists", "evidence_sets", "r_precision", "evidence_rank",
    "recall_at_k", "KiltExampleScore", "score_example", "align_predictions", "score_examples",
    "summarize", "evaluate_kilt", "parse_prediction", "read_predictions", "evaluate_kilt_files",
    "kilt_table",
]

# --------------------------------------------------------------------------- answers

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalization as KILT applies it (``eval_downstream.normalize_answer``): lowercase,
    drop ASCII punctuation, replace the words a/an/the with a space, collapse whitespace -- in
    that order."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized strings are equal (``eval_downstream._exact_match_score``)."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of the normalized strings (``eval_downstream._f1_score``): common tokens counted
    with multiplicity; 0.0 when nothing is shared (also when either side normalizes to nothing)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE: Any = None


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F of the raw strings from the ``rouge`` package (``eval_downstream._rougel_score``):
    no normalization; 0.0 when the package finds either side empty (it raises ``ValueError``,
    e.g. for ``"..."``). Only ``rouge-l`` is computed: ``rouge-1``/``rouge-2``, which KILT also
    computes and discards, fail on exactly the same inputs, so the value is the same."""
    global _ROUGE
    if _ROUGE is None:
        from rouge import Rouge

        _ROUGE = Rouge(metrics=["rouge-l"], stats=["f"])
    try:
        return float(_ROUGE.get_scores(prediction, gold, avg=True)["rouge-l"]["f"])
    except ValueError:  # "Hypothesis is empty." / "Reference is empty."
        return 0.0


def max_over_answers(metric: Callable[[str, str], float], prediction: str, golds: Iterable[str]) -> float:
    """The best score of ``prediction`` against any gold answer
    (``eval_downstream._metric_max_over_ground_truths``). ``golds`` must not be empty: KILT's
    scorer fails there too."""
    golds = list(golds)
    if not golds:
        raise ValueError("no gold answers to score against")
    return max(metric(prediction, g) for g in golds)


def gold_answers(example: KiltExample) -> set[str]:
    """The stripped, non-empty answers of all gold outputs, as a set
    (``eval_downstream.get_gold_answers``)."""
    return {o.answer.strip() for o in example.output if o.answer and o.answer.strip()}


# --------------------------------------------------------------------------- provenance pages


def output_pages(output: KiltOutput) -> list[str]:
    """One output's provenance pages: ``str(wikipedia_id).strip()`` in order, repeats dropped;
    ``[]`` when the output has no provenance (``eval_retrieval._get_ids_list`` for one output)."""
    pages: list[str] = []
    for p in output.provenance or ():
        wid = str(p.wikipedia_id).strip()
        if wid not in pages:
            pages.append(wid)
    return pages


def gold_page_lists(example: KiltExample) -> list[list[str]]:
    """One page list per gold output, outputs without provenance included as ``[]``
    (``eval_retrieval._get_ids_list`` on the gold item, as ``rprecision`` uses it)."""
    return [output_pages(o) for o in example.output]


def evidence_sets(example: KiltExample) -> list[frozenset[str]]:
    """The distinct evidence sets of a gold example (``eval_retrieval.get_rank``, step 1): one
    page set per output that has a ``provenance`` list -- an empty list gives an empty set, which
    counts in recall's denominator and can never be completed; outputs without the key are
    skipped. Equal sets are kept once, in order of first appearance."""
    sets: list[frozenset[str]] = []
    for o in example.output:
        if o.provenance is None:
            continue
        s = frozenset(str(p.wikipedia_id).strip() for p in o.provenance)
        if s not in sets:
            sets.append(s)
    return sets


def r_precision(guess_pages: Sequence[str], gold_lists: Sequence[Sequence[str]]) -> float:
    """KILT's page-level R-Precision (``eval_retrieval.rprecision`` / ``_computeRprec``): for each
    gold output with R pages, the share of the first R predicted pages that are among them (0.0
    when R is 0); the best over gold outputs. ``guess_pages`` are distinct (see
    :func:`output_pages`). No gold output at all is an error, as in KILT."""
    if not gold_lists:
        raise ValueError("a gold example without outputs has no R-Precision")
    best = 0.0
    for gold in gold_lists:
        if gold:
            g = set(gold)
            best = max(best, sum(p in g for p in guess_pages[: len(gold)]) / len(gold))
    return best


_Point = bool | tuple[str, int]  # True: a completed evidence set; False: a miss; ("partial", i): set i begun


def evidence_rank(guess_pages: Sequence[str], sets: Sequence[frozenset[str]]) -> list[_Point]:
    """KILT's rank of evidence sets (``eval_retrieval.get_rank``, step 3). Walking the predicted
    pages in order, a page in no set adds a miss (False); for every set holding it, the page is
    crossed off, the set's earlier partial point is removed, and a point is added at the end:
    True if the set is now complete, else a partial point. A page in several sets thus adds
    several points. No predicted pages gives an empty rank."""
    remaining = [set(s) for s in sets]
    rank: list[_Point] = []
    for page in guess_pages:
        page = str(page).strip()
        found = False
        for i, rest in enumerate(remaining):
            if page not in rest:
                continue
            found = True
            marker = ("partial", i)
            if marker in rank:
                rank.remove(marker)
            rest.discard(page)
            rank.append(True if not rest else marker)
        if not found:
            rank.append(False)
    return rank


def recall_at_k(guess_pages: Sequence[str], sets: Sequence[frozenset[str]], k: int) -> float:
    """KILT's page-level recall@k (``eval_retrieval._recall_at_k`` via ``get_ranking_metrics``):
    completed evidence sets among the first ``k`` points of :func:`evidence_rank`, divided by the
    number of distinct sets; 0.0 when there are no predicted pages or no sets. (KILT's scorer
    reports recall only for k > 1; the formula is the same for k = 1.)"""
    if k <= 0:
        raise ValueError(f"k must be a positive integer, got {k}")
    if not guess_pages or not sets:
        return 0.0
    return evidence_rank(guess_pages, sets)[:k].count(True) / len(sets)


# --------------------------------------------------------------------------- per example


@dataclass
class KiltExampleScore:
    """One example's KILT values. ``answered``: the prediction's answer is non-empty (else every
    answer metric is 0). ``kilt``: the KILT variants are credited (answered and R-Precision 1)."""

    id: str
    answered: bool
    accuracy: float
    em: float
    f1: float
    rougel: float
    rprec: float
    kilt: bool
    recall: dict[int, float] = field(default_factory=dict)


def score_example(gold: KiltExample, guess: KiltExample, ks: Sequence[int] = (5,), *,
                  gold_name: str = "gold", guess_name: str = "guess") -> KiltExampleScore:
    """Score one prediction against its gold example (``eval_downstream._calculate_metrics`` for
    one item, plus ``eval_retrieval.get_ranking_metrics``). Raises :class:`DataFormatError` where
    KILT's scorer fails: the prediction has not exactly one output with an ``answer``, the gold
    example has no outputs, or it has no answer while the prediction's answer is non-empty."""
    if len(guess.output) != 1 or guess.output[0].answer is None:
        raise DataFormatError(guess_name, f"id {guess.id!r}: expected exactly one output with an 'answer' "
                              f"(KILT's scorer requires it), got {_outputs_shown(guess.output)}")
    if not gold.output:
        raise DataFormatError(gold_name, f"id {gold.id!r}: no outputs; KILT's scorer cannot score it "
                              "(R-Precision needs at least one gold output)")
    answer = guess.output[0].answer.strip()
    pages = output_pages(guess.output[0])
    rprec = r_precision(pages, gold_page_lists(gold))
    sets = evidence_sets(gold)
    recall = {k: recall_at_k(pages, sets, k) for k in ks}
    if not answer:
        return KiltExampleScore(gold.id, False, 0.0, 0.0, 0.0, 0.0, rprec, False, recall)
    golds = gold_answers(gold)
    if not golds:
        raise DataFormatError(gold_name, f"id {gold.id!r}: no non-empty gold answer; KILT's scorer cannot "
                              "score the prediction's answer against it")
    return KiltExampleScore(
        id=gold.id, answered=True,
        accuracy=float(answer in golds),
        em=max_over_answers(exact_match, answer, golds),
        f1=max_over_answers(f1_score, answer, golds),
        rougel=max_over_answers(rouge_l, answer, golds),
        rprec=rprec, kilt=rprec == 1, recall=recall)


def _outputs_shown(outputs: Sequence[KiltOutput]) -> str:
    if len(outputs) != 1:
        return f"{len(outputs)} outputs"
    return "an output without 'answer'"


# --------------------------------------------------------------------------- whole files


def _shown_ids(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def _by_stripped_id(examples: Sequence[KiltExample], name: str, who: str) -> dict[str, KiltExample]:
    out: dict[str, KiltExample] = {}
    for i, ex in enumerate(examples, start=1):
        key = str(ex.id).strip()
        if key in out:
            raise DataFormatError(name, f"duplicate {who} id {key!r} (example {i}, first as {out[key].id!r}); "
                                  "KILT's scorer requires unique ids, compared after stripping whitespace")
        out[key] = ex
    return out


def align_predictions(gold: Sequence[KiltExample], guess: Sequence[KiltExample], *, strict: bool = False,
                      gold_name: str = "gold", guess_name: str = "guess") -> list[KiltExample]:
    """The prediction for each gold example, in gold order (``eval_downstream.validate_input``):
    ids are compared after stripping whitespace; duplicate gold or prediction ids and a gold id
    without a prediction are errors. Predictions for ids not in gold are ignored with a warning,
    as in KILT (``strict=True`` makes that an error too)."""
    gold_by = _by_stripped_id(gold, gold_name, "gold")
    guess_by = _by_stripped_id(guess, guess_name, "prediction")
    missing = [k for k in gold_by if k not in guess_by]
    if missing:
        raise DataFormatError(guess_name, f"no prediction for {len(missing)} gold id(s) of {gold_name}: "
                              f"{_shown_ids(missing)}")
    extra = [k for k in guess_by if k not in gold_by]
    if extra:
        msg = (f"{len(guess)} predictions for {len(gold)} gold examples: {len(extra)} id(s) not in "
               f"{gold_name}: {_shown_ids(extra)}")
        if strict:
            raise DataFormatError(guess_name, msg)
        log.warning("%s: %s (ignored, as KILT's scorer does)", guess_name, msg)
    return [guess_by[k] for k in gold_by]


def score_examples(gold: Sequence[KiltExample | Mapping], guess: Sequence[KiltExample | Mapping],
                   ks: Sequence[int] = (5,), *, strict: bool = False, gold_name: str = "gold",
                   guess_name: str = "guess") -> list[KiltExampleScore]:
    """Align predictions with gold (:func:`align_predictions`) and score each gold example
    (:func:`score_example`), in gold order. Dicts are validated first."""
    ks = _check_ks(ks)
    gold = [g if isinstance(g, KiltExample) else parse_kilt_example(g, gold_name, i)
            for i, g in enumerate(gold, start=1)]
    guess = [g if isinstance(g, KiltExample) else parse_prediction(g, guess_name, i)
             for i, g in enumerate(guess, start=1)]
    aligned = align_predictions(gold, guess, strict=strict, gold_name=gold_name, guess_name=guess_name)
    return [score_example(g, p, ks, gold_name=gold_name, guess_name=guess_name) for g, p in zip(gold, aligned)]


def summarize(scores: Sequence[KiltExampleScore], ks: Sequence[int] = (5,)) -> dict:
    """Means over examples in the official scorer's output structure
    (``eval_downstream.evaluate``): ``kilt`` (credited values only), ``downstream``,
    ``retrieval`` (``Rprec``, ``recall@k`` for each k). All zeros for no examples."""
    n = len(scores)

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n if n else 0.0

    return {
        "kilt": {
            "KILT-accuracy": mean(s.accuracy for s in scores if s.kilt),
            "KILT-em": mean(s.em for s in scores if s.kilt),
            "KILT-f1": mean(s.f1 for s in scores if s.kilt),
            "KILT-rougel": mean(s.rougel for s in scores if s.kilt),
        },
        "downstream": {
            "accuracy": mean(s.accuracy for s in scores),
            "em": mean(s.em for s in scores),
            "f1": mean(s.f1 for s in scores),
            "rougel": mean(s.rougel for s in scores),
        },
        "retrieval": {
            "Rprec": mean(s.rprec for s in scores),
            **{f"recall@{k}": mean(s.recall[k] for s in scores) for k in sorted(set(ks))},
        },
    }


def evaluate_kilt(gold: Sequence[KiltExample | Mapping], guess: Sequence[KiltExample | Mapping],
                  ks: Sequence[int] = (5,), *, strict: bool = False, gold_name: str = "gold",
                  guess_name: str = "guess") -> dict:
    """KILT's downstream, KILT and retrieval metrics for predictions ``guess`` against ``gold``,
    as ``kilt/eval_downstream.py``'s ``evaluate`` computes them (with ``ks=(5,)`` the same keys
    and values). ``gold_name``/``guess_name`` name the inputs in errors."""
    ks = _check_ks(ks)
    scores = score_examples(gold, guess, ks, strict=strict, gold_name=gold_name, guess_name=guess_name)
    return summarize(scores, ks)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k <= 0 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    return ks


# --------------------------------------------------------------------------- prediction files


def parse_prediction(obj: Any, path: str = "<data>", line: int | None = None) -> KiltExample:
    """Validate one prediction row. Looser than a gold row where KILT's scorer is: ``input`` is
    optional, ``id`` and ``wikipedia_id`` may be integers (KILT compares ``str(...)``), and a
    provenance entry without ``wikipedia_id`` is skipped (``eval_retrieval._get_ids_list``)."""
    def err(name: str | None, reason: str, kind: str = WRONG_TYPE) -> RowError:
        return RowError(path, reason, line=line, field=name, kind=kind)

    if not isinstance(obj, Mapping):
        raise err(None, f"expected a JSON object (a prediction), got {type(obj).__name__}")
    if obj.get("id") is None:
        raise err("id", "missing (expected a string)", MISSING_FIELD)
    if isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int)):
        raise err("id", f"expected a string, got {type(obj['id']).__name__}")
    text = obj.get("input", "")
    if not isinstance(text, str):
        raise err("input", f"expected a string, got {type(text).__name__}")
    if "output" not in obj:
        raise err("output", "missing (expected a list with one output)", MISSING_FIELD)
    if not isinstance(obj["output"], list):
        raise err("output", f"expected a list, got {type(obj['output']).__name__}")
    outputs = []
    for i, o in enumerate(obj["output"]):
        pre = f"output[{i}]"
        if not isinstance(o, Mapping):
            raise err(pre, f"expected an object, got {type(o).__name__}")
        answer = o.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise err(pre + ".answer", f"expected a string, got {type(answer).__name__}")
        prov = None
        if "provenance" in o:
            if not isinstance(o["provenance"], list):
                raise err(pre + ".provenance", f"expected a list, got {type(o['provenance']).__name__}")
            prov = []
            for j, p in enumerate(o["provenance"]):
                if not isinstance(p, Mapping):
                    raise err(f"{pre}.provenance[{j}]", f"expected an object, got {type(p).__name__}")
                wid = p.get("wikipedia_id")
                if wid is None:
                    continue  # KILT skips provenance without a page id
                if isinstance(wid, bool) or not isinstance(wid, (str, int)):
                    raise err(f"{pre}.provenance[{j}].wikipedia_id", f"expected a string, got {type(wid).__name__}",
                              BAD_VALUE)
                prov.append(Provenance(wikipedia_id=str(wid),
                                       extra={k: v for k, v in p.items() if k != "wikipedia_id"}))
        extra = {k: v for k, v in o.items() if k not in ("answer", "provenance")}
        outputs.append(KiltOutput(answer=answer, provenance=prov, extra=extra))
    extra = {k: v for k, v in obj.items() if k not in ("id", "input", "output", "meta")}
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else None
    return KiltExample(id=str(obj["id"]), input=text, output=outputs, meta=meta, extra=extra)


def read_predictions(path: str, report: RowReport | None = None) -> list[KiltExample]:
    """Read a KILT prediction jsonl (``id``, ``output[{answer, provenance}]``): rows validated by
    :func:`parse_prediction`, ids unique; errors name the file and line."""
    return list(iter_jsonl_rows(str(path), parse_prediction, key=lambda e: e.id, key_field="id",
                                report=report))


def evaluate_kilt_files(gold_path: str, guess_path: str, ks: Sequence[int] = (5,), *,
                        strict: bool = False) -> dict:
    """:func:`evaluate_kilt` on a gold KILT file and a prediction file; errors name the files."""
    gold = read_kilt(str(gold_path))
    guess = read_predictions(str(guess_path))
    return evaluate_kilt(gold, guess, ks, strict=strict, gold_name=str(gold_path), guess_name=str(guess_path))


def kilt_table(result: Mapping[str, Mapping[str, float]], title: str = "KILT"):
    """A rich table of an :func:`evaluate_kilt` result: one row per section, one column per metric
    kind (KILT variants beside their downstream values)."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    for c in ("accuracy", "em", "f1", "rougel"):
        t.add_column(c, justify="right")
    kilt, down = result.get("kilt", {}), result.get("downstream", {})
    t.add_row("downstream", *(f"{down.get(c, 0.0):.4f}" for c in ("accuracy", "em", "f1", "rougel")))
    t.add_row("KILT", *(f"{kilt.get('KILT-' + c, 0.0):.4f}" for c in ("accuracy", "em", "f1", "rougel")))
    ret = result.get("retrieval", {})
    rt = Table(title="retrieval (pages)")
    for k in ret:
        rt.add_column(k, justify="right")
    rt.add_row(*(f"{v:.4f}" for v in ret.values()))
    from rich.console import Group

    return Group(t, rt)
