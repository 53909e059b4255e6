"""What every benchmark shares: the command-line basics, machine info, JSON results, plots, and a
prepared corpus cached under ``bench_out/cache/`` so runs reuse the sample, passages, model and
embeddings.

Cache layout (one directory per sample size)::

    bench_out/cache/<size>/sample/                  the sample task (re2g.data.sample)
    bench_out/cache/<size>/passages/                its passages Parquet (Ray Data split)
    bench_out/cache/<size>/models/biencoder/        an untrained tiny DPR bi-encoder (tiny preset)
    bench_out/cache/<size>/passages_first<N>/       the first N passages (a subset for the benchmarks)
    bench_out/cache/<size>/embeddings/<N>_len<L>/   their embeddings (passage max length L)

Every step is skipped when its output is already there and complete; a step whose input was
rebuilt is rebuilt too. Result JSON layout::

    {"benchmark", "timestamp", "machine": {...}, "params": {...}, "results": {...},
     "ratios": {...}, "notes": [...]}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

SIZES = ("tiny", "demo", "bench")
DEFAULT_OUT = Path("bench_out")
SUBSET_FILE_ROWS = 8192  # rows per Parquet file of a passage subset
PACKAGES = ("re2g", "ray", "torch", "transformers", "faiss-cpu", "faiss-gpu", "pyserini", "pyarrow", "numpy")

T = TypeVar("T")


# --------------------------------------------------------------------------- command line


def parser(description: str, default_size: str) -> argparse.ArgumentParser:
    """An ``argparse`` parser with the options every benchmark takes (``--size``, ``--out``,
    ``--cache``); each benchmark adds its own."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=SIZES, default=default_size,
                   help="sample size of the corpus (tiny: a few hundred passages, for the smoke test)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where <name>.json and plots are written")
    p.add_argument("--cache", type=Path, default=None, help="prepared corpora (default: <out>/cache)")
    return p


def cache_dir(args: argparse.Namespace) -> Path:
    return args.cache if args.cache is not None else args.out / "cache"


# --------------------------------------------------------------------------- machine and results


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU count and model, memory, OS, Python and package versions, load average, host name."""
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cpu_model": _cpu_model(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "load_average": load_average(),
        "host": socket.gethostname(),
    }


@dataclass
class Result:
    """One benchmark run: parameters, figures, same-run ratios and notes; written as JSON."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    load_at_start: list[float] | None = field(default_factory=load_average)

    def to_dict(self) -> dict[str, Any]:
        machine = machine_info()
        machine["load_average_at_start"] = self.load_at_start
        return {"benchmark": self.name, "timestamp": self.started, "machine": machine,
                "params": self.params, "results": self.results, "ratios": self.ratios, "notes": self.notes}

    def write(self, out_dir: Path) -> Path:
        """Write ``out_dir/<name>.json`` (atomically: a temporary file renamed)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.name}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(_jsonable(self.to_dict()), indent=2) + "\n")
        os.replace(tmp, path)
        return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def ratio(a: float, b: float, digits: int = 3) -> float | None:
    """``a / b`` rounded, None when ``b`` is 0 or either is missing."""
    if a is None or b is None or not b:
        return None
    return round(float(a) / float(b), digits)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), wall seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _console():
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)  # wide enough tables in logs too


def print_table(table) -> None:
    _console().print(table)


def print_written(*paths: Path) -> None:
    _console().print("[bold]wrote[/bold] " + ", ".join(str(p) for p in paths))


def new_table(title: str, columns: Sequence[str], *, left: int = 1):
    """A rich table with these columns: the first ``left`` (labels) left-aligned, the figures right."""
    from rich.table import Table

    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < left else "right")
    return t


def finish(result: Result, table, out_dir: Path) -> Path:
    """Print ``table``, write the result's JSON into ``out_dir`` and say where; returns the path."""
    print_table(table)
    path = result.write(out_dir)
    print_written(path)
    return path


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: why a local Ray gets one logical CPU more than the machine has (stated in the results)
RAY_EXTRA_CPU_NOTE = (
    "local Ray started with one logical CPU more than the usable CPUs: Ray Data's read task needs a CPU slot, "
    "and with encoder actors holding every CPU (e.g. 2 actors x 1 CPU on 2 CPUs) embed_corpus never schedules it "
    "and hangs")


