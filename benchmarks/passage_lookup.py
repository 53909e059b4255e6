"""Passage lookup (pid -> title, text): per-process memory, open time and lookup latency of the
memory-mapped PassageStore against the in-memory lookups it replaced.

    python -m benchmarks.passage_lookup [--corpus sample|synthetic|vital] [--size bench]
                                        [--passages 1000000] [--batches 300]

Every Serve retriever replica, training worker, mining and prediction actor holds a pid -> passage
lookup. Three variants, each measured in a fresh process over the same passages:

- ``dict``: a ``dict`` of ``(title, text, wikipedia_id)`` tuples (the first representation);
- ``PassageLookup``: the Arrow columns read into the process, pids in a sorted numpy array (until
  the store; :func:`re2g.data.passage_files.read_passage_lookup`);
- ``PassageStore``: the memory-mapped store (:func:`re2g.data.passage_files.load_passage_lookup`),
  which every process on a node shares through the page cache; measured in a second process while a
  first one holds the store open and has read every page (a Serve replica next to another).

Memory: the process's private (anonymous) resident memory after opening minus before (RssAnon in
/proc/self/status; for the store also the file pages it maps, RssFile, which are the page cache's and
shared); latency: p50/p90 per batch of 100 random pids (the store's ``get_many``; one ``[pid]`` per
pid for the others); open: seconds to a usable lookup (the store's one-time build is reported
apart). Corpora: the sample's passages (``sample``), ``--passages`` synthetic passages of ~100 words
(``synthetic``), the real vital-articles passages (``vital``, the asset must be fetched). Writes
bench_out/passage_lookup.json (+ ``_<corpus>`` for the non-default corpora) and prints a table.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common

NAME = "passage_lookup"
VARIANTS = ("dict", "PassageLookup", "PassageStore")


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    with open("/proc/self/smaps_rollup") as f:  # Pss: shared pages count 1/n to each of the n processes mapping them
        for line in f:
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) * 1024
    return out


def _as_dict(table) -> dict:
    """The first representation: one tuple of Python strings per passage."""
    pids, titles, texts = (table.column(c).to_pylist() for c in ("pid", "title", "text"))
    wids = table.column("wikipedia_id").to_pylist() if "wikipedia_id" in table.column_names else [None] * len(pids)
    return {p: (t or "", x or "", None if w is None else str(w)) for p, t, x, w in zip(pids, titles, texts, wids)}


def _open(kind: str, passages: str):
    import pyarrow.dataset as ds

    from re2g.data.passage_files import load_passage_lookup, read_passage_lookup

    if kind == "dict":
        table = ds.dataset(passages, format="parquet").to_table()
        lookup = _as_dict(table)
        del table
        return lookup
    if kind == "PassageLookup":
        return read_passage_lookup(passages)
    return load_passage_lookup(passages)


def _measure(kind: str, passages: str, warm_up: str, batches: list[list[str]], queue) -> None:
    import gc

    warm = _open(kind, warm_up)  # the lazy imports and code paths of a first open, on 10 other passages
    (warm.get_many if hasattr(warm, "get_many") else lambda ps: [warm.get(p) for p in ps])(list(warm)[:3])
    del warm
    gc.collect()
    before = _status()
    t0 = time.perf_counter()
    lookup = _open(kind, passages)
    open_s = time.perf_counter() - t0
    gc.collect()
    opened = _status()
    get = lookup.get_many if hasattr(lookup, "get_many") else (lambda ps: [lookup[p] for p in ps])
    times, chars = [], 0
    for b in batches:
        t0 = time.perf_counter()
        infos = get(b)
        times.append(time.perf_counter() - t0)
        chars += sum(len(i[1]) for i in infos)
    del batches
    gc.collect()
    after = _status()
    ms = np.array(times) * 1e3
    queue.put({"passages": len(lookup), "open_seconds": round(open_s, 3),
               "private_bytes": opened["RssAnon"] - before["RssAnon"],
               "private_bytes_after_lookups": after["RssAnon"] - before["RssAnon"],
               "mapped_file_bytes_after_lookups": after["RssFile"] - before["RssFile"],
               "rss_bytes_after_lookups": after["VmRSS"] - before["VmRSS"],
               "pss_bytes_after_lookups": after["Pss"] - before["Pss"],
               "batch100_p50_ms": round(float(np.percentile(ms, 50)), 3),
               "batch100_p90_ms": round(float(np.percentile(ms, 90)), 3),
               "lookups_per_s": round(100 * len(ms) / float(ms.sum() / 1e3)), "checksum_chars": chars})


_HOLD = """
import sys
import numpy as np
from re2g.data.passage_store import PassageStore
s = PassageStore(sys.argv[1])
for k in range(len(s._batches)):  # read every page of the store, as a busy replica does
    for o, data, bits in s._views(k):
        np.frombuffer(data, np.uint8)[::4096].sum(), o[::1024].sum()
