"""LoRA: low-rank adapters that fine-tune a frozen model through a few small matrices.

Explained in the chapter "Fine-tuning for classification" (chapters/09_classification.ipynb),
section "LoRA". A linear layer computes ``x @ W.T + b`` with ``W`` of shape ``(out, in)``.
LoRA (Hu et al. 2021) keeps ``W`` frozen and learns a low-rank change to it,

    W' = W + (alpha / r) * B @ A,    A: (r, in),  B: (out, r),

so the layer trains ``r * (in + out)`` numbers instead of ``in * out``. ``A`` starts random and
``B`` at zero: at the start ``W' = W`` and the model computes exactly what it did before.
``alpha / r`` scales the update so that changing ``r`` does not change how large the first
updates are (with ``alpha`` fixed, a larger rank does not need a smaller learning rate).
After training, ``merge_lora`` folds ``(alpha / r) * B @ A`` into ``W``: the model is a plain
model again, with no extra cost per token.

An embedding table is a linear layer whose input is one-hot (a lookup of row ``i`` is
``onehot(i) @ W``), so it takes an adapter too: ``LoRAEmbedding`` (as in Hugging Face's
``peft``). There the input side ``A`` is a lookup table of one ``r``-vector per token; it
starts at zero and ``B`` random, since a random ``A`` at the scale of a linear layer's
initialisation (``1 / sqrt(vocab_size)``) would make the first updates vanishingly small.

This module holds ``LoRALinear`` (our ``Linear`` plus an adapter), ``LoRAEmbedding``,
``apply_lora(model, targets, r, alpha)``, ``merge_lora``, ``lora_parameters`` and
``count_lora_parameters`` (the count by formula). It does not train (``finetune.py`` and ``train.py``) nor quantize the frozen
weights (QLoRA, Dettmers et al. 2023, is left for later).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_from_scratch.linear import Linear, linear

#: The projections of a GPT block that LoRA adapts by default: attention and MLP (see ``model.py``).
GPT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: The GPT's token embedding table (``transformer.wte``): ``GPT_TARGETS + GPT_EMBEDDING`` adapts it as well.
GPT_EMBEDDING = ("transformer.wte",)


def _check_rank(r, alpha) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"the LoRA rank r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"the LoRA alpha must be a positive number, got {alpha!r}")


class LoRALinear(Linear):
    """``Linear`` plus a low-rank adapter: ``y = x @ W.T + b + (alpha / r) * (x @ A.T) @ B.T``.

    ``weight`` and ``bias`` keep their names (a pre-trained state dict loads as it is) and are
    frozen; ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` are the trainable parameters.
    ``lora_A`` is initialised like ``nn.Linear``'s weight (Kaiming uniform), ``lora_B`` at zero.
    Build one from an existing layer with ``LoRALinear.from_linear`` (the weights are shared,
    not copied).
    """

    def __init__(self, in_features: int, out_features: int, *, r: int, alpha: float, bias: bool = True) -> None:
        _check_rank(r, alpha)
        super().__init__(in_features, out_features, bias=bias)
        self.r, self.alpha = r, float(alpha)
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_linear(cls, layer: nn.Linear, *, r: int, alpha: float) -> LoRALinear:
        """A ``LoRALinear`` that uses ``layer``'s own weight and bias (frozen) and a new adapter."""
        if not isinstance(layer, nn.Linear) or isinstance(layer, LoRALinear):
            raise TypeError(f"expected a Linear layer without an adapter, got {type(layer).__name__}")
        new = cls(layer.in_features, layer.out_features, r=r, alpha=alpha, bias=layer.bias is not None)
        new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        new.weight = layer.weight  # the same Parameter: no copy
        new.weight.requires_grad_(False)
        if layer.bias is not None:
            new.bias = layer.bias
            new.bias.requires_grad_(False)
        new.use_onednn = layer.use_onednn if isinstance(layer, Linear) else True
        return new

    def forward(self, x: Tensor) -> Tensor:
        base = super().forward(x)  # (..., out): the frozen layer
        update = linear(linear(x, self.lora_A), self.lora_B)  # (..., r) then (..., out)
        return base + self.scaling * update

    def delta_weight(self) -> Tensor:
        """The adapter as a change of the weight: ``(alpha / r) * B @ A``, shape ``(out, in)``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged(self) -> Linear:
        """A plain ``Linear`` with weight ``W + (alpha / r) * B @ A`` (and the same bias)."""
        layer = Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        layer.use_onednn = self.use_onednn
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


class LoRAEmbedding(nn.Embedding):
    """``nn.Embedding`` plus a low-rank adapter: row ``i`` is ``W[i] + (alpha / r) * B @ A[:, i]``.

    The table ``weight`` ``(num_embeddings, dim)`` keeps its name and is frozen; ``lora_A``
    ``(r, num_embeddings)`` (one ``r``-vector per token, starting at zero) and ``lora_B``
    ``(dim, r)`` (starting normal, std 1) train. Shapes follow ``LoRALinear`` with the one-hot
    token as the input: the change of the table is ``(alpha / r) * (B @ A).T``. Build one from
    an existing table with ``LoRAEmbedding.from_embedding`` (the table is shared, not copied).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, r: int, alpha: float) -> None:
        _check_rank(r, alpha)
        super().__init__(num_embeddings, embedding_dim)
        self.r, self.alpha = r, float(alpha)
        self.lora_A = nn.Parameter(torch.zeros(r, num_embeddings))
        self.lora_B = nn.Parameter(torch.randn(embedding_dim, r))
        self.weight.requires_grad_(False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_embedding(cls, table: nn.Embedding, *, r: int, alpha: float) -> LoRAEmbedding:
        """A ``LoRAEmbedding`` that uses ``table``'s own weight (frozen) and a new adapter."""
        if not isinstance(table, nn.Embedding) or isinstance(table, LoRAEmbedding):
            raise TypeError(f"expected an Embedding without an adapter, got {type(table).__name__}")
        if table.padding_idx is not None or table.max_norm is not None:
            raise ValueError("LoRAEmbedding supports plain tables only (no padding_idx, no max_norm)")
        new = cls(table.num_embeddings, table.embedding_dim, r=r, alpha=alpha)
        new.to(device=table.weight.device, dtype=table.weight.dtype)
        new.weight = table.weight  # the same Parameter: no copy
        new.weight.requires_grad_(False)
        return new

    def forward(self, idx: Tensor) -> Tensor:
        base = super().forward(idx)  # (..., dim): the frozen table
        update = F.embedding(idx, self.lora_A.T) @ self.lora_B.T  # (..., r) then (..., dim)
        return base + self.scaling * update

    def delta_weight(self) -> Tensor:
        """The adapter as a change of the table: ``(alpha / r) * (B @ A).T``, shape ``(num_embeddings, dim)``."""
        return self.scaling * (self.lora_B @ self.lora_A).T

    def merged(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding ``W + (alpha / r) * (B @ A).T``."""
        table = nn.Embedding(self.num_embeddings, self.embedding_dim)
        table.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            table.weight.copy_(self.weight + self.delta_weight())
        return table

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


#: The adapter classes: what ``apply_lora`` puts in and ``merge_lora`` takes out.
ADAPTERS = (LoRALinear, LoRAEmbedding)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module, targets: Sequence[str] = GPT_TARGETS, *, r: int = 8, alpha: float = 16.0, freeze: bool = True
) -> list[str]:
    """Replaces the layers named by ``targets`` with adapters, in place: ``LoRALinear`` for linear
    layers, ``LoRAEmbedding`` for embedding tables.

    ``targets``: module names or their endings (``"attn.c_attn"`` matches
    ``transformer.h.0.attn.c_attn`` in every block; ``GPT_EMBEDDING`` names the token table). ``freeze=True`` first freezes every
    parameter of ``model``, so that only the adapters train (unfreeze a new head yourself).
    Returns the names of the adapted layers. Raises ``ValueError`` for ``r <= 0``, a
    non-positive ``alpha``, a target that names no module (listing the layers there are) and a
    model that already has adapters, ``TypeError`` for a target that is neither a linear layer
    nor an embedding table.
    """
    _check_rank(r, alpha)
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
    if any(isinstance(m, ADAPTERS) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge_lora it first")
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding))]
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            endings = sorted({".".join(n.split(".")[-2:]) for n in linears})
            raise ValueError(f"LoRA target {target!r} names no module of this model; its linear layers and "
                             f"embedding tables end in {endings}")
        for name in hits:
            if not isinstance(modules[name], (nn.Linear, nn.Embedding)):
                raise TypeError(f"LoRA target {target!r} matches {name}, a {type(modules[name]).__name__}, "
                                "neither a linear layer nor an embedding table")
            if name not in chosen:
                chosen.append(name)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in chosen:
        layer = modules[name]
        if isinstance(layer, nn.Embedding):
            adapted = LoRAEmbedding.from_embedding(layer, r=r, alpha=alpha)
        else:
            adapted = LoRALinear.from_linear(layer, r=r, alpha=alpha)
        _set_submodule(model, name, adapted)
    return chosen


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its weight (``W + (alpha / r) * B @ A``): plain layers again.

    In place; returns ``model``. The merged model computes the same outputs as the adapted one
    (up to float rounding) at the cost of the model without adapters.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, ADAPTERS)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).merged())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (every ``lora_A`` and ``lora_B``)."""
    return [p for m in model.modules() if isinstance(m, ADAPTERS) for p in (m.lora_A, m.lora_B)]


def count_lora_parameters(shapes: Sequence[tuple[int, int]], r: int) -> int:
    """Parameters of rank-``r`` adapters on layers of shapes ``(in, out)``: ``r * (in + out)`` each.

    An embedding table of ``V`` rows of width ``d`` counts as ``(V, d)``.
    """
    _check_rank(r, 1.0)
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)
