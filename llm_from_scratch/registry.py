"""Which model classes a checkpoint may name, and the configuration class each one takes.

A checkpoint records its model's class name (``"GPT"``) and configuration (a dict of the
configuration's fields). To rebuild the model, ``load_model`` (``generate.py``) looks the name up
here: ``MODEL_CLASSES`` maps it to the model class and the configuration class whose fields
the dict holds. The language models of the first half of the course are listed below; a
module of the second half registers its own with ``register_model`` when it is imported
(``finetune.py`` registers ``GPTClassifier``), so the first half never imports the second.

It does not read or write checkpoints (``checkpoint.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.modern import ModernConfig, TransformerLM

#: Model class name -> (model class, configuration class). ``register_model`` adds to it.
MODEL_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "GPT": (GPT, GPTConfig),  # chapters "The GPT architecture" and "Pre-training"
    "TransformerLM": (TransformerLM, ModernConfig),  # chapter "Beyond GPT-2"
}


def register_model(model_cls: type[nn.Module], config_cls: type) -> None:
    """Lets checkpoints of ``model_cls`` (built as ``model_cls(config_cls(**fields))``) be loaded by name.

    ``config_cls`` must be a dataclass. Registering the same pair again does nothing; another
    class under a name already taken raises ``ValueError``.
    """
    if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)):
        raise TypeError(f"model_cls must be a subclass of torch.nn.Module, got {model_cls!r}")
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"config_cls must be a dataclass, got {config_cls!r}")
    name = model_cls.__name__
    if name in MODEL_CLASSES and MODEL_CLASSES[name] != (model_cls, config_cls):
        raise ValueError(f"a model class named {name!r} is already registered: {MODEL_CLASSES[name]}")
    MODEL_CLASSES[name] = (model_cls, config_cls)


def model_classes(name: str) -> tuple[type[nn.Module], type]:
    """``(model class, configuration class)`` registered under ``name``; ``ValueError`` when unknown."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}: expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name]


def build_model(name: str, config: dict[str, Any]) -> nn.Module:
    """A new model of the class registered under ``name``, configured by the fields in ``config``."""
    model_cls, config_cls = model_classes(name)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no fields {unknown}: the checkpoint was made by another version")
    return model_cls(config_cls(**config))
