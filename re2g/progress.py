"""re2g's own progress on the terminal: one line (or bar, on a terminal) per long step.

Ray's own output goes to a log file (``re2g.runtime.connect_ray``), so the driver shows what the
workers do itself:

* a training stage (:func:`track_training`, around ``TorchTrainer.fit``): rank 0 appends a record
  to the stage's ``metrics.jsonl`` every ``log_every`` steps; a thread here tails the file and moves
  a bar ``[dpr] 120/300 steps  loss=0.52 dev_recall@5=0.61  0:00:45 ETA 0:01:10``;
* a Ray Data execution (:class:`RayDataProgress`, registered in the ``DataContext`` by
  ``connect_ray``): rows out of the slowest operator, ``Ray Data MapBatches(Encoder) 320/490 rows``.

On a terminal these are rich progress bars that vanish when done, leaving one summary line; elsewhere
(a pipe, a log, a test's ``Console(file=StringIO())``) each update is a plain line, no more often than
every ``LINE_EVERY_S`` seconds for Ray Data. Everything goes to one console per process
(:func:`use_console`; by default stderr).
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from rich.console import Console

#: Ray Data executions shorter than this leave no summary line.
SUMMARY_MIN_S = 10.0
#: without a terminal, a running Ray Data execution prints a line at most this often
LINE_EVERY_S = 30.0
#: how often the metrics file is read
POLL_S = 0.5
#: width of a bar on a terminal
BAR = 24

_lock = threading.RLock()
_console: Console | None = None
_driver_pid: int | None = None   # the process whose Ray Data executions are shown (connect_ray's)


def use_console(console: Console) -> None:
    """Send progress to ``console`` (the entry point's; the quickstart's) and show this process's
    Ray Data executions."""
    global _console, _driver_pid
    with _lock:
        if _console is not console:
            _display.close()
        _console = console
        _driver_pid = os.getpid()


def close_display() -> None:
    """Take the live bars off the terminal now (a stop prints its line where they were)."""
    _display.close()


def show_ray_data() -> None:
    """Show this process's Ray Data executions (``connect_ray`` calls it)."""
    global _driver_pid
    _driver_pid = os.getpid()


def console() -> Console:
    global _console
    with _lock:
        if _console is None:
            _console = Console(stderr=True)
        return _console


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class _Task:
    label: str
    unit: str
    total: int | None = None
    done: int = 0
    info: str = ""
    t0: float = field(default_factory=time.time)
    first: tuple[float, int] | None = None   # (time, done) at the first update (the rate's start)
    last_line: float = 0.0
    rich_id: int | None = None

    def eta(self) -> float | None:
        if not self.total or self.first is None:
            return None
        t, d = self.first
        rate = (self.done - d) / max(time.time() - t, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self) -> str:
        of = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        eta = self.eta()
        tail = f"  {_fmt_s(time.time() - self.t0)}" + (f", ETA {_fmt_s(eta)}" if eta is not None and
                                                        self.done < (self.total or 0) else "")
        return f"{self.label} {of} {self.unit}" + (f"  {self.info}" if self.info else "") + tail


