"""Process set-up that entry points (CLI, jobs, Serve) call: connecting to Ray, picking a device,
stopping cleanly on Ctrl-C and SIGTERM (:func:`clean_stops`).

Library functions never call these on their own; they take what they need as arguments.
~690 lines: the Ray connection, the routing of Ray's output to RUN_DIR/logs/ray.log and the clean
stops depend on each other's state (the log file, the handlers put back after ``ray.init``); the
clean-stop part could move to a module of its own (a to-do, not done yet).
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from re2g.config import RayConfig


def quiet_env() -> None:
    """Environment defaults for every re2g entry point (no telemetry, no hub downloads by surprise)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not has_cuda():
        # DeepSpeed picks its accelerator at import; on a machine without CUDA it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-builds its CPU communication op into torch's extension cache; the default cache
    # (~/.cache/torch_extensions) is shared by every Python environment of the user, and the op's build
    # hash includes the environment's paths, so two checkouts with their own .venv rebuilt it for each
    # other at every training start (30 s to 3 min on 2 cores). One cache per environment instead;
    # scripts/setup.sh builds into the same place.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA install
        return False


def pick_device(name: str = "auto") -> str:
    """``name`` when it names a device (``cpu``, ``cuda``); ``auto`` -> ``cuda`` when a GPU is visible,
    except inside a Ray actor that Ray gave no GPU (a Serve replica, a Ray Data actor of ``re2g embed`` or
    ``re2g predict``): Ray 2.60 leaves a node's GPUs visible to an actor that reserved none, so choosing by
    visibility alone put such an actor's model on a GPU Ray never gave it. Else ``cpu``."""
    if name != "auto":
        return name
    if not has_cuda():
        return "cpu"
    ray = sys.modules.get("ray")  # not imported: not a Ray worker
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        if ctx.get_actor_id() is not None and not ctx.get_accelerator_ids().get("GPU"):
            return "cpu"
    return "cuda"


RAY_LOG = "ray.log"
#: Ray log records that reach the terminal besides errors: warnings about a run that cannot go on
NEEDS_USER = re.compile(r"cannot be scheduled|infeasible|insufficient|not enough|out of memory|\bOOM\b|"
                        r"no space|disk is full|\bhangs?\b|taken more than|unhealthy|failed to start|deadlock",
                        re.I)

#: ... except these: Ray Data's check of the CPUs free at the moment a dataset starts ("does not have any
#: available CPUs. The Dataset job will hang unless…") fires whenever the previous step's actors are still
#: being released, and the job goes on (seen in the quickstart); it stays in the log.
NOT_FOR_USER = re.compile(r"does not have any available CPUs", re.I)

_quiet: dict = {}   # this process's quiet set-up: path, file, terminal (see _go_quiet)


def log_dir_for(run_dir: str | Path | None) -> Path:
    """Where a command's Ray log goes: ``RUN_DIR/logs`` for a local run directory, else a
    directory under the system's temporary directory."""
    s = str(run_dir) if run_dir else ""
    if s.startswith("file://"):
        s = s[len("file://"):]
    if s and "://" not in s:
        return Path(s) / "logs"
    return Path(tempfile.gettempdir()) / "re2g-logs"


def ray_log_path() -> str | None:
    """The file this process sends Ray's output to (None when Ray prints to the terminal)."""
    return _quiet.get("path")


def log_hint() -> str:
    """`` (Ray's log: PATH)`` for an error message, or ``""`` when Ray's output is on the terminal."""
    path = ray_log_path()
    return f" (Ray's log: {path})" if path else ""


