"""Tests for llm_from_scratch.model against Hugging Face transformers' GPT-2 (offline, random weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from llm_from_scratch.model import GPT, GPTConfig, count_parameters, estimate_flops_per_token

SMALL_CONFIGS = [
    dict(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4),
    dict(vocab_size=257, n_positions=16, n_embd=64, n_layer=3, n_head=2),
    dict(vocab_size=50, n_positions=24, n_embd=24, n_layer=1, n_head=3),
]


def _hf_model(seed: int, **sizes) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        **sizes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager"
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF zero-inits biases and sets LN to (1, 0): randomise everything
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _our_config(sizes: dict, **kw) -> GPTConfig:
    return GPTConfig(
        vocab_size=sizes["vocab_size"],
        context_length=sizes["n_positions"],
        d_model=sizes["n_embd"],
        n_layers=sizes["n_layer"],
        n_heads=sizes["n_head"],
        **kw,
    )


def _embedding_grad(model, wte, idx, targets):
    store = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        store["emb"] = output

    handle = wte.register_forward_hook(hook)
    try:
        out = model(idx, labels=targets) if isinstance(model, GPT2LMHeadModel) else model(idx, targets)
    finally:
        handle.remove()
    loss = out.loss if isinstance(model, GPT2LMHeadModel) else out[1]
    loss.backward()
    return loss, store["emb"].grad


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("sizes", SMALL_CONFIGS)
def test_logits_and_gradients_match_hf(sizes, use_sdpa):
    hf = _hf_model(0, **sizes)
    ours = GPT.from_hf_gpt2(hf.state_dict(), _our_config(sizes, use_sdpa=use_sdpa)).eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, sizes["vocab_size"], (2, sizes["n_positions"]), generator=g)
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == (2, sizes["n_positions"], sizes["vocab_size"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # Loss: HF shifts labels inside; ours takes next-token targets, -100 ignored in both.
    targets = idx.clone()
    targets[0, 5] = -100
    hf_loss, hf_grad = _embedding_grad(hf, hf.transformer.wte, idx, targets)
    shifted = torch.cat([targets[:, 1:], torch.full((2, 1), -100)], dim=1)
    our_loss, our_grad = _embedding_grad(ours, ours.transformer.wte, idx, shifted)
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, hf_grad, rtol=1e-4, atol=1e-7)
    # parameter gradients too, through the transposes
    torch.testing.assert_close(
        ours.transformer.h[0].attn.c_attn.weight.grad, hf.transformer.h[0].attn.c_attn.weight.grad.t(),
        rtol=1e-4, atol=1e-7,
    )


def test_load_from_safetensors_folder_and_gpt2model(tmp_path):
    sizes = SMALL_CONFIGS[0]
    hf = _hf_model(2, **sizes)
    hf.save_pretrained(tmp_path)  # model.safetensors (tied lm_head left out) + config.json
    ours = GPT.from_hf_gpt2(tmp_path).eval()  # config from config.json
    assert ours.config == _our_config(sizes)
    ours_file = GPT.from_hf_gpt2(tmp_path / "model.safetensors", _our_config(sizes)).eval()
    body = GPT2Model(hf.config)
    body.load_state_dict(hf.transformer.state_dict())
    ours_body = GPT.from_hf_gpt2(body.state_dict(), _our_config(sizes)).eval()  # keys without "transformer."
    idx = torch.randint(0, sizes["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(idx).logits
        for model in (ours, ours_file, ours_body):
            torch.testing.assert_close(model(idx), expected, rtol=0, atol=1e-5)


def test_gpt2_small_infers_config_from_shapes():
    hf_sd = GPT2LMHeadModel(GPT2Config(n_layer=1)).state_dict()  # GPT-2 small sizes, one layer
    ours = GPT.from_hf_gpt2(hf_sd)
    assert (ours.config.n_heads, ours.config.d_model, ours.config.n_layers) == (12, 768, 1)


def test_parameter_counts():
    for sizes in SMALL_CONFIGS:
        hf = GPT2LMHeadModel(GPT2Config(**sizes))
        cfg = _our_config(sizes)
        assert GPT(cfg).num_parameters() == sum(p.numel() for p in hf.parameters()) == count_parameters(cfg)
        untied = GPTConfig(**{**cfg.__dict__, "tie_weights": False})
        assert GPT(untied).num_parameters() == count_parameters(untied) == count_parameters(cfg) + cfg.vocab_size * cfg.d_model
    assert count_parameters(GPTConfig.gpt2_small()) == 124_439_808
    # 124,439,808 by hand: embeddings + 12 blocks + final norm
    d, V, T = 768, 50257, 1024
    assert V * d + T * d + 12 * (12 * d * d + 13 * d) + 2 * d == 124_439_808


def test_gpt2_small_parameter_count_from_model():
    assert GPT(GPTConfig.gpt2_small()).num_parameters() == 124_439_808


def test_weight_tying_and_init():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, context_length=64, d_model=256, n_layers=8, n_heads=4)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    untied = GPT(GPTConfig(**{**cfg.__dict__, "tie_weights": False}))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    residual = torch.cat([
        torch.cat([b.attn.c_proj.weight.flatten(), b.mlp.c_proj.weight.flatten()]) for b in model.transformer.h
    ])
    other = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    torch.testing.assert_close(residual.std().item(), 0.02 / math.sqrt(2 * 8), rtol=0.02, atol=0)
    torch.testing.assert_close(other.std().item(), 0.02, rtol=0.02, atol=0)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_untrained_loss_is_near_log_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1000, context_length=32, d_model=64, n_layers=2, n_heads=4)).eval()
    idx = torch.randint(0, 1000, (4, 32))
    targets = torch.randint(0, 1000, (4, 32))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 32, 1000)
    assert abs(loss.item() - math.log(1000)) < 0.1


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_kv_cache_logits_match_uncached(use_sdpa):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=16, d_model=32, n_layers=2, n_heads=4, use_sdpa=use_sdpa))
    model.eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache()
        steps = [model(idx[:, :5], kv_cache=cache)] + [model(idx[:, t : t + 1], kv_cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert len(cache[0]) == 12
    with pytest.raises(ValueError, match="context_length=16"):
        model(idx[:, :5], kv_cache=cache)


def test_flops_per_token():
    cfg = GPTConfig.gpt2_small()
    n = 124_439_808 - 1024 * 768
    assert estimate_flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024
    assert estimate_flops_per_token(cfg, training=False, seq_len=1) == 2 * n + 4 * 12 * 768


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        GPTConfig(n_layers=0)
    model = GPT(GPTConfig(vocab_size=50, context_length=8, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="longer than context_length=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="batch, tokens"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_bad_state_dicts():
    sizes = SMALL_CONFIGS[0]
    cfg = _our_config(sizes)
    sd = dict(_hf_model(0, **sizes).state_dict())
    broken = dict(sd)
    del broken["transformer.h.1.mlp.c_fc.bias"]
    broken["transformer.h.7.attn.c_attn.weight"] = torch.zeros(3)
    broken["transformer.h.0.attn.c_proj.weight"] = torch.zeros(48, 40)
    with pytest.raises(ValueError) as err:
        GPT.from_hf_gpt2(broken, cfg)
    message = str(err.value)
    assert "missing keys: ['transformer.h.1.mlp.c_fc.bias']" in message
    assert "unexpected keys: ['transformer.h.7.attn.c_attn.weight']" in message
    assert "mis-shaped keys: ['transformer.h.0.attn.c_proj.weight" in message
    with pytest.raises(ValueError, match="mis-shaped"):
        GPT.from_hf_gpt2(sd, GPTConfig(**{**cfg.__dict__, "vocab_size": 100}))
    with pytest.raises(TypeError):
        GPT.from_hf_gpt2(42)


def test_unsupported_hf_configs_are_refused(tmp_path):
    sizes = SMALL_CONFIGS[2]
    _hf_model(0, **sizes).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        GPT.from_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_inner": 7}))
    with pytest.raises(ValueError, match="n_inner=7"):
        GPT.from_hf_gpt2(tmp_path)
    with pytest.raises(ValueError, match="no safetensors file"):
        GPT.from_hf_gpt2(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="cannot infer n_heads"):
        GPT.from_hf_gpt2(tmp_path / "model.safetensors")  # d_model 24 is no GPT-2 size, and no config.json


def test_hidden_then_output_layer_is_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(n_layers=2)).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        hidden = model.hidden(idx)
        assert hidden.shape == (2, 9, model.config.d_model)
        assert torch.equal(model.lm_head(hidden), model(idx))
