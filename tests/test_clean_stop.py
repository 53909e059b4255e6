"""Clean stops: Ctrl-C in a real terminal and SIGTERM end an ``re2g`` command with one line, the
local Ray's processes gone and exit status 130 / 143 (``re2g.runtime.clean_stops``). After Ctrl-C
the process dies of SIGINT once it has cleaned up (a shell's ``$?`` 130, ``Popen.returncode`` -2);
after SIGTERM it exits with 143.

The end-to-end checks run two ``re2g quickstart`` in subprocesses at once (each its own local Ray,
as a user's shell would) and stop them in their first step, once Ray is up: one with Ctrl-C typed
into a pseudo-terminal (the kernel's line discipline sends SIGINT to the foreground process group,
as a terminal emulator's does), one with SIGTERM. ~20-30 s together on the shared 2-core machine,
nearly all of it start-up. The rest run in process or in a bare Python, without Ray: the
quickstart's step markers, ``on_stop``, the JVM's and Ray Train's signal handlers, transformers' bars.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

RE2G = str(Path(sys.executable).parent / "re2g")
ROOT = Path(__file__).resolve().parent.parent
FIRST_STEP = "1/13 sample knowledge task"
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")   # colours, cursor moves, titles
CRASHES = ("Traceback", "Segmentation fault", "KeyboardInterrupt", "Aborted", "SIGTERM received", "core dumped")
# seconds from the signal to the exit that count as a hang, not as a slow stop: a stop takes ~5-15 s here
# (stopping the local Ray), over 25 s when other tests load the 2 cores; a command whose signal handling
# is broken never exits at all (the test waits this long, then kills it)
HANG_S = 90


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TERM="xterm-256color",
               COLUMNS="160", LINES="50")
    return env


def _quickstart(run: Path) -> list[str]:
    return [RE2G, "quickstart", "--run", str(run), "--no-serve", "--set", "ray.num_cpus=1"]  # fewer idle workers


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent, start time) of a process, None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _descendants(root: int) -> list[tuple[int, int]]:
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            children.setdefault(st[1], []).append((int(name), st[2]))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _left(procs: list[tuple[int, int]], within_s: float) -> list[str]:
    """The processes of ``procs`` still running (zombies waiting to be reaped do not count) after
    waiting up to ``within_s``; their command lines."""
    def alive() -> list[int]:
        return [p for p, start in procs if (st := _stat(p)) is not None and st[0] != "Z" and st[2] == start]

    deadline = time.monotonic() + within_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    out = []
    for p in alive():
        try:
            out.append(f"{p}: " + Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            pass
    return out


class _Output:
    """Collects a stream (a pipe or a pty's master) in a thread."""

    def __init__(self, fd: int):
        self.fd, self.chunks, self.lock = fd, [], threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:   # the pty's other side closed (EIO)
                return
            if not data:
                return
            with self.lock:
                self.chunks.append(data)

    @property
    def text(self) -> str:
        """What was written, without the terminal's escape sequences."""
        with self.lock:
            return ANSI.sub("", b"".join(self.chunks).decode("utf-8", "replace"))


def _in_terminal(cmd: list[str]) -> tuple[subprocess.Popen, int]:
    """``cmd`` with a pseudo-terminal as its controlling terminal, in its own session (so the
    terminal's Ctrl-C reaches its process group only). Returns (process, the pty's master fd)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))

    def controlling_terminal() -> None:   # after setsid (start_new_session): the pty becomes ours
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=ROOT,
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    return proc, master


def _piped(cmd: list[str]) -> tuple[subprocess.Popen, int]:
    """``cmd`` with its output in a pipe (no terminal), in its own session. Returns (process, read fd)."""
    read, write = os.pipe()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=write, stderr=write, env=_env(), cwd=ROOT,
                            start_new_session=True)
    os.close(write)
    return proc, read


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict:
    """Two quickstarts started together (their start-up is most of the time): one in a terminal,
    stopped with Ctrl-C typed into it; one with its output in a pipe, stopped with SIGTERM; each
    once its first step began (Ray is up: connect_ray comes before step 1). For each: the run
    directory, exit status, output, seconds from the signal to the exit, the Ray processes that
    ran under it and those of them still running 15 s later."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads processes from /proc (Linux)")
    base = tmp_path_factory.mktemp("stops")
    started = {"ctrl-c": _in_terminal(_quickstart(base / "ctrl-c")),
               "sigterm": _piped(_quickstart(base / "sigterm"))}
    send = {"ctrl-c": lambda proc, fd: os.write(fd, b"\x03"),   # Ctrl-C, typed
            "sigterm": lambda proc, fd: proc.send_signal(signal.SIGTERM)}
    outs = {name: _Output(fd) for name, (_, fd) in started.items()}
    results: dict = {}
    try:
        deadline = time.monotonic() + 240
        while len(results) < len(started):   # each is stopped as soon as it is in its first step
            for name, (proc, fd) in started.items():
                if name not in results and FIRST_STEP in outs[name].text:
                    results[name] = {"run": base / name, "procs": _descendants(proc.pid), "t0": time.monotonic()}
                    send[name](proc, fd)
                elif name not in results and (proc.poll() is not None or time.monotonic() > deadline):
                    raise AssertionError(f"{name}: never printed {FIRST_STEP!r} (rc {proc.poll()}):\n"
                                         f"{outs[name].text[-3000:]}")
            time.sleep(0.05)
        for name, (proc, _) in started.items():
            try:
                proc.wait(timeout=max(1.0, results[name]["t0"] + HANG_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"{name}: still running {HANG_S} s after the signal (a hang):\n"
                                     f"{outs[name].text[-3000:]}")
            results[name]["seconds"] = time.monotonic() - results[name]["t0"]
            results[name]["rc"] = proc.returncode
        for name in started:
            outs[name].thread.join(timeout=5)
            results[name]["output"] = outs[name].text
            results[name]["left"] = _left(results[name]["procs"], within_s=15)
    finally:
        for proc, fd in started.values():
            if proc.poll() is None:
                proc.kill()
            os.close(fd)
    return results


def _shell_status(returncode: int) -> int:
    """``$?`` in a shell for a Popen return code (-n: died of signal n)."""
    return 128 - returncode if returncode < 0 else returncode


def _check(result: dict, code: int, line: str) -> None:
    terminal = result["output"]
    assert _shell_status(result["rc"]) == code, f"returncode {result['rc']}, expected $? {code}:\n{terminal[-3000:]}"
    assert line in terminal, terminal[-3000:]
    crashed = [c for c in CRASHES if c in terminal]
    assert not crashed, f"{crashed} on the terminal:\n{terminal[-3000:]}"
    assert result["seconds"] < HANG_S, f"{result['seconds']:.1f} s to stop (a hang)"
    assert result["procs"], "no Ray processes were running under the command"
    assert not result["left"], f"still running after the stop: {result['left']}"
    # the step it stopped in left no marker, and no half-written sample that could pass for a finished one
    from re2g.quickstart import STATE_DIR, STEPS

    run = result["run"]
    begun = re.findall(rf"(\d+)/{len(STEPS)} ", terminal)
    stopped_in = STEPS[int(begun[-1]) - 1].name
    assert not (run / STATE_DIR / f"{stopped_in}.json").exists(), stopped_in
    assert not (run / "sample").exists() or (run / "sample" / "sample.json").exists()
    print(f"exit {code} {result['seconds']:.1f} s after the signal, {len(result['procs'])} Ray processes gone")


def test_ctrl_c_in_a_terminal_stops_the_quickstart_and_its_ray(stopped):
    assert stopped["ctrl-c"]["rc"] == -signal.SIGINT   # died of it: a script running it stops too
    _check(stopped["ctrl-c"], 130, "interrupted: stopping Ray… (finished steps are kept: the next run resumes)")


def test_sigterm_stops_the_quickstart_and_its_ray(stopped):
    _check(stopped["sigterm"], 143, "terminated: stopping Ray… (finished steps are kept: the next run resumes)")


# --------------------------------------------------------------------------- in process


def test_an_interrupted_step_is_redone_and_finished_ones_are_not(tmp_path, monkeypatch):
    from re2g import quickstart
    from re2g.config import load_config
    from re2g.quickstart import STATE_DIR, Step, config_hash, run_quickstart

    runs: list[str] = []

    def write(name: str, interrupt: bool = False):
        def step(ctx) -> dict:
            runs.append(name)
            out = ctx.run_dir / name
            out.mkdir(exist_ok=True)
            (out / "part-0").write_text("x")
            if interrupt:
                raise KeyboardInterrupt   # Ctrl-C half-way through the step
            return {"metric": name}
        return Step(name, name, step, lambda c, n=name: [str(c.run_dir / n)])

    cfg = load_config(preset="tiny", overrides=[f"run_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(quickstart, "STEPS", [write("first"), write("second", interrupt=True), write("third")])
    # "second" finished once for this config, its output since removed: it runs again, and stopped
    # half-way, its old marker must not vouch for the half-written output
    state = tmp_path / "run" / STATE_DIR
    state.mkdir(parents=True)
    (state / "second.json").write_text(json.dumps({"config": config_hash(cfg), "result": {}}))
    with pytest.raises(KeyboardInterrupt):
        run_quickstart(cfg)
    assert runs == ["first", "second"]
    assert (state / "first.json").exists() and not (state / "second.json").exists()
    assert not list(state.glob(".*.tmp"))

    (tmp_path / "run" / "third").mkdir()                                               # outputs there, but
    (state / "third.json").write_text('{"config": "' + config_hash(cfg) + '", "res')   # a marker cut short
    monkeypatch.setattr(quickstart, "STEPS", [write("first"), write("second"), write("third")])
    runs.clear()
    summary = run_quickstart(cfg)
    assert runs == ["second", "third"]                 # "first" resumed, the interrupted one redone
    assert [s["skipped"] for s in summary["stages"]] == [True, False, False]
    assert json.loads((state / "third.json").read_text())["config"] == config_hash(cfg)


def test_on_stop_cleans_up_like_finally_when_nothing_stops():
    from re2g.runtime import on_stop

    calls = []
    with on_stop("Serve", lambda: calls.append("stopped")):
        calls.append("body")
    assert calls == ["body", "stopped"]
    with pytest.raises(KeyboardInterrupt):   # no clean_stops around: a plain Ctrl-C cleans up on the way out
        with on_stop("Serve", lambda: calls.append("stopped again")):
            raise KeyboardInterrupt
    assert calls[-1] == "stopped again"


def _python(script: str, *, timeout: float) -> subprocess.CompletedProcess:
    """``script`` run by this Python in the repository root, output captured."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


def test_a_stop_exits_with_its_code_after_the_cleanup(tmp_path):
    """SIGTERM in the middle of a block (no Ray): the line, the clean-up, exit 143."""
    script = (
        "import os, signal, time\n"
        "from re2g.runtime import clean_stops, on_stop, stop_note\n"
        "stop_note('a note')\n"
        "with clean_stops():\n"
        "    with on_stop('Thing', lambda: print('cleaned', flush=True)):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "print('not reached')\n")
    p = _python(script, timeout=60)
    assert p.returncode == 143, p.stdout + p.stderr
    assert p.stdout == "cleaned\n"
    assert "terminated: stopping Thing… (a note)" in p.stderr and "Traceback" not in p.stderr


def test_a_jvm_in_process_leaves_sigterm_to_python(tmp_path):
    """pyserini's JVM (the BM25 searcher runs in the driver) installs its own SIGINT/SIGTERM
    handlers unless started with -Xrs: it used to exit from C, without re2g's clean-up."""
    pytest.importorskip("jnius_config")
    from re2g.index.java import JavaNotFoundError, find_java

    try:
        find_java()
    except JavaNotFoundError as e:
        pytest.skip(str(e))
    script = (
        "import os, signal, time\n"
        "from re2g.runtime import clean_stops\n"
        "with clean_stops():\n"
        "    from re2g.index.java import prepare_pyserini\n"
        "    prepare_pyserini()\n"
        "    from jnius import autoclass\n"
        "    autoclass('java.lang.System').getProperty('java.version')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n")
    p = _python(script, timeout=120)
    assert p.returncode == 143, p.stdout + p.stderr   # (the JVM's own handler exits with 143 too:)
    assert "terminated: stopped" in p.stderr


def test_ray_train_keeps_its_sigint_handler_out_under_clean_stops(monkeypatch):
    """Ray Train's fit() installs a SIGINT handler that aborts the run and lets the command go on,
    and leaves it installed after fit (a later Ctrl-C then exited 0)."""
    pytest.importorskip("ray.train.v2.api.data_parallel_trainer")
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from re2g import runtime

    runtime._ray_train_leaves_sigint()
    registered = []
    monkeypatch.setattr(signal, "signal", lambda *a: registered.append(a))
    monkeypatch.setitem(runtime._stops, "active", True)
    assert DataParallelTrainer._register_sigint_handler(object(), controller=None) is None
    assert registered == []


def test_quiet_mode_turns_transformers_bars_off(monkeypatch, capfd):
    """``save_pretrained`` drew "Writing model shards: 100%|███| 1/1" per model on the terminal
    (the quickstart's step 4) with transformers' tqdm; quiet mode (no --verbose) turns it off."""
    from transformers.utils import logging as hf_logging

    from re2g.runtime import _no_transformers_bars

    def shards() -> str:   # what save_pretrained does around its shard loop
        for _ in hf_logging.tqdm([1], desc="Writing model shards"):
            pass
        captured = capfd.readouterr()
        return captured.out + captured.err

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    hf_logging.enable_progress_bar()
    try:
        assert "Writing model shards" in shards()
        _no_transformers_bars()
        assert not hf_logging.is_progress_bar_enabled()
        assert "Writing model shards" not in shards()
    finally:
        hf_logging.enable_progress_bar()