def connect_ray(cfg: RayConfig | None = None, *, log_dir: str | Path | None = None, verbose: bool | None = None):
    """Connect to the Ray cluster named by ``cfg.address`` (or ``RAY_ADDRESS``), or start a local
    Ray in-process when there is none. Returns the ``ray`` module. Safe to call twice (a connected
    process is left as it is).

    Quiet unless ``verbose`` (default ``cfg.verbose``, ``--verbose`` on the CLI): Ray's output goes to
    ``LOG_DIR/ray.log`` (``log_dir`` default: a temporary directory; entry points pass
    ``RUN_DIR/logs``), whose path is printed once -- the workers' stdout/stderr (Ray Train's controller
    and workers, Ray Data's operators, Serve's replicas and access log), Ray's log records (errors
    and warnings that need the user also reach the terminal), warnings of Ray and deprecations, and
    whatever Ray's C++ core or the JVM write to this process's stderr below Python. Ray Data's own
    progress bars are off; re2g shows each execution as one line (``re2g.progress``). Verbose: Ray
    prints everything to the terminal as it does by default."""
    import ray

    quiet_env()
    if ray.is_initialized():
        return ray
    cfg = cfg or RayConfig()
    verbose = cfg.verbose if verbose is None else verbose
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"configure_logging": True, "logging_level": "INFO"}   # Ray's default
    if not verbose:
        _go_quiet(Path(log_dir) if log_dir else log_dir_for(None))
        # the workers' lines come to this process and go to the log (without the hook: Ray's session logs)
        kwargs["log_to_driver"] = _worker_stream_handler() is not None
    if address:
        init_ray(address=address, **kwargs)
    else:
        init_ray(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False, **kwargs)
    if not verbose:
        _route_worker_output()
        _route_raylet_errors()
        _quiet_ray_data()
        _route_ray_loggers()
    _keep_signals()   # ray.init took SIGTERM (Python's handler, then its C++ core's); clean_stops keeps both
    return ray


def init_ray(**kwargs):
    """``ray.init(**kwargs)`` that leaves an in-process JVM's signal handlers in place.

    ``ray.init`` turns Python's ``faulthandler`` on when it is off. Installed over the handlers of a JVM
    already running in this process (pyserini's Lucene through pyjnius), its SIGSEGV handler catches
    the JVM's own SIGSEGVs (implicit null checks in compiled Java code) and re-raises them, which the
    JVM then takes for a crash: "SIGSEGV (sent by kill)", an ``hs_err_pid*.log`` and exit 134 minutes
    later, in the middle of a BM25 search. Turning ``faulthandler`` off again restores the JVM's
    handlers. (A JVM started after ``ray.init`` installs its handlers on top, which is fine.)"""
    import faulthandler

    import ray

    was_on = faulthandler.is_enabled()
    ray.init(**kwargs)
    jnius_config = sys.modules.get("jnius_config")
    if not was_on and faulthandler.is_enabled() and getattr(jnius_config, "vm_running", False):
        faulthandler.disable()


# --------------------------------------------------------------------------- quiet: Ray to a file


class _TerminalFilter(logging.Filter):
    """Lets a Ray log record reach the terminal only when it is an error or needs the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        if stopping():   # what Ray says while it is being stopped goes to the log only
            return False
        if record.levelno >= logging.ERROR:
            return True
        msg = record.getMessage()
        return record.levelno >= logging.WARNING and bool(NEEDS_USER.search(msg)) and not NOT_FOR_USER.search(msg)


def _write(text: str) -> None:
    f = _quiet.get("file")
    if f is None:
        return
    with _quiet["lock"]:
        try:
            f.write(text if text.endswith("\n") else text + "\n")
        except ValueError:  # closed at exit
            pass


def _go_quiet(log_dir: Path) -> None:
    """Open ``log_dir/ray.log``, send this process's fd 2 there (Python's ``sys.stderr`` stays on the
    terminal), route Ray's log records and warnings, print the path once. Idempotent."""
    if _quiet.get("file") is not None:
        return
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = (log_dir / RAY_LOG).absolute()
        f = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    except OSError:  # not writable here: the temporary directory
        path = (log_dir_for(None) / f"ray-{os.getpid()}.log").absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    _quiet.update(path=str(path), file=f, lock=threading.Lock())
    f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    _redirect_fd2(f)
    _no_transformers_bars()
    _route_ray_loggers()
    _route_warnings()
    _hook_errors()
    print(f"Ray's output goes to {path} (--verbose shows it here)", file=sys.stderr, flush=True)


def _redirect_fd2(f) -> None:
    """fd 2 -> the log (the JVM's and Ray's C++ messages), ``sys.stderr`` -> a copy of the old fd 2."""
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return  # stderr is not the process's fd 2 (captured, e.g. under pytest): leave it
    except (AttributeError, OSError, ValueError):
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    os.dup2(f.fileno(), 2)
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    sys.stderr = io.TextIOWrapper(io.FileIO(terminal, "w"), encoding=encoding, errors="backslashreplace",
                                  line_buffering=True, write_through=True)
    _quiet["terminal"] = sys.stderr


