"""KILT-format predictions for a task file from a run directory (``re2g predict``).

The in-process pipeline (:class:`re2g.pipeline.Re2GPipeline`, the three stage objects of
:mod:`re2g.stages` loaded by :mod:`re2g.run`, as Serve's deployments load them) over the examples:
small sets in this process, large ones through Ray Data, a pool of actors each loading the run once
(``map_batches`` with ``ActorPoolStrategy``); both call the same :class:`PipelinePredictor`. Either
way the output is a KILT jsonl in the input's order, written atomically, which ``re2g evaluate kilt``
scores (tests/test_one_path.py: the same answers as the pipeline and the served app).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from re2g.config import Re2GConfig


@dataclass
class PredictStats:
    """What a prediction run did."""

    task_file: str
    out: str
    examples: int
    seconds: float
    used_ray: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class PipelinePredictor:
    """Ray Data callable class: one :class:`re2g.pipeline.Re2GPipeline` per actor."""

    def __init__(self, run_dir: str, cfg_dict: dict | None = None, overrides: dict | None = None):
        from re2g.pipeline import Re2GPipeline

        cfg = Re2GConfig.model_validate(cfg_dict) if cfg_dict is not None else None
        self.pipeline = Re2GPipeline.from_run_dir(run_dir, cfg, **(overrides or {}))

    def __call__(self, batch: dict) -> dict:
        import json

        from re2g.pipeline import kilt_prediction

        ids, inputs = list(batch["id"]), list(batch["input"])
        answers = self.pipeline.answer_batch(inputs)
        rows = [json.dumps(kilt_prediction(i, a, input=q)) for i, q, a in zip(ids, inputs, answers)]
        return {"id": ids, "record": rows}


def predict_file(run_dir: str | Path, task_file: str, out: str, *, cfg: Re2GConfig | None = None,
                 use_ray: bool = False, actors: int = 1, batch_size: int = 16, limit: int | None = None,
                 models: dict | None = None, progress: bool = True) -> PredictStats:
    """Answer every example of ``task_file`` with the run's pipeline and write KILT predictions to ``out``.

    ``models`` overrides the run's model directories (``biencoder=``, ``reranker=``, ``generator=``).
    With ``use_ray`` the caller has connected to Ray.
    """
    import json

    from tqdm.auto import tqdm

    from re2g.data.kilt import read_kilt, write_jsonl

    if "://" not in str(task_file):             # a local path (remote ones are fsspec's to open)
        p = Path(task_file)
        if not p.is_file():
            from re2g.errors import DataFormatError

            raise DataFormatError(str(task_file), "is a directory, not a KILT task jsonl" if p.is_dir()
                                  else "no such file (expected a KILT task jsonl)")
    examples = read_kilt(task_file)
    if limit is not None:
        examples = examples[:limit]
    t0 = time.time()
    if use_ray:
        import ray

        from re2g.devices import gpu_share

        ds = ray.data.from_items([{"id": e.id, "input": e.input} for e in examples])
        # a GPU (or a share of one) per actor where the cluster has GPUs: an actor uses cuda only when given one
        gpus = gpu_share(ray.cluster_resources().get("GPU", 0), actors, cfg.device if cfg else "auto")
        ds = ds.map_batches(PipelinePredictor, fn_constructor_kwargs=dict(
            run_dir=str(run_dir), cfg_dict=cfg.model_dump(mode="json") if cfg else None, overrides=models),
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=gpus)
        by_id = {r["id"]: json.loads(r["record"]) for r in ds.take_all()}
        records = [by_id[e.id] for e in examples]
    else:
        predictor = PipelinePredictor(str(run_dir), cfg.model_dump(mode="json") if cfg else None, models)
        records = []
        for s in tqdm(range(0, len(examples), batch_size), desc="predict", disable=not progress):
            chunk = examples[s:s + batch_size]
            out_batch = predictor({"id": [e.id for e in chunk], "input": [e.input for e in chunk]})
            records.extend(json.loads(r) for r in out_batch["record"])
    write_jsonl(out, records)
    return PredictStats(task_file=task_file, out=out, examples=len(records), seconds=round(time.time() - t0, 3),
                        used_ray=use_ray)