class _Display:
    """The tasks shown now; a rich ``Progress`` while any is active on a terminal."""

    def __init__(self):
        self.tasks: dict[int, _Task] = {}
        self.progress = None
        self._next = 0

    def _live(self):
        con = console()
        if not con.is_terminal:
            return None
        if self.progress is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            p = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(bar_width=BAR),
                         MofNCompleteColumn(), TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                         TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False),
                         console=con, transient=True, refresh_per_second=4)
            try:
                p.start()
            except Exception:  # another live display is active (rich allows one): plain lines instead
                return None
            self.progress = p
        return self.progress

    def start(self, label: str, unit: str, total: int | None = None) -> int:
        with _lock:
            self._next += 1
            task = _Task(label, unit, total)
            p = self._live()
            if p is not None:
                task.rich_id = p.add_task(label, total=total, unit=unit, info="")
            self.tasks[self._next] = task
            return self._next

    def update(self, tid: int, done: int, total: int | None = None, info: str | None = None,
               line: bool = True) -> None:
        with _lock:
            task = self.tasks.get(tid)
            if task is None:
                return
            if task.first is None:
                task.first = (time.time(), done)
            task.done, task.total = done, total if total is not None else task.total
            if info is not None:
                task.info = info
            if task.rich_id is not None and self.progress is not None:
                self.progress.update(task.rich_id, completed=done, total=task.total, info=self._fit(task))
            elif line:
                task.last_line = time.time()
                console().print(task.line(), markup=False, highlight=False)

    @staticmethod
    def _fit(task: _Task) -> str:
        """The task's info cut to what the line has left after the bar, counts and times (rich would
        squeeze those instead)."""
        n = len(str(task.total or task.done))
        used = 2 + len(task.label) + 1 + BAR + 1 + 2 * n + 2 + len(task.unit) + 1 + 8 + 4 + 8 + 1
        room = console().width - used - 1
        if len(task.info) <= room:
            return task.info
        return task.info[:max(0, room - 1)] + "…" if room > 1 else ""

    def finish(self, tid: int, summary: str | None) -> None:
        with _lock:
            task = self.tasks.pop(tid, None)
            if task is None:
                return
            if task.rich_id is not None and self.progress is not None:
                self.progress.remove_task(task.rich_id)
            if not self.tasks:
                self.close()
            if summary:
                console().print(summary, markup=False, highlight=False)

    def close(self) -> None:
        with _lock:
            if self.progress is not None:
                p, self.progress = self.progress, None
                p.stop()


_display = _Display()


# --------------------------------------------------------------------------- training stages


_SHOWN = ("loss",)          # besides dev_* metrics, what the training line shows


def describe(record: dict) -> str:
    """``loss=0.5213 dev_recall@5=0.612`` from a metrics record (loss and the dev metrics)."""
    keys = [k for k in record if k in _SHOWN or k.startswith("dev_")]
    return " ".join(f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}" for k in keys)


