"""Build and open the retrieval side of a run: dense index + BM25 + their hybrid.

``build_indexes`` is what ``re2g index`` and ``jobs.build_index`` call; ``open_retrievers`` gives
``{"bm25": ..., "dpr": ..., "hybrid": ...}``, every one with ``search``/``batch_search``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from re2g.config import Re2GConfig, save_config
from re2g.errors import ArtifactError


@dataclass
class IndexBuildSummary:
    """What ``build_indexes`` wrote and how long each part took."""

    dense: dict | None = None
    bm25: dict | None = None
    seconds: dict = field(default_factory=dict)

    def table(self):
        from rich.table import Table

        t = Table(title="indexes")
        for c in ("index", "passages", "shards", "details", "seconds"):
            t.add_column(c, justify="right" if c in ("passages", "shards", "seconds") else "left")
        if self.dense:
            d = self.dense
            detail = f"{d['metric']}{' exact' if d['exact'] else ''} {d['quantization']} dim={d['dim']}"
            t.add_row("dense (faiss)", str(d["total_count"]), str(d["num_shards"]), detail,
                      f"{self.seconds.get('dense', 0):.1f}")
        if self.bm25:
            b = self.bm25
            t.add_row("bm25 (Lucene)", str(b["count"]), "1", f"k1={b['k1']} b={b['b']}",
                      f"{self.seconds.get('bm25', 0):.1f}")
        return t

    def to_dict(self) -> dict:
        return {"dense": self.dense, "bm25": self.bm25, "seconds": self.seconds}


def build_indexes(cfg: Re2GConfig, *, passages: str, embeddings: str | None, dense_dir: str | None,
                  bm25_dir: str | None, overwrite: bool = False, use_ray: bool = True) -> IndexBuildSummary:
    """Build the dense HNSW shards from ``embeddings`` (Ray tasks) and the BM25 index from
    ``passages``; either part is skipped when its output directory is None."""
    from re2g.index.embed import read_embeddings_meta

    summary = IndexBuildSummary()
    if dense_dir is not None:
        if embeddings is None:
            raise ArtifactError("a dense index needs embeddings (run `re2g embed` first)")
        from re2g.index.dense import build_dense_index

        meta = read_embeddings_meta(embeddings)
        t0 = time.time()
        info = build_dense_index(embeddings, dense_dir, cfg.index, encoder_fingerprint=meta["fingerprint"],
                                 use_ray=use_ray, overwrite=overwrite,
                                 encoder_settings=meta.get("encoder_settings"))
        summary.seconds["dense"] = round(time.time() - t0, 3)
        summary.dense = {k: v for k, v in info.__dict__.items() if k != "manifest"}
    if bm25_dir is not None:
        from re2g.index.bm25 import build_bm25_index

        t0 = time.time()
        binfo = build_bm25_index(passages, bm25_dir, threads=cfg.bm25.threads, overwrite=overwrite,
                                 k1=cfg.bm25.k1, b=cfg.bm25.b)
        summary.seconds["bm25"] = round(time.time() - t0, 3)
        summary.bm25 = binfo.to_dict()
        save_config(cfg, bm25_dir)
    return summary


def open_retrievers(cfg: Re2GConfig, *, passages: str, dense_dir: str | None, bm25_dir: str | None,
                    query_encoder=None, verify: bool = False, dense_index=None) -> dict:
    """Open the retrievers that exist: ``bm25`` (needs ``bm25_dir``), ``dpr`` (needs ``dense_dir``
    and a ``query_encoder`` with ``embed_queries``; the index refuses an encoder whose fingerprint
    differs from the one it was built with) and ``hybrid`` (when both exist). ``dense_index``: an
    index opened already (e.g. ``re2g.index.shards.ActorShardedIndex``) to search instead of loading
    ``dense_dir`` here. ``verify``: check every dense index file's sha256 at load (else sizes and
    ends only; ``re2g index verify`` checks checksums on demand). The passages are looked up in
    their memory-mapped store (:func:`re2g.data.passage_files.load_passage_lookup`)."""
    from re2g.index.fusion import HybridRetriever

    out: dict = {}
    bm25 = dense = None
    if bm25_dir is not None:
        from re2g.index.bm25 import BM25Retriever

        bm25 = BM25Retriever.from_dir(bm25_dir, threads=cfg.bm25.threads)
        out["bm25"] = bm25
    if (dense_dir is not None or dense_index is not None) and query_encoder is not None:
        from re2g.index.dense import DenseIndex, DenseRetriever

        index = dense_index
        if index is None:
            fp = query_encoder.fingerprint() if hasattr(query_encoder, "fingerprint") else None
            index = DenseIndex.load(dense_dir, expected_fingerprint=fp, verify=verify, ef_search=cfg.index.ef_search,
                                    nprobe=cfg.index.ivf_nprobe,
                                    expected_settings=getattr(query_encoder, "settings", None))
        dense = DenseRetriever(index, query_encoder, passages=passages)
        out["dpr"] = dense
    if bm25 is not None and dense is not None:
        out["hybrid"] = HybridRetriever(dense, bm25, cfg.retrieval)
    return out
