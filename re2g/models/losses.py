"""The training losses of Re2G as short pure functions over score tensors.

* :func:`gather_with_grad` -- all-gather a (B, ...) tensor across data-parallel ranks; the local part
  keeps its autograd graph, the other ranks' parts are constants (DPR's in-batch negatives).
* :func:`in_batch_nll` -- DPR: NLL of each query's positive over all passages of the (global) batch.
* :func:`multi_positive_nll` -- the reranker: ``-sum_{i in Prov} log softmax(z)_i`` over a candidate list.
* :func:`listwise_kl` -- ``KL(softmax(t/T) || softmax(s/T))`` over candidate lists.
* :func:`rocketqa_joint_loss` -- RocketQAv2: ``KL(softmax(s_ce) || softmax(s_de)) + CE(s_ce, labels)``.
* :func:`distill_kl` -- Re2G's online KD reranker -> DPR: ``KL(softmax(z_r/T) || softmax(z_dpr/T)) * T^2``.

Masks are boolean, ``True`` = a real entry; masked entries never contribute (no NaN even when a row
is entirely masked: such a row is left out of the mean). Every loss is a mean over the rows that count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = -1e4  # "minus infinity" that stays finite in fp32 and bf16 (exp underflows to exactly 0)


def _masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits in fp32 with masked entries pushed to a large negative value."""
    logits = logits.float()
    if mask is None:
        return logits
    return logits.masked_fill(~mask.bool(), _NEG)


def _row_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B,) over the rows where ``rows`` (B,) is True (0 when none, with grad)."""
    rows = rows.bool()
    if not bool(rows.any()):
        return values.sum() * 0.0
    return values[rows].mean()


def gather_with_grad(x: torch.Tensor, remote_grad: bool = False) -> torch.Tensor:
    """(B, ...) on each of W ranks -> (W*B, ...) in rank order; this rank's slice is ``x`` itself
    (gradient flows), the other slices are received copies (no gradient). Without an initialized
    process group (or with one rank) returns ``x``. Every rank must pass the same shape.

    ``remote_grad=True``: a differentiable all-gather instead; each rank's loss then also sends
    gradient to the other ranks' slices (summed back to their owners in backward), so the averaged
    gradient equals that of one big batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if remote_grad and x.is_floating_point():
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def in_batch_nll(q: torch.Tensor, p: torch.Tensor, positive: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """DPR's loss: ``mean_b -log softmax(q_b . p^T)[positive_b]``.

    q (B, D) query vectors; p (N, D) all passages of the batch (positives, hard negatives, other
    queries' passages -- gathered across ranks); positive (B,) long: the column of each query's
    positive; mask (B, N) bool: False drops a column for that query (a false negative, e.g. another
    copy of one of its positives). The positive column itself is always kept.
    """
    scores = q.float() @ p.float().T  # (B, N)
    if mask is not None:
        mask = mask.bool().clone()
        mask[torch.arange(len(positive), device=mask.device), positive] = True
    logp = F.log_softmax(_masked(scores, mask), dim=-1)  # (B, N)
    return -logp.gather(1, positive.view(-1, 1)).squeeze(1).mean()


def multi_positive_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reranker's loss over candidate lists: ``mean_b -sum_{i in Prov_b} log softmax(z_b)_i``.

    logits (B, C); labels (B, C) bool: True for the positives (provenance) of the list; mask (B, C)
    bool: True for real candidates (lists shorter than C are padded). Rows without a positive count
    nothing (and are left out of the mean).
    """
    labels = labels.bool()
    if mask is not None:
        labels = labels & mask.bool()
    logp = F.log_softmax(_masked(logits, mask), dim=-1)  # (B, C)
    per_row = -(logp * labels.float()).sum(dim=-1)  # (B,)
    return _row_mean(per_row, labels.any(dim=-1))


def listwise_kl(target_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None,
                temperature: float = 1.0) -> torch.Tensor:
    """``mean_b KL(softmax(t_b/T) || softmax(s_b/T))`` over the unmasked candidates of each list.

    target_logits, logits (B, C); mask (B, C) bool. No detaching here: both sides get gradients
    (detach the target yourself for one-way distillation). Rows with fewer than one candidate are
    left out of the mean.
    """
    t = _masked(target_logits / temperature, mask)
    s = _masked(logits / temperature, mask)
    logp_t = F.log_softmax(t, dim=-1)
    logp_s = F.log_softmax(s, dim=-1)
    terms = logp_t.exp() * (logp_t - logp_s)  # (B, C)
    if mask is not None:
        terms = torch.where(mask.bool(), terms, torch.zeros_like(terms))
        rows = mask.bool().any(dim=-1)
    else:
        rows = torch.ones(terms.shape[0], dtype=torch.bool, device=terms.device)
    return _row_mean(terms.sum(dim=-1), rows)


def rocketqa_joint_loss(s_ce: torch.Tensor, s_de: torch.Tensor, labels: torch.Tensor,
                        mask: torch.Tensor | None = None, *, kl_weight: float = 1.0,
                        ce_weight: float = 1.0) -> torch.Tensor:
    """RocketQAv2's joint loss over the same candidate lists:
    ``kl_weight * KL(softmax(s_ce) || softmax(s_de)) + ce_weight * CE(softmax(s_ce), labels)``.

    s_ce (B, C) reranker scores; s_de (B, C) retriever dot products; labels (B, C) bool positives;
    mask (B, C) bool real candidates. Both score tensors get gradients (the models train together);
    CE with several positives is :func:`multi_positive_nll`.
    """
    return (kl_weight * listwise_kl(s_ce, s_de, mask)
            + ce_weight * multi_positive_nll(s_ce, labels, mask))


def distill_kl(z_rerank: torch.Tensor, z_dpr: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 10.0, *, detach_teacher: bool = True) -> torch.Tensor:
    """Re2G's online knowledge distillation reranker -> DPR over the same candidates:
    ``KL(softmax(z_rerank/T) || softmax(z_dpr/T)) * T^2`` (mean over queries).

    z_rerank, z_dpr (B, C); mask (B, C) bool real candidates; ``detach_teacher``: the reranker
    gets no gradient from this loss (the default; pass False to train both).
    """
    teacher = z_rerank.detach() if detach_teacher else z_rerank
    return listwise_kl(teacher, z_dpr, mask, temperature) * temperature ** 2


def false_negative_mask(query_positive_keys: torch.Tensor, passage_keys: torch.Tensor) -> torch.Tensor:
    """(B, P) int64 keys of each query's positives (pad with -1), (N,) int64 keys of the batch's
    passages -> (B, N) bool mask, False where a passage is one of that query's positives.
    :func:`in_batch_nll` keeps each query's own positive column regardless."""
    hit = (query_positive_keys.unsqueeze(-1) == passage_keys.view(1, 1, -1)) & (query_positive_keys.unsqueeze(-1) >= 0)
    return ~hit.any(dim=1)  # (B, N)
