"""``Linear`` (oneDNN products on the CPU) against ``F.linear`` in float64 and float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from llm_from_scratch.linear import ONEDNN_AVAILABLE, Linear, linear, runs_on_onednn, set_onednn
from llm_from_scratch.model import GPT, GPTConfig

needs_onednn = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="PyTorch without oneDNN, or not an x86-64 CPU")


def onednn_calls(fn) -> int:
    """How many oneDNN linear products ``fn()`` ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


def reference(x, weight, bias, grad_out):
    """Output and gradients of ``F.linear`` computed in float64."""
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    out = F.linear(x64, w64, b64)
    grads = torch.autograd.grad(out, [t for t in (x64, w64, b64) if t is not None], grad_out.double())
    return out, grads


@pytest.mark.parametrize("shape,in_features,out_features,bias,transposed", [
    ((37,), 64, 48, True, False),  # (N, in)
    ((3, 29), 96, 160, True, False),  # (B, T, in)
    ((2, 3, 5), 32, 8, False, False),  # more leading dimensions, no bias
    ((41,), 64, 48, True, True),  # a non-contiguous input (a transposed view)
])
def test_linear_matches_float64_reference(shape, in_features, out_features, bias, transposed):
    g = torch.Generator().manual_seed(0)
    if transposed:
        x = torch.randn(in_features, *shape, generator=g).t().requires_grad_()
        assert not x.is_contiguous()
    else:
        x = torch.randn(*shape, in_features, generator=g).requires_grad_()
    layer = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=g))
    grad_out = torch.randn(*shape, out_features, generator=g)

    out = layer(x)
    grads = torch.autograd.grad(out, [t for t in (x, layer.weight, layer.bias) if t is not None], grad_out)
    ref_out, ref_grads = reference(x, layer.weight, layer.bias, grad_out)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-4)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_forward_and_both_backward_products_run_on_onednn():
    layer = Linear(64, 32)
    x = torch.randn(4, 10, 64, requires_grad=True)
    assert onednn_calls(lambda: layer(x).sum().backward()) == 3  # x @ W.T, grad @ W, grad.T @ x
    x_no_grad = torch.randn(4, 10, 64)
    assert onednn_calls(lambda: layer(x_no_grad).sum().backward()) == 2  # no gradient for x
    with torch.no_grad():
        assert onednn_calls(lambda: layer(x)) == 1
    layer.use_onednn = False  # the switch the chapter and the benchmarks use
    assert onednn_calls(lambda: layer(x).sum().backward()) == 0


@needs_onednn
def test_other_dtypes_autocast_and_shapes_go_to_f_linear():
    layer = Linear(16, 8)
    x = torch.randn(3, 16)
    assert runs_on_onednn(x, layer.weight, layer.bias)
    assert not runs_on_onednn(x.double(), layer.weight.double())
    assert not runs_on_onednn(x[0], layer.weight)  # one vector: F.linear
    assert not runs_on_onednn(x[:0], layer.weight)  # an empty batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs_on_onednn(x, layer.weight)
        assert onednn_calls(lambda: layer(x)) == 0
        assert layer(x).dtype == torch.bfloat16  # autocast applies, as for nn.Linear
    torch.testing.assert_close(layer(x[0]), F.linear(x[0], layer.weight, layer.bias))
    assert layer(x[:0]).shape == (0, 8)
    layer64 = Linear(16, 8).double()
    torch.testing.assert_close(layer64(x.double()), F.linear(x.double(), layer64.weight, layer64.bias), rtol=0, atol=0)


def test_linear_is_an_nn_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    ours = Linear(12, 5)
    torch.manual_seed(0)
    theirs = nn.Linear(12, 5)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)  # same initialisation from the same seed
    x = torch.randn(2, 12)
    torch.testing.assert_close(linear(x, ours.weight, ours.bias), theirs(x), rtol=1e-6, atol=1e-6)


def test_gpt_training_step_matches_f_linear():
    """A GPT (tied output layer) gives the same loss and gradients with oneDNN products as with F.linear."""
    config = GPTConfig(vocab_size=97, context_length=16, d_model=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))

    def loss_and_grads(use_onednn: bool):
        set_onednn(model, use_onednn)
        model.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss_ref, grads_ref = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
