"""Causal multi-head self-attention, the mixing step of a GPT.

Explained in the chapter "Attention" (chapters/03_attention.ipynb). This module holds:

* ``scaled_dot_product_attention``: attention written out (scores, mask, softmax, dropout,
  weighted sum), the reference the chapter teaches;
* ``causal_mask``: which keys each query may look at;
* ``KVCache``: the keys and values one layer has already computed, so that generation
  (chapter "Generating text") can feed one new token at a time;
* ``MultiHeadAttention``: the causal multi-head self-attention layer of GPT-2, with a
  fused path (PyTorch's ``scaled_dot_product_attention``) and an explicit path (ours)
  that give the same result.

It does not hold positional information (the model adds it, see ``model.py``) nor any
cross-attention: every layer here attends over its own input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_from_scratch.linear import Linear  # nn.Linear, its CPU products on oneDNN (chapter 5)


def causal_mask(
    length: int, device: torch.device | str | None = None, *, key_length: int | None = None
) -> Tensor:
    """Boolean mask of shape ``(length, key_length)``: ``True`` where a query may attend.

    Query ``i`` may look at key ``j`` when ``j <= i``: a lower-triangular pattern. With
    ``key_length > length`` (queries that continue ``key_length - length`` cached keys),
    query ``i`` sits at position ``key_length - length + i`` and sees every key up to it.
    ``key_length`` defaults to ``length``.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if key_length is None:
        key_length = length
    if isinstance(key_length, bool) or not isinstance(key_length, int) or key_length < length:
        raise ValueError(f"key_length must be an int >= length ({length}), got {key_length!r}")
    ones = torch.ones(length, key_length, dtype=torch.bool, device=device)
    return torch.tril(ones, diagonal=key_length - length)  # (length, key_length)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Attention written out: ``softmax(q @ k^T / sqrt(d_k) + mask) @ v``.

    Shapes: ``q`` is ``(..., T_q, d_k)``, ``k`` is ``(..., T_k, d_k)``, ``v`` is
    ``(..., T_k, d_v)``; the result is ``(..., T_q, d_v)``. Leading dimensions (batch,
    heads) broadcast.

    ``mask`` must broadcast to the scores' shape ``(..., T_q, T_k)``. A boolean mask keeps
    the scores where it is ``True`` and sets the others to minus infinity before the
    softmax (the same convention as ``torch.nn.functional.scaled_dot_product_attention``);
    a floating mask is added to the scores. A query whose keys are all masked out gets NaN.
    ``dropout_p`` zeroes attention weights with that probability (and rescales the rest);
    like PyTorch's function it applies whenever it is non-zero, so pass 0 at evaluation.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., tokens, features), got {tuple(tensor.shape)}")
    if q.size(-1) != k.size(-1):
        raise ValueError(f"q and k must have the same last dimension, got {q.size(-1)} and {k.size(-1)}")
    if k.size(-2) != v.size(-2):
        raise ValueError(f"k and v must have the same number of tokens, got {k.size(-2)} and {v.size(-2)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T_q, T_k)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        try:
            shape = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape {tuple(scores.shape)}"
            )
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask.is_floating_point():
            scores = scores + mask
        else:
            raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
    weights = torch.softmax(scores, dim=-1)  # (..., T_q, T_k), each row sums to 1
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (..., T_q, d_v)


def with_padding(causal: Tensor, padding_mask: Tensor, batch: int) -> Tensor:
    """Combine a causal mask ``(T, total)`` with a padding mask ``(B, total)`` (``True`` = real token).

    Returns a bool mask ``(B, 1, T, total)``. A query that would see only padding (a pad token
    before any real one) would get NaN from the softmax; it attends causally instead: its output
    is meaningless but finite, and nothing reads it. Used by every attention module that takes
    left-padded batches (chapter "Generating text").
    """
    B, total = batch, causal.shape[-1]
    if not isinstance(padding_mask, Tensor) or padding_mask.shape != (B, total) or padding_mask.dtype != torch.bool:
        got = f"{padding_mask.dtype} {tuple(padding_mask.shape)}" if isinstance(padding_mask, Tensor) else type(padding_mask).__name__
        raise ValueError(f"padding_mask must be a bool tensor of shape {(B, total)}, got {got}")
    combined = causal & padding_mask[:, None, None, :]  # (B, 1, T, total)
    return torch.where(combined.any(dim=-1, keepdim=True), combined, causal)


