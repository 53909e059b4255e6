"""The training stages as small definitions for the one loop in ``re2g.train.loop``.

A stage says which model(s) it trains (:meth:`build` / :meth:`load`), how a micro-batch becomes a
loss (:meth:`loss`), how it is evaluated on dev (:meth:`evaluate`), how it is saved (:meth:`save`)
and a few fixed scores to compare a saved model with the in-memory one (:meth:`probe`).
Stages are plain dataclasses: cheap to build and to ship to Ray Train workers; the passages are
loaded lazily in each process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from re2g.config import ModelsConfig
from re2g.models.losses import (false_negative_mask, gather_with_grad, in_batch_nll, multi_positive_nll,
                                rocketqa_joint_loss)
from re2g.train.evaluate import DevSet, dense_rankings, eval_pool, metrics_dict, report, rerank_rankings

_LOOKUPS: dict[str, dict] = {}
_POOLS: dict[tuple, list[str]] = {}


def passage_lookup(path: str) -> dict:
    """``pid -> (title, text, wikipedia_id)`` for a passages Parquet, loaded once per process."""
    if path not in _LOOKUPS:
        from re2g.index.dense import load_passage_lookup

        _LOOKUPS[path] = load_passage_lookup(path)
    return _LOOKUPS[path]


def param_groups(module: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _titles_texts(passages: list[dict]) -> tuple[list[str], list[str]]:
    return [p["title"] for p in passages], [p["text"] for p in passages]


@dataclass
class StageBase:
    """What every stage holds: model config, tokenizer (tiny builds), passages, dev set, optimizer."""

    models: ModelsConfig
    tokenizer_dir: str | None
    passages: str
    dev: DevSet
    lr: float
    weight_decay: float = 0.0
    name: str = "stage"
    dev_metric: str = "dev_recall@5"
    eval_pool_size: int | None = None  # dense dev evaluation pool cap (None: the whole corpus, exact)
    eval_pool_seed: int = 0

    @property
    def lookup(self) -> dict:
        return passage_lookup(self.passages)

    def eval_pool(self) -> list[str]:
        """The dense dev evaluation's pool (:func:`re2g.train.evaluate.eval_pool`): the dev positives,
        the dev negatives/candidates and a seeded sample of the corpus, built once per process."""
        required = [p for ps in self.dev.gold for p in ps]
        for extra in (self.dev.negatives, self.dev.candidates):
            required += [p for ps in extra or [] for p in ps]
        key = (self.passages, self.eval_pool_size, self.eval_pool_seed, tuple(required))
        if key not in _POOLS:
            _POOLS[key] = eval_pool(self.lookup, required, self.eval_pool_size, self.eval_pool_seed)
        return _POOLS[key]

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        return param_groups(module, self.lr, self.weight_decay)

    def probe_passages(self, n: int = 4) -> list[str]:
        return sorted(self.lookup)[:n]


# --------------------------------------------------------------------------- stage 1: DPR


@dataclass
class DPRStage(StageBase):
    """DPR: NLL of the positive over every passage of the global batch (positives and hard negatives
    of all queries on all workers); other copies of a query's positives are masked out."""

    name: str = "dpr"
    remote_grad: bool = False

    def build(self) -> torch.nn.Module:
        from re2g.models.factory import load_biencoder

        return load_biencoder(self.models, self.tokenizer_dir)

    def load(self, directory: str | Path) -> torch.nn.Module:
        from re2g.models.encoders import BiEncoder

        return BiEncoder.from_pretrained(directory)

    def loss(self, model, batch: list[dict]) -> tuple[torch.Tensor, int]:
        import torch.distributed as dist

        B = len(batch)
        q = model.encode_queries([x["query"] for x in batch])  # (B, D)
        passages = [x["positive"] for x in batch] + [n for x in batch for n in x["negatives"]]
        p = model.encode_passages(*_titles_texts(passages))  # (B*(1+H), D)
        keys = torch.tensor([pp["key"] for pp in passages], dtype=torch.long, device=p.device)
        p_all = gather_with_grad(p, self.remote_grad)  # (W*B*(1+H), D)
        keys_all = gather_with_grad(keys)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        positive = torch.arange(B, device=p.device) + rank * len(passages)  # (B,)
        P = max(len(x["positive_keys"]) for x in batch)
        pos_keys = torch.full((B, P), -1, dtype=torch.long, device=p.device)
        for i, x in enumerate(batch):
            pos_keys[i, :len(x["positive_keys"])] = torch.tensor(x["positive_keys"], dtype=torch.long)
        mask = false_negative_mask(pos_keys, keys_all)  # (B, N)
        return in_batch_nll(q * model.logit_scale, p_all, positive, mask), B  # scale: see EncoderSettings

    def evaluate(self, model) -> dict[str, float]:
        rankings = dense_rankings(model, self.dev.queries, self.lookup, pool=self.eval_pool())
        return metrics_dict(report(self.name, rankings, self.dev, self.lookup))

    def save(self, model, directory: str | Path) -> None:
        model.save_pretrained(directory)

    @torch.no_grad()
    def probe(self, model) -> list[float]:
        pids = self.probe_passages()
        q = model.embed_queries(self.dev.queries[:2])
        p = model.embed_passages([self.lookup[x][0] for x in pids], [self.lookup[x][1] for x in pids])
        return [float(v) for v in (q @ p.T).reshape(-1)]


