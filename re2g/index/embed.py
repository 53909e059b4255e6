"""Embed a passages Parquet with the DPR context encoder: Ray Data over a pool of encoder actors.

``embed_corpus`` reads ``pid, title, text`` (local path or pyarrow/fsspec URI), runs
``map_batches`` with :class:`PassageEmbedder` (a stateful class: each actor loads the bi-encoder
once) under ``compute=ActorPoolStrategy(size=actors)``, one GPU per actor where GPUs exist, and
writes Parquet ``pid, vector`` (``vector: list<float32>``). ``_embeddings.json`` beside the Parquet
files (kind ``embeddings`` of the one manifest schema, :mod:`re2g.artifacts`) records the count, the
encoder's fingerprint, the dimension and the timing; it is written last, and the output is built
under a temporary name and renamed (:func:`re2g.artifacts.staged_dir`), so a crash never leaves
embeddings that a later step would take for complete.

``embed_corpus_local`` is the same computation in one process (the baseline of the benchmark, and
the path for small corpora without Ray).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from re2g.artifacts import KINDS, Manifest, read_manifest, staged_dir, write_manifest
from re2g.data.passage_files import open_passages_dataset
from re2g.errors import ArtifactError, DataFormatError

KIND = "embeddings"
EMBEDDINGS_META = KINDS[KIND].file  # "_" prefix: Parquet dataset readers skip it


@dataclass
class EmbedStats:
    """What an embedding run did."""

    out: str
    passages: int
    dim: int
    seconds: float
    fingerprint: str
    actors: int
    batch_size: int
    device: str

    @property
    def passages_per_s(self) -> float:
        return self.passages / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passages_per_s"] = round(self.passages_per_s, 2)
        return d

    def table(self):
        from rich.table import Table

        t = Table(title="corpus embedding")
        for col in ("passages", "dim", "actors", "batch", "device", "seconds", "passages/s"):
            t.add_column(col, justify="right")
        t.add_row(str(self.passages), str(self.dim), str(self.actors), str(self.batch_size), self.device,
                  f"{self.seconds:.1f}", f"{self.passages_per_s:.1f}")
        return t


def _vectors_column(vecs: np.ndarray):
    """(N, D) float32 -> a pyarrow ``list<float32>`` array."""
    import pyarrow as pa

    n, d = vecs.shape
    flat = pa.array(np.ascontiguousarray(vecs, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


class PassageEmbedder:
    """Ray Data callable class: loads the bi-encoder once per actor, embeds pyarrow batches.

    ``model_dir`` is a bi-encoder saved by ``BiEncoder.save_pretrained`` or an encoder checkpoint
    (DPR or any Hugging Face encoder; ``encoding`` overrides its pooling, normalization, prefixes:
    see :class:`re2g.models.pooling.EncoderSettings`). On CUDA the encoder runs
    in bf16 (``dtype="auto"``); on CPU in fp32. ``threads`` caps torch's intra-op threads so that
    several actors on one node do not oversubscribe its cores.
    """

    def __init__(self, model_dir: str, *, batch_size: int = 64, max_length: int | None = None,
                 device: str = "auto", dtype: str = "auto", threads: int | None = None,
                 encoding: dict | None = None):
        import torch

        from re2g.models.encoders import BiEncoder
        from re2g.runtime import pick_device

        if threads:
            torch.set_num_threads(int(threads))
        self.device = pick_device(device)
        model = BiEncoder.from_pretrained(model_dir, shared=True, **(encoding or {}))  # the passage tower
        if self.device == "cuda" and dtype in ("auto", "bf16"):
            model = model.to(torch.bfloat16)
        elif self.device == "cuda" and dtype == "fp16":
            model = model.to(torch.float16)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def embed(self, titles: list[str], texts: list[str]) -> np.ndarray:
        """(N,) titles and texts -> (N, D) float32."""
        return self.model.embed_passages(titles, texts, batch_size=self.batch_size, max_length=self.max_length)

    def __call__(self, batch):
        import pyarrow as pa

        titles = [t or "" for t in batch.column("title").to_pylist()]
        texts = batch.column("text").to_pylist()
        vecs = self.embed(titles, texts)
        return pa.table({"pid": batch.column("pid"), "vector": _vectors_column(vecs)})


SMALL_BLOCK_BYTES = 256 * 1024


def actor_cpu_request(actors: int, threads: int, cluster_cpus: float, use_gpu: bool) -> float | None:
    """CPUs each encoder actor reserves: its thread count, but never so many that the actors take
    every CPU of the cluster (Ray Data's read and write tasks then never get one and the job hangs)."""
    if use_gpu:
        return None
    want = float(threads)
    spare = 1.0 if cluster_cpus > 1 else 0.25
    if actors * want > cluster_cpus - spare:
        want = max(0.1, (cluster_cpus - spare) / actors)
    return round(want, 3)


def read_embeddings_meta(path: str) -> dict:
    """The ``_embeddings.json`` of an embeddings directory (older formats are mapped) as a dict with
    ``passages`` (``counts.vectors``) and ``fingerprint`` (``fingerprints.encoder``) beside the
    schema's fields; a missing one means the run never finished (:class:`ArtifactError`)."""
    m = read_manifest(path, KIND)
    return {**m.to_dict(), "passages": m.counts["vectors"], "fingerprint": m.fingerprints["encoder"]}


def _embeddings_manifest(stats: EmbedStats, passages: str, model_dir: str, settings: dict,
                         max_length: int | None) -> Manifest:
    details = {k: v for k, v in stats.to_dict().items() if k not in ("passages", "fingerprint")}
    return Manifest(kind=KIND, config={"batch_size": stats.batch_size, "max_length": max_length,
                                       "actors": stats.actors},
                    counts={"vectors": stats.passages}, fingerprints={"encoder": stats.fingerprint},
                    passages_path=str(passages), model_dir=str(model_dir), encoder_settings=settings, **details)


def _target(stage) -> str:
    """Where writers put the files of a staged output: a plain path when local."""
    return str(stage.local) if stage.is_local else stage.uri


def _check_passages_schema(passages: str) -> int:
    n = open_passages_dataset(passages).count_rows()
    if n == 0:
        raise DataFormatError(passages, "no passages: the corpus is empty")
    return n


def embed_corpus(passages: str, model_dir: str, out: str, *, batch_size: int = 64, actors: int = 1,
                 max_length: int | None = None, device: str = "auto", threads_per_actor: int | None = None,
                 overwrite: bool = False, encoding: dict | None = None) -> EmbedStats:
    """Embed every passage with Ray Data (the caller has connected to Ray).

    One encoder actor per ``actors`` (each with one GPU when the cluster has GPUs and ``device`` is
    not ``cpu``); Ray Data's progress bars show the work. ``encoding``: encoder-setting overrides
    (``pooling``, ``normalize``, ...). Returns :class:`EmbedStats`.
    """
    import ray

    n = _check_passages_schema(passages)
    fingerprint, settings = _encoder_identity(model_dir, encoding)
    resources = ray.cluster_resources()
    use_gpu = device != "cpu" and resources.get("GPU", 0) >= 1
    dev = "cuda" if use_gpu else "cpu"
    actor_cpus = actor_cpu_request(actors, threads_per_actor or 1, resources.get("CPU", 1.0), use_gpu)
    t0 = time.time()
    with staged_dir(out, overwrite=overwrite) as stage:
        target = _target(stage)
        ctx = ray.data.DataContext.get_current()
        saved_block = ctx.target_max_block_size
        # small blocks, so that a corpus of a few MB still spreads over every encoder actor
        ctx.target_max_block_size = min(saved_block or SMALL_BLOCK_BYTES, SMALL_BLOCK_BYTES)
        try:
            ds = ray.data.read_parquet(passages, columns=["pid", "title", "text"])
        finally:
            ctx.target_max_block_size = saved_block
        ds = ds.map_batches(
            PassageEmbedder,
            fn_constructor_kwargs=dict(model_dir=str(model_dir), batch_size=batch_size, max_length=max_length,
                                       device=dev, threads=threads_per_actor, encoding=encoding),
            batch_size=batch_size * 4,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=actor_cpus,
        )
        ds.write_parquet(target)
        seconds = time.time() - t0
        import pyarrow.dataset as pads

        written = pads.dataset(target, format="parquet")
        count = written.count_rows()
        if count != n:
            raise ArtifactError(f"{out}: wrote {count} vectors for {n} passages")
        first = next(written.to_batches(columns=["vector"], batch_size=1))
        dim = len(first.column(0)[0])
        stats = EmbedStats(out=str(out), passages=n, dim=dim, seconds=round(seconds, 3), fingerprint=fingerprint,
                           actors=actors, batch_size=batch_size, device=dev)
        write_manifest(target, _embeddings_manifest(stats, passages, model_dir, settings, max_length))
    return stats


def _encoder_identity(model_dir: str, encoding: dict | None) -> tuple[str, dict]:
    """The passage encoder's fingerprint and settings (what the embeddings' meta records)."""
    from re2g.models.encoders import BiEncoder

    enc = BiEncoder.from_pretrained(model_dir, shared=True, **(encoding or {}))
    return enc.fingerprint(), enc.settings.to_dict()


def embed_corpus_local(passages: str, model_dir: str, out: str, *, batch_size: int = 64,
                       max_length: int | None = None, device: str = "auto", threads: int | None = None,
                       overwrite: bool = False, progress: bool = True, encoding: dict | None = None) -> EmbedStats:
    """The same embedding in this process, without Ray: a plain loop over Parquet batches."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    n = _check_passages_schema(passages)
    fingerprint, settings = _encoder_identity(model_dir, encoding)  # in fp32, before a cast to bf16
    t0 = time.time()
    with staged_dir(out, overwrite=overwrite) as stage:
        target = _target(stage)
        embedder = PassageEmbedder(str(model_dir), batch_size=batch_size, max_length=max_length,
                                   device=device, threads=threads, encoding=encoding)
        dataset = pads.dataset(passages, format="parquet")
        dim = 0
        with tqdm(total=n, desc="embed passages", disable=not progress) as bar:
            for i, batch in enumerate(dataset.to_batches(columns=["pid", "title", "text"], batch_size=batch_size * 16)):
                import pyarrow as pa

                table = embedder(pa.Table.from_batches([batch]))
                dim = len(table.column("vector")[0]) if table.num_rows else dim
                with_fs = target.rstrip("/") + f"/part-{i:05d}.parquet"
                pq.write_table(table, with_fs)
                bar.update(batch.num_rows)
        seconds = time.time() - t0
        stats = EmbedStats(out=str(out), passages=n, dim=dim, seconds=round(seconds, 3), fingerprint=fingerprint,
                           actors=0, batch_size=batch_size, device=embedder.device)
        write_manifest(target, _embeddings_manifest(stats, passages, model_dir, settings, max_length))
    return stats
