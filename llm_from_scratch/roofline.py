"""The roofline of decoding: the bytes one generated token reads, the machine's read bandwidth, the ceiling.

Explained in the chapter "Fast generation" (chapters/11_fast_generation.ipynb). A decode step
multiplies one token vector per sequence by every weight matrix: two floating-point operations
per weight read, far fewer than a CPU (or a GPU) can do per byte it loads from memory. So the
step takes at least ``bytes read / read bandwidth`` seconds, and ``batch * bandwidth / bytes``
tokens per second is a ceiling no implementation passes (Williams et al., 2009).

* ``read_bandwidth``: the bytes per second a ``torch.sum`` reads from a large float32 buffer,
  on PyTorch's threads: what the memory system delivers to a simple streaming read;
* ``weight_bytes``: the bytes of the weight matrices a step reads, each in its own format
  (float32, bfloat16, int8 with its scales), as ``quantize.quantize_model`` stores them;
* ``kv_cache_bytes``: the bytes of keys and values one sequence's step reads at a position;
* ``decode_ceiling``: tokens per second at the roofline.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from llm_from_scratch.model import GPTConfig


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second that ``torch.sum`` reads from a float32 buffer of ``nbytes`` (best of ``repeats``).

    The buffer should be much larger than the CPU's caches (the default, 1 GiB, is), or the
    number measures the caches. Runs on PyTorch's current number of threads.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 4:
        raise ValueError(f"nbytes must be an int >= 4 (bytes of the buffer), got {nbytes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    x = torch.ones(nbytes // 4)
    x.sum()  # touch every page once before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weight matrices one decode step reads: every linear layer's weight and bias.

    A float32 ``nn.Linear`` counts 4 bytes per weight; the layers of ``quantize.quantize_model``
    count the tensors they hold (bfloat16 weights: 2 bytes; int8: 1 byte plus a float16 scale
    per group). A weight tied to the token embedding counts once, as the output layer's: the
    embedding look-up reads one row per token. Layer norms and position embeddings are not
    counted (a few kilobytes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            tensors = [module.weight] + ([module.bias] if module.bias is not None else [])
        elif callable(getattr(module, "dequantize", None)):  # a quantized linear layer: its buffers
            tensors = list(module.buffers(recurse=False))
        else:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def kv_cache_bytes(config: GPTConfig, length: int, *, bytes_per_value: int = 4) -> int:
    """Bytes of cached keys and values that one sequence's decode step reads at position ``length``.

    Every layer reads a key and a value vector of ``d_model`` numbers for each of the ``length``
    earlier positions: ``2 * n_layers * length * d_model * bytes_per_value``.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0 (cached positions), got {length!r}")
    return 2 * config.n_layers * length * config.d_model * bytes_per_value


def decode_ceiling(step_bytes: float, bandwidth: float, batch_size: int = 1) -> float:
    """Tokens per second at the roofline: ``batch_size`` tokens per step of ``step_bytes`` read at ``bandwidth``."""
    if not step_bytes > 0 or not bandwidth > 0:
        raise ValueError(f"step_bytes and bandwidth must be > 0, got {step_bytes!r} and {bandwidth!r}")
    return batch_size * bandwidth / step_bytes
