"""Process set-up that entry points (CLI, jobs, Serve) call: connecting to Ray, picking a device.

Library functions never call these on their own; they take what they need as arguments.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from re2g.config import RayConfig


def quiet_env() -> None:
    """Environment defaults for every re2g entry point (no telemetry, no hub downloads by surprise)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not has_cuda():
        # DeepSpeed picks its accelerator at import; on a machine without CUDA it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA install
        return False


def pick_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if name == "auto":
        return "cuda" if has_cuda() else "cpu"
    return name


RAY_LOG = "ray.log"
#: Ray log records that reach the terminal besides errors: warnings about a run that cannot go on
NEEDS_USER = re.compile(r"cannot be scheduled|infeasible|insufficient|not enough|out of memory|\bOOM\b|"
                        r"no space|disk is full|\bhangs?\b|taken more than|unhealthy|failed to start|deadlock",
                        re.I)

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
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False, **kwargs)
    if not verbose:
        _route_worker_output()
        _quiet_ray_data()
        _route_ray_loggers()
    return ray


# --------------------------------------------------------------------------- quiet: Ray to a file


class _TerminalFilter(logging.Filter):
    """Lets a Ray log record reach the terminal only when it is an error or needs the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and bool(NEEDS_USER.search(record.getMessage()))


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
    import threading

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


def _quiet_ray_data() -> None:
    """Ray Data: no progress bars of its own (re2g shows each execution as one line)."""
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except Exception:
        return
    from re2g.progress import register_ray_data

    register_ray_data()
