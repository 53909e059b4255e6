"""Where each artifact of a run lives inside its run directory (a path or a URI prefix).

```
RUN_DIR/
  config.yaml            the config the run was made with
  sample/                the sample task (when the run uses it) + sample.json
  passages/              passages Parquet (pid, title, text, wikipedia_id) + _manifest.json
  models/dpr_init/       bi-encoder before training   models/dpr/  after stage 1
  models/reranker/ ...   one save_pretrained directory per model and stage + re2g_model.json
  embeddings/            Parquet pid, vector + _embeddings.json
  index/dense/           HNSW shards + manifest.json
  index/bm25/            Lucene index + re2g_bm25.json
  reports/               metrics JSON, Markdown, plots
```

Each artifact directory's manifest (the ``*.json`` named above) is in the one schema of
:mod:`re2g.artifacts` (kind, version, config, fingerprints, counts, checksums); the directory is
complete when its manifest is there, and appears at its path only once complete.
"""

from __future__ import annotations

from dataclasses import dataclass


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' (works for local paths and URIs alike)."""
    out = str(base).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


@dataclass(frozen=True)
class RunLayout:
    """The standard artifact paths of a run directory."""

    run_dir: str

    @property
    def sample(self) -> str:
        return join(self.run_dir, "sample")

    @property
    def passages(self) -> str:
        return join(self.run_dir, "passages")

    def model(self, name: str) -> str:
        return join(self.run_dir, "models", name)

    @property
    def embeddings(self) -> str:
        return join(self.run_dir, "embeddings")

    @property
    def dense_index(self) -> str:
        return join(self.run_dir, "index", "dense")

    @property
    def bm25_index(self) -> str:
        return join(self.run_dir, "index", "bm25")

    @property
    def reports(self) -> str:
        return join(self.run_dir, "reports")
