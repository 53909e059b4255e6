"""``re2g.models.reranker.rerank_top`` and ``lengths_mask``: the masked top-k that stage 4, its dev
evaluation and inference share, on hand-made tensors (ties, ragged lists, empty lists)."""

from __future__ import annotations

import torch

from re2g.models.reranker import lengths_mask, rerank_top


def test_lengths_mask():
    assert lengths_mask([3, 1, 0]).tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert lengths_mask([]).shape == (0, 0)


def test_top_k_sorted_descending_with_ties_in_list_order():
    z = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    top, m = rerank_top(z, torch.ones_like(z, dtype=torch.bool), 3)
    assert top.tolist() == [[1, 3, 2]] and m.tolist() == [[True, True, True]]
    z = torch.zeros(1, 6)  # all tied: the list's own order
    assert rerank_top(z, torch.ones(1, 6, dtype=torch.bool), 4)[0].tolist() == [[0, 1, 2, 3]]


def test_ragged_rows_keep_all_their_real_entries():
    """A short row never cuts the others: each row's top-k is what it would be alone."""
    z = torch.tensor([[0.5, 2.0, 1.0, 4.0, 3.0],
                      [9.0, 7.0, 0.0, 0.0, 0.0],    # 2 real entries, padding scored 0 (above nothing)
                      [-1.0, -5.0, -3.0, 0.0, 0.0]])  # 3 real entries, padding above them by score
    mask = lengths_mask([5, 2, 3])
    top, m = rerank_top(z, mask, 4)
    assert top.shape == (3, 4)
    assert top[0].tolist() == [3, 4, 1, 2] and m[0].all()
    assert top[1, :2].tolist() == [0, 1] and m[1].tolist() == [True, True, False, False]
    assert top[2, :3].tolist() == [0, 2, 1] and m[2].tolist() == [True, True, True, False]
    for b, n in enumerate([5, 2, 3]):  # the same as the row alone
        alone, am = rerank_top(z[b:b + 1, :n], mask[b:b + 1, :n], 4)
        assert top[b, :alone.shape[1]].tolist() == alone[0].tolist() and am.all()


def test_k_larger_than_every_list_and_masks_in_the_middle():
    z = torch.tensor([[1.0, 5.0, 2.0], [3.0, 1.0, 2.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])  # not a prefix: masked 5.0 is skipped
    top, m = rerank_top(z, mask, 10)
    assert top.shape == (2, 2)
    assert top[0].tolist() == [2, 0] and m[0].tolist() == [True, True]
    assert top[1, 0].item() == 2 and m[1].tolist() == [True, False]
    empty, em = rerank_top(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), 5)
    assert empty.shape == (2, 0) and em.shape == (2, 0)


def test_positions_gather_differentiable_scores():
    z = torch.tensor([[0.1, 0.9, 0.5]], requires_grad=True)
    top, _ = rerank_top(z, torch.ones(1, 3, dtype=torch.bool), 2)
    z.gather(1, top).sum().backward()
    assert z.grad.tolist() == [[0.0, 1.0, 1.0]]
