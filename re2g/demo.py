"""What `make demo` runs until the full quickstart exists: the sample task, split into passages.

Generates the sample knowledge task (skipped when it is already there for the same size and seed),
splits its knowledge source into passages with Ray Data on a local Ray started in-process, and
prints a summary: pages, passages, queries per task and split, and a few examples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from re2g.config import PassageConfig, SampleConfig


def run_demo(out: str | Path, *, size: str = "demo", seed: int = 13, console: Console | None = None) -> dict:
    """Run the demo into ``out`` and return its summary as a dict (also printed)."""
    from re2g.data.passages import split_knowledge_source
    from re2g.data.sample import generate_sample, load_sample_summary
    from re2g.runtime import connect_ray

    console = console or Console()
    out = Path(out)
    sample_dir = out / "sample"
    passages_dir = out / "passages"
    t0 = time.time()

    cfg = SampleConfig(size=size, seed=seed)
    summary = load_sample_summary(sample_dir, cfg)
    if summary is None:
        console.rule("[bold]1/2 sample knowledge task")
        summary = generate_sample(sample_dir, cfg, overwrite=True)
    else:
        console.rule("[bold]1/2 sample knowledge task (already there, skipped)")
    console.print(summary.table())

    console.rule("[bold]2/2 passages (Ray Data)")
    stats_file = out / "passages_stats.json"
    if passages_dir.exists() and stats_file.exists():
        stats = json.loads(stats_file.read_text())
        console.print(f"passages already split: {stats['passages']} passages in {passages_dir}")
    else:
        connect_ray()
        pstats = split_knowledge_source(str(sample_dir / "knowledge_source.jsonl"), str(passages_dir),
                                        PassageConfig(), overwrite=True)
        stats = pstats.to_dict()
        stats_file.write_text(json.dumps(stats, indent=2))
        console.print(pstats.table())

    result = {"sample": summary.to_dict(), "passages": stats, "seconds": round(time.time() - t0, 1)}
    console.print(f"[bold green]demo done[/] in {result['seconds']} s: {out}/")
    return result
