"""``Linear``: ``nn.Linear`` whose float32 products on the CPU run on oneDNN.

Explained in the chapter "Pre-training" (chapters/05_pretraining.ipynb), section "Where the
time goes". A training step of a GPT is mostly matrix products: those of its linear layers,
forward (``x @ W.T``) and backward (``grad @ W`` for the input, ``grad.T @ x`` for the weight).
On the CPU, ``nn.Linear`` hands them to PyTorch's BLAS, Intel's MKL, which on the AMD
processors of the course's machines runs its AVX2 code path (about 110 GFLOP/s per core). PyTorch
ships a second CPU math library, oneDNN (its compiler's), whose kernels use the AVX-512 units
when the processor has them: about 200 GFLOP/s on the same core (``benchmarks/matmul.py``). On
processors without AVX-512 the two are about equally fast.

``Linear`` is ``nn.Linear`` in every other respect (parameters, initialisation, state dict,
``isinstance``): only where its product runs changes. The products are the same float32 sums
taken in another order, so results differ from ``F.linear``'s by rounding (about 1e-6 relative,
like running on another number of threads). Anything else goes to ``F.linear``: other devices and
dtypes, autocast, ``torch.compile`` (whose compiler chooses for itself), tensor subclasses
(``DTensor``), a PyTorch built without oneDNN, and processors that are not x86-64.

It does not fuse anything into the product nor lower its precision. With
``LLM_FROM_SCRATCH_PORTABLE=1`` (``utils.portable_math``: the same bits on every x86-64 CPU, for
the course's tests) every product goes to ``F.linear``.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from llm_from_scratch.utils import portable_math

#: oneDNN is built into this PyTorch, exposes the product ``Linear`` calls, and the CPU is x86-64.
ONEDNN_AVAILABLE: bool = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and platform.machine().lower() in {"x86_64", "amd64"}
)


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T (+ bias)`` on oneDNN: ``x`` ``(..., in)``, ``weight`` ``(out, in)`` -> ``(..., out)``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with the forward and both backward products on oneDNN."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _product(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad_out, weight.t(), None)  # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
            if ctx.needs_input_grad[1]:
                x_2d = x.reshape(-1, x.shape[-1])  # (N, in)
                # oneDNN copies a transposed first operand into a contiguous one: let it be the smaller.
                if grad_2d.shape[1] > x_2d.shape[1]:  # more outputs than inputs
                    grad_weight = _product(x_2d.t(), grad_2d.t(), None).t().contiguous()  # ((in, N) @ (N, out)).T
                else:
                    grad_weight = _product(grad_2d.t(), x_2d.t(), None)  # (out, N) @ (N, in) -> (out, in)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_2d.sum(0)  # (out,)
        return grad_x, grad_weight, grad_bias


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) in (Tensor, nn.Parameter)


def runs_on_onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``linear(x, weight, bias)`` runs on oneDNN (see the module's docstring)."""
    return (
        ONEDNN_AVAILABLE
        and not portable_math()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.dim() >= 2
        and x.numel() > 0
        and _plain(x) and _plain(weight) and _plain(bias)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN where ``runs_on_onednn`` says so.

    ``x`` ``(..., in)``, ``weight`` ``(out, in)``, ``bias`` ``(out,)`` -> ``(..., out)``.
    """
    if not runs_on_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _product(x, weight, bias)  # nothing to differentiate: skip the autograd node


class Linear(nn.Linear):
    """``nn.Linear`` whose float32 CPU products (forward and backward) run on oneDNN.

    ``use_onednn = False`` on an instance (``set_onednn(model, False)`` for a whole model) sends
    its products back to ``F.linear``, to compare the two. See the module's docstring.
    """

    use_onednn: bool = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.use_onednn:
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


def set_onednn(model: nn.Module, enabled: bool) -> nn.Module:
    """Set ``use_onednn`` on every ``Linear`` of ``model`` (to compare the two libraries); returns ``model``."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.use_onednn = enabled
    return model
