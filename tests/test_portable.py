"""Portable mode (``llm_from_scratch.utils.portable_math``): what ``make nbval`` and ``make execute`` run under.

The committed chapter outputs are reproduced in CI on whichever x86-64 CPU it gets, Intel or AMD,
only if every float32 product and reduction runs the same instructions in the same order. These
tests check the switches: the Makefile sets the same variables as the package documents, and in
that mode the package's own fast paths step aside (``Linear`` gives ``F.linear``'s bits, the
kernels are built for x86-64-v3).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from llm_from_scratch.utils import PORTABLE_ENV, PORTABLE_MATH_ENV, portable_math

ROOT = Path(__file__).resolve().parent.parent
X86 = platform.machine().lower() in {"x86_64", "amd64"}


def _makefile_portable() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = re.search(r"^PORTABLE := (.*)$", text, re.M)
    assert line, "the Makefile defines PORTABLE"
    return dict(item.split("=", 1) for item in line.group(1).split())


def test_makefile_sets_what_the_package_documents():
    assert _makefile_portable() == {PORTABLE_ENV: "1", **PORTABLE_MATH_ENV}


def test_portable_math_reads_the_variable(monkeypatch):
    monkeypatch.setenv(PORTABLE_ENV, "1")
    assert portable_math()
    for value in ("", "0", "yes"):
        monkeypatch.setenv(PORTABLE_ENV, value)
        assert not portable_math()


_PROBE = r"""
import json, torch, torch.nn.functional as F
from llm_from_scratch.linear import Linear, runs_on_onednn
torch.manual_seed(0)
layer = Linear(64, 96)
x = torch.randn(5, 7, 64, requires_grad=True)
y = layer(x)
y.square().sum().backward()
ref_x = x.detach().clone().requires_grad_()
ref_w = layer.weight.detach().clone().requires_grad_()
ref_b = layer.bias.detach().clone().requires_grad_()
ref = F.linear(ref_x, ref_w, ref_b)
ref.square().sum().backward()
print(json.dumps({
    "capability": torch.backends.cpu.get_cpu_capability(),
    "onednn": runs_on_onednn(x, layer.weight, layer.bias),
    "same_output": bool(torch.equal(y, ref)),
    "same_grads": bool(torch.equal(x.grad, ref_x.grad) and torch.equal(layer.weight.grad, ref_w.grad)
                       and torch.equal(layer.bias.grad, ref_b.grad)),
}))
"""


@pytest.mark.skipif(not X86, reason="portable mode pins x86-64 code paths")
def test_in_portable_mode_linear_is_f_linear_bit_for_bit():
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("the CPU has no AVX2")
    env = {**os.environ, PORTABLE_ENV: "1", **PORTABLE_MATH_ENV}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"capability": "AVX2", "onednn": False, "same_output": True, "same_grads": True}


def test_kernels_are_built_for_x86_64_v3_in_portable_mode(monkeypatch):
    import llm_from_scratch.quantize as quantize

    seen = {}

    def fake_load(name, sources, extra_cflags, **kwargs):
        seen["flags"] = extra_cflags
        raise RuntimeError("stop before compiling")

    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    monkeypatch.setattr(quantize.platform, "machine", lambda: "x86_64")
    for value, march in (("1", "-march=x86-64-v3"), ("", "-march=native")):
        monkeypatch.setenv(PORTABLE_ENV, value)
        with pytest.raises(RuntimeError, match="stop before compiling"):
            quantize._build_kernels()
        assert march in seen["flags"], (value, seen["flags"])


def _notebook(path: Path, outputs: dict[str, str], timing: set[str]) -> None:
    nb = nbformat.v4.new_notebook()
    for cell_id, text in outputs.items():
        cell = nbformat.v4.new_code_cell(f"print({cell_id!r})")
        cell.id = cell_id
        cell.metadata["tags"] = ["timing"] if cell_id in timing else []
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        nb.cells.append(cell)
    nbformat.write(nb, path)


def _texts(path: Path) -> dict[str, str]:
    return {c.id: c.outputs[0]["text"] for c in nbformat.read(path, as_version=4).cells}


@pytest.mark.parametrize("take_tagged, expected", [
    (False, {"a": "new a", "t": "old t"}),   # make execute: the measured timing stays
    (True, {"a": "old a", "t": "new t"}),    # make timings: only the timing cell is new
])
def test_merge_outputs_keeps_the_right_cells(tmp_path, take_tagged, expected):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import execute_notebooks
    finally:
        sys.path.pop(0)
    old, new = tmp_path / "old.ipynb", tmp_path / "new.ipynb"
    _notebook(old, {"a": "old a", "t": "old t"}, {"t"})
    _notebook(new, {"a": "new a", "t": "new t"}, {"t"})
    execute_notebooks.merge_outputs(new, nbformat.read(old, as_version=4), "timing", take_tagged)
    assert _texts(new) == expected


def test_speedrun_trains_in_float32_on_any_cpu_in_portable_mode(monkeypatch):
    import torch

    from llm_from_scratch import speedrun

    monkeypatch.setattr(speedrun, "cpu_supports_bf16", lambda: True)
    monkeypatch.setenv(PORTABLE_ENV, "")
    assert speedrun.resolve_precision("auto", "cpu") is torch.bfloat16
    monkeypatch.setenv(PORTABLE_ENV, "1")
    assert speedrun.resolve_precision("auto", "cpu") is None
    assert speedrun.resolve_precision("bf16", "cpu") is torch.bfloat16  # asked for explicitly: kept


# The unary operations that ATen hands to MKL's vector maths (``vml.h`` in PyTorch's source; a
# profile of each shows ``mkl_vml_kernel_s<Op>_...``). MKL picks their code by processor and
# MKL_CBWR does not pin it: on an AMD EPYC ``torch.sqrt`` runs ``mkl_vml_kernel_sSqrt_EXHAynn``
# whatever MKL_CBWR says, and 15% of its results differ from the correctly rounded square root,
# so an Intel processor (another kernel) rounds differently. In a training step that last bit
# becomes another model, so no trainer of a GPT may call them on its way.
MKL_VECTOR_MATH = {"acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "log", "log10", "log2", "sin",
                   "sqrt", "tan", "tanh", "trunc"}


def _ops_called(fn) -> set[str]:
    """The ATen operations (base names: ``aten.sqrt.default`` -> ``sqrt``) that ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func._schema.name.split("::")[-1].rstrip("_"))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_the_probe_sees_mkl_vector_maths():
    import torch

    x = torch.rand(8)
    assert _ops_called(lambda: (x.sqrt(), x.log(), torch.tanh(x))) >= {"sqrt", "log", "tanh"}
    # an unfused AdamW step takes the square root through torch.sqrt
    p = torch.nn.Parameter(torch.rand(4))
    p.grad = torch.rand(4)
    assert "sqrt" in _ops_called(torch.optim.AdamW([p], foreach=False).step)