class KVCache:
    """The keys and values one attention layer has seen so far, for generation.

    ``keys`` and ``values`` have shape ``(B, n_heads, T_cache, head_dim)`` (``None`` while
    empty). ``MultiHeadAttention`` appends the new tokens' keys and values and attends over
    the whole cache. One cache per layer; ``len(cache)`` is the number of cached tokens,
    which is also the position of the next token.

    Storage is preallocated and grows by doubling (``capacity`` tokens, at least
    ``initial_capacity``), so appending one token writes in place instead of copying the
    whole cache with ``torch.cat`` every step; ``keys``/``values`` are views of the filled part.
    Meant for inference (under ``torch.no_grad``): the in-place writes do not support
    backpropagating through several appends.
    """

    def __init__(self, initial_capacity: int = 256) -> None:
        self.initial_capacity = initial_capacity
        self._keys: Tensor | None = None  # (B, n_heads, capacity, head_dim)
        self._values: Tensor | None = None
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.size(-2)

    @property
    def keys(self) -> Tensor | None:
        return None if self._keys is None else self._keys[..., : self._length, :]

    @property
    def values(self) -> Tensor | None:
        return None if self._values is None else self._values[..., : self._length, :]

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``(B, n_heads, T_new, head_dim)`` keys and values; return the whole cache."""
        new_length = self._length + keys.size(-2)
        if new_length > self.capacity:  # grow: double (amortised O(1) per token)
            capacity = max(new_length, 2 * self.capacity, self.initial_capacity)
            shape = (*keys.shape[:-2], capacity, keys.size(-1))
            grown_k = keys.new_empty(shape)
            grown_v = values.new_empty((*values.shape[:-2], capacity, values.size(-1)))
            if self._length:
                grown_k[..., : self._length, :] = self.keys
                grown_v[..., : self._length, :] = self.values
            self._keys, self._values = grown_k, grown_v
        self._keys[..., self._length : new_length, :] = keys  # in place: no copy of the old entries
        self._values[..., self._length : new_length, :] = values
        self._length = new_length
        return self.keys, self.values  # (B, n_heads, T_cache + T_new, head_dim)

    def storage(self) -> tuple[Tensor | None, Tensor | None]:
        """The preallocated keys and values ``(B, n_heads, capacity, head_dim)``, filled up to ``len(self)``.

        For code that writes a new token's entries in place itself (``quantize.DecodeBlock``'s
        fused step) and then calls ``extend``.
        """
        return self._keys, self._values

    def extend(self, n: int) -> None:
        """Count ``n`` more tokens as cached: their keys and values were written into ``storage()`` in place."""
        if n < 0 or self._length + n > self.capacity:
            raise ValueError(f"cannot extend a cache of {self._length} tokens by {n} within capacity {self.capacity}")
        self._length += n

    def reset(self) -> None:
        """Empty the cache (start a new sequence)."""
        self._keys = self._values = None
        self._length = 0


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention (GPT-2's layer).

    Input and output have shape ``(B, T, d_model)``. One linear layer ``c_attn`` computes the
    queries, keys and values of all heads at once; they are split into ``n_heads`` heads of
    ``head_dim = d_model // n_heads`` features, each head attends causally, the heads are
    concatenated again and mixed by the output projection ``c_proj``. The names match
    GPT-2's checkpoints.

    ``use_sdpa=True`` runs the fused ``torch.nn.functional.scaled_dot_product_attention``;
    ``False`` runs our ``scaled_dot_product_attention``. Both compute the same function.
    ``dropout`` applies to the attention weights and to the output (training mode only).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        context_length: int,
        dropout: float = 0.0,
        bias: bool = True,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("context_length", context_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}): each head gets d_model // n_heads features"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.context_length = context_length
        self.dropout = dropout
        self.use_sdpa = use_sdpa
        self.c_attn = Linear(d_model, 3 * d_model, bias=bias)  # queries, keys, values of all heads
        self.c_proj = Linear(d_model, d_model, bias=bias)  # mixes the heads' outputs
        self.resid_dropout = nn.Dropout(dropout)
        # Lower-triangular mask for the explicit path; not saved in checkpoints.
        self.register_buffer("causal", causal_mask(context_length), persistent=False)

    def forward(
        self, x: Tensor, *, kv_cache: KVCache | None = None, padding_mask: Tensor | None = None
    ) -> Tensor:
        """Attend causally over ``x`` of shape ``(B, T, d_model)``; returns ``(B, T, d_model)``.

        ``kv_cache``: when given, ``x`` holds the tokens that follow the ``len(kv_cache)``
        cached ones; their keys and values are appended to the cache and the queries attend
        over all of it. ``padding_mask``: optional ``(B, T_total)`` bool, ``True`` for real
        tokens, ``False`` for padding keys nobody should attend to (``T_total`` counts the
        cached tokens too).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have shape (batch, tokens, d_model), got {x.dim()} dimensions {tuple(x.shape)}")
        B, T, C = x.shape
        if C != self.d_model:
            raise ValueError(f"x has {C} features in its last dimension, expected d_model={self.d_model}")
        past = 0 if kv_cache is None else len(kv_cache)
        if past + T > self.context_length:
            raise ValueError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) is longer than context_length={self.context_length}"
            )

        q, k, v = self.c_attn(x).split(self.d_model, dim=2)  # 3 x (B, T, d_model)
        # Split d_model into heads: (B, T, d_model) -> (B, n_heads, T, head_dim)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, n_heads, past + T, head_dim)
        total = past + T

        mask = None  # None means "causal, queries and keys aligned": SDPA's is_causal fast path
        # One new query after cached keys sees every key: no mask at all (decoding's common case).
        attend_all = T == 1 and past > 0 and padding_mask is None
        if (past > 0 or padding_mask is not None) and not attend_all:
            mask = self.causal[past:total, :total]  # (T, total): query i sits at position past + i
        if padding_mask is not None:
            mask = with_padding(mask, padding_mask, B)  # (B, 1, T, total)

        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            # Fused kernel (flash / memory-efficient where available): same maths, less memory.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and not attend_all
            )
        else:
            if mask is None and not attend_all:
                mask = self.causal[:T, :T]
            y = scaled_dot_product_attention(q, k, v, mask=mask, dropout_p=dropout_p)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, self.d_model)  # concatenate the heads
        return self.resid_dropout(self.c_proj(y))  # (B, T, d_model)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, context_length={self.context_length}, "
            f"dropout={self.dropout}, use_sdpa={self.use_sdpa}"
        )
