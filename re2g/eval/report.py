"""Run reports: Markdown + JSON + PNG plots, and the summary table printed at the end of a run.

The input is a plain dict (what ``re2g quickstart`` collects)::

    {
      "run_dir": str, "seconds": float,
      "stages": [{"name", "seconds", "skipped", "metric", "before", "after"}],     # what each stage added
      "retrieval": {split: {system: {"recall@1": .., "recall@5": .., ..., "mrr@10": ..}}},
      "downstream": {split: {system: {"em": .., "f1": .., "accuracy": .., "Rprec": ..}}},
      "training": {stage: "path/to/metrics.jsonl"},
      "answers": [{"query", "answer", "provenance": [...]}],
    }

Every key is optional; sections without data are left out of the report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from re2g.artifacts import write_json_atomic, write_text_atomic


def _num(v) -> str:
    return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def read_metrics_log(path: str | Path) -> list[dict]:
    """The rows of a training ``metrics.jsonl`` (missing file: no rows)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _k_of(key: str) -> int | None:
    m = re.fullmatch(r"recall@(\d+)", key)
    return int(m.group(1)) if m else None


def plot_training_curves(training: dict[str, str], out_png: str | Path) -> Path | None:
    """Loss against step for every stage that logged metrics (one panel per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {stage: read_metrics_log(p) for stage, p in training.items()}
    logs = {s: rows for s, rows in logs.items() if any("loss" in r for r in rows)}
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(4.2 * len(logs), 3.2), squeeze=False)
    for ax, (stage, rows) in zip(axes[0], logs.items()):
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1.2)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_recall_curves(systems: dict[str, dict], out_png: str | Path, title: str = "dev retrieval") -> Path | None:
    """Recall@k against k, one line per system (BM25, DPR, hybrid, reranked, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}
    for name, metrics in systems.items():
        pts = sorted((_k_of(k), v) for k, v in metrics.items() if _k_of(k) is not None)
        if pts:
            lines[name] = pts
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-")]  # curves that coincide stay visible
    for i, (name, pts) in enumerate(lines.items()):
        marker, ls = styles[i % len(styles)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=ls, markersize=7 - i,
                label=name)
    ax.set_xscale("log")
    ks = sorted({p[0] for pts in lines.values() for p in pts})
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k (passages)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_downstream(systems: dict[str, dict], out_png: str | Path, keys=("em", "f1", "accuracy"),
                    title: str = "dev answers") -> Path | None:
    """Grouped bars of EM / F1 / accuracy per system (untrained, stage 2, stage 4, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n, m in systems.items() if any(k in m for k in keys)]
    keys = [k for k in keys if any(k in systems[n] for n in names)]
    if not names or not keys:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.4))
    x = np.arange(len(names))
    w = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar(x + i * w - 0.4 + w / 2, [systems[n].get(k, 0.0) for n in names], w, label=k)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1.0)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _seconds_cell(stage: dict) -> str:
    """A stage's time: its seconds, ``done before`` (a resumed run reused it), or ``—`` (left out)."""
    if not stage.get("skipped"):
        return _secs(stage.get("seconds"))
    return "done before" if stage.get("seconds") is not None else "—"


def stages_table(summary: dict):
    """The rich table printed at the end of a run: what each stage added."""
    from rich.table import Table

    t = Table(title="what each stage added")
    for c in ("stage", "metric", "before", "after", "change", "seconds"):
        t.add_column(c, justify="left" if c in ("stage", "metric") else "right")
    for s in summary.get("stages", []):
        before, after = s.get("before"), s.get("after")
        change = f"{after - before:+.3f}" if isinstance(before, (int, float)) and isinstance(after, (int, float)) else ""
        secs = _seconds_cell(s)
        t.add_row(s["name"], s.get("metric", ""), _num(before), _num(after), change, secs)
    if summary.get("seconds") is not None:
        t.add_section()
        t.add_row("total", "", "", "", "", _secs(summary["seconds"]))
    return t


def _secs(x) -> str:
    return f"{x:.0f}" if isinstance(x, (int, float)) else "—"


def _md_table(rows: dict[str, dict], keys: list[str] | None = None) -> str:
    keys = keys or sorted({k for m in rows.values() for k in m}, key=lambda k: (_k_of(k) is None, _k_of(k) or 0, k))
    out = ["| system | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in rows.items():
        out.append(f"| {name} | " + " | ".join(_num(m.get(k)) for k in keys) + " |")
    return "\n".join(out)


def write_report(summary: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and the plots into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if p := plot_training_curves(summary.get("training", {}), out / "training_curves.png"):
        files["training_curves"] = p
    for split, systems in summary.get("retrieval", {}).items():
        if p := plot_recall_curves(systems, out / f"recall_{split}.png", title=f"{split} retrieval"):
            files[f"recall_{split}"] = p
    for split, systems in summary.get("downstream", {}).items():
        if p := plot_downstream(systems, out / f"answers_{split}.png", title=f"{split} answers"):
            files[f"answers_{split}"] = p

    md = [f"# re2g run report\n\nRun directory: `{summary.get('run_dir', '')}`"
          + (f" — {summary['seconds']:.0f} s in all" if summary.get("seconds") else "") + "\n"]
    if summary.get("stages"):
        md.append("## What each stage added\n")
        md.append("| stage | metric | before | after | change | seconds |\n|---|---|---|---|---|---|")
        for s in summary["stages"]:
            b, a = s.get("before"), s.get("after")
            ch = f"{a - b:+.3f}" if isinstance(b, (int, float)) and isinstance(a, (int, float)) else ""
            md.append(f"| {s['name']} | {s.get('metric', '')} | {_num(b)} | {_num(a)} | {ch} | "
                      f"{_seconds_cell(s)} |")
        md.append("")
    for split, systems in summary.get("retrieval", {}).items():
        md.append(f"## Retrieval ({split})\n\n{_md_table(systems)}\n")
        if f"recall_{split}" in files:
            md.append(f"![recall]({files[f'recall_{split}'].name})\n")
    for split, systems in summary.get("downstream", {}).items():
        md.append(f"## Answers ({split}, KILT metrics)\n\n{_md_table(systems)}\n")
        if f"answers_{split}" in files:
            md.append(f"![answers]({files[f'answers_{split}'].name})\n")
    if "training_curves" in files:
        md.append("## Training curves\n\n![training](training_curves.png)\n")
    if summary.get("answers"):
        md.append("## Sample answers\n")
        for a in summary["answers"]:
            md.append(f"- **{a['query']}** → {a['answer']}  ")
            for p in a.get("provenance", [])[:3]:
                md.append(f"  - `{p['pid']}` {p.get('title', '')} ({p.get('source', '')}, "
                          f"rerank {p.get('rerank_score', 0):.2f})")
        md.append("")
    write_text_atomic(out / "report.md", "\n".join(md))
    write_json_atomic(out / "report.json", summary, default=str)
    files["markdown"] = out / "report.md"
    files["json"] = out / "report.json"
    return files