def _route_ray_loggers() -> None:
    """Every ``ray`` logger that has handlers also writes to the log; its terminal handlers keep
    errors and warnings that need the user. Ray Data's, Train's and Serve's loggers are set up at
    import, so they are imported first."""
    import importlib

    f = _quiet.get("file")
    if f is None:
        return
    for mod in ("ray.data", "ray.train", "ray.serve"):
        try:
            importlib.import_module(mod)
        except Exception:  # a library not installed: nothing of it to route
            pass
    for name in ["ray", *sorted(n for n in logging.Logger.manager.loggerDict if n.startswith("ray."))]:
        logger = logging.getLogger(name)
        if not logger.handlers or (name != "ray" and logger.propagate):
            continue
        for h in logger.handlers:
            if getattr(h, "_re2g", False):
                continue
            if not any(isinstance(x, _TerminalFilter) for x in h.filters) and _to_terminal(h):
                h.addFilter(_TerminalFilter())
        if not any(getattr(h, "_re2g", False) for h in logger.handlers):
            fh = logging.StreamHandler(f)
            fh.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- "
                                              "%(message)s"))
            fh.setLevel(logging.INFO)
            fh._re2g = True
            logger.addHandler(fh)
        if logger.level > logging.INFO or logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def _to_terminal(handler: logging.Handler) -> bool:
    """Whether a handler writes to the terminal (a stream handler, Ray's plain handler), not a file."""
    if isinstance(handler, logging.FileHandler):
        return False
    return isinstance(handler, logging.StreamHandler) or type(handler).__name__ == "PlainRayHandler"


def _route_warnings() -> None:
    """Deprecation and future warnings, and any warning raised inside Ray, go to the log."""
    import warnings

    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        ray_dir = os.sep + "ray" + os.sep
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) \
                or ray_dir in str(filename) or "RayDeprecationWarning" in category.__name__:
            _write(warnings.formatwarning(message, category, filename, lineno, line))
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _no_transformers_bars() -> None:
    """transformers' tqdm bars off in this process (``save_pretrained``'s "Writing model shards" per
    model, the hub's downloads); ``HF_HUB_DISABLE_PROGRESS_BARS`` for a transformers imported later
    and for Ray's workers (their output is in the log anyway)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # a transformers without it: its bars stay
            pass


def _hook_errors() -> None:
    """An uncaught exception's traceback is followed by where Ray's log is."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        if not issubclass(kind, KeyboardInterrupt) and ray_log_path():
            print(f"Ray's log: {ray_log_path()}", file=sys.stderr, flush=True)

    sys.excepthook = hook


def _worker_stream_handler():
    """Ray's dispatcher of the workers' stdout/stderr in the driver (internal API), or None."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        return global_worker_stdstream_dispatcher
    except Exception:  # moved in this Ray: the workers' output stays in Ray's session logs
        return None


def _route_worker_output() -> None:
    """The workers' lines go to the log instead of the terminal (autoscaler events stay there)."""
    dispatcher = _worker_stream_handler()
    if dispatcher is None:
        return
    try:
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
    except Exception:
        RAY_TQDM_MAGIC = "__ray_tqdm_magic_token__"
    original = next((h for name, h in dispatcher.handlers if name == "ray_print_logs"), None)

    def to_log(data: dict) -> None:
        if data.get("pid") == "autoscaler" and original is not None:
            original(data)   # cluster scaling events: the user is waiting on them
            return
        name = data.get("actor_name") or data.get("task_name") or ""
        ip = data.get("ip")
        where = "" if ip == data.get("localhost") else f", ip={ip}"
        prefix = f"({name + ' ' if name else ''}pid={data.get('pid')}{where})"
        lines = [line for line in data.get("lines", []) if RAY_TQDM_MAGIC not in line]
        if lines:
            _write("\n".join(f"{prefix} {line}" for line in lines))

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("re2g_ray_log")
    dispatcher.add_handler("re2g_ray_log", to_log)


