"""A Llama-style transformer: the parts that replaced GPT-2's since 2019.

Explained in the chapter "Beyond GPT-2" (chapters/08_beyond_gpt2.ipynb). This module holds:

* ``RMSNorm``: layer norm without the mean and the bias, ``x / rms(x) * weight``;
* ``rope_angles``, ``apply_rope``, ``RotaryEmbedding``: rotary position embeddings, which rotate
  pairs of query/key features by position-dependent angles, in either layout ("half": split
  halves as in Hugging Face Llama, "interleaved": adjacent pairs as in RoFormer and Meta's code);
* ``SwiGLU``: the gated feed-forward block ``down(silu(gate(x)) * up(x))``;
* ``GroupedQueryAttention``: causal attention whose ``n_heads`` query heads share ``n_kv_heads``
  key/value heads, so the KV cache is ``n_heads / n_kv_heads`` times smaller;
* ``ModernConfig`` and ``TransformerLM``: the model (pre-norm RMSNorm, RoPE, SwiGLU, no biases,
  untied output layer by default), with ``TransformerLM.from_hf_llama`` to load Hugging Face
  ``LlamaForCausalLM`` weights.

``TransformerLM`` has the same interface as ``model.GPT`` (``forward(idx, targets=None, *,
kv_cache=None)``, ``new_kv_cache()``, ``config.context_length``), so the trainer (``train.py``),
the generator and the ``KVCache`` of ``attention.py`` work with it unchanged. Parameter names are
Hugging Face Llama's (``model.layers.0.self_attn.q_proj.weight`` ...), so loading a checkpoint
is a plain ``load_state_dict``. It does not implement RoPE scaling variants (Llama 3.1's
"llama3", YaRN ...), sliding windows, dropout or mixture-of-experts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_from_scratch.attention import KVCache, causal_mask, scaled_dot_product_attention, with_padding
from llm_from_scratch.linear import Linear
from llm_from_scratch.model import check_token_inputs, next_token_loss

ROPE_LAYOUTS = ("half", "interleaved")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square normalisation: ``x / sqrt(mean(x**2) + eps) * weight``.

    Unlike ``nn.LayerNorm`` it neither subtracts the mean nor adds a bias: one statistic and
    one learned vector (``weight``, initialised to ones) instead of two. Input and output
    ``(..., d_model)``. The statistic is computed in float32 and the result cast back to the
    input's dtype before the weight multiplies it, as in Hugging Face Llama.
    """

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        _check_positive_int("d_model", d_model)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., d_model)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Cosines and sines of RoPE's angles, each ``(T, head_dim // 2)`` in float32.

    Pair ``i`` of a token at position ``p`` turns by ``p * theta ** (-2 i / head_dim)``: the
    first pairs spin fast, the last ones slowly.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # (head_dim // 2,)
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (T, head_dim // 2)
    return angles.cos(), angles.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    # x: (..., T, head_dim); cos, sin: (T, head_dim // 2). Pair (a, b) -> (a cos - b sin, b cos + a sin).
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.size(-1) // 2
    if layout == "half":  # pairs (i, i + head_dim/2): Hugging Face Llama's rotate_half
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i + 1): RoFormer / Meta's original code
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def apply_rope(x: Tensor, positions: Tensor, theta: float = 10000.0, layout: str = "half") -> Tensor:
    """Rotary position embedding of ``x`` ``(..., T, head_dim)`` at integer ``positions`` ``(T,)``.

    The features are grouped in ``head_dim / 2`` pairs and pair ``i`` is rotated by the angle
    ``positions * theta ** (-2 i / head_dim)``. ``layout="half"`` pairs feature ``i`` with
    ``i + head_dim / 2`` (Hugging Face Llama), ``"interleaved"`` pairs ``2 i`` with ``2 i + 1``
    (RoFormer, Meta's Llama code); the two are the same function up to a permutation of the
    features. Because rotations compose, ``apply_rope(q, m) . apply_rope(k, n)`` depends only on
    ``m - n``. Returns a tensor of ``x``'s shape and dtype.
    """
    if not isinstance(x, Tensor) or not isinstance(positions, Tensor):
        raise TypeError("x and positions must be torch.Tensors")
    if x.dim() < 2 or x.size(-1) % 2 != 0:
        raise ValueError(f"x must have shape (..., T, head_dim) with an even head_dim, got {tuple(x.shape)}")
    if positions.dim() != 1 or positions.numel() != x.size(-2):
        raise ValueError(f"positions must have shape ({x.size(-2)},) (one per token), got {tuple(positions.shape)}")
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    cos, sin = rope_angles(positions, x.size(-1), theta)
    return _rotate(x, cos, sin, layout)


