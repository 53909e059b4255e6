"""A quiet terminal: Ray's own output goes to RUN_DIR/logs/ray.log, the terminal keeps re2g's.

The end-to-end check runs ``re2g train dpr`` in a subprocess (its own local Ray, as a user's shell
would) on the tiny sample with its BM25 index and ready negatives: the passages split again over Ray
Data, a few DPR steps on 2 Ray Train workers. Its stdout + stderr must hold re2g's progress and
table and none of Ray's lines; the log must hold them (~60-80 s on the shared 2-core machine). The
rest are unit tests of ``re2g.progress`` and the log routing (no Ray).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

# lines only Ray itself prints (Train's controller and workers, Data's executor, Serve, Ray core)
RAY_MARKERS = ["PlacementGroupCleaner", "TrainingReport(", "streaming_executor", "logging_progress",
               "RayTrainWorker", "TrainController", "Checkpoint successfully created", "core_worker.cc",
               "Token authentication", "RayDeprecationWarning", "Writing model shards", "(pid=",
               "Starting execution of Dataset", "MMapDirectory"]


# --------------------------------------------------------------------------- end to end (subprocess)


@pytest.mark.slow
def test_train_dpr_terminal_shows_re2g_and_no_ray_lines(tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    for sub in ("sample", "index/bm25"):   # passages/ left out: `re2g train` splits them again on Ray Data
        shutil.copytree(tiny_run_dir / sub, run / sub)
    _negatives(run, tiny_run_dir / "passages")
    sets = [f"run_dir={run}", "data.sample.size=tiny", "train.num_workers=2", "train.cpus_per_worker=0.5",
            "models.shared_encoder=true", "models.passage_max_length=64", "models.query_max_length=32",
            "train.dpr.batch_size=8", "train.dpr.max_steps=6", "train.dpr.log_every=2",
            "train.dpr.max_dev_queries=20", "train.mining.actors=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "re2g.cli", "train", "dpr", "--preset", "tiny", *(a for s in sets for a in ("--set", s))]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                       cwd=Path(__file__).resolve().parent.parent)
    seconds = time.time() - t0
    terminal = p.stdout + p.stderr
    assert p.returncode == 0, terminal[-3000:]
    log = run / "logs" / "ray.log"
    assert f"Ray's output goes to {log}" in terminal
    leaked = [m for m in RAY_MARKERS if m in terminal]
    assert not leaked, f"Ray's lines on the terminal: {leaked}\n{terminal[-3000:]}"
    # re2g's own: the stage's progress from metrics.jsonl, its summary and its table
    assert "[dpr] 2/6 steps" in terminal and "[dpr] done: 6/6 steps" in terminal, terminal
    assert "dpr: dev retrieval, before and after training" in terminal
    # ... and Ray's lines were there, in the log (Ray core, driver-side Ray Data, Train's workers)
    text = log.read_text()
    for marker in ("TrainingReport(", "RayTrainWorker", "streaming_executor", "Starting execution of Dataset",
                   "Started a local Ray instance"):
        assert marker in text, marker
    print(f"re2g train dpr: {seconds:.0f} s, {len(terminal.splitlines())} terminal lines, "
          f"{len(text.splitlines())} log lines")


def _negatives(run: Path, passages: Path) -> None:
    """RUN/train/negatives.jsonl without mining (the terminal is under test here, not BM25): random
    passages that are not the query's positives."""
    import random

    from re2g.config import load_config
    from re2g.data.sample import task_file
    from re2g.train.api import _locator
    from re2g.train.data import load_queries, write_records
    from re2g.train.stages import passage_lookup

    pids = sorted(passage_lookup(str(passages)))
    train = run / "sample" / task_file(load_config(preset="tiny").train.task, "train")
    records, _ = load_queries(str(train), _locator(str(passages)))
    rng = random.Random(0)
    for r in records:
        r.negatives = [p for p in rng.sample(pids, 12) if p not in r.positives][:8]
    write_records(run / "train" / "negatives.jsonl", records)


# --------------------------------------------------------------------------- progress (no Ray)


@pytest.fixture
def out_console():
    from re2g import progress

    buf = io.StringIO()
    progress.use_console(Console(file=buf, width=200))
    yield buf
    progress.use_console(Console(stderr=True))


def _append(path: Path, records: list[dict], delay: float) -> None:
    for r in records:
        time.sleep(delay)
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")


