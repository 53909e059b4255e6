"""Stage 4's score spread (issue 17): ``score_spread`` is max - min over each query's real candidates,
the number docs/e2e_options.md uses to explain why ``distill`` flattens a DPR that is far more
confident than its reranker."""

import torch

from re2g.models.losses import distill_kl
from re2g.train.rag_eval import METRICS, score_spread


def test_score_spread_per_row_ignores_padding_and_empty_rows():
    z = torch.tensor([[3.0, -1.0, 100.0], [2.0, 2.5, -50.0], [7.0, 8.0, 9.0]])  # (B=3, C=3)
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    got = score_spread(z, mask)
    assert got.shape == (3,)
    assert torch.allclose(got, torch.tensor([4.0, 52.5, 0.0]))
    assert "dpr_spread" in METRICS and "rerank_spread" in METRICS


def test_distill_at_t10_is_mostly_flattening_when_dpr_spreads_far_wider():
    """The measured case in numbers: DPR's scores spread 83 over the candidates, the reranker's 6, both
    in the same order. At T = 10 the teacher is nearly uniform (best / worst < 2), so although both
    agree on the order, the KL's descent direction lowers DPR's best candidate and raises its worst:
    it teaches flatness, which a query encoder with a fixed-norm output can only get by rotating q."""
    z_dpr = torch.linspace(83.0, 0.0, 20).unsqueeze(0).requires_grad_(True)  # (1, 20) best first
    z_r = torch.linspace(6.0, 0.0, 20).unsqueeze(0)                           # (1, 20) same order
    mask = torch.ones(1, 20, dtype=torch.bool)
    distill_kl(z_r, z_dpr, mask, 10.0).backward()
    g = z_dpr.grad[0]
    teacher = torch.softmax(z_r[0] / 10.0, -1)
    assert float(teacher[0] / teacher[-1]) < 2.0        # the target is nearly uniform at T = 10
    assert float(g[0]) > 0 and float(g[-1]) < 0         # descent lowers DPR's best, raises its worst
    assert float(score_spread(z_dpr.detach(), mask)[0]) / float(score_spread(z_r, mask)[0]) > 10
