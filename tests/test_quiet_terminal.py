"""A quiet terminal: Ray's own output goes to RUN_DIR/logs/ray.log, the terminal keeps re2g's.

Unit tests of ``re2g.progress`` and the log routing (no Ray). The end-to-end check rides on the
quickstart run that tests/test_quickstart.py makes anyway (``re2g quickstart`` in a subprocess, as a
user's shell runs it: Ray Data, BM25, four Ray Train stages):
``test_quickstart.py::test_the_terminal_shows_re2g_and_no_ray_lines`` asserts that its stdout + stderr
hold re2g's progress and tables and none of Ray's lines (``test_quickstart.RAY_MARKERS``), and that
RUN_DIR/logs/ray.log holds Ray's. (It ran ``re2g train dpr`` on its own before: ~75 s more.)
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console


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
    # Ray Data's snapshot of free CPUs when a dataset starts: a false alarm between steps, log only
    assert not f.filter(_record(logging.WARNING, "Warning: The Ray cluster currently does not have any available "
                                                 "CPUs. The Dataset job will hang unless more CPUs are freed up."))
    assert f.filter(_record(logging.WARNING, "The actor pool hangs: no progress for 600 s"))
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