# --------------------------------------------------------------------------- stage 3: reranker


def _list_scores(reranker, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reranker scores of a micro-batch of candidate lists, padded: (B, C) scores, labels, mask."""
    B, C = len(batch), max(len(x["passages"]) for x in batch)
    qs, titles, texts, idx = [], [], [], []
    for i, x in enumerate(batch):
        for j, p in enumerate(x["passages"]):
            qs.append(x["query"])
            titles.append(p["title"])
            texts.append(p["text"])
            idx.append(i * C + j)
    z = reranker.score_pairs(qs, titles, texts)  # (n,)
    device = z.device
    scores = torch.zeros(B * C, dtype=z.dtype, device=device).index_put((torch.tensor(idx, device=device),), z)
    labels = torch.zeros(B, C, dtype=torch.bool, device=device)
    mask = torch.zeros(B, C, dtype=torch.bool, device=device)
    for i, x in enumerate(batch):
        n = len(x["labels"])
        labels[i, :n] = torch.tensor(x["labels"], dtype=torch.bool)
        mask[i, :n] = True
    return scores.view(B, C), labels, mask


def init_reranker_from_biencoder(reranker, biencoder_dir: str) -> None:
    """Copy a saved bi-encoder's (query) encoder weights into the reranker's encoder (same class,
    sizes and vocabulary; the pooler and the classifier head stay as they are). For tiny models with no
    pretrained language model, the stage-1 encoder is the best starting point there is."""
    from re2g.errors import ArtifactError
    from re2g.models.encoders import BiEncoder

    bert = BiEncoder.from_pretrained(biencoder_dir).backbone("query")
    target = getattr(reranker.model, getattr(reranker.model, "base_model_prefix", "bert"), None)
    if target is None or type(target) is not type(bert):
        raise ArtifactError(f"{biencoder_dir}: the reranker's encoder ({type(target).__name__}) is not the "
                            f"bi-encoder's ({type(bert).__name__}); cannot initialize it from the bi-encoder")
    state = dict(bert.state_dict())
    key = "embeddings.token_type_embeddings.weight"
    mine = target.state_dict().get(key)
    if key in state and mine is not None and mine.shape[0] > state[key].shape[0]:  # exact-match type: extra rows
        state[key] = torch.cat([state[key], mine[state[key].shape[0]:]])
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ArtifactError(f"{biencoder_dir}: bi-encoder and reranker differ (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")


@dataclass
class RerankerStage(StageBase):
    """The cross-encoder: ``-sum_{i in Prov} log softmax(z_r)_i`` over each query's candidate list."""

    name: str = "reranker"
    dev_metric: str = "dev_recall@1"
    init_from_biencoder: str | None = None

    def build(self) -> torch.nn.Module:
        from re2g.models.factory import load_reranker

        model = load_reranker(self.models, self.tokenizer_dir)
        if self.init_from_biencoder:
            init_reranker_from_biencoder(model, self.init_from_biencoder)
        return model

    def load(self, directory: str | Path) -> torch.nn.Module:
        from re2g.models.reranker import CrossEncoder

        return CrossEncoder.from_pretrained(directory)

    def loss(self, model, batch: list[dict]) -> tuple[torch.Tensor, int]:
        scores, labels, mask = _list_scores(model, batch)
        return multi_positive_nll(scores, labels, mask), len(batch)

    def evaluate(self, model) -> dict[str, float]:
        rankings = rerank_rankings(model, self.dev.queries, self.dev.candidates or [[] for _ in self.dev.queries],
                                   self.lookup)
        return metrics_dict(report(self.name, rankings, self.dev, self.lookup))

    def save(self, model, directory: str | Path) -> None:
        model.save_pretrained(directory)

    @torch.no_grad()
    def probe(self, model) -> list[float]:
        was = model.training
        model.eval()
        cands = (self.dev.candidates[0] if self.dev.candidates else self.probe_passages())[:4]
        s = model.score_pairs([self.dev.queries[0]] * len(cands), [self.lookup[c][0] for c in cands],
                              [self.lookup[c][1] for c in cands])
        model.train(was)
        return [float(v) for v in s]


# --------------------------------------------------------------------------- joint (RocketQAv2)


class JointModel(torch.nn.Module):
    """The retriever and the reranker as one module (one DeepSpeed engine updates both)."""

    def __init__(self, biencoder: torch.nn.Module, reranker: torch.nn.Module):
        super().__init__()
        self.biencoder = biencoder
        self.reranker = reranker


@dataclass
class JointStage(StageBase):
    """RocketQAv2: ``KL(softmax(s_ce) || softmax(s_de)) + CE(s_ce, labels)`` over the same lists."""

    name: str = "joint"
    reranker_lr: float | None = None
    kl_weight: float = 1.0
    ce_weight: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        from re2g.models.factory import load_biencoder, load_reranker

        return JointModel(load_biencoder(self.models, self.tokenizer_dir), load_reranker(self.models, self.tokenizer_dir))

    def load(self, directory: str | Path) -> torch.nn.Module:
        from re2g.models.encoders import BiEncoder
        from re2g.models.reranker import CrossEncoder

        d = Path(directory)
        return JointModel(BiEncoder.from_pretrained(d / "biencoder"), CrossEncoder.from_pretrained(d / "reranker"))

    def param_groups(self, module: torch.nn.Module) -> list[dict]:
        return (param_groups(module.biencoder, self.lr, self.weight_decay)
                + param_groups(module.reranker, self.reranker_lr or self.lr, self.weight_decay))

    def loss(self, model, batch: list[dict]) -> tuple[torch.Tensor, int]:
        bi = model.biencoder
        q = bi.encode_queries([x["query"] for x in batch])  # (B, D)
        s_ce, labels, mask = _list_scores(model.reranker, batch)  # (B, C)
        B, C = s_ce.shape
        flat = [p for x in batch for p in x["passages"]] 
        p = bi.encode_passages(*_titles_texts(flat))  # (n, D), n <= B*C
        idx = torch.tensor([i * C + j for i, x in enumerate(batch) for j in range(len(x["passages"]))],
                           device=p.device)
        P = torch.zeros(B * C, p.shape[-1], dtype=p.dtype, device=p.device).index_put((idx,), p).view(B, C, -1)
        s_de = torch.einsum("bd,bcd->bc", q, P) * bi.logit_scale  # (B, C)
        return rocketqa_joint_loss(s_ce, s_de, labels, mask, kl_weight=self.kl_weight,
                                   ce_weight=self.ce_weight), B

    def evaluate(self, model) -> dict[str, float]:
        rankings = dense_rankings(model.biencoder, self.dev.queries, self.lookup, pool=self.eval_pool())
        out = metrics_dict(report("joint-retriever", rankings, self.dev, self.lookup))
        if self.dev.candidates:
            rr = rerank_rankings(model.reranker, self.dev.queries, self.dev.candidates, self.lookup)
            out.update(metrics_dict(report("joint-reranker", rr, self.dev, self.lookup), "dev_reranker_"))
        return out

    def save(self, model, directory: str | Path) -> None:
        d = Path(directory)
        model.biencoder.save_pretrained(d / "biencoder")
        model.reranker.save_pretrained(d / "reranker")

    @torch.no_grad()
    def probe(self, model) -> list[float]:
        dpr = DPRStage(self.models, self.tokenizer_dir, self.passages, self.dev, self.lr)
        rr = RerankerStage(self.models, self.tokenizer_dir, self.passages, self.dev, self.lr)
        return dpr.probe(model.biencoder) + rr.probe(model.reranker)