def test_fine_tuning_steps_call_no_mkl_vector_maths():
    from llm_from_scratch.dpo import PreferenceDataset, train_dpo
    from llm_from_scratch.instruct import END, Example, InstructionDataset, train_sft
    from tests.test_dpo import PAIRS
    from tests.test_instruct import tiny_chat_model

    model, tokenizer = tiny_chat_model()
    pad = tokenizer.special_tokens[END]
    examples = [Example("Who speaks these lines?", name, "speaker", str(i), ("VIOLA", "OLIVIA"))
                for i, name in enumerate(["VIOLA", "OLIVIA", "VIOLA"])]
    sft_set = InstructionDataset(examples, tokenizer, context_length=64)
    ops = _ops_called(lambda: train_sft(model, sft_set, steps=2, batch_size=2, pad_id=pad))
    assert not ops & MKL_VECTOR_MATH, f"train_sft calls {sorted(ops & MKL_VECTOR_MATH)}"
    pairs = PreferenceDataset(PAIRS, tokenizer, context_length=64)
    ops = _ops_called(lambda: train_dpo(model, pairs, steps=2, batch_size=2, pad_id=pad))
    assert not ops & MKL_VECTOR_MATH, f"train_dpo calls {sorted(ops & MKL_VECTOR_MATH)}"