for a in (s._keys, s._rows):
    np.frombuffer(a, np.uint8)[::4096].sum()
print("ready", flush=True)
sys.stdin.readline()
"""


def run(passages: Path, *, label: str, n_batches: int, result: common.Result) -> common.Result:
    from re2g.data.passage_files import count_passages
    from re2g.data.passage_store import open_passage_store

    t0 = time.perf_counter()
    store = open_passage_store(str(passages))  # built here when missing (older passages): timed apart
    first_open = time.perf_counter() - t0
    store_bytes = store.nbytes_on_disk()
    store_dir = store.path
    rng = np.random.default_rng(0)  # the same random pids for every variant, drawn here
    batches = [[k.decode("utf-8") for k in store._keys[rng.integers(0, len(store), 100)]] for _ in range(n_batches)]
    del store
    parquet_bytes = sum(f.stat().st_size for f in Path(passages).glob("*.parquet")) if Path(passages).is_dir() \
        else Path(passages).stat().st_size
    warm_up = synthetic_passages(Path(passages).parent / "warm_up_10", 10)
    open_passage_store(str(warm_up))
    ctx = mp.get_context("spawn")
    rows = {}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, store_dir], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for kind in VARIANTS:
            q = ctx.Queue()
            p = ctx.Process(target=_measure, args=(kind, str(passages), str(warm_up), batches, q))
            p.start()
            rows[kind] = q.get()
            p.join()
    finally:
        holder.communicate("\n", timeout=120)
    n = rows["dict"]["passages"]
    for r in rows.values():
        r["private_bytes_per_passage"] = round(r["private_bytes"] / max(1, n), 1)
    result.params.update(corpus=label, passages=n, rows=count_passages(str(passages)), batches=n_batches,
                         batch=100, source=str(passages), parquet_bytes=parquet_bytes, store_bytes=store_bytes,
                         store_first_open_seconds=round(first_open, 2))
    result.results = {"variants": rows,
                      "same_texts": len({r["checksum_chars"] for r in rows.values()}) == 1}
    d, a, s = rows["dict"], rows["PassageLookup"], rows["PassageStore"]
    mem, page = "private_bytes_after_lookups", 4096  # /proc counts whole 4 KiB pages: a 0 growth is < 1 page
    result.ratios = {
        "dict / PassageLookup (memory)": common.ratio(d["private_bytes"], a["private_bytes"]),
        "PassageLookup / PassageStore (private memory per process after the lookups, store >= 1 page: a lower bound)":
            common.ratio(a[mem], max(page, s[mem])),
        "dict / PassageStore (private memory per process after the lookups, store >= 1 page: a lower bound)":
            common.ratio(d[mem], max(page, s[mem])),
        "PassageLookup / PassageStore (Pss after the lookups: shared pages split between the 2 processes)":
            common.ratio(a["pss_bytes_after_lookups"], max(page, s["pss_bytes_after_lookups"])),
        "PassageStore / PassageLookup (p50 ms per 100 pids)": common.ratio(s["batch100_p50_ms"], a["batch100_p50_ms"]),
        "PassageStore / dict (p50 ms per 100 pids)": common.ratio(s["batch100_p50_ms"], d["batch100_p50_ms"]),
        "PassageStore / PassageLookup (open seconds)": common.ratio(s["open_seconds"], a["open_seconds"]),
    }
    result.notes += [
        "private memory: RssAnon after opening (and after the timed lookups) minus before, each variant in a "
        "fresh process (after a warm-up open of 10 other passages, so imports are not counted); the store's file "
        "pages (RssFile: the kernel maps whole huge pages and fault-around blocks, so it nears the file size) "
        "are the page cache's, shared by every process on the node, and counted once per node (store_bytes)",
        "PassageStore measured while another process holds the store open and has read every page",
        "store_first_open_seconds: opening in the parent, which builds the store when the passages have none",
    ]
    return result


def table(result: common.Result):
    p = result.params
    t = common.new_table(f"pid -> passage lookup, {p['corpus']}: {p['passages']:,} passages "
                         f"(store {p['store_bytes'] / 1e6:,.0f} MB), {p['batches']} batches of 100",
                         ("variant", "private MB", "after lookups", "Pss MB", "B/passage", "open (s)",
                          "p50 ms/100", "p90 ms/100"))
    for kind, r in result.results["variants"].items():
        t.add_row(kind, common.fmt(r["private_bytes"] / 1e6), common.fmt(r["private_bytes_after_lookups"] / 1e6),
                  common.fmt(r["pss_bytes_after_lookups"] / 1e6),
                  common.fmt(r["private_bytes_per_passage"]),
                  common.fmt(r["open_seconds"], 3), common.fmt(r["batch100_p50_ms"], 3),
                  common.fmt(r["batch100_p90_ms"], 3))
    return t


# --------------------------------------------------------------------------- corpora


def synthetic_passages(out: Path, n: int, *, words: int = 100, seed: int = 0) -> Path:
    """``n`` passages of ``words`` words (~600 characters) with KILT-style pids, 10 per page, written
    with :func:`re2g.data.passage_files.write_passages` (which builds the store); kept when there."""
    from re2g.data.passage_files import write_passages

    if (out / "_manifest.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=k))
                      for k in rng.integers(2, 9, 5000)])

    def rows():
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            ids = rng.integers(0, len(vocab), (m, words))
            for i in range(m):
                j = start + i
                yield {"pid": f"{j // 10}::[{j % 10},{j % 10}]", "title": f"Page {j // 10}",
                       "text": " ".join(vocab[ids[i]]), "wikipedia_id": str(j // 10)}

    write_passages(rows(), str(out), overwrite=True, manifest={"source": f"synthetic {n} x {words} words"})
    return out


def vital_passages(out: Path) -> Path:
    """The vital-articles asset (10,033 Wikipedia lead sections) split into ~100-word passages in this
    process (``re2g.data.passages.split_page``); kept when there."""
    from re2g.config import PassageConfig
    from re2g.data.passage_files import write_passages
    from re2g.data.passages import split_page
    from re2g.data.vital import load_vital_articles

    if (out / "_manifest.json").is_file():
        return out
    cfg = PassageConfig()
    pages = ({"wikipedia_id": a.wikipedia_id, "wikipedia_title": a.title, "text": [a.title, *a.paragraphs]}
             for a in load_vital_articles())
    write_passages((p for page in pages for p in split_page(page, cfg)), str(out), overwrite=True,
                   manifest={"source": "vital-articles"})
    return out


def main(argv: list[str] | None = None) -> Path:
    """Command line: see the module docstring."""
    p = common.parser(__doc__.splitlines()[0], default_size="bench")
    p.add_argument("--corpus", choices=("sample", "synthetic", "vital"), default="sample",
                   help="the sample's passages, synthetic ~100-word passages, or the real vital-articles passages")
    p.add_argument("--passages", type=int, default=1_000_000, help="synthetic passages (--corpus synthetic)")
    p.add_argument("--batches", type=int, default=300, help="timed batches of 100 random pids per variant")
    p.add_argument("--lookups", type=int, default=None, help="(older name) random lookups: --batches = lookups / 100")
    args = p.parse_args(argv)
    n_batches = max(1, args.lookups // 100) if args.lookups else args.batches
    cache = common.cache_dir(args)
    if args.corpus == "sample":
        passages, label, name = common.prepare_corpus(args.size, cache).passages, f"sample {args.size}", NAME
    elif args.corpus == "synthetic":
        passages = synthetic_passages(cache / "synthetic" / f"passages_{args.passages}", args.passages)
        label, name = f"synthetic {args.passages:,} x 100 words", f"{NAME}_synthetic"
    else:
        passages, label, name = vital_passages(cache / "vital" / "passages"), "vital-articles", f"{NAME}_vital"
    result = run(Path(passages), label=label, n_batches=n_batches, result=common.Result(name))
    result.params["size"] = args.size if args.corpus == "sample" else None   # the sample size, as every benchmark
    return common.finish(result, table(result), args.out)


if __name__ == "__main__":
    main()