class RotaryEmbedding(nn.Module):
    """``apply_rope`` with the cosines and sines of positions ``0 .. context_length - 1`` precomputed.

    ``forward(x, start)`` rotates ``x`` ``(B, n_heads, T, head_dim)`` as tokens at positions
    ``start .. start + T - 1`` (``start`` is the KV-cache length during generation);
    ``forward(x, position_ids=p)`` uses ``p`` ``(B, T)``, one row of positions per sequence. The tables
    are buffers that are not saved in checkpoints.
    """

    def __init__(self, head_dim: int, context_length: int, theta: float = 10000.0, layout: str = "half") -> None:
        super().__init__()
        _check_positive_int("head_dim", head_dim)
        _check_positive_int("context_length", context_length)
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even (features are rotated in pairs), got {head_dim}")
        if layout not in ROPE_LAYOUTS:
            raise ValueError(f"layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
        self.theta, self.layout = theta, layout
        cos, sin = rope_angles(torch.arange(context_length), head_dim, theta)
        self.register_buffer("cos", cos, persistent=False)  # (context_length, head_dim // 2)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor, start: int = 0, position_ids: Tensor | None = None) -> Tensor:
        if position_ids is not None:  # (B, T): each row its own positions (left-padded batches)
            cos, sin = self.cos[position_ids][:, None], self.sin[position_ids][:, None]  # (B, 1, T, head_dim // 2)
            return _rotate(x, cos, sin, self.layout)
        T = x.size(-2)
        return _rotate(x, self.cos[start:start + T], self.sin[start:start + T], self.layout)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, layout={self.layout!r}"


# --------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """Gated feed-forward block: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases.

    Input and output ``(B, T, d_model)``, hidden width ``d_ff``. Three matrices instead of GPT's
    two, so ``d_ff ~ 8/3 d_model`` costs what GPT's ``4 d_model`` does.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        _check_positive_int("d_model", d_model)
        _check_positive_int("d_ff", d_ff)
        self.gate_proj = Linear(d_model, d_ff, bias=False)
        self.up_proj = Linear(d_model, d_ff, bias=False)
        self.down_proj = Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d_model)


