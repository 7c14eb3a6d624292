"""The cross-entropy of next-token prediction, computed in fewer passes over the logits.

Explained in the chapter "Pre-training" (chapters/05_pretraining.ipynb), sections "The
objective" (what the loss is) and "Where the time goes" (why this version). ``cross_entropy``
returns what ``F.cross_entropy(logits, targets, ignore_index=...)`` returns, the mean of
``logsumexp(logits[i]) - logits[i, targets[i]]`` over the rows whose target is not ignored, and
the same gradient, ``(softmax(logits[i]) - onehot(targets[i])) / n``.

``F.cross_entropy`` materialises the log-probabilities (a copy of the ``(N, vocab_size)``
logits), and its backward fills a tensor of that size with zeros, scatters into it and runs
the log-softmax's backward: several passes over tensors of tens of megabytes, most of them out
of the CPU's caches. Here the forward keeps one number per row (its loss), and the backward
writes the gradient once; both work through the rows in chunks that fit in the cache (the
backward computes each chunk's softmax again rather than storing it). Float32 CPU logits take this path; anything else (GPU, other dtypes) goes to
``F.cross_entropy``.

It computes no logits (the output layer does) and takes no label smoothing or class weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Elements of the logits handled at once: 1 MiB of float32, a chunk that stays in the cache.
_CHUNK_ELEMENTS = 2**18


def _chunks(n_rows: int, n_cols: int) -> list[slice]:
    rows = max(1, _CHUNK_ELEMENTS // n_cols)
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``logits`` ``(N, V)`` against ``targets`` ``(N,)``; see the module's docstring."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        n_rows, n_cols = logits.shape
        valid = targets != ignore_index  # (N,)
        safe_targets = targets.masked_fill(~valid, 0)[:, None]  # (N, 1): any column for the ignored rows
        losses = torch.empty(n_rows, dtype=logits.dtype)  # (N,) -log p(target_i)
        for rows in _chunks(n_rows, n_cols):
            log_probs = torch.log_softmax(logits[rows], dim=1)  # (rows, V): a chunk, in the cache
            torch.neg(log_probs.gather(1, safe_targets[rows]).squeeze(1), out=losses[rows])
        ctx.save_for_backward(logits, safe_targets, valid)
        return (losses * valid).sum() / valid.sum()  # NaN if every target is ignored, as F.cross_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        logits, safe_targets, valid = ctx.saved_tensors
        n_rows, n_cols = logits.shape
        row_scale = (valid * (grad_loss / valid.sum()))[:, None]  # (N, 1): d loss / d loss_i, 0 if ignored
        grad = torch.empty_like(logits)  # (N, V)
        for rows in _chunks(n_rows, n_cols):
            torch.mul(torch.softmax(logits[rows], dim=1), row_scale[rows], out=grad[rows])  # p_i, scaled
        grad.scatter_add_(1, safe_targets, -row_scale)  # minus onehot(target_i), scaled
        return grad, None, None


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(logits, targets, ignore_index=ignore_index)`` (mean over kept targets).

    ``logits`` ``(N, vocab_size)``, ``targets`` ``(N,)`` integer ids in ``[0, vocab_size)`` or
    ``ignore_index``. Float32 CPU logits use the chunked computation of this module.
    """
    if not (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and targets.dim() == 1 and not targets.is_floating_point() and logits.numel() > 0
            and type(logits) is Tensor and not torch.compiler.is_compiling()):
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must have {logits.shape[0]} entries (one per row of logits), got {targets.shape[0]}")
    valid = targets[targets != ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= logits.shape[1]):
        raise ValueError(f"targets must be in [0, {logits.shape[1]}) or {ignore_index}, "
                         f"got values in [{valid.min().item()}, {valid.max().item()}]")
    return _CrossEntropy.apply(logits, targets, ignore_index)
