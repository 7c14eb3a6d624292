"""Tests of llm_from_scratch.lora: adapters that start as no-ops, merge exactly, and train alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_from_scratch.linear import Linear
from llm_from_scratch.lora import (
    GPT_EMBEDDING,
    GPT_TARGETS,
    LoRAEmbedding,
    LoRALinear,
    apply_lora,
    count_lora_parameters,
    lora_parameters,
    merge_lora,
)
from llm_from_scratch.model import GPT, GPTConfig


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, context_length=16, d_model=32, n_layers=2, n_heads=2)).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(seed))


def test_zero_b_leaves_the_output_unchanged():
    model = tiny_gpt()
    x = tokens()
    before = model(x)
    apply_lora(model, r=4, alpha=8)
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(model(x), before)  # B = 0: exactly the same products, plus zero


def test_layer_against_the_formula():
    torch.manual_seed(0)
    base = Linear(6, 5)
    layer = LoRALinear.from_linear(base, r=2, alpha=6)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6, dtype=torch.float64)
    w, b, a, bb = (t.detach().double() for t in (base.weight, base.bias, layer.lora_A, layer.lora_B))
    expected = F.linear(x, w + (6 / 2) * bb @ a, b)  # the LoRA paper's W + (alpha / r) B A, in float64
    assert torch.allclose(layer(x.float()).double(), expected, atol=1e-5)
    assert layer.weight is base.weight  # shared, not copied


def test_merged_equals_adapted():
    model = tiny_gpt()
    apply_lora(model, r=4, alpha=16)
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.1)  # a trained-looking adapter
    x = tokens()
    adapted = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for n, _ in tiny_gpt().named_parameters())
    assert torch.allclose(model(x), adapted, atol=1e-5)


def test_only_adapters_get_gradients():
    model = tiny_gpt()
    apply_lora(model, ["attn.c_attn", "mlp.c_fc"], r=2, alpha=4)
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.1)
    x = tokens()
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {f"transformer.h.{i}.{t}.lora_{m}" for i in range(2) for t in ("attn.c_attn", "mlp.c_fc") for m in "AB"}
    assert with_grad == expected


def test_parameter_counts_by_hand():
    model = tiny_gpt()
    apply_lora(model, GPT_TARGETS, r=4, alpha=8)
    d = 32  # c_attn 32 -> 96, attn.c_proj 32 -> 32, c_fc 32 -> 128, mlp.c_proj 128 -> 32; two blocks
    by_hand = 2 * 4 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert by_hand == 2 * 4 * 512 == 4096
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == by_hand
    assert count_lora_parameters([(32, 96), (32, 32), (32, 128), (128, 32)] * 2, 4) == by_hand


def test_bad_inputs():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="names no module"):
        apply_lora(model, ["attn.c_query"], r=4, alpha=8)
    for r in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rank r must be a positive int"):
            apply_lora(model, r=r, alpha=8)
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(model, r=4, alpha=0)
    with pytest.raises(TypeError, match="neither a linear layer nor an embedding table"):
        apply_lora(model, ["ln_1"], r=4, alpha=8)
    apply_lora(model, r=2, alpha=4)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, r=2, alpha=4)


def test_embedding_adapter_against_the_formula():
    torch.manual_seed(0)
    table = torch.nn.Embedding(11, 6)
    layer = LoRAEmbedding.from_embedding(table, r=3, alpha=6)
    assert torch.count_nonzero(layer.lora_A) == 0 and layer.weight is table.weight  # starts as a no-op, shared
    idx = torch.tensor([[0, 4, 4, 10], [3, 2, 1, 0]])
    assert torch.equal(layer(idx), table(idx))
    torch.nn.init.normal_(layer.lora_A)
    w, a, b = (t.detach().double() for t in (table.weight, layer.lora_A, layer.lora_B))
    one_hot = F.one_hot(idx, 11).double()  # (2, 4, 11): a lookup is a product with a one-hot row
    expected = one_hot @ w + (6 / 3) * (one_hot @ a.T) @ b.T  # x W + (alpha / r) (x A^T) B^T, in float64
    assert torch.allclose(layer(idx).double(), expected, atol=1e-5)
    assert torch.allclose(layer.merged()(idx), layer(idx), atol=1e-6)


def test_embedding_adapter_in_a_gpt_trains_alone_and_merges():
    model = tiny_gpt()
    x = tokens()
    before = model(x)
    names = apply_lora(model, GPT_TARGETS + GPT_EMBEDDING, r=2, alpha=4)
    assert names[-1] == "transformer.wte" and isinstance(model.transformer.wte, LoRAEmbedding)
    assert torch.equal(model(x), before)  # A = 0 in the table's adapter, B = 0 in the linear ones
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        count_lora_parameters([(32, 96), (32, 32), (32, 128), (128, 32)] * 2 + [(50, 32)], 2))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.1)
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {"transformer.wte.lora_A", "transformer.wte.lora_B"} <= with_grad
    assert all(".lora_" in n for n in with_grad)
    adapted = model(x)
    merge_lora(model)
    assert type(model.transformer.wte) is torch.nn.Embedding
    assert torch.allclose(model(x), adapted, atol=1e-5)


def test_embedding_adapter_bad_inputs():
    with pytest.raises(TypeError, match="expected an Embedding"):
        LoRAEmbedding.from_embedding(Linear(3, 4), r=2, alpha=4)
    with pytest.raises(ValueError, match="plain tables only"):
        LoRAEmbedding.from_embedding(torch.nn.Embedding(5, 3, padding_idx=0), r=2, alpha=4)
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        LoRAEmbedding(5, 3, r=0, alpha=4)
