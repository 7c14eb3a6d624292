"""Quantized weights for decoding: bfloat16 and int8 linear layers, and their files.

Explained in the chapter "Fast generation" (chapters/11_fast_generation.ipynb), with the roofline
of decoding (``roofline.py``). A decode step reads every weight matrix once for a
matrix-vector product, so its speed is set by the bytes the weights take: 4 per weight in
float32, 2 in bfloat16, about 1 in int8. This module holds:

* ``quantize_int8`` / ``dequantize_int8``: symmetric absmax quantization of a weight matrix
  ``(out, in)``, one scale per group of ``group_size`` consecutive input columns of each row
  (llama.cpp's ``q8_0`` blocks of 32; ``group_size=None``: one scale per output row),

      s = max |w| / 127 over the group (stored as float16, rounded up),  q = round(w / s) in [-127, 127],

  so that ``|w - q * s| <= s / 2`` for every weight;
* ``Int8Linear`` and ``BF16Linear``: drop-in replacements of ``nn.Linear`` for inference that
  hold the weights in those formats and multiply without ever writing float32 weights to
  memory on the CPU: a small C++ kernel (``csrc/quantized_matvec.cpp``) widens them to
  float32 in registers, for up to a few token vectors at once (decoding). ``F32Linear`` keeps
  float32 weights unchanged and multiplies them with the same loops (prefetching, threads),
  so that float32 gets the same fast path as the smaller formats. Everything else (a
  long prompt, gradients, another device, no compiler) runs the plain reference:
  dequantize, then ``F.linear``. Both compute the same float32 sums up to their order;
* ``W8A8Linear`` and ``quantize_activations``: the same int8 weights multiplied by token vectors
  rounded to int8 too, in the same groups (llama.cpp's ``q8_0`` product): each group's products
  are summed in int32 and scaled once, a few instructions per 64 weights with AVX-512 VNNI;
* ``quantize_model``: a copy of a model with every ``nn.Linear`` replaced (the output layer too:
  when it is tied to the token embedding, the embedding stays float32 for the look-up and the
  output layer gets its own quantized copy), and GPT's blocks given ``DecodeBlock``'s shorter
  path for a decode step (the same operations without the modules' Python overhead: one call of
  the kernel's ``decode_block`` per block), and the weight matrices on transparent huge pages;
* ``save_quantized`` / ``load_quantized``: one safetensors file with the quantized weights,
  their scales and the model's configuration, written atomically.

The kernel is compiled on first use (about 10-30 s, with ``g++ -O3 -march=native`` and
OpenMP) into ``~/.cache/llm_from_scratch/extensions`` (``$XDG_CACHE_HOME`` is honoured), one
build per source, PyTorch version and CPU. Where that fails (no compiler, no ninja) a warning
is issued once and the reference runs instead; ``LLM_FROM_SCRATCH_NO_KERNELS=1`` skips the
kernel altogether. It does not quantize the key/value cache, train quantized weights (QLoRA), or
use GPU kernels.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import mmap
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_from_scratch.model import Block
from llm_from_scratch.utils import portable_math

logger = logging.getLogger(__name__)

#: The formats ``quantize_model`` produces ("fp32": float32 weights as they are, in the kernel's layer;
#: "w8a8": int8 weights times token vectors quantized to int8 too, llama.cpp's ``q8_0`` product).
DTYPES = ("int8", "w8a8", "bf16", "fp32")
#: Identifies a quantized model file (and its layout version) inside the safetensors metadata.
QUANTIZED_FORMAT = "llm_from_scratch.quantized/1"
#: Largest number of token vectors (rows of ``x``) the kernel multiplies; more go to the reference.
KERNEL_MAX_ROWS = 16

_FLOAT16_MAX = torch.finfo(torch.float16).max


# --------------------------------------------------------------------------------------------
# Quantizing one matrix (the reference)
# --------------------------------------------------------------------------------------------
def _check_group_size(group_size: int | None, in_features: int, where: str = "the weight") -> int:
    """The group size as an int (``None``: the whole row); ``ValueError`` when it does not divide the row."""
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None (one scale per row), got {group_size!r}")
    if in_features % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the {in_features} input features of {where}: "
            f"expected a divisor of {in_features} (e.g. 32) or None for one scale per output row"
        )
    return group_size


def quantize_int8(weight: Tensor, group_size: int | None = 32) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization of ``weight`` ``(out, in)`` in groups of ``group_size`` columns.

    Returns ``qweight`` ``(out, in)`` int8 in ``[-127, 127]`` and ``scales``
    ``(out, in // group_size)`` float16, with ``weight ~= qweight * scales`` (each scale repeated
    over its group; ``dequantize_int8``). A scale is ``max |w| / 127`` over its group, rounded
    *up* to the next float16 so that no weight needs clamping: every weight is within half a
    scale of its dequantized value. An all-zero group gets scale 1 (its weights stay 0).
    ``group_size=None``: one scale per output row. ``ValueError`` for weights that are not
    finite, too large for float16 scales, or a group size that does not divide ``in``.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a floating-point matrix (out, in), got {got}")
    out_features, in_features = weight.shape
    group_size = _check_group_size(group_size, in_features)
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)  # (out, groups, G)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or infinite values: nothing to quantize")
    absmax = w.abs().amax(dim=-1)  # (out, groups)
    scales = absmax / 127
    if float(scales.max()) > _FLOAT16_MAX:
        raise ValueError(f"weights up to {float(absmax.max()):.3g} need scales beyond float16's range ({_FLOAT16_MAX})")
    half = scales.to(torch.float16)
    # float16 rounds to nearest: where it rounded down, take the next float16 up.
    up = torch.nextafter(half, torch.tensor(float("inf"), dtype=torch.float16))
    half = torch.where(half.float() < scales, up, half)
    half = torch.where(absmax == 0, torch.ones_like(half), half)
    q = torch.round(w / half.float()[..., None]).clamp_(-127, 127)  # (out, groups, G); clamp: a no-op guard
    return q.to(torch.int8).reshape(out_features, in_features), half


def dequantize_int8(qweight: Tensor, scales: Tensor) -> Tensor:
    """``qweight`` ``(out, in)`` int8 times ``scales`` ``(out, groups)``: the float32 weight ``(out, in)``.

    Each scale multiplies its group of ``in // groups`` consecutive columns; the products are
    exact in float32 (7 bits times 11 bits).
    """
    out_features, in_features = qweight.shape
    groups = scales.size(-1)
    w = qweight.reshape(out_features, groups, in_features // groups).float() * scales.float()[..., None]
    return w.reshape(out_features, in_features)  # (out, in)


def quantize_activations(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization of activations ``x`` ``(..., in)`` per group of ``group_size``.

    Returns ``q`` ``(..., in)`` int8 in ``[-127, 127]`` and ``scales`` ``(..., in // group_size)``
    float32, with ``x ~= q * scale`` over each group: ``scale = max |x| / 127`` and
    ``q = round(x * (1 / scale))`` (to nearest even), in float32, the very arithmetic of the
    kernel's ``int8_act_linear`` (the same bytes). Unlike the weights' scales these are not
    rounded to float16 and not rounded up: ``|x - q * scale| <= scale / 2`` up to float32
    rounding. An all-zero group gets scale 0. Done afresh for every token vector of every
    product, so it must be cheap: no checks beyond the shape.
    """
    *lead, in_features = x.shape
    group_size = _check_group_size(group_size, in_features, where="the activations")
    xg = x.float().reshape(*lead, in_features // group_size, group_size)  # (..., groups, G)
    scales = xg.abs().amax(dim=-1) / 127  # (..., groups)
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round(xg * inverse[..., None]).to(torch.int8)
    return q.reshape(*lead, in_features), scales


# --------------------------------------------------------------------------------------------
# The kernel: built on first use, or the reference with a warning
# --------------------------------------------------------------------------------------------
_SOURCE = Path(__file__).parent / "csrc" / "quantized_matvec.cpp"
_kernels: Any = None  # torch.ops.llm_from_scratch_quantized once built; False when unavailable
_warned = False


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "llm_from_scratch" / "extensions"


def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags: a ``-march=native`` build is only valid on such a CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH: add the pip package's when PATH has none."""
    import shutil
    import sys

    if shutil.which("ninja"):
        return
    folders = [str(Path(sys.executable).parent)]  # a virtual environment's bin, when not activated
    try:
        import ninja  # the PyPI wheel (requirements.txt) ships the binary

        folders.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    os.environ["PATH"] = os.pathsep.join(folders + [os.environ.get("PATH", "")])


def _build_kernels() -> Any:
    from torch.utils.cpp_extension import load

    _ninja_on_path()

    source = _SOURCE.read_bytes()
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in {"x86_64", "amd64"}:
        # portable_math(): the same instructions, so the same sums, on every x86-64 CPU with AVX2
        flags.append("-march=x86-64-v3" if portable_math() else "-march=native")
    key = hashlib.sha256(source + torch.__version__.encode() + " ".join(flags).encode()
                         + _cpu_fingerprint().encode()).hexdigest()[:16]
    name = f"llm_from_scratch_quantized_{key}"
    build_dir = _cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("building the quantized matrix-vector kernels in %s (once)", build_dir)
    # The extension links the libgomp that PyTorch itself loaded (same soname): one thread pool.
    load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, build_directory=str(build_dir),
         is_python_module=False, verbose=False)
    ops = torch.ops.llm_from_scratch_quantized
    if ops.isa().startswith("avx512") and torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        raise RuntimeError(f"the kernel was built for AVX-512 but this CPU reports {torch.backends.cpu.get_cpu_capability()}")
    return ops