def connect_ray():
    """Ray for the benchmarks: the one already initialised (tests) or at ``RAY_ADDRESS``, else a local
    one with ``usable_cpus() + 1`` logical CPUs (see :data:`RAY_EXTRA_CPU_NOTE`)."""
    import ray

    from re2g.config import RayConfig
    from re2g.runtime import connect_ray as _connect

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return _connect()
    return _connect(RayConfig(num_cpus=usable_cpus() + 1))


#: Ray Data's read of a small Parquet corpus is one block (blocks are coalesced up to
#: ``DataContext.target_max_block_size``, 128 MiB), so one encoder actor gets all the work; the
#: benchmarks can cap the block size to give every actor some
SMALL_BLOCK_BYTES = 256 * 1024


@contextlib.contextmanager
def ray_data_block_size(max_bytes: int | None) -> Iterator[None]:
    """Cap Ray Data's ``target_max_block_size`` in this driver for the block (None: unchanged)."""
    if max_bytes is None:
        yield
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.target_max_block_size
    ctx.target_max_block_size = int(max_bytes)
    try:
        yield
    finally:
        ctx.target_max_block_size = old


def ray_cpus() -> int:
    """Logical CPUs of the connected Ray cluster."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


# --------------------------------------------------------------------------- the prepared corpus


def _parquet_files(d: Path) -> list[Path]:
    return sorted(f for f in d.rglob("*.parquet") if not f.name.startswith((".", "_")))


def _count_rows(d: Path) -> int:
    import pyarrow.dataset as pads

    return pads.dataset([str(f) for f in _parquet_files(d)], format="parquet").count_rows()


@dataclass(frozen=True)
class Corpus:
    """A sample task with its passages and an untrained tiny bi-encoder, cached on disk."""

    size: str
    root: Path  # cache/<size>
    sample: Path
    passages: Path
    model_dir: Path

    @property
    def passage_count(self) -> int:
        return _count_rows(self.passages)

    def dev_queries(self, limit: int | None = None) -> list[str]:
        """The inputs of every dev task file (slot filling, QA, fact verification), in that order;
        with ``limit``, that many spread evenly over the list (so every task is represented)."""
        from re2g.data.kilt import read_kilt
        from re2g.data.sample import TASKS, task_file

        out: list[str] = []
        for task in TASKS:
            path = self.sample / task_file(task, "dev")
            if path.is_file():
                out.extend(ex.input for ex in read_kilt(str(path)))
        if limit and limit < len(out):
            out = [out[i] for i in np.linspace(0, len(out) - 1, limit).round().astype(int)]
        return out

    def subset(self, n: int | None) -> tuple[Path, int]:
        """The first ``n`` passages as a Parquet directory (all of them when ``n`` is None or not
        smaller than the corpus); returns the directory and its row count."""
        total = self.passage_count
        if n is None or n >= total:
            return self.passages, total
        out = self.root / f"passages_first{n}"
        marker = out / "_subset.json"
        if marker.is_file() and json.loads(marker.read_text()).get("rows") == n:
            return out, n
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq

        from re2g.data.passages import staged_output_dir

        table = pads.dataset([str(f) for f in _parquet_files(self.passages)], format="parquet").head(n)
        with staged_output_dir(str(out), overwrite=True) as stage:
            # several files, so that Ray Data reads several blocks and every encoder actor gets work
            for i, start in enumerate(range(0, n, SUBSET_FILE_ROWS)):
                pq.write_table(table.slice(start, SUBSET_FILE_ROWS), f"{stage.path}/part-{i:05d}.parquet")
            with open(f"{stage.path}/_subset.json", "w") as f:
                json.dump({"rows": n, "of": str(self.passages)}, f)
        return out, n

    def embeddings(self, n: int | None, *, max_length: int, batch_size: int = 64,
                   actors: int | None = None) -> tuple[Path, dict[str, Any]]:
        """Embeddings of the first ``n`` passages at passage length ``max_length``, made once with
        Ray Data (``embed_corpus``, ``actors`` x 1 thread; default: the usable CPUs, leaving one Ray
        CPU slot free; blocks capped at :data:`SMALL_BLOCK_BYTES`) and reused while the encoder's fingerprint
        matches. Returns the directory and its ``_embeddings.json`` (+ ``cached``)."""
        from re2g.errors import ArtifactError
        from re2g.index.embed import embed_corpus, read_embeddings_meta
        from re2g.models.fingerprint import encoder_fingerprint

        passages, rows = self.subset(n)
        out = self.root / "embeddings" / f"{'all' if passages == self.passages else rows}_len{max_length}"
        fingerprint = encoder_fingerprint(str(self.model_dir))
        try:
            meta = read_embeddings_meta(str(out))
            if meta.get("fingerprint") == fingerprint and meta.get("passages") == rows:
                return out, {**meta, "cached": True}
        except ArtifactError:
            pass
        connect_ray()
        actors = actors or max(1, min(usable_cpus(), ray_cpus() - 1))  # leave Ray Data's read task a CPU slot
        with ray_data_block_size(SMALL_BLOCK_BYTES):
            stats = embed_corpus(str(passages), str(self.model_dir), str(out), batch_size=batch_size, actors=actors,
                                 threads_per_actor=1, max_length=max_length, overwrite=True)
        return out, {**read_embeddings_meta(str(out)), "cached": False, "passages_per_s": stats.passages_per_s,
                     "ray_data_block_bytes": SMALL_BLOCK_BYTES}

    def embed_queries(self, texts: Sequence[str], *, max_length: int = 64, batch_size: int = 256) -> np.ndarray:
        """Query vectors (B, D) float32 from the bi-encoder's query encoder."""
        from re2g.models.encoders import BiEncoder

        enc = BiEncoder.from_pretrained(str(self.model_dir))
        return enc.embed_queries(list(texts), batch_size=batch_size, max_length=max_length)


