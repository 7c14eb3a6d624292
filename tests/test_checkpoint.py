"""Tests of llm_from_scratch.checkpoint and registry: fine-tuned models save and load like pre-trained ones."""

from __future__ import annotations

import json
import os

import pytest
import torch

import llm_from_scratch
from llm_from_scratch import checkpoint, train
from llm_from_scratch.checkpoint import load_checkpoint, save_checkpoint
from llm_from_scratch.finetune import ClassifierConfig, GPTClassifier
from llm_from_scratch.generate import load_model
from llm_from_scratch.lora import ADAPTERS, LoRAEmbedding
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.registry import MODEL_CLASSES, build_model, register_model

SIZES = dict(vocab_size=40, context_length=16, d_model=32, n_layers=2, n_heads=2)


def classifier(seed: int = 0, **overrides) -> GPTClassifier:
    torch.manual_seed(seed)
    return GPTClassifier(ClassifierConfig(**SIZES, labels=("a", "b", "c"), pad_id=39, **overrides)).eval()


def batch() -> torch.Tensor:
    idx = torch.randint(0, 39, (3, 10), generator=torch.Generator().manual_seed(5))
    idx[0, 7:] = 39  # right padding
    return idx


def test_names_stay_importable_where_they_were():
    for name in ("save_checkpoint", "load_checkpoint", "tokenizer_fingerprint", "CHECKPOINT_NAME", "CHECKPOINT_FORMAT"):
        assert getattr(train, name) is getattr(checkpoint, name) is getattr(llm_from_scratch, name)


def test_registry_lists_the_models():
    assert MODEL_CLASSES["GPT"] == (GPT, GPTConfig)
    assert MODEL_CLASSES["GPTClassifier"] == (GPTClassifier, ClassifierConfig)
    assert isinstance(build_model("GPT", {**SIZES}), GPT)
    with pytest.raises(ValueError, match="unknown model class 'Nope'"):
        build_model("Nope", {})
    with pytest.raises(ValueError, match="has no fields"):
        build_model("GPT", {**SIZES, "colour": "blue"})
    with pytest.raises(TypeError):
        register_model(GPT, dict)


def _perturb_adapters(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, ADAPTERS):
            torch.nn.init.normal_(m.lora_A if isinstance(m, LoRAEmbedding) else m.lora_B, std=0.1)


@pytest.mark.parametrize("merge", [False, True])
def test_classifier_with_and_without_unmerged_adapters_round_trip(tmp_path, merge):
    model = classifier(0)
    model.add_lora(r=2, alpha=4, targets=("attn.c_attn", "mlp.c_fc", "transformer.wte"))
    _perturb_adapters(model)
    if merge:
        model.merge_lora()
    x = batch()
    expected = model(x)
    path = save_checkpoint(tmp_path / "checkpoint.safetensors", model, step=3,
                           tokenizer={"path": "t", "sha256": "abc", "vocab_size": 40})
    loaded, meta = load_model(tmp_path)
    assert type(loaded) is GPTClassifier and meta["step"] == 3 and meta["tokenizer"]["sha256"] == "abc"
    assert loaded.config == model.config  # tuples again, not the JSON lists
    has_adapters = any(isinstance(m, ADAPTERS) for m in loaded.modules())
    assert has_adapters is not merge
    assert torch.equal(loaded(x), expected)
    header = json.loads(json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
                        ["__metadata__"]["llm_from_scratch"])
    assert header["model_class"] == "GPTClassifier" and header["model_config"]["lora_r"] == (0 if merge else 2)


def test_adapters_must_match_the_checkpoint(tmp_path):
    adapted = classifier(0)
    adapted.add_lora(r=2, alpha=4)
    path = save_checkpoint(tmp_path / "c.safetensors", adapted)
    with pytest.raises(ValueError, match="lora_r: 2 in the checkpoint, 0 now"):
        load_checkpoint(path, classifier(1))
    other_labels = GPTClassifier(ClassifierConfig(**SIZES, labels=("x", "y", "z"), pad_id=39))
    with pytest.raises(ValueError, match="labels"):
        load_checkpoint(save_checkpoint(tmp_path / "d.safetensors", classifier(0)), other_labels)


def test_classifier_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, classifier(0), step=1)
    good = path.read_bytes()

    def interrupted(src, dst):  # the process dies after writing the temporary file
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, classifier(1), step=2)
    monkeypatch.undo()
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["checkpoint.safetensors"]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="not a valid checkpoint"):
        load_checkpoint(corrupt)
