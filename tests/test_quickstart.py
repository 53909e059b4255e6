"""`re2g quickstart` end to end on the tiny sample task, inside the test suite, as a user's shell runs it:
the command in a subprocess (its own local Ray), its terminal (stdout + stderr) captured.

Every stage runs for real (Ray Data passages and embedding, Lucene BM25, DPR / RAG generator /
reranker / end-to-end training on 2 Ray Train workers with DeepSpeed ZeRO-2, HNSW shards, KILT
evaluation), with the quickstart's own tiny settings and fewer steps (``FAST``) so the whole run
stays at a few minutes on 2 cores. Serving is covered by tests/test_serve.py and the web page test.

The same run is the quiet terminal's end-to-end check (``test_the_terminal_shows_re2g_and_no_ray_lines``):
Ray's own output (Ray core, Ray Data's executor, Train's controller and workers) goes to RUN_DIR/logs/ray.log
and the terminal keeps re2g's progress and tables (tests/test_quiet_terminal.py has the unit tests).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RE2G = str(Path(sys.executable).parent / "re2g")
# fewer steps than `re2g quickstart` (cli.QUICKSTART_TINY); measured on the 2-core machine
FAST = ["train.dpr.max_steps=120", "train.reranker.max_steps=160", "train.generator.epochs=8",
        "train.e2e.max_steps=100", "train.generator.max_dev_queries=50", "train.e2e.max_dev_queries=50"]
DEV = 50
# lines only Ray itself prints (Train's controller and workers, Data's executor, Serve, Ray core)
RAY_MARKERS = ["PlacementGroupCleaner", "TrainingReport(", "streaming_executor", "logging_progress",
               "RayTrainWorker", "TrainController", "Checkpoint successfully created", "core_worker.cc",
               "Token authentication", "RayDeprecationWarning", "Writing model shards", "(pid=",
               "Starting execution of Dataset", "MMapDirectory"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """``re2g quickstart --no-serve`` with ``FAST`` and ``--dev-limit DEV``: the run directory, the run's
    summary (reports/report.json), the report's files and the terminal."""
    run = tmp_path_factory.mktemp("quickstart") / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="160")
    cmd = [RE2G, "quickstart", "--run", str(run), "--size", "tiny", "--no-serve", "--dev-limit", str(DEV),
           *(a for s in FAST for a in ("--set", s))]
    # its own session: a run past the timeout is stopped with the processes it started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=3600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"re2g quickstart still running after an hour:\n{(out + err)[-3000:]}")
    terminal = out + err
    assert proc.returncode == 0, terminal[-3000:]
    reports = run / "reports"
    files = {"markdown": reports / "report.md", "json": reports / "report.json"}
    files.update({f.stem: f for f in reports.glob("*.png")})
    summary = json.loads(files["json"].read_text())
    return run, summary, files, terminal


def _cell(v) -> str:
    """A before / after value as the stages table prints it."""
    return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _stage(summary, name):
    return next(s for s in summary["stages"] if s["name"] == name)


def test_every_stage_ran_and_reported(quickstart):
    run, summary, files, printed = quickstart
    from re2g.quickstart import STEPS

    assert [s["name"] for s in summary["stages"]] == [s.name for s in STEPS]
    assert not any(s.get("skipped") for s in summary["stages"])
    for name in ("dpr", "generator", "reranker", "e2e"):
        s = _stage(summary, name)
        assert isinstance(s["before"], float) and isinstance(s["after"], float), s
    assert {"markdown", "json", "training_curves", "recall_dev", "answers_dev"} <= set(files)
    md = files["markdown"].read_text()
    for name in ("dpr", "generator", "reranker", "e2e"):
        assert f"| {name} |" in md
    # report.json holds the stages the command printed at its end ("what each stage added")
    table = printed[printed.rindex("what each stage added"):]
    rows = {}
    for line in table.splitlines():
        parts = re.split(r"[│┃|]", line)             # │ stage │ metric │ before │ after │ change │ seconds │
        if len(parts) == 8:
            rows[parts[1].strip()] = [c.strip() for c in parts[1:-1]]
    for s in summary["stages"]:
        assert rows.get(s["name"], [])[2:4] == [_cell(s.get("before")), _cell(s.get("after"))], (s, table)
    assert f"report: {files['markdown']}" in printed
    # training curves of every training stage were found
    assert set(summary["training"]) >= {"dpr", "generator", "reranker", "e2e"}
    assert "KILT evaluation" in printed
    # the terminal: each training stage's progress (from its metrics.jsonl)
    for name in ("dpr", "generator", "reranker", "e2e-distill"):
        assert re.search(rf"^\[{name}\] \d+/\d+ steps  loss=", printed, re.M), name
        assert re.search(rf"^\[{name}\] done: \d+/\d+ steps in ", printed, re.M), name


