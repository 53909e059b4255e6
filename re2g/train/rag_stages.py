"""Stages 2 and 4 for the one training loop of ``re2g.train.loop``, and their training examples.

:class:`GenerationStage` (stage 2, RAG) and :class:`E2EStage` (stage 4, end to end) build and load
:class:`~re2g.train.rag_model.Re2GModel`, give the loop its optimizer groups, the loss of a
micro-batch (:mod:`re2g.train.rag_steps`) and the dev metrics (:mod:`re2g.train.rag_eval`); a
checkpoint's dev metrics are written beside it (``eval.json``). The generator is either kind
(seq2seq or causal LM, read as ``models`` says); with ``lora.enabled`` it gets LoRA adapters
(:mod:`re2g.models.lora`) and only they train (its base weights have no gradient). :func:`plan_examples` makes the
micro-batches of ``{"id", "query", "target", ["bm25"]}`` examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from re2g.config import GenerationConfig, LoraTrainConfig, RetrievalConfig
from re2g.train.rag_eval import evaluate_e2e, evaluate_rag
from re2g.train.rag_model import Re2GModel, load_generator_dir, reinit_weights
from re2g.train.rag_steps import IndexHandle, StepParts, e2e_step, rag_step
from re2g.train.stages import StageBase, param_groups


@dataclass
class _GenStageBase(StageBase):
    """What stages 2 and 4 share: where the starting models are, the index handle, dev gold."""

    index: IndexHandle | None = None
    biencoder_dir: str = ""
    generator_dir: str = ""
    gold: list = field(default_factory=list)          # KILT dev examples (KiltExample)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    marginalization: str = "sequence"
    query_encoder_lr: float | None = None
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    dev_metric: str = "dev_em"
    _last_eval: dict | None = None

    generator_at_root: bool = False

    def _index(self):
        return self.index.open()

    def _generator(self, reinit_std: float | None = None):
        """The starting generator (either kind), weights redrawn when ``reinit_std``, then wrapped in
        LoRA adapters when ``lora.enabled``."""
        gen = load_generator_dir(self.generator_dir, self.generation, self.models)
        if reinit_std:
            reinit_weights(gen.model, reinit_std)
        if self.lora.enabled:
            from re2g.models.lora import apply_lora

            apply_lora(gen, self.lora, base=self.generator_dir)
        return gen

    def _load(self, directory: str | Path, *, frozen_query_encoder: bool) -> Re2GModel:
        """A saved checkpoint's models (a LoRA generator's adapter, if kept, merged into its base)."""
        return Re2GModel.from_pretrained(directory, frozen_query_encoder=frozen_query_encoder,
                                         generation=self.generation, models=self.models)

    def save(self, model, directory: str | Path) -> None:
        """The models, and the dev metrics of this step (when evaluated) beside the checkpoint."""
        model.save_pretrained(directory, generator_at_root=self.generator_at_root)
        if self._last_eval is not None:
            from re2g.artifacts import write_json_atomic

            write_json_atomic(Path(directory).parent / "eval.json", {"dev": self._last_eval})
            self._last_eval = None

    def _remember(self, metrics: dict) -> dict:
        self._last_eval = dict(metrics)
        return metrics


@dataclass
class GenerationStage(_GenStageBase):
    """Stage 2 -- RAG: query encoder + generator (BART or a causal LM) on the target outputs, passages from
    the fixed index."""

    name: str = "generator"
    n_docs: int = 5
    train_query_encoder: bool = True
    generator_at_root: bool = True
    reinit_std: float | None = None

    def build(self) -> torch.nn.Module:
        from re2g.models.encoders import BiEncoder

        return Re2GModel(BiEncoder.from_pretrained(self.biencoder_dir), self._generator(self.reinit_std),
                         frozen_query_encoder=not self.train_query_encoder, lora_merge=self.lora.merge_on_save)

    def load(self, directory: str | Path) -> torch.nn.Module:
        return self._load(directory, frozen_query_encoder=not self.train_query_encoder)

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        return (param_groups(module.generator, self.lr, self.weight_decay)
                + param_groups(module.biencoder.query_encoder, self.query_encoder_lr or self.lr, self.weight_decay))

    def loss(self, model, batch: list[dict]) -> tuple[torch.Tensor, int]:
        parts = rag_step(model, batch, self._index(), self.lookup, n_docs=self.n_docs, kind=self.marginalization)
        return parts.loss, len(batch)

    def evaluate(self, model) -> dict[str, float]:
        return self._remember(evaluate_rag(model, self.gold, self._index(), self.lookup, n_docs=self.n_docs,
                                           generation=self.generation))

    @torch.no_grad()
    def probe(self, model) -> list[float]:
        was = model.training
        model.eval()
        try:
            parts = rag_step(model, [{"query": g.input, "target": (g.answers or [""])[0]} for g in self.gold[:2]],
                             self._index(), self.lookup, n_docs=self.n_docs, kind=self.marginalization)
        finally:
            model.train(was)
        return [float(parts.nll)] + [float(v) for v in parts.doc_scores.reshape(-1)]


@dataclass
class E2EStage(_GenStageBase):
    """Stage 4 -- end to end: the reranker's scores weight the marginalization (see the module doc)."""

    name: str = "e2e"
    reranker_dir: str = ""
    option: str = "distill"
    reranker_lr: float | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # dpr/bm25_top_k, fusion, rerank_top_k
    temperature: float = 10.0
    distill_weight: float = 1.0
    dev_bm25: list = field(default_factory=list)

    def build(self) -> torch.nn.Module:
        from re2g.models.encoders import BiEncoder
        from re2g.models.reranker import CrossEncoder

        return Re2GModel(BiEncoder.from_pretrained(self.biencoder_dir), self._generator(),
                         CrossEncoder.from_pretrained(self.reranker_dir),
                         frozen_query_encoder=self.option == "frozen", lora_merge=self.lora.merge_on_save)

    def load(self, directory: str | Path) -> torch.nn.Module:
        return self._load(directory, frozen_query_encoder=self.option == "frozen")

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        groups = (param_groups(module.generator, self.lr, self.weight_decay)
                  + param_groups(module.reranker, self.reranker_lr or self.lr, self.weight_decay))
        if self.option != "frozen":
            groups += param_groups(module.biencoder.query_encoder, self.query_encoder_lr or self.lr, self.weight_decay)
        return groups

    def step(self, model, batch: list[dict]) -> StepParts:
        return e2e_step(model, batch, self._index(), self.lookup, option=self.option, retrieval=self.retrieval,
                        kind=self.marginalization, temperature=self.temperature,
                        distill_weight=self.distill_weight)

    def loss(self, model, batch: list[dict]) -> tuple[torch.Tensor, int]:
        return self.step(model, batch).loss, len(batch)

    def evaluate(self, model) -> dict[str, float]:
        return self._remember(evaluate_e2e(model, self.gold, self.dev_bm25, self._index(), self.lookup,
                                           option=self.option, retrieval=self.retrieval,
                                           generation=self.generation, temperature=self.temperature))

    @torch.no_grad()
    def probe(self, model) -> list[float]:
        was = model.training
        model.eval()
        try:
            batch = [{"query": g.input, "target": (g.answers or [""])[0], "bm25": b}
                     for g, b in zip(self.gold[:2], self.dev_bm25[:2])]
            parts = self.step(model, batch)
        finally:
            model.train(was)
        return [float(parts.nll)] + [float(v) for v in parts.doc_scores.reshape(-1)]


def plan_examples(examples: Sequence[dict], *, batch_size: int, epochs: int, world: int, grad_accum: int,
                  max_steps: int | None, seed: int):
    """Micro-batches of ``{"id", "query", "target", ["bm25"]}`` examples, reshuffled every epoch."""
    import random

    from re2g.train.plans import finish_plan

    rng = random.Random(seed)
    epochs_out = []
    for _ in range(epochs):
        order = list(examples)
        rng.shuffle(order)
        epochs_out.append([order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)])
    dropped = epochs * (len(examples) % batch_size)
    return finish_plan(epochs_out, world, grad_accum, max_steps, dropped)


def training_examples(kilt_path: str, limit: int | None = None) -> list[dict]:
    """KILT examples with an answer -> ``{"id", "query", "target"}`` (the first answer is the target)."""
    from re2g.data.kilt import read_kilt

    out = []
    for ex in read_kilt(kilt_path):
        if ex.answers:
            out.append({"id": ex.id, "query": ex.input, "target": ex.answers[0]})
        if limit is not None and len(out) >= limit:
            break
    return out