def kernels() -> Any:
    """The compiled ops, built on the first call; None when unavailable.

    ``int8_linear``, ``bf16_linear``, ``f32_linear`` and ``int8_act_linear`` (w8a8) multiply a few
    token vectors by a layer's weights; ``decode_block`` runs one block's decode step (``DecodeBlock``).

    Unavailable: ``LLM_FROM_SCRATCH_NO_KERNELS=1``, or the build failed (a warning says why,
    once; the layers then run their reference).
    """
    global _kernels, _warned
    if _kernels is None:
        if os.environ.get("LLM_FROM_SCRATCH_NO_KERNELS", "") not in ("", "0"):
            _kernels = False
        else:
            try:
                _kernels = _build_kernels()
            except Exception as err:  # compiler, ninja, linker, loader: any failure means "no kernel"
                _kernels = False
                if not _warned:
                    _warned = True
                    warnings.warn(f"the quantized matrix-vector kernel is not available ({type(err).__name__}: "
                                  f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); "
                                  "quantized layers use the slower reference (dequantize, then F.linear)",
                                  RuntimeWarning, stacklevel=2)
    return _kernels or None


# --------------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------------
class _QuantizedLinear(nn.Module):
    """What every format shares: shapes, bias, and the choice between the kernel and the reference."""

    #: ``False`` on an instance (or the class) sends every product to the reference.
    use_kernel: bool = True

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def dequantize(self) -> Tensor:
        """The float32 weight ``(out, in)`` these values stand for."""
        raise NotImplementedError

    def forward_reference(self, x: Tensor) -> Tensor:
        """Dequantize, then ``F.linear``: ``x`` ``(..., in)`` -> ``(..., out)`` in ``x``'s dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def _kernel_product(self, ops: Any, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(..., in)`` -> ``(..., out)``: the kernel for a few float32 CPU rows without gradients."""
        rows = x.numel() // self.in_features if self.in_features else 0
        if (self.use_kernel and 0 < rows <= KERNEL_MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
                and not (torch.is_grad_enabled() and x.requires_grad) and type(x) is Tensor):
            ops = kernels()
            if ops is not None:
                y = self._kernel_product(ops, x.reshape(rows, self.in_features).contiguous())  # (rows, out)
                return y.view(*x.shape[:-1], self.out_features)
        return self.forward_reference(x)

    #: The layer's format for the kernel's ``decode_block`` (0 fp32, 1 bf16, 2 int8, 3 w8a8), and its weight buffer.
    kind: int
    _weight_name = "weight"

    def kernel_args(self) -> tuple[int, Tensor, Tensor | None, Tensor | None]:
        """``(kind, weight, scales, bias)`` for ``decode_block``, read from the buffers directly (once per step)."""
        buffers = self._buffers
        return self.kind, buffers[self._weight_name], buffers.get("scales"), self._bias_arg()

    def _bias_arg(self) -> Tensor | None:
        bias = self._buffers["bias"]  # float32 and contiguous as made here: no conversion per product
        return bias if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()) else bias.float().contiguous()