def _route_raylet_errors() -> None:
    """Error messages the raylet pushes to the driver (printed by Ray's ``listen_error_messages``
    thread straight to stdout, e.g. "Task ServeController.graceful_shutdown failed" while Serve is
    shut down) go to the log while a stop is under way (internal API; unchanged otherwise)."""
    try:
        import ray._private.worker as ray_worker
    except Exception:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_re2g", False):
        return

    def print_to_stdstream(data, ignore_prefix, *args, **kwargs):
        if stopping():
            pid = data.get("pid")
            _write("\n".join(f"({pid}) {line}" for line in data.get("lines", [])))
            return None
        return original(data, ignore_prefix, *args, **kwargs)

    print_to_stdstream._re2g = True
    ray_worker.print_to_stdstream = print_to_stdstream


def _quiet_ray_data() -> None:
    """Ray Data: no progress bars of its own (re2g shows each execution as one line)."""
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except Exception:
        return
    from re2g.progress import register_ray_data

    register_ray_data()


# --------------------------------------------------------------------------- clean stops: Ctrl-C, SIGTERM

#: a stopped command's exit status as a shell shows it, 128 + the signal (see :func:`_exit`)
STOP_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: how long one clean-up (Serve's shutdown) may take before the stop goes on without it
CLEANUP_TIMEOUT_S = 15.0
#: the process exits this long after the signal, whatever still runs
STOP_DEADLINE_S = 30.0

_stops: dict = {"active": False, "signum": None, "note": "", "cleanups": [], "signals": []}


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGINT (Ctrl-C) or SIGTERM inside :func:`clean_stops`. A
    ``KeyboardInterrupt``, so Ray's blocking calls end and libraries clean up as for Ctrl-C (Ray's
    ``ray.get`` turns it into a plain ``KeyboardInterrupt``: the stop is recorded, not the type)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stopping() -> bool:
    """Whether a stop (SIGINT or SIGTERM under :func:`clean_stops`) is under way."""
    return _stops["signum"] is not None


def stop_note(text: str) -> None:
    """What the interrupt line adds in parentheses (the quickstart: that finished steps are kept)."""
    _stops["note"] = text


@contextmanager
def on_stop(label: str, cleanup: Callable[[], None]) -> Iterator[None]:
    """Run ``cleanup`` when the block is left, as ``finally`` would; when it is left because of a
    stop, ``cleanup`` runs in :func:`clean_stops`' bounded shutdown instead, after the interrupt line
    and before the local Ray is stopped. ``label`` names it in that line (``stopping Serve and Ray…``)."""
    entry = (label, cleanup)
    _stops["cleanups"].append(entry)
    try:
        yield
    finally:
        if not (_stops["active"] and stopping()):
            if entry in _stops["cleanups"]:
                _stops["cleanups"].remove(entry)
            cleanup()