# --------------------------------------------------------------------------------------------
# Grouped-query attention
# --------------------------------------------------------------------------------------------


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``n_heads`` query heads and ``n_kv_heads`` key/value heads.

    Query head ``h`` uses key/value head ``h // (n_heads // n_kv_heads)``. ``n_kv_heads ==
    n_heads`` is ordinary multi-head attention, ``n_kv_heads == 1`` multi-query attention.
    Queries and keys are rotated by RoPE before the dot product (keys are cached rotated).
    ``q_proj``: ``d_model -> n_heads * head_dim``; ``k_proj``, ``v_proj``: ``d_model ->
    n_kv_heads * head_dim``; ``o_proj`` mixes the heads back to ``d_model``; no biases.
    The ``KVCache`` holds ``(B, n_kv_heads, T, head_dim)`` keys and values: that is the saving.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        context_length: int,
        rope_theta: float = 10000.0,
        rope_layout: str = "half",
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            _check_positive_int(name, value)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.context_length = context_length
        self.use_sdpa = use_sdpa
        self.q_proj = Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, context_length, rope_theta, rope_layout)
        self.register_buffer("causal", causal_mask(context_length), persistent=False)

    def forward(
        self,
        x: Tensor,
        *,
        kv_cache: KVCache | None = None,
        padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Attend causally over ``x`` ``(B, T, d_model)``, after the ``len(kv_cache)`` cached tokens.

        ``padding_mask`` ``(B, past + T)`` bool (``True``: real token) and ``position_ids`` ``(B, T)``
        serve left-padded batches, as in ``MultiHeadAttention`` and ``GPT.forward``.
        """
        if x.dim() != 3 or x.size(-1) != self.d_model:
            raise ValueError(f"x must have shape (batch, tokens, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        past = 0 if kv_cache is None else len(kv_cache)
        if past + T > self.context_length:
            raise ValueError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) is longer than context_length={self.context_length}"
            )
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = self.rotary(q, past, position_ids)  # positions past .. past + T - 1 (or position_ids)
        k = self.rotary(k, past, position_ids)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, n_kv_heads, past + T, head_dim)
        total = past + T
        mask = self.causal[past:total, :total]  # (T, total): query i sits at position past + i
        if padding_mask is not None:
            mask = with_padding(mask, padding_mask, B)  # (B, 1, T, total)
        group = self.n_heads // self.n_kv_heads
        if self.use_sdpa:
            # Fused kernel; enable_gqa lets query head h read key/value head h // group without copying.
            fast = past == 0 and padding_mask is None
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if fast else mask, is_causal=fast, enable_gqa=group > 1
            )
        else:
            # Explicit: split the query heads into (n_kv_heads, group) and let k, v broadcast over the group.
            q = q.view(B, self.n_kv_heads, group, T, self.head_dim)
            if mask.dim() == 4:
                mask = mask[:, :, None]  # (B, 1, 1, T, total)
            y = scaled_dot_product_attention(q, k[:, :, None], v[:, :, None], mask=mask)  # (B, n_kv, group, T, hd)
            y = y.reshape(B, self.n_heads, T, self.head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # concatenate the heads
        return self.o_proj(y)  # (B, T, d_model)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, use_sdpa={self.use_sdpa}"


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def swiglu_hidden_size(d_model: int, multiple_of: int = 32) -> int:
    """Llama's rule for ``d_ff``: ``8/3 d_model`` (same parameters as GPT's ``4 d_model`` MLP), rounded up."""
    hidden = int(8 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class ModernConfig:
    """Sizes of a ``TransformerLM``.

    ``vocab_size``, ``context_length`` (RoPE tables are built this long), ``d_model``, ``n_layers``,
    ``n_heads`` as in ``GPTConfig``. ``n_kv_heads``: key/value heads of grouped-query attention
    (``None``: ``n_heads``, plain multi-head attention; must divide ``n_heads``). ``d_ff``: SwiGLU's
    hidden width (``None``: ``swiglu_hidden_size(d_model)``). ``rope_theta``: RoPE's base.
    ``rope_layout``: ``"half"`` (Hugging Face Llama, the layout ``from_hf_llama`` expects) or
    ``"interleaved"``. ``norm_eps``: RMSNorm's epsilon. ``tie_weights``: share the token
    embedding with the output layer (Llama: False). ``use_sdpa``: PyTorch's fused attention.
    The defaults are a generic mid-size Llama-like shape, not a published model: use a preset or
    ``ModernConfig.from_hf(llama_config)``.
    """

    vocab_size: int = 32000
    context_length: int = 2048
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int | None = None
    d_ff: int | None = None
    rope_theta: float = 10000.0
    rope_layout: str = "half"
    norm_eps: float = 1e-5
    tie_weights: bool = False
    use_sdpa: bool = True

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = swiglu_hidden_size(self.d_model)
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            _check_positive_int(f"ModernConfig.{name}", getattr(self, name))
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"ModernConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModernConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModernConfig head_dim = d_model // n_heads must be even for RoPE, got {self.head_dim}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"ModernConfig.rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModernConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModernConfig.norm_eps must be positive, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes the KV cache grows by per token: keys and values, every layer, ``n_kv_heads`` heads."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value

    # --- presets ---------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> ModernConfig:
        """The budget of ``GPTConfig.tiny``: 4 layers, 4 query heads, 2 KV heads, d_model 128, d_ff 352, context 128."""
        return cls(**{**dict(n_layers=4, n_heads=4, n_kv_heads=2, d_model=128, d_ff=352, context_length=128,
                             vocab_size=50257), **overrides})

    @classmethod
    def small_cpu(cls, **overrides) -> ModernConfig:
        """The budget of ``GPTConfig.small_cpu``: 6 layers, 6 query heads, 2 KV heads, d_model 384, context 256."""
        return cls(**{**dict(n_layers=6, n_heads=6, n_kv_heads=2, d_model=384, d_ff=1024, context_length=256,
                             vocab_size=50257), **overrides})

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> ModernConfig:
        """The ``ModernConfig`` of a Hugging Face ``LlamaConfig`` (an object or its ``to_dict()``).

        Raises ``ValueError`` for the Llama options this model does not implement (biases, RoPE
        scaling, a ``head_dim`` other than ``hidden_size // num_attention_heads``, an activation
        other than SiLU).
        """
        d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        problems = []
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (only 'default' is implemented)")
        if d.get("attention_bias") or d.get("mlp_bias"):
            problems.append("attention_bias/mlp_bias (this model has no biases)")
        if d.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {d['hidden_act']!r} (expected 'silu')")
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim != d["hidden_size"] // d["num_attention_heads"]:
            problems.append(f"head_dim {head_dim} != hidden_size // num_attention_heads")
        if problems:
            raise ValueError("unsupported Llama configuration: " + "; ".join(problems))
        return cls(**{**dict(
            vocab_size=d["vocab_size"],
            context_length=d["max_position_embeddings"],
            d_model=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            d_ff=d["intermediate_size"],
            rope_theta=float(theta),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_weights=bool(d.get("tie_word_embeddings", False)),
        ), **overrides})


class DecoderLayer(nn.Module):
    """A pre-norm Llama block: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(self, config: ModernConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = GroupedQueryAttention(
            config.d_model, config.n_heads, config.n_kv_heads, context_length=config.context_length,
            rope_theta=config.rope_theta, rope_layout=config.rope_layout, use_sdpa=config.use_sdpa,
        )
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x: Tensor, **attention_kwargs) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), **attention_kwargs)  # (B, T, d_model)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerLM(nn.Module):
    """A Llama-style language model: token embedding, ``n_layers`` ``DecoderLayer``s, RMSNorm, output layer.

    No position embedding (RoPE rotates queries and keys inside attention), no biases anywhere,
    an output layer separate from the token embedding unless ``config.tie_weights``. Parameter
    names are Hugging Face ``LlamaForCausalLM``'s::

        model.embed_tokens.weight                          (vocab_size, d_model)
        model.layers.N.input_layernorm.weight              (d_model,)
        model.layers.N.self_attn.{q,o}_proj.weight         (d_model, d_model)
        model.layers.N.self_attn.{k,v}_proj.weight         (n_kv_heads * head_dim, d_model)
        model.layers.N.post_attention_layernorm.weight     (d_model,)
        model.layers.N.mlp.{gate,up}_proj.weight           (d_ff, d_model)
        model.layers.N.mlp.down_proj.weight                (d_model, d_ff)
        model.norm.weight                                  (d_model,)
        lm_head.weight                                     (vocab_size, d_model)

    ``forward``, ``new_kv_cache`` and ``config.context_length`` behave as ``GPT``'s.
    """

    def __init__(self, config: ModernConfig) -> None:
        super().__init__()
        if not isinstance(config, ModernConfig):
            raise TypeError(f"config must be a ModernConfig, got {type(config).__name__}")
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.d_model),
                layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers)),
                norm=RMSNorm(config.d_model, config.norm_eps),
            )
        )
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # Same residual scaling as GPT (GPT-2 paper, section 2.3): the branches' last projections.
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Number of parameters, a tied matrix counted once; optionally without the token embedding."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
        return total

    def new_kv_cache(self) -> list[KVCache]:
        """One empty ``KVCache`` per layer, for ``forward(..., kv_cache=...)``."""
        return [KVCache() for _ in range(self.config.n_layers)]

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        kv_cache: list[KVCache] | None = None,
        padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` ``(B, T)``; ``(logits, loss)`` with ``targets``.

        As ``GPT.forward``: ``targets`` ``(B, T)`` gives the mean cross-entropy over the entries
        that are not ``-100``; with ``kv_cache`` (from ``new_kv_cache()``) ``idx`` continues the
        cached tokens, whose count is the position of ``idx[:, 0]`` for RoPE. For left-padded
        batches: ``padding_mask`` ``(B, T_cache + T)`` bool, ``True`` for real tokens, and
        ``position_ids`` ``(B, T)``, each token's position in its own sequence.
        """
        check_token_inputs(idx, self.config, kv_cache=kv_cache, position_ids=position_ids)
        x = self.model.embed_tokens(idx)  # (B, T, d_model); no position embedding: RoPE is in attention
        for i, layer in enumerate(self.model.layers):
            x = layer(x, kv_cache=None if kv_cache is None else kv_cache[i], padding_mask=padding_mask,
                      position_ids=position_ids)
        logits = self.lm_head(self.model.norm(x))  # (B, T, vocab_size)
        if targets is None:
            return logits
        return logits, next_token_loss(logits, targets)

    # --- Hugging Face Llama checkpoints ---------------------------------------------------------
    @classmethod
    def from_hf_llama(cls, state_dict: Mapping[str, Tensor], config: ModernConfig | Any = None) -> TransformerLM:
        """A ``TransformerLM`` holding the weights of a Hugging Face ``LlamaForCausalLM``.

        ``state_dict``: its ``state_dict()`` (or a ``LlamaModel``'s, whose keys lack ``model.``;
        then the output layer must be tied). ``config``: a ``ModernConfig``, or the Hugging Face
        ``LlamaConfig`` (converted by ``ModernConfig.from_hf``): the number of heads is not
        visible in the weights. The names are the same, so loading is a copy; the layout of
        RoPE must be ``"half"`` (Hugging Face's checkpoints permute Meta's ``q_proj``/``k_proj``
        rows for it). Raises ``ValueError`` listing missing, unexpected and mis-shaped keys.
        """
        if config is None:
            raise ValueError("config is required: pass a ModernConfig or the LlamaConfig (heads are not in the weights)")
        if not isinstance(config, ModernConfig):
            config = ModernConfig.from_hf(config)
        if config.rope_layout != "half":
            raise ValueError(f"Hugging Face Llama weights need rope_layout='half', got {config.rope_layout!r}")
        model = cls(config)
        model.load_hf_llama_state_dict(state_dict)
        return model

    @torch.no_grad()
    def load_hf_llama_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy a Hugging Face Llama state dict into this model (see ``from_hf_llama``)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
        hf = {_add_prefix(k): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
        tied = self.config.tie_weights
        if tied and "lm_head.weight" in hf:
            hf.pop("lm_head.weight")  # HF lists the tied matrix under both names
        ours = {k: v for k, v in self.state_dict().items() if not (tied and k == "lm_head.weight")}
        missing = [k for k in ours if k not in hf]
        unexpected = sorted(k for k in hf if k not in ours)
        mismatched = [f"{k}: checkpoint {tuple(hf[k].shape)}, expected {tuple(v.shape)}"
                      for k, v in ours.items() if k in hf and hf[k].shape != v.shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                "state dict does not fit this TransformerLM:"
                + (f"\n  missing keys: {missing}" if missing else "")
                + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                + (f"\n  mis-shaped keys: {mismatched}" if mismatched else "")
            )
        params = dict(self.named_parameters())
        for name, value in hf.items():
            params[name].copy_(value)


def _add_prefix(key: str) -> str:
    # LlamaModel's keys lack the "model." prefix that LlamaForCausalLM's carry.
    return key if key.startswith(("model.", "lm_head.")) or not re.match(r"(embed_tokens|layers|norm)\b", key) \
        else "model." + key