class Int8Linear(_QuantizedLinear):
    """A linear layer with int8 weights and float16 scales per group of ``group_size`` input columns.

    Buffers: ``qweight`` ``(out, in)`` int8, ``scales`` ``(out, in // group_size)`` float16,
    ``bias`` ``(out,)`` float32 or None. Made from an ``nn.Linear`` by ``from_linear``.
    Inference only: nothing here is a trainable parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int | None = 32) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = _check_group_size(group_size, in_features)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, in_features // self.group_size, dtype=torch.float16))

    @classmethod
    def from_linear(cls, layer: nn.Linear, group_size: int | None = 32) -> Int8Linear:
        """The int8 version of ``layer`` (its weight quantized by ``quantize_int8``, its bias kept in float32)."""
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, group_size)
        new.qweight, new.scales = quantize_int8(layer.weight, new.group_size)
        if layer.bias is not None:
            new.bias = layer.bias.detach().float().clone()
        return new.to(layer.weight.device)

    def dequantize(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scales)

    kind = 2
    _weight_name = "qweight"

    def _kernel_product(self, ops: Any, x: Tensor) -> Tensor:
        return ops.int8_linear(x, self.qweight, self.scales, self._bias_arg())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


class W8A8Linear(Int8Linear):
    """``Int8Linear`` whose products quantize each token vector to int8 too (``quantize_activations``).

    The same weights, scales and files as ``Int8Linear``; each product first rounds the token
    vector to int8 in groups of ``group_size`` (the weights' groups), multiplies bytes by
    bytes, sums each group in int32 and scales it once: llama.cpp's ``q8_0`` matrix-vector
    product. With AVX-512 VNNI the kernel does that in a few instructions per 64 weights;
    the reference (``forward_reference``) quantizes and dequantizes the vector, then
    ``F.linear``. Both compute the same products of the same int8 values, so they agree up to
    the float32 rounding of the sums. The price is a second rounding, of the activations:
    the chapter "Fast generation" measures it.
    """

    def forward_reference(self, x: Tensor) -> Tensor:
        q, scales = quantize_activations(x, self.group_size)
        x_hat = dequantize_int8(q.reshape(-1, self.in_features), scales.reshape(q.numel() // self.in_features, -1))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x_hat.view(x.shape).to(x.dtype), self.dequantize().to(x.dtype), bias)

    kind = 3

    def _kernel_product(self, ops: Any, x: Tensor) -> Tensor:
        return ops.int8_act_linear(x, self.qweight, self.scales, self._bias_arg())


class _DenseLinear(_QuantizedLinear):
    """What ``BF16Linear`` and ``F32Linear`` share: one ``weight`` ``(out, in)`` in ``weight_dtype``, no scales."""

    #: The weight's dtype and the kernel op that multiplies it (set by each subclass).
    weight_dtype: torch.dtype
    kernel_op: str

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=self.weight_dtype))

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> _DenseLinear:
        """``layer`` with its weight copied in ``weight_dtype`` (bfloat16: rounded to nearest), its bias in float32."""
        new = cls(layer.in_features, layer.out_features, layer.bias is not None)
        new.weight = layer.weight.detach().to(cls.weight_dtype, copy=True).contiguous()
        if layer.bias is not None:
            new.bias = layer.bias.detach().float().clone()
        return new.to(layer.weight.device)

    def dequantize(self) -> Tensor:
        return self.weight.float()

    def _kernel_product(self, ops: Any, x: Tensor) -> Tensor:
        return getattr(ops, self.kernel_op)(x, self.weight, self._bias_arg())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BF16Linear(_DenseLinear):
    """A linear layer with bfloat16 weights (``weight`` ``(out, in)``) and a float32 bias; inference only."""

    weight_dtype = torch.bfloat16
    kernel_op = "bf16_linear"
    kind = 1


class F32Linear(_DenseLinear):
    """A linear layer with its float32 weight unchanged (``weight`` ``(out, in)``), multiplied by the kernel.

    Nothing is rounded: it is ``nn.Linear``'s function for inference, with the kernel's
    matrix-vector product for a few token vectors (the same loops as the other formats, so
    the float32 row of a benchmark measures the format, not a different product).
    """

    weight_dtype = torch.float32
    kernel_op = "f32_linear"
    kind = 0


_LAYER_TYPES = {"int8": Int8Linear, "w8a8": W8A8Linear, "bf16": BF16Linear, "fp32": F32Linear}
_GROUPED = ("int8", "w8a8")  # the formats with int8 weights and scales per group


class DecodeBlock(Block):
    """GPT's ``Block`` with a shorter path for one decode step; ``quantize_model`` gives its blocks this class.

    A decode step of a few sequences runs about a dozen small operations per layer besides the
    four products, and on the CPU their Python and dispatch cost adds up to milliseconds per
    step (microseconds per call, several times that right after the products have streamed
    their weights through the caches): a large share of a step whose products take 5-10 ms
    (the chapter "Fast generation" profiles it). For one new token per sequence after cached
    ones (no padding mask, eval mode, no gradients, at most ``KERNEL_MAX_ROWS`` float32 CPU
    rows, PyTorch's attention (``use_sdpa``), the kernel built and every linear layer a kernel
    layer) this ``forward`` hands the whole step to the kernel's ``decode_block``, which runs
    ``Block.forward``'s ATen operations in its order from C++ (and writes the new key and value
    into the cache's storage in place), so the result is the same to the last bit
    (``tests/test_quantize.py`` checks it); a step whose cache must first grow takes
    ``_short_forward``, the same steps in Python. Anything else runs ``Block.forward``.
    """

    #: ``False`` (on the class or a block) sends every step through ``Block.forward``.
    short_path: bool = True

    def forward(self, x: Tensor, *, kv_cache: Any = None, padding_mask: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        attn, mlp = self.attn, self.mlp
        layers = (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
        ops = kernels() if self.short_path else None
        if (ops is None or T != 1 or kv_cache is None or len(kv_cache) == 0 or padding_mask is not None
                or self.training or not attn.use_sdpa or B > KERNEL_MAX_ROWS or x.dtype != torch.float32
                or x.device.type != "cpu" or torch.is_grad_enabled()
                or not all(isinstance(m, _QuantizedLinear) and m.use_kernel for m in layers)):
            return super().forward(x, kv_cache=kv_cache, padding_mask=padding_mask)
        keys, values = kv_cache.storage()  # (B, n_heads, capacity, head_dim)
        length = len(kv_cache)
        if length < keys.size(2):  # room for this token: the whole step in one call of the kernel
            ln_1, ln_2 = self.ln_1._parameters, self.ln_2._parameters
            kinds, weights, scales, biases = zip(*(m.kernel_args() for m in layers), strict=True)
            y = ops.decode_block(x.contiguous(), (ln_1["weight"], ln_1["bias"], ln_2["weight"], ln_2["bias"]),
                                 (self.ln_1.eps, self.ln_2.eps), kinds, weights, scales, biases, keys, values, length,
                                 attn.n_heads, mlp.gelu.approximate)
            kv_cache.extend(1)
            return y
        return self._short_forward(ops, x, kv_cache, layers)  # the cache grows (KVCache.append) this step

    def _short_forward(self, ops: Any, x: Tensor, kv_cache: Any, layers: tuple) -> Tensor:
        """What ``decode_block`` does, in Python: for a step whose cache must grow first."""
        B, _, C = x.shape
        attn, mlp = self.attn, self.mlp
        c_attn, c_proj, c_fc, mlp_proj = layers
        H, D = attn.n_heads, attn.head_dim
        ln_1, ln_2 = self.ln_1, self.ln_2
        h = F.layer_norm(x, (C,), ln_1.weight, ln_1.bias, ln_1.eps).view(B, C)
        q, k, v = c_attn._kernel_product(ops, h).view(B, 3, H, 1, D).unbind(1)  # 3 x (B, n_heads, 1, head_dim)
        keys, values = kv_cache.append(k, v)  # (B, n_heads, past + 1, head_dim)
        y = F.scaled_dot_product_attention(q, keys, values)  # one query sees every cached key: no mask
        x = x + c_proj._kernel_product(ops, y.reshape(B, C)).view(B, 1, C)
        h = F.layer_norm(x, (C,), ln_2.weight, ln_2.bias, ln_2.eps).view(B, C)
        h = F.gelu(c_fc._kernel_product(ops, h), approximate=mlp.gelu.approximate)
        return x + mlp_proj._kernel_product(ops, h).view(B, 1, C)


def _short_decode_blocks(model: nn.Module) -> None:
    """Give GPT's blocks (exactly ``Block``, not subclasses) the ``DecodeBlock`` class, in place."""
    for module in model.modules():
        if type(module) is Block:
            module.__class__ = DecodeBlock


# --------------------------------------------------------------------------------------------
# Huge pages for the weights
# --------------------------------------------------------------------------------------------
_HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page


def _huge_page_copy(t: Tensor) -> Tensor:
    """``t`` copied into fresh memory that Linux is asked to back with 2 MiB pages; ``t`` itself elsewhere.

    A product streams its weights through the caches once per step. With 4 KiB pages that is a
    page-table walk every 4 KiB, and the CPU's own prefetcher stops at every page boundary;
    with 2 MiB pages (transparent huge pages: ``madvise`` on an anonymous mapping not yet
    touched) the float32 kernel reads the same bytes about 8% faster on the course's machine
    (``benchmarks/RESULTS.md``). Where the system says no (another OS, THP off) the copy
    simply has ordinary pages: the values are the same either way.
    """
    nbytes = t.numel() * t.element_size()
    if (sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE") or t.device.type != "cpu"
            or nbytes < _HUGE_PAGE or not t.is_contiguous()):
        return t
    length = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE + _HUGE_PAGE  # whole huge pages, and room to align the start
    memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # untouched (shared memory: no THP)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # THP unavailable: ordinary pages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(memory, dtype=torch.uint8)  # (length,), keeps the mapping alive
    start = -raw.data_ptr() % _HUGE_PAGE
    return raw[start:start + nbytes].view(t.dtype).view(t.shape).copy_(t)


def _weights_on_huge_pages(model: nn.Module) -> None:
    """Move every kernel layer's weight matrix (``qweight`` or ``weight``) onto huge pages, in place."""
    for module in model.modules():
        if isinstance(module, _QuantizedLinear):
            name = module._weight_name
            setattr(module, name, _huge_page_copy(getattr(module, name)))


# --------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------
def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    from llm_from_scratch.lora import LoRALinear

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, _QuantizedLinear):
            raise ValueError(f"the model is already quantized ({name}: {type(module).__name__}): "
                             "quantize the float32 model, not a quantized one")
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} holds a LoRA adapter: merge it first (lora.merge_lora), then quantize")
        if isinstance(module, nn.Linear):
            layers.append((name, module))
    return layers


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def quantize_model(model: nn.Module, dtype: str = "int8", group_size: int | None = 32, *,
                   inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace=True``) whose ``nn.Linear`` layers hold quantized weights.

    ``dtype="int8"``: ``Int8Linear`` layers, scales per group of ``group_size`` input columns
    (``None``: one per output row); ``"w8a8"``: ``W8A8Linear`` layers, the same int8 weights
    with each token vector quantized to int8 in the same groups for the product; ``"bf16"``: ``BF16Linear`` layers; ``"fp32"``: ``F32Linear``
    layers, the float32 weights unchanged in the kernel's layer (``group_size`` unused by both).
    Embeddings, layer norms and biases stay float32, so a tied output layer gets its own
    quantized copy of the embedding. GPT's blocks become ``DecodeBlock`` (the same function, a
    shorter path for a decode step). The result works with ``generate.generate`` and
    ``stream_generate`` as it is and is in eval mode; it is for inference (no gradients reach
    the quantized weights). ``model.quantization`` records ``{"dtype", "group_size"}``.

    Raises ``TypeError`` for something that is not an ``nn.Module`` and ``ValueError`` for an
    unknown ``dtype``, a ``group_size`` that does not divide some layer's input width (naming
    the layer), a model that is already quantized, or one with an unmerged LoRA adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_dtype(dtype)
    layers = _linear_layers(model)
    if dtype in _GROUPED:
        for name, layer in layers:
            _check_group_size(group_size, layer.in_features, where=f"layer {name!r}")
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    if not inplace:
        model = copy.deepcopy(model)  # keeps tied weights tied in the copy
        layers = _linear_layers(model)
    with torch.no_grad():
        for name, layer in layers:
            layer_type = _LAYER_TYPES[dtype]
            new = layer_type.from_linear(layer, group_size) if dtype in _GROUPED else layer_type.from_linear(layer)
            _set_submodule(model, name, new)
    _short_decode_blocks(model)
    _weights_on_huge_pages(model)
    model.quantization = {"dtype": dtype, "group_size": group_size if dtype in _GROUPED else None}
    return model.eval()