def test_track_training_shows_new_records_then_a_summary(tmp_path, out_console):
    from re2g.progress import track_training

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 99, "loss": 9.0}) + "\n")  # an earlier run's record: not shown
    recs = [{"step": 2, "loss": 1.5, "lr": 0.1}, {"step": 4, "loss": 0.75, "dev_recall@5": 0.5}]
    with track_training("dpr", 4, str(metrics)):
        writer = threading.Thread(target=_append, args=(metrics, recs, 0.3))
        writer.start()
        writer.join()
        time.sleep(0.1)
    lines = out_console.getvalue().splitlines()
    assert lines[0].startswith("[dpr] 2/4 steps  loss=1.5") and "lr" not in lines[0]
    assert lines[1].startswith("[dpr] 4/4 steps  loss=0.75 dev_recall@5=0.5")
    assert lines[2].startswith("[dpr] done: 4/4 steps in 0:0") and lines[2].endswith("loss=0.75 dev_recall@5=0.5")
    assert "99" not in out_console.getvalue()


def test_track_training_says_stopped_on_an_error(tmp_path, out_console):
    from re2g.progress import track_training

    with pytest.raises(RuntimeError):
        with track_training("reranker", 10, str(tmp_path / "metrics.jsonl")):
            raise RuntimeError("worker died")
    assert out_console.getvalue().startswith("[reranker] stopped in 0:00")


def test_tail_keeps_a_partial_line_for_later(tmp_path):
    from re2g.progress import _Tail

    path = tmp_path / "m.jsonl"
    tail = _Tail(str(path))
    assert tail.read() == []                       # no file yet
    path.write_text('{"step": 1}\n{"step": ')
    assert tail.read() == [{"step": 1}]
    with open(path, "a") as f:
        f.write('2}\n')
    assert tail.read() == [{"step": 2}]


def test_ray_data_progress_acts_only_in_the_driver(monkeypatch, out_console):
    from re2g import progress

    cb = progress.RayDataProgress()
    assert cb._active()                            # use_console made this process the driver
    monkeypatch.setattr(progress, "_driver_pid", os.getpid() + 1)
    assert not cb._active()                        # e.g. Ray Train's SplitCoordinator actor
    cb.before_execution_starts(object())
    assert cb.tid is None and out_console.getvalue() == ""


# --------------------------------------------------------------------------- routing (no Ray)


def _record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("ray", level, __file__, 1, msg, None, None)


def test_ray_records_reach_the_terminal_only_when_they_need_the_user():
    from re2g.runtime import _TerminalFilter

    f = _TerminalFilter()
    assert not f.filter(_record(logging.INFO, "Started a local Ray instance."))
    assert not f.filter(_record(logging.WARNING, "Token authentication is enabled for this Ray cluster."))
    assert not f.filter(_record(logging.WARNING, "Progress bars disabled. To enable, set ..."))
    assert f.filter(_record(logging.WARNING, "The following resource request cannot be scheduled right now"))
    assert f.filter(_record(logging.ERROR, "anything at all"))


def test_log_dir_for(tmp_path):
    import tempfile

    from re2g.runtime import log_dir_for

    assert log_dir_for(tmp_path / "run") == tmp_path / "run" / "logs"
    assert log_dir_for(f"file://{tmp_path}/run") == tmp_path / "run" / "logs"
    assert log_dir_for("s3://bucket/run") == Path(tempfile.gettempdir()) / "re2g-logs"
    assert log_dir_for(None) == Path(tempfile.gettempdir()) / "re2g-logs"


def test_verbose_is_a_ray_config_field():
    from re2g.config import load_config

    assert load_config(preset="tiny").ray.verbose is False
    assert load_config(preset="tiny", overrides=["ray.verbose=true"]).ray.verbose is True


def test_errors_name_the_log(monkeypatch):
    from typer.testing import CliRunner

    from re2g import runtime
    from re2g.cli import app

    assert runtime.log_hint() == "" or runtime.ray_log_path()
    monkeypatch.setitem(runtime._quiet, "path", "/runs/x/logs/ray.log")
    assert runtime.log_hint() == " (Ray's log: /runs/x/logs/ray.log)"
    res = CliRunner().invoke(app, ["retrieval-report", "--passages", "p", "--index", "i"])
    assert res.exit_code == 2
    assert "(Ray's log: /runs/x/logs/ray.log)" in res.output


@pytest.mark.parametrize("cmd", [["quickstart"], ["demo"], ["train", "dpr"], ["train", "generator"], ["embed"],
                                 ["serve"], ["mine-negatives"]])
def test_verbose_option(cmd):
    from typer.testing import CliRunner

    from re2g.cli import app

    res = CliRunner().invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0 and "--verbose" in res.output