class _Tail:
    """New complete lines of a growing jsonl file, from its size at the start."""

    def __init__(self, path: str):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.partial = ""

    def read(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        text, out = self.partial + text, []
        *lines, self.partial = text.split("\n")
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@contextmanager
def track_training(name: str, steps: int, metrics_path: str | None) -> Iterator[None]:
    """Show the progress of stage ``name`` (``steps`` optimizer steps) from its ``metrics.jsonl``
    while the body runs (``TorchTrainer.fit``), then one summary line."""
    if not metrics_path:
        yield
        return
    tail = _Tail(metrics_path)
    tid = _display.start(f"[{name}]", "steps", steps)
    stop = threading.Event()
    last: dict = {}
    t0 = time.time()

    def poll() -> None:
        while True:
            stopping = stop.wait(POLL_S)
            for rec in tail.read():
                last.clear()
                last.update(rec)
                _display.update(tid, int(rec.get("step", 0)), info=describe(rec))
            if stopping:
                return

    thread = threading.Thread(target=poll, name=f"re2g-progress-{name}", daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join(timeout=5)
        took = _fmt_s(time.time() - t0)
        if last:  # (no record: metrics.jsonl is on another node, or the run stopped before the first)
            summary = f"[{name}] {'done' if ok else 'stopped'}: {last.get('step', 0)}/{steps} steps in {took}  " \
                      + describe(last)
        else:
            summary = f"[{name}] {'done' if ok else 'stopped'} in {took}"
        _display.finish(tid, summary)


# --------------------------------------------------------------------------- Ray Data


def _op_rows(executor) -> tuple[str, int, int | None]:
    """(operators, rows done, rows expected) of a running Ray Data execution: its map operators (the
    work: encoders, retrievers, predictors; all operators where there is none), counted at the one
    furthest behind among those whose output size is known. Reads the executor's topology (internal
    API; any failure shows rows as unknown)."""
    try:
        from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer

        ops = [op for op in executor._topology if not isinstance(op, InputDataBuffer)]
    except Exception:
        return "", 0, None
    work = [op for op in ops if "Map" in op.name] or ops
    names = " -> ".join(op.name for op in work)
    best: tuple[float, int, int | None] | None = None
    for op in work:
        try:
            total = _rows_expected(op)
            done = int(op.metrics.row_outputs_taken or 0)
        except Exception:
            continue
        if not total:
            continue
        frac = done / total
        if best is None or frac < best[0]:
            best = (frac, min(done, total), total)
    if best is None:
        try:
            done = int(work[-1].metrics.row_outputs_taken or 0) if work else 0
        except Exception:
            done = 0
        return names, done, None
    return names, best[1], best[2]


def _rows_expected(op) -> int | None:
    """An operator's expected output rows; while it does not know them yet, its input's (a map keeps
    the rows it gets, the usual case here)."""
    seen = 0
    while op is not None and seen < 16:
        total = op.num_output_rows_total()
        if total:
            return total
        if "FlatMap" in op.name or op.name.startswith("ListFiles"):  # rows in != rows out; files, not rows
            return None
        deps = getattr(op, "input_dependencies", None) or []
        op, seen = (deps[0] if len(deps) == 1 else None), seen + 1
    return None


def _stopping() -> bool:
    """Whether Ctrl-C or SIGTERM is stopping this process (``re2g.runtime.clean_stops``)."""
    from re2g.runtime import stopping

    return stopping()


try:  # Ray Data's execution callbacks (DataContext.custom_execution_callback_classes)
    from ray.data._internal.execution.execution_callback import ExecutionCallback as _Callback
except Exception:  # pragma: no cover - Ray Data missing or reorganized: no Ray Data lines
    _Callback = object


class RayDataProgress(_Callback):
    """Shows one Ray Data execution of this process as one line/bar (rows of its slowest operator)."""

    def __init__(self):
        self.tid: int | None = None
        self.t0 = 0.0
        self.last_update = 0.0
        self.label = "Ray Data"

    def _active(self) -> bool:
        return _driver_pid == os.getpid()

    def before_execution_starts(self, executor) -> None:
        if not self._active():
            return
        names, _, total = _op_rows(executor)
        self.label = f"Ray Data {names}" if names else "Ray Data"
        self.t0 = time.time()
        self.tid = _display.start(self.label, "rows", total)

    def on_execution_step(self, executor) -> None:
        if self.tid is None or time.time() - self.last_update < POLL_S:
            return
        self.last_update = time.time()
        _, done, total = _op_rows(executor)
        task = _display.tasks.get(self.tid)
        line = task is not None and time.time() - max(task.last_line, self.t0) >= LINE_EVERY_S
        _display.update(self.tid, done, total, line=line)

    def _end(self, executor, ok: bool) -> None:
        if self.tid is None:
            return
        _, done, total = _op_rows(executor)
        took = time.time() - self.t0
        summary = None
        if took >= SUMMARY_MIN_S or not ok:
            summary = (f"{self.label}: {done}" + (f"/{total}" if total else "") + f" rows in {_fmt_s(took)}"
                       + ("" if ok else " (stopped)" if _stopping() else " (failed)"))
        tid, self.tid = self.tid, None
        _display.finish(tid, summary)

    def after_execution_succeeds(self, executor) -> None:
        self._end(executor, True)

    def after_execution_fails(self, executor, error) -> None:
        self._end(executor, False)


def register_ray_data() -> None:
    """Show this process's Ray Data executions with :class:`RayDataProgress` (datasets created from
    now on; the class is registered once in the current ``DataContext``)."""
    show_ray_data()
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        classes = getattr(ctx, "custom_execution_callback_classes", None)
        if classes is not None and RayDataProgress not in classes:
            classes.append(RayDataProgress)
    except Exception:  # pragma: no cover - older/newer Ray Data without the hook
        pass
