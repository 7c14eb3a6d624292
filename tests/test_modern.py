"""Tests for llm_from_scratch.modern: RMSNorm, RoPE, SwiGLU, grouped-query attention, TransformerLM.

References: the formulas written out, torch.nn.RMSNorm, our MultiHeadAttention, and Hugging Face
transformers' LlamaForCausalLM (logits within 1e-5 in float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_from_scratch.attention import MultiHeadAttention
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.modern import (
    GroupedQueryAttention,
    ModernConfig,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerLM,
    apply_rope,
)
from llm_from_scratch.train import TrainConfig, decay_parameter_names, train

transformers = pytest.importorskip("transformers")


# --- RMSNorm ---------------------------------------------------------------------------------


def test_rmsnorm_matches_formula_and_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 3 + 1
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    formula = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    reference = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
    out = norm(x)
    torch.testing.assert_close(out, formula, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
    # Unlike LayerNorm, a constant shift changes the output: the mean is not removed.
    assert not torch.allclose(norm(x + 5), out, atol=1e-3)


def test_rmsnorm_validates():
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(8, eps=0.0)
    with pytest.raises(ValueError, match="d_model"):
        RMSNorm(0)


# --- RoPE ------------------------------------------------------------------------------------


def _complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    # Independent reference (RoFormer / Meta's code): adjacent pairs as complex numbers times e^{i p w}.
    d = x.size(-1)
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(len(positions), d // 2, dtype=torch.float64), positions.double()[:, None] * freqs)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_interleaved_matches_complex_reference(theta):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 8)
    pos = torch.arange(7) + 5
    torch.testing.assert_close(apply_rope(x, pos, theta, layout="interleaved"), _complex_rope(x, pos, theta),
                               rtol=1e-5, atol=1e-5)


def test_rope_layouts_equal_up_to_permutation():
    torch.manual_seed(2)
    d = 16
    x = torch.randn(2, 9, d)
    pos = torch.arange(9)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # interleaved -> half order
    half = apply_rope(x[..., perm], pos, layout="half")
    interleaved = apply_rope(x, pos, layout="interleaved")
    torch.testing.assert_close(half, interleaved[..., perm])


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_dot_product_depends_only_on_offset(layout):
    torch.manual_seed(3)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    dots = {}
    for m, n in [(0, 0), (7, 7), (30, 30), (3, 0), (10, 7), (50, 47), (2, 9), (40, 47)]:
        qm = apply_rope(q, torch.tensor([m]), layout=layout)
        kn = apply_rope(k, torch.tensor([n]), layout=layout)
        dots.setdefault(m - n, []).append(float((qm * kn).sum()))
    for offset, values in dots.items():
        assert max(values) - min(values) < 1e-4, (offset, values)
    assert abs(dots[0][0] - float((q * k).sum())) < 1e-5  # position 0 is the identity
    assert abs(dots[3][0] - dots[-7][0]) > 1e-3  # different offsets differ
    # Rotations preserve norms.
    torch.testing.assert_close(apply_rope(q, torch.tensor([13]), layout=layout).norm(), q.norm())


def test_rotary_module_matches_function_and_validates():
    torch.manual_seed(4)
    x = torch.randn(2, 4, 6, 8)
    rot = RotaryEmbedding(8, 32, theta=100.0, layout="interleaved")
    torch.testing.assert_close(rot(x, start=10), apply_rope(x, torch.arange(10, 16), 100.0, "interleaved"))
    with pytest.raises(ValueError, match="layout"):
        apply_rope(x, torch.arange(6), layout="pairs")
    with pytest.raises(ValueError, match="positions"):
        apply_rope(x, torch.arange(5))
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 16)


# --- SwiGLU ----------------------------------------------------------------------------------


def test_swiglu_formula():
    torch.manual_seed(5)
    ff = SwiGLU(8, 20)
    x = torch.randn(2, 3, 8)
    a, b = x @ ff.gate_proj.weight.T, x @ ff.up_proj.weight.T
    expected = (a * torch.sigmoid(a) * b) @ ff.down_proj.weight.T
    torch.testing.assert_close(ff(x), expected)
    assert all(m.bias is None for m in (ff.gate_proj, ff.up_proj, ff.down_proj))


# --- grouped-query attention -----------------------------------------------------------------


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_gqa_with_all_heads_equals_multi_head_attention(use_sdpa):
    torch.manual_seed(6)
    d, h, T = 32, 4, 10
    mha = MultiHeadAttention(d, h, context_length=16, bias=False)
    gqa = GroupedQueryAttention(d, h, h, context_length=16, rope_theta=10000.0, use_sdpa=use_sdpa)
    gqa.rotary.cos.fill_(1.0)  # angle 0 everywhere: no rotation, so only the attention is compared
    gqa.rotary.sin.fill_(0.0)
    with torch.no_grad():
        q, k, v = mha.c_attn.weight.split(d, dim=0)
        gqa.q_proj.weight.copy_(q)
        gqa.k_proj.weight.copy_(k)
        gqa.v_proj.weight.copy_(v)
        gqa.o_proj.weight.copy_(mha.c_proj.weight)
    x = torch.randn(2, T, d)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
    # n_kv_heads = 2 equals full attention whose k/v weights repeat each KV head for its group.
    torch.manual_seed(7)
    d, h, kv, T = 32, 4, 2, 9
    gqa = GroupedQueryAttention(d, h, kv, context_length=16)
    full = GroupedQueryAttention(d, h, h, context_length=16)
    hd = d // h
    with torch.no_grad():
        full.q_proj.weight.copy_(gqa.q_proj.weight)
        full.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(kv, hd, d).repeat_interleave(h // kv, dim=0).reshape(h * hd, d)
            getattr(full, name).weight.copy_(w)
    x = torch.randn(2, T, d)
    torch.testing.assert_close(gqa(x), full(x), rtol=1e-5, atol=1e-6)
    gqa.use_sdpa = False
    torch.testing.assert_close(gqa(x), full(x), rtol=1e-5, atol=1e-6)


def test_gqa_validates():
    with pytest.raises(ValueError, match="n_kv_heads"):
        GroupedQueryAttention(32, 4, 3, context_length=8)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModernConfig(d_model=32, n_heads=4, n_kv_heads=3)


# --- parity with Hugging Face Llama ----------------------------------------------------------


def _hf_llama(n_kv_heads: int, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=tie, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones; make them random so they are tested too
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return hf, cfg


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_parity_with_hf_llama(n_kv_heads, use_sdpa):
    hf, cfg = _hf_llama(n_kv_heads)
    config = ModernConfig.from_hf(cfg, use_sdpa=use_sdpa)
    assert (config.n_kv_heads, config.d_ff, config.norm_eps) == (n_kv_heads, 96, 1e-6)
    ours = TransformerLM.from_hf_llama(hf.state_dict(), config).eval()
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        logits = ours(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_parity_with_hf_llama_tied_and_config_object():
    hf, cfg = _hf_llama(2, tie=True, seed=3)
    ours = TransformerLM.from_hf_llama(hf.state_dict(), cfg).eval()  # LlamaConfig passed directly
    assert ours.config.tie_weights and ours.lm_head.weight is ours.model.embed_tokens.weight
    idx = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-5)


def test_parameter_names_are_hf_llama_names():
    hf, cfg = _hf_llama(2)
    ours = TransformerLM(ModernConfig.from_hf(cfg))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in hf.state_dict().items()}


def test_loader_reports_bad_keys():
    hf, cfg = _hf_llama(2)
    sd = dict(hf.state_dict())
    sd.pop("model.norm.weight")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    with pytest.raises(ValueError) as err:
        TransformerLM.from_hf_llama(sd, cfg)
    message = str(err.value)
    assert "missing keys: ['model.norm.weight']" in message
    assert "unexpected keys: ['model.layers.0.self_attn.q_proj.bias']" in message
    assert "model.layers.1.mlp.up_proj.weight: checkpoint (95, 64), expected (96, 64)" in message
    with pytest.raises(ValueError, match="config is required"):
        TransformerLM.from_hf_llama(hf.state_dict())
    bad = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        ModernConfig.from_hf(bad)


# --- KV cache, trainer, interface ------------------------------------------------------------


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_cached_equals_uncached(use_sdpa):
    torch.manual_seed(8)
    model = TransformerLM(ModernConfig.tiny(vocab_size=61, context_length=32, use_sdpa=use_sdpa)).eval()
    idx = torch.randint(0, 61, (2, 15))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache()
        pieces = [model(idx[:, :6], kv_cache=cache)]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(6, 11)]
        pieces.append(model(idx[:, 11:], kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    # The cache holds n_kv_heads heads, not n_heads: that is the saving.
    assert cache[0].keys.shape == (2, model.config.n_kv_heads, 15, model.config.head_dim)
    assert model.config.kv_cache_bytes_per_token(2) == 2 * 4 * 2 * 32 * 2


def test_loss_and_validation_like_gpt():
    torch.manual_seed(9)
    model = TransformerLM(ModernConfig.tiny(vocab_size=50, context_length=16))
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.roll(-1, dims=1)
    targets[0, -1] = -100
    logits, loss = model(idx, targets)
    mask = targets != -100
    expected = F.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 3), 50))
    with pytest.raises(TypeError):
        model(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="ModernConfig"):
        TransformerLM(GPTConfig.tiny())


def test_tiny_preset_budget_close_to_gpt_tiny():
    modern = TransformerLM(ModernConfig.tiny(vocab_size=2048))
    gpt = GPT(GPTConfig.tiny(vocab_size=2048))
    # Same width and depth; the blocks' parameters within 10% of GPT's (SwiGLU at 8/3 width, GQA).
    ours = modern.num_parameters(exclude_embeddings=True) - modern.lm_head.weight.numel()
    theirs = gpt.num_parameters(exclude_embeddings=True)
    assert abs(ours - theirs) / theirs < 0.1, (ours, theirs)


def test_trainer_weight_decay_groups_and_short_run():
    model = TransformerLM(ModernConfig.tiny(vocab_size=40, context_length=16, n_layers=1))
    decay, no_decay = decay_parameter_names(model)
    assert "lm_head.weight" in decay and "model.layers.0.self_attn.k_proj.weight" in decay
    assert set(no_decay) == {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                             "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"}
    data = torch.arange(400) % 40
    history = train(model, data, data, TrainConfig(max_steps=30, batch_size=4, max_lr=1e-2, warmup_steps=2,
                                                   eval_interval=30, eval_batches=2, log_interval=10,
                                                   progress=False, device="cpu", seed=0))
    val = [r["val_loss"] for r in history if "val_loss" in r]
    assert val[-1] < val[0] - 1.0  # a periodic sequence is learnt quickly


def test_generate_with_and_without_cache_if_available():
    generate = pytest.importorskip("llm_from_scratch.generate")
    torch.manual_seed(10)
    model = TransformerLM(ModernConfig.tiny(vocab_size=61, context_length=40)).eval()
    prompt = torch.randint(0, 61, (1, 5))
    import inspect

    params = inspect.signature(generate.generate).parameters
    if "use_cache" not in params:
        pytest.skip("generate() has no use_cache switch")
    kwargs = {"max_new_tokens": 12}
    if "temperature" in params:
        kwargs["temperature"] = 0.0
    with torch.no_grad():
        cached = generate.generate(model, prompt, use_cache=True, **kwargs)
        uncached = generate.generate(model, prompt, use_cache=False, **kwargs)
    assert torch.equal(torch.as_tensor(cached), torch.as_tensor(uncached))


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_left_padding_matches_hf_llama(use_sdpa):
    # padding_mask + position_ids (left-padded batches) against HF's attention_mask + position_ids.
    hf, cfg = _hf_llama(2, seed=5)
    ours = TransformerLM.from_hf_llama(hf.state_dict(), ModernConfig.from_hf(cfg, use_sdpa=use_sdpa)).eval()
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False  # row 1: 4 pad tokens, then 6 real ones
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask.long(), position_ids=positions).logits
        logits = ours(idx, padding_mask=mask, position_ids=positions)
        alone = ours(idx[1:, 4:])  # row 1 without its padding
    torch.testing.assert_close(logits[mask], expected[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, 4:], alone[0], rtol=0, atol=1e-5)


def test_generate_padded_batch_cached_equals_uncached():
    generate = pytest.importorskip("llm_from_scratch.generate")
    if "attention_mask" not in __import__("inspect").signature(generate.generate).parameters:
        pytest.skip("generate() takes no attention_mask")
    torch.manual_seed(11)
    model = TransformerLM(ModernConfig.tiny(vocab_size=61, context_length=40)).eval()
    idx = torch.randint(1, 61, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    idx[0, :3] = 0
    with torch.no_grad():
        cached = generate.generate(model, idx, 8, temperature=0.0, attention_mask=mask, use_cache=True)
        uncached = generate.generate(model, idx, 8, temperature=0.0, attention_mask=mask, use_cache=False)
        alone = generate.generate(model, idx[0:1, 3:], 8, temperature=0.0)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[0, 3:], alone[0])


def test_loads_llama_model_without_head_when_tied():
    hf, cfg = _hf_llama(4, tie=True, seed=6)
    ours = TransformerLM.from_hf_llama(hf.model.state_dict(), cfg).eval()  # keys without "model."
    idx = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0, atol=1e-5)
