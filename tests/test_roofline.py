"""The roofline helpers against hand counts (chapter "Fast generation")."""

import math

import pytest
import torch

from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.quantize import quantize_model
from llm_from_scratch.roofline import decode_ceiling, kv_cache_bytes, read_bandwidth, weight_bytes

CONFIG = GPTConfig(vocab_size=96, context_length=16, d_model=64, n_layers=2, n_heads=4)


def _hand_counts(config: GPTConfig) -> tuple[int, int]:
    """(weights, biases) of every linear layer of a GPT, counted from the architecture by hand."""
    d, layers = config.d_model, config.n_layers
    # per block: qkv (d -> 3d), attention out (d -> d), MLP up (d -> 4d), MLP down (4d -> d)
    weights = layers * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + config.vocab_size * d  # + the output layer
    biases = layers * (3 * d + d + 4 * d + d) if config.bias else 0
    return weights, biases


def test_weight_bytes_counts_each_format_by_hand():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    weights, biases = _hand_counts(CONFIG)
    assert weight_bytes(model) == 4 * (weights + biases)  # the tied output layer once
    assert weight_bytes(quantize_model(model, "bf16")) == 2 * weights + 4 * biases
    # int8: one byte a weight, a float16 scale per group of 32 input columns, float32 biases
    assert weight_bytes(quantize_model(model, "int8", 32)) == weights + 2 * (weights // 32) + 4 * biases
    rows = CONFIG.n_layers * (3 + 1 + 4 + 1) * CONFIG.d_model + CONFIG.vocab_size  # one scale per output row
    assert weight_bytes(quantize_model(model, "int8", None)) == weights + 2 * rows + 4 * biases


def test_kv_cache_bytes_and_the_ceiling():
    assert kv_cache_bytes(CONFIG, 10) == 2 * 2 * 10 * 64 * 4
    assert kv_cache_bytes(CONFIG, 10, bytes_per_value=2) == 2 * 2 * 10 * 64 * 2
    assert kv_cache_bytes(CONFIG, 0) == 0
    assert decode_ceiling(5e8, 50e9) == pytest.approx(100.0)
    assert decode_ceiling(5e8, 50e9, batch_size=8) == pytest.approx(800.0)


def test_read_bandwidth_is_a_plausible_rate():
    rate = read_bandwidth(1 << 24, repeats=2)  # 16 MiB
    assert math.isfinite(rate) and 1e8 < rate < 1e13  # between 0.1 GB/s and 10 TB/s


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="nbytes"):
        read_bandwidth(0)
    with pytest.raises(ValueError, match="repeats"):
        read_bandwidth(1 << 20, repeats=0)
    with pytest.raises(TypeError, match="nn.Module"):
        weight_bytes("model")
    with pytest.raises(ValueError, match="length"):
        kv_cache_bytes(CONFIG, -1)
    with pytest.raises(ValueError, match="bandwidth"):
        decode_ceiling(1.0, 0.0)