@contextmanager
def clean_stops() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM stop the block cleanly (the ``re2g`` command line runs every
    command inside): the first raises :class:`Stopped` in the main thread, so ``finally`` blocks run
    and partial outputs (temporary directories) are removed; then one line on the terminal
    (``interrupted: stopping Serve and Ray…``), the :func:`on_stop` clean-ups (Serve; each at most
    :data:`CLEANUP_TIMEOUT_S`), the exit with 130 / 143 (:func:`_exit`: no interpreter teardown), and
    the local Ray's processes stopped right after it when this process started them
    (:func:`_stop_local_ray_after_exit`). Ray's output in the meantime goes to the log only. A second
    signal exits at once, and so does the process :data:`STOP_DEADLINE_S` after the first.

    Ray and the JVM take these signals for themselves (``ray.init``'s SIGTERM handlers, Ray Train's
    SIGINT handler during ``fit`` -- never removed after it -- and a JVM's shutdown handlers);
    :func:`connect_ray` puts the handlers back, Ray Train's is not installed and an in-process JVM
    starts with ``-Xrs``."""
    if _stops["active"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_CODES}
    # a signal ignored when the process started stays ignored (`nohup`, a shell's background job)
    _stops.update(active=True, signum=None, cleanups=[],
                  signals=[s for s, h in previous.items() if h is not signal.SIG_IGN])
    _jvm_leaves_signals()
    _install_handlers()
    try:
        yield
    except BaseException:
        if not stopping():
            raise
        _finish()
    else:
        if stopping():   # the stop was swallowed on the way up: it still ends the process
            _finish()
    finally:
        _stops["active"] = False
        for s, h in previous.items():
            if h is not None:
                signal.signal(s, h)


def _install_handlers() -> None:
    if _stops["active"] and threading.current_thread() is threading.main_thread():
        for s in _stops["signals"]:
            signal.signal(s, _on_signal)


def _keep_signals() -> None:
    """After ``ray.init``: this process's handlers back (see :func:`clean_stops`)."""
    if not _stops["active"]:
        return
    _install_handlers()
    _ray_train_leaves_sigint()


def _on_signal(signum, frame) -> None:
    if stopping():   # the second Ctrl-C: no more waiting
        _say(f"{_verb(signum)} again: exiting now")
        _exit(STOP_CODES[_stops["signum"]], stop_ray=True)
    _stops["signum"] = signum
    threading.Thread(target=_deadline, name="re2g-stop-deadline", daemon=True).start()
    raise Stopped(signum)


def _verb(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else "terminated"


def _deadline() -> None:
    time.sleep(STOP_DEADLINE_S)
    _say(f"still stopping after {STOP_DEADLINE_S:.0f} s: exiting now")
    _exit(STOP_CODES[_stops["signum"]], stop_ray=True)


def _finish() -> None:
    """The stop, in the main thread: the line, the clean-ups, the exit (the local Ray stopped after
    it). Never returns."""
    signum = _stops["signum"]
    code = STOP_CODES[signum]
    if _quiet.get("file") is not None:   # tracebacks of threads the stop ends: the log
        threading.excepthook = lambda a: _write("".join(traceback.format_exception(
            a.exc_type, a.exc_value, a.exc_traceback)))
        sys.unraisablehook = lambda u: _write(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}: "
                                               f"{u.exc_value!r}")
    try:
        from re2g.progress import close_display

        close_display()   # live bars off the terminal before the line
    except Exception:
        pass
    cleanups = list(_stops["cleanups"])
    parts = list(dict.fromkeys(label for label, _ in cleanups))
    node = _local_ray()
    if node is not None:
        parts.append("Ray")
    note = _stops["note"]
    line = (f"{_verb(signum)}: " + (f"stopping {' and '.join(parts)}…" if parts else "stopped")
            + (f" ({note})" if note else ""))
    _say(line)
    _write(f"re2g: {line}")
    t0 = time.monotonic()
    for label, cleanup in reversed(cleanups):
        _bounded(cleanup, label)
    _write(f"re2g: stopped in {time.monotonic() - t0:.1f} s")
    _exit(code, stop_ray=node is not None)


def _local_ray():
    """The Ray node this process started (also half-way through ``ray.init``), or None: none, or
    connected to a cluster started elsewhere (leaving it is enough: its GCS ends this driver's job
    and the actors it owns)."""
    if "ray" not in sys.modules:
        return None
    try:
        from ray._private import worker

        node = getattr(worker, "_global_node", None)
        return node if node is not None and getattr(node, "all_processes", None) else None
    except Exception:
        return None


#: the helper that stops the local Ray's processes once this process has exited (argv: this
#: process's pid, then pid:start-time of each process to stop)
_REAPER = """
import os, signal, sys, time
def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
def alive(pid, start):
    st = stat(pid)
    return st is not None and st[0] != "Z" and (start is None or st[1] == start)
parent = int(sys.argv[1])
procs = [tuple(int(x) for x in a.split(":")) for a in sys.argv[2:]]
t = time.monotonic() + 60
while alive(parent, None) and time.monotonic() < t:
    time.sleep(0.02)
for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
    for pid, start in procs:
        if alive(pid, start):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    t = time.monotonic() + wait
    while time.monotonic() < t and any(alive(p, s) for p, s in procs):
        time.sleep(0.05)
"""


def _descendants() -> list[tuple[int, int]]:
    """(pid, start time) of every process below this one (Linux ``/proc``; elsewhere none)."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append((int(name), int(fields[19])))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _stop_local_ray_after_exit() -> None:
    """Stop the local Ray once this process is gone: a detached helper (its own session, so a second
    Ctrl-C does not reach it) waits for this process to exit, then sends SIGTERM to every process
    below it that is still there (workers, agents), and SIGKILL 3 s later. The raylet, the GCS and
    Ray's monitors share this process's fate (Ray starts them so) and go at the exit itself.

    Not ``ray.shutdown()`` here: it shuts this process's core worker down first, and a thread of Ray
    Data's (a streaming executor finishing its scheduling step, a metadata fetcher) calling Ray after
    that ends the process from C++ half-way through ("The core worker has already been shutdown ...
    The process will exit", status 1); stopping the raylet first ends it the same way ("The
    connection to the plasma store is failed. Terminate the process")."""
    procs = _descendants()
    if not procs:
        return
    import subprocess

    try:
        subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), *(f"{p}:{s}" for p, s in procs)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError as e:   # no helper: the processes Ray fate-shares still go with this one
        _write(f"re2g: could not start the helper that stops Ray's processes: {e}")


def _bounded(fn: Callable[[], None], label: str) -> None:
    """Run ``fn`` in a thread for at most :data:`CLEANUP_TIMEOUT_S` (the main thread stays free for
    a second Ctrl-C); its errors go to the log."""
    def run() -> None:
        try:
            fn()
        except BaseException as e:  # the stop goes on without it
            _write(f"re2g: stopping {label}: {type(e).__name__}: {e}")

    t = threading.Thread(target=run, name=f"re2g-stop-{label}", daemon=True)
    t.start()
    t.join(CLEANUP_TIMEOUT_S)
    if t.is_alive():
        _write(f"re2g: {label} did not stop within {CLEANUP_TIMEOUT_S:.0f} s; going on")


def _say(text: str) -> None:
    """One line on the terminal, written straight to its file descriptor (safe inside a handler)."""
    stream = _quiet.get("terminal") or sys.__stderr__ or sys.stderr
    try:
        stream.flush()
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = 2
    try:
        os.write(fd, (text + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _exit(code: int, stop_ray: bool = False) -> None:
    """Exit now: streams flushed, no interpreter teardown (a JVM's and torch's threads made that
    crash); ``stop_ray``: the local Ray's processes stopped once this one is gone.

    After Ctrl-C the process dies of SIGINT, its default action put back: what a shell expects of a
    program that cleaned up after Ctrl-C (``$?`` is 130 and a script or ``make`` running it stops
    too, where ``exit 130`` lets the script go on). Otherwise, and where that does not end it (PID 1
    in a container ignores SIGINT), ``os._exit(code)``: 143 after SIGTERM, as Java programs exit,
    without the shell's "Terminated" under the interrupt line."""
    if stop_ray and _local_ray() is not None:
        _stop_local_ray_after_exit()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    f = _quiet.get("file")
    if f is not None:
        try:
            f.flush()
        except Exception:
            pass
    if _stops["signum"] == signal.SIGINT and threading.current_thread() is threading.main_thread():
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            os.kill(os.getpid(), signal.SIGINT)
        except (OSError, ValueError):
            pass
    os._exit(code)


def _jvm_leaves_signals() -> None:
    """A JVM started in this process (pyserini's Lucene: the BM25 searcher) handles SIGINT and SIGTERM
    itself by default -- its shutdown, then ``exit`` from C under Python's, Ray's and torch's
    threads, without Ray's shutdown. ``-Xrs`` leaves both signals to Python; a JVM already running
    keeps its options."""
    try:
        import jnius_config
    except Exception:   # no pyjnius: no JVM in this process
        return
    try:
        if not jnius_config.vm_running and "-Xrs" not in jnius_config.get_options():
            jnius_config.add_options("-Xrs")
    except Exception:
        pass


def _ray_train_leaves_sigint() -> None:
    """Ray Train's ``fit`` installs a SIGINT handler that aborts the run and returns (the command
    then went on to its next step) and stays installed after ``fit`` (a later Ctrl-C then exits 0 or
    hangs on the finished run). Under :func:`clean_stops` it is not installed: the stop ends ``fit``
    like any other blocking call (internal API; any failure leaves Ray Train as it is)."""
    try:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except Exception:
        return
    original = DataParallelTrainer.__dict__.get("_register_sigint_handler")
    if original is None or getattr(original, "_re2g", False):
        return

    def _register_sigint_handler(self, controller):
        if _stops["active"]:
            return None
        return original(self, controller)

    _register_sigint_handler._re2g = True
    DataParallelTrainer._register_sigint_handler = _register_sigint_handler
