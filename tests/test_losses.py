"""The losses against hand-computed values, masking, and the cross-worker gather with 2 gloo ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from re2g.models.losses import (distill_kl, false_negative_mask, gather_with_grad, in_batch_nll, listwise_kl,
                                multi_positive_nll, rocketqa_joint_loss)


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_in_batch_nll_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # scores: q0 -> [1, 0, 1], q1 -> [0, 2, 2]
    loss = in_batch_nll(q, p, torch.tensor([0, 1]))
    want = ((lse(1, 0, 1) - 1) + (lse(0, 2, 2) - 2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_in_batch_nll_masks_false_negatives_but_keeps_the_positive():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[False, True, False], [True, True, True]])  # q0: column 2 is a false negative
    loss = in_batch_nll(q, p, torch.tensor([0, 1]), mask)  # mask[0,0] False is overridden (own positive)
    want = ((lse(1, 0) - 1) + (lse(0, 2, 2) - 2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_false_negative_mask():
    keys = torch.tensor([[7, 9], [3, -1]])
    passages = torch.tensor([7, 3, 9, 5])
    m = false_negative_mask(keys, passages)
    assert m.tolist() == [[False, True, False, True], [True, False, True, True]]


def test_multi_positive_nll_several_positives_and_padding():
    z = torch.tensor([[2.0, 1.0, 0.0, 5.0], [0.5, 0.0, 0.0, 0.0]])
    labels = torch.tensor([[True, True, False, False], [False, True, False, True]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])  # padded columns
    loss = multi_positive_nll(z, labels, mask)
    row0 = (lse(2, 1, 0) - 2) + (lse(2, 1, 0) - 1)       # both positives summed; column 3 is padding
    row1 = lse(0.5, 0.0) - 0.0                            # label on a padded column is ignored
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_multi_positive_nll_rows_without_positive_are_left_out():
    z = torch.tensor([[1.0, 0.0], [3.0, 1.0]], requires_grad=True)
    labels = torch.tensor([[True, False], [False, False]])
    loss = multi_positive_nll(z, labels)
    assert loss.item() == pytest.approx(lse(1, 0) - 1, rel=1e-6)
    loss.backward()
    assert z.grad[1].abs().sum() == 0


def test_listwise_kl_and_masking_no_nan():
    t = torch.tensor([[1.0, 0.0, 9.0], [0.0, 0.0, 0.0]])
    s = torch.tensor([[0.0, 1.0, -9.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])  # row 1 entirely masked
    got = listwise_kl(t, s, mask)
    pt = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    ps = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    want = float((pt * (pt.log() - ps.log())).sum())
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(got)
    assert listwise_kl(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_rocketqa_joint_loss_is_kl_plus_ce_and_trains_both():
    s_ce = torch.tensor([[2.0, 0.0, 1.0]], requires_grad=True)
    s_de = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[True, False, False]])
    loss = rocketqa_joint_loss(s_ce, s_de, labels)
    pc = torch.softmax(s_ce.detach()[0], 0)
    pd = torch.softmax(s_de.detach()[0], 0)
    kl = float((pc * (pc.log() - pd.log())).sum())
    ce = lse(2, 0, 1) - 2
    assert loss.item() == pytest.approx(kl + ce, rel=1e-5)
    loss.backward()
    assert s_ce.grad.abs().sum() > 0 and s_de.grad.abs().sum() > 0


def test_distill_kl_temperature_and_teacher_detached():
    zr = torch.tensor([[10.0, 0.0, -10.0]], requires_grad=True)
    zd = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    T = 10.0
    got = distill_kl(zr, zd, temperature=T)
    pt = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0)
    want = float((pt * (pt.log() - math.log(1 / 3))).sum()) * T * T
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert zr.grad is None and zd.grad.abs().sum() > 0
    # masked padding: a padded third candidate changes nothing
    mask = torch.tensor([[True, True, False]])
    a = distill_kl(torch.tensor([[1.0, 2.0, 50.0]]), torch.tensor([[0.0, 1.0, -50.0]]), mask, T)
    b = distill_kl(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]), None, T)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_gather_single_process_is_identity():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


# --------------------------------------------------------------------------- 2 gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, q_all, p_all, out):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B = q_all.shape[0] // world
        q = q_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        p = p_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        pg = gather_with_grad(p)  # (W*B, D)
        loss = in_batch_nll(q, pg, torch.arange(B) + rank * B)
        loss.backward()
        out[rank] = {"gathered": pg.detach().clone(), "loss": loss.item(),
                     "q_grad": q.grad.clone(), "p_grad": p.grad.clone(),
                     "remote_has_grad": [pg.requires_grad]}
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_two_gloo_ranks():
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    W, B, D = 2, 3, 4
    q_all, p_all = torch.randn(W * B, D), torch.randn(W * B, D)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(W, _free_port(), q_all, p_all, out), nprocs=W, join=True)
    # every rank sees the whole batch in rank order
    for r in range(W):
        assert torch.allclose(out[r]["gathered"], p_all)
    # the per-rank losses average to the global in-batch loss
    full = in_batch_nll(q_all, p_all, torch.arange(W * B))
    assert (out[0]["loss"] + out[1]["loss"]) / 2 == pytest.approx(full.item(), rel=1e-5)
    # query gradients equal those of the global loss (x W, since each rank means over its B queries)
    qa = q_all.clone().requires_grad_(True)
    pa = p_all.clone().requires_grad_(True)
    in_batch_nll(qa, pa, torch.arange(W * B)).backward()
    q_grad = torch.cat([out[0]["q_grad"], out[1]["q_grad"]])
    assert torch.allclose(q_grad, qa.grad * W, atol=1e-5)
    # the local passages got gradient only through the local queries (remote copies are constants)
    for r in range(W):
        pl = p_all[r * B:(r + 1) * B].clone().requires_grad_(True)
        parts = [p_all[i * B:(i + 1) * B] for i in range(W)]
        parts[r] = pl
        in_batch_nll(q_all[r * B:(r + 1) * B], torch.cat(parts), torch.arange(B) + r * B).backward()
        assert torch.allclose(out[r]["p_grad"], pl.grad, atol=1e-6)
