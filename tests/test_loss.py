"""``loss.cross_entropy`` against ``F.cross_entropy``: same loss, same gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llm_from_scratch.loss as loss_module
from llm_from_scratch.loss import cross_entropy


def loss_and_grad(fn, logits, targets, scale=1.0, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits, targets, **kwargs)
    (grad,) = torch.autograd.grad(loss * scale, logits)
    return loss.detach(), grad


@pytest.mark.parametrize("n_rows,vocab_size,chunk", [
    (37, 101, None),  # one chunk
    (300, 2048, 2**12),  # many chunks of 2 rows, the last one shorter
    (5, 70000, None),  # rows longer than a chunk: one row per chunk
])
def test_matches_f_cross_entropy(n_rows, vocab_size, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(n_rows)
    logits = torch.randn(n_rows, vocab_size, generator=g) * 3
    targets = torch.randint(0, vocab_size, (n_rows,), generator=g)
    targets[::4] = -100  # ignored rows
    for scale in (1.0, -2.5):  # the incoming gradient need not be 1
        ours, ours_grad = loss_and_grad(cross_entropy, logits, targets, scale)
        ref, ref_grad = loss_and_grad(F.cross_entropy, logits, targets, scale)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-9)
    assert ours_grad[::4].abs().max() == 0  # ignored rows get no gradient


def test_hand_computed_value_and_non_contiguous_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]]).t().contiguous().t()  # a transposed layout
    assert not logits.is_contiguous()
    targets = torch.tensor([0, 1, -100])
    want = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2  # mean over the two kept rows
    assert cross_entropy(logits, targets).item() == pytest.approx(want, rel=1e-6)
    _, grad = loss_and_grad(cross_entropy, logits, targets)
    p = 1 / (1 + math.exp(-2.0))
    torch.testing.assert_close(grad, torch.tensor([[(p - 1) / 2, (1 - p) / 2], [0.25, -0.25], [0.0, 0.0]]))


def test_every_target_ignored_gives_nan_like_f_cross_entropy():
    logits = torch.randn(4, 9)
    targets = torch.full((4,), -100)
    assert torch.isnan(cross_entropy(logits, targets)) and torch.isnan(F.cross_entropy(logits, targets))


def test_other_dtypes_and_shapes_go_to_f_cross_entropy():
    logits = torch.randn(6, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (6,))
    assert torch.equal(cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    batched = torch.randn(2, 11, 3)  # (N, C, d): class dimension second, as F.cross_entropy allows
    batch_targets = torch.randint(0, 11, (2, 3))
    assert torch.equal(cross_entropy(batched, batch_targets), F.cross_entropy(batched, batch_targets))


def test_bad_targets_raise_value_error():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 5\)"):
        cross_entropy(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="one per row"):
        cross_entropy(logits, torch.tensor([0, 1]))