def _empty_quantized(model: nn.Module, quantization: dict[str, Any]) -> nn.Module:
    """``model`` with every ``nn.Linear`` replaced by an empty quantized layer of its shape (for loading)."""
    dtype, group_size = _check_dtype(quantization["dtype"]), quantization.get("group_size")
    for name, layer in _linear_layers(model):
        bias = layer.bias is not None
        new = (_LAYER_TYPES[dtype](layer.in_features, layer.out_features, bias, group_size) if dtype in _GROUPED
               else _LAYER_TYPES[dtype](layer.in_features, layer.out_features, bias))
        _set_submodule(model, name, new)
    _short_decode_blocks(model)
    model.quantization = dict(quantization)
    return model


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, path: str | os.PathLike, *, tokenizer: dict[str, str] | None = None) -> Path:
    """Write a model from ``quantize_model`` to one safetensors file, atomically (temporary file, then rename).

    Tensors: the state dict (``model.*``: int8 weights with their float16 scales, or bfloat16
    weights, and every float32 tensor; a tied tensor once). Metadata (JSON): the format, the
    model's class and configuration, the quantization, the tokenizer fingerprint and a sha256
    of the tensors, as in training checkpoints (``checkpoint.py``). ``load_quantized`` reads it.
    """
    from safetensors.torch import save as st_save

    from llm_from_scratch.checkpoint import _model_config_dict, _tensor_digest, _unwrap
    from llm_from_scratch.utils import atomic_write_bytes

    inner = _unwrap(model)
    quantization = getattr(inner, "quantization", None)
    if not isinstance(quantization, dict) or not any(isinstance(m, _QuantizedLinear) for m in inner.modules()):
        raise ValueError("model is not quantized: call quantize_model first")
    config = _model_config_dict(inner)
    if config is None:
        raise ValueError(f"{type(inner).__name__} has no config: load_quantized could not rebuild it")
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in inner.state_dict(keep_vars=True).items():
        if t.numel() and id(t) in seen:
            aliases[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[f"model.{name}"] = t.detach().contiguous().cpu()
    meta = {
        "format": QUANTIZED_FORMAT,
        "model_class": type(inner).__name__,
        "model_config": config,
        "quantization": quantization,
        "aliases": aliases,
        "tokenizer": tokenizer,
        "tensors_sha256": _tensor_digest(tensors),
    }
    path = Path(path)
    atomic_write_bytes(path, st_save(tensors, metadata={"llm_from_scratch": json.dumps(meta)}))
    return path


def read_quantized_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a file written by ``save_quantized``; None for any other safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["llm_from_scratch"])
    except Exception:  # not safetensors, or no metadata of ours
        return None
    return meta if meta.get("format") == QUANTIZED_FORMAT else None


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model saved by ``save_quantized``, in eval mode, and the file's metadata.

    The model class comes from the registry (``registry.MODEL_CLASSES``) by the name the file
    records. ``FileNotFoundError`` when there is no file; ``ValueError`` for a file that is not
    a quantized model, or whose tensors do not match their recorded sha256 (corrupt).
    """
    from safetensors.torch import load_file

    from llm_from_scratch.checkpoint import _tensor_digest
    from llm_from_scratch.registry import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model at {path}")
    meta = read_quantized_metadata(path)
    if meta is None:
        raise ValueError(f"{path} is not a quantized model (format {QUANTIZED_FORMAT!r}); see save_quantized")
    tensors = load_file(str(path))
    if _tensor_digest(tensors) != meta["tensors_sha256"]:
        raise ValueError(f"{path} is corrupt: the tensors' sha256 does not match the one recorded when it was written")
    model = _empty_quantized(build_model(meta["model_class"], meta["model_config"]), meta["quantization"])
    state = {k.removeprefix("model."): v for k, v in tensors.items()}
    for alias, target in meta["aliases"].items():
        state[alias] = state[target]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit its recorded model: {err}") from None
    model = model.to(device).eval()
    _weights_on_huge_pages(model)  # CPU tensors only
    return model, meta


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def _cmd_quantize(args) -> int:
    from llm_from_scratch.generate import load_model

    model, meta = load_model(args.checkpoint)
    model = quantize_model(model, args.dtype, None if args.group_size == 0 else args.group_size, inplace=True)
    path = save_quantized(model, args.out, tokenizer=meta.get("tokenizer"))
    size = path.stat().st_size
    print(f"{path}: {size / 1e6:.1f} MB, {args.dtype} weights; "
          f"generate with: python -m llm_from_scratch generate --checkpoint {path}")
    return 0


def add_quantize_parser(subparsers) -> None:
    """Register ``quantize`` on the ``subparsers`` of ``python -m llm_from_scratch``."""
    p = subparsers.add_parser("quantize", help="write a checkpoint's model with int8, bfloat16 or kernel-layer float32 weights",
                              description="Quantize a training checkpoint's model and save it (safetensors).")
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder (or its checkpoint.safetensors)")
    p.add_argument("--dtype", choices=DTYPES, default="int8",
                   help="int8 (scales per group), w8a8 (int8 weights, token vectors quantized in the same groups), "
                        "bf16, or fp32 (the weights unchanged, for the kernel's float32 layer)")
    p.add_argument("--group-size", type=int, default=32, help="int8, w8a8: weights per scale (0: one scale per row)")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.set_defaults(func=_cmd_quantize, parser=p)
