import random

import numpy as np
import pytest
import torch

import llm_from_scratch
from llm_from_scratch import artifacts_dir, get_device, seed_everything


def test_version_is_exported():
    assert isinstance(llm_from_scratch.__version__, str) and llm_from_scratch.__version__.count(".") == 2


def test_get_device_prefers_available_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("llm_from_scratch.utils._mps_available", lambda: False)
    assert get_device() == torch.device("cpu")
    assert get_device("auto") == torch.device("cpu")
    monkeypatch.setattr("llm_from_scratch.utils._mps_available", lambda: True)
    assert get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == torch.device("cuda")
    assert get_device("cpu") == torch.device("cpu")  # an explicit choice overrides


def test_get_device_rejects_unavailable_or_unknown(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("llm_from_scratch.utils._mps_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        get_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        get_device("mps")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        get_device("tpu")
    with pytest.raises(TypeError, match="preferred must be"):
        get_device(3)


def test_seed_everything_reproduces_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3)

    seed_everything(123)
    a = draw()
    seed_everything(123)
    b = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    torch.manual_seed(123)  # the reference: PyTorch's own seeding
    assert torch.equal(a[2], torch.rand(3))
    gen = seed_everything(123)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(123)))


def test_seed_everything_rejects_bad_seeds():
    with pytest.raises(TypeError):
        seed_everything(1.5)
    with pytest.raises(TypeError):
        seed_everything(True)
    with pytest.raises(ValueError, match="seed must be in"):
        seed_everything(-1)


def test_artifacts_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FROM_SCRATCH_ARTIFACTS", str(tmp_path / "art"))
    path = artifacts_dir("ckpt", "run1")
    assert path == tmp_path / "art" / "ckpt" / "run1" and path.is_dir()


def test_artifacts_dir_finds_course_root(tmp_path, monkeypatch):
    monkeypatch.delenv("LLM_FROM_SCRATCH_ARTIFACTS", raising=False)
    (tmp_path / "_toc.yml").write_text("root: intro\n")
    (tmp_path / "chapters").mkdir()
    monkeypatch.chdir(tmp_path / "chapters")
    assert artifacts_dir(create=False) == tmp_path / "artifacts"


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path, monkeypatch):
    from llm_from_scratch import utils

    target = tmp_path / "sub" / "file.txt"
    utils.atomic_write_text(target, "first")
    assert target.read_text() == "first"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(utils.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        utils.atomic_write_bytes(target, b"second")
    assert target.read_text() == "first"  # the old file survives
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]  # no temporary left behind


def test_atomic_write_keeps_the_umask_mode(tmp_path):
    import os
    import stat

    from llm_from_scratch.utils import atomic_write_bytes

    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "new.bin", b"x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # what open() would give, not mkstemp's 0600
        os.chmod(path, 0o640)
        atomic_write_bytes(path, b"y")  # replacing a file keeps its mode
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_show_source_renders_a_function_and_chosen_methods():
    import inspect

    from llm_from_scratch.model import GPT
    from llm_from_scratch.train import lr_at
    from llm_from_scratch.utils import SourceCode, show_source

    shown = show_source(lr_at)
    assert isinstance(shown, SourceCode)
    assert shown.code == inspect.getsource(lr_at)
    assert shown.header.startswith("# llm_from_scratch/train.py, lines ")
    markdown = shown._repr_markdown_()
    assert markdown.startswith("```python\n# llm_from_scratch/train.py") and markdown.endswith("```\n")
    compile(shown.code, "<lr_at>", "exec")  # a whole, valid function

    part = show_source(GPT, "forward")
    assert part.code.startswith("class GPT(")
    assert "def forward(" in part.code and "def __init__" not in part.code
    method = show_source(GPT.forward)
    assert method.code.startswith("def forward(")  # dedented: a method shown alone compiles
    compile(method.code, "<forward>", "exec")
    decorated = show_source(GPT.load_hf_gpt2_state_dict)  # wrapped by @torch.no_grad(): still model.py
    assert decorated.header.startswith("# llm_from_scratch/model.py, lines ")
    with pytest.raises(ValueError, match="no_such"):
        show_source(GPT, "no_such")
    with pytest.raises(TypeError, match="function, method or class"):
        show_source(42)