def test_the_terminal_shows_re2g_and_no_ray_lines(quickstart):
    """The quiet terminal end to end (tests/test_quiet_terminal.py ran ``re2g train dpr`` for it before):
    a user's shell shows re2g's progress and tables and none of Ray's lines; Ray's lines (Ray core,
    driver-side Ray Data, Train's workers) are in RUN_DIR/logs/ray.log."""
    run, _, _, terminal = quickstart
    log = run / "logs" / "ray.log"
    assert f"Ray's output goes to {log}" in terminal
    leaked = [m for m in RAY_MARKERS if m in terminal]
    assert not leaked, f"Ray's lines on the terminal: {leaked}\n{terminal[-3000:]}"
    # re2g's own: a stage's progress from metrics.jsonl, its summary and its table
    assert re.search(r"^\[dpr\] \d+/120 steps  loss=", terminal, re.M), terminal
    assert re.search(r"^\[dpr\] done: 120/120 steps in ", terminal, re.M), terminal
    assert "dpr: dev retrieval, before and after training" in terminal
    text = log.read_text()
    for marker in ("TrainingReport(", "RayTrainWorker", "streaming_executor", "Starting execution of Dataset",
                   "Started a local Ray instance"):
        assert marker in text, marker


def test_trained_system_beats_bm25_and_the_untrained_generator(quickstart):
    _, summary, _, _ = quickstart
    retrieval, dev = summary["retrieval"]["dev"], summary["downstream"]["dev"]
    final = dev["stage 4 (distill)"]
    # retrieval: the trained system's provenance pages vs BM25 alone (page R-Precision)
    assert final["Rprec"] > retrieval["bm25"]["rprec_page"] + 0.2
    assert retrieval["hybrid"]["recall@5"] > retrieval["bm25"]["recall@5"]
    assert retrieval["reranked"]["recall@5"] > retrieval["bm25"]["recall@5"]  # the Recall@k plot's 4th curve
    # answers: the untrained generator gets none right
    assert dev["untrained"]["em"] == 0.0
    assert final["em"] >= 0.06 and dev["stages 1-3"]["em"] >= 0.06


def test_reranker_beats_the_trained_hybrids_order(quickstart):
    """Stage 3 behind the *trained* DPR: the reranker (started from stage 1's encoder) orders the
    hybrid's dev lists (DPR top-12 + BM25 top-12) better than they come. Measured: R@1 0.370 vs the
    lists' order 0.306 here (FAST); 0.444 vs 0.417 at the quickstart's 300 steps; demo size 0.470 vs 0.309."""
    run, _, _, _ = quickstart
    ev = json.loads((run / "models" / "reranker" / "eval.json").read_text())
    order, untrained, after = ev["before"]["retriever order"], ev["before"]["reranker"], ev["after"]["reranker"]
    assert after["recall@1"] > untrained["recall@1"] + 0.2
    assert after["recall@1"] > order["recall@1"] + 0.02
    # measured here: MRR@10 0.603 vs 0.564, page R-Prec 0.963 vs 1.000 (4 of 108 queries); at 300 steps
    # MRR@10 and page R-Prec equal the order's (0.636, 1.000)
    assert after["mrr@10"] >= order["mrr@10"]
    assert after["rprec_page"] >= order["rprec_page"] - 0.05


def test_saved_reranker_gives_the_workers_scores(quickstart):
    """The reranker directory the run saved (copied from the last DeepSpeed checkpoint) scores a dev list
    as the training worker's in-memory model did: the worker's final metrics carry a probe (four
    scores, computed before saving) that eval.json keeps."""
    from re2g.config import load_config
    from re2g.models.reranker import CrossEncoder
    from re2g.train.api import _dev, prepare_inputs
    from re2g.train.stages import RerankerStage

    run, _, _, _ = quickstart
    cfg = load_config(run / "config.yaml")
    inputs = prepare_inputs(cfg, build=False)
    ev = json.loads((run / "models" / "reranker" / "eval.json").read_text())
    dev = _dev(cfg, inputs, cfg.train.reranker, str(run / "train" / "candidates-dev.jsonl"))
    stage = RerankerStage(None, None, inputs.passages, dev, 1.0)
    saved = stage.probe(CrossEncoder.from_pretrained(run / "models" / "reranker"))
    assert len(saved) == 4 and saved == pytest.approx(ev["run"]["metrics"]["probe"], rel=1e-4, abs=1e-4)


def test_stage_4_distillation_brings_dpr_to_the_reranker(quickstart):
    """Stage 4 with ``distill``: the KL between the reranker's and DPR's distributions over the
    candidates falls, and EM does not drop (by more than one dev question in 50)."""
    run, _, _, _ = quickstart
    ev = json.loads((run / "models" / "e2e-distill" / "eval.json").read_text())
    before, after = ev["before"]["e2e-distill"], ev["after"]["e2e-distill"]
    assert after["kl"] < 0.5 * before["kl"]
    assert after["em"] >= before["em"] - 1 / DEV - 1e-9


def test_second_run_skips_finished_steps(quickstart, ray_local):
    import io

    from rich.console import Console

    from re2g.config import load_config
    from re2g.quickstart import run_quickstart

    run, _, _, _ = quickstart
    cfg = load_config(run / "config.yaml")
    again = run_quickstart(cfg, console=Console(file=io.StringIO()), only=["sample", "passages", "dpr", "generator"],
                           dev_limit=DEV, test_limit=DEV)
    assert all(s["skipped"] for s in again["stages"])