def prepare_corpus(size: str, cache: Path, *, progress: bool = True) -> Corpus:
    """The sample of ``size`` with passages and a tiny untrained bi-encoder under ``cache/<size>``,
    built where missing (the passage split needs Ray: connected here when it runs)."""
    from re2g.config import PassageConfig, SampleConfig, load_config
    from re2g.data.passages import split_knowledge_source
    from re2g.data.sample import KNOWLEDGE_SOURCE, generate_sample, load_sample_summary
    from re2g.models.init import init_models

    root = Path(cache) / size
    sample, passages, models = root / "sample", root / "passages", root / "models"
    model_dir = models / "biencoder"
    rebuilt = False
    if load_sample_summary(sample, SampleConfig(size=size)) is None:
        generate_sample(sample, SampleConfig(size=size), progress=progress, overwrite=True)
        rebuilt = True
    if rebuilt or not (passages / "_manifest.json").is_file():
        connect_ray()
        split_knowledge_source(str(sample / KNOWLEDGE_SOURCE), str(passages), PassageConfig(), overwrite=True)
    if rebuilt or not (model_dir / "re2g_model.json").is_file():
        init_models(load_config(preset="tiny").models, models, tokenizers_dir=sample / "tokenizers",
                    which=("biencoder",))
    return Corpus(size, root, sample, passages, model_dir)


def fmt(x: float | None, digits: int = 1) -> str:
    """A number for a table cell (``-`` for None)."""
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"
