"""The course's pre-trained model: the run of the chapter "Pre-training", made once and reused.

Explained in the chapter "Pre-training" (chapters/05_pretraining.ipynb). Every later chapter
(generation, beyond GPT-2, fine-tuning, ...) starts from the model that chapter trains.
``pretrained_model(settings)`` loads it from the artifacts folder when a finished run with
exactly these settings is there, and otherwise trains it with the same settings, on the same
data, and says so. It never substitutes a different model.

What it does not do: choose the settings. ``PretrainSettings()`` holds the chapter's defaults;
a chapter run with other parameters (a GPU profile, a smoke test) passes its own and gets (or
trains) the run that matches them, in its own folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm_from_scratch.bpe import CourseData, course_data
from llm_from_scratch.metrics import text_stats
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.train import CHECKPOINT_NAME, TrainConfig, load_checkpoint, tokenizer_fingerprint, train
from llm_from_scratch.utils import artifacts_dir, atomic_write_text, seed_everything

logger = logging.getLogger(__name__)

#: Written last, when a run has finished: its presence marks a complete run.
SETTINGS_NAME = "settings.json"
#: The tokenizer the run was trained with, saved beside its checkpoint (``generate`` finds it there).
TOKENIZER_NAME = "tokenizer.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the weights of the pre-training run (defaults: the chapter's CPU run)."""

    subset: str | None = "small"
    vocab_size: int = 4096
    split_seed: int = 2
    preset: str = "tiny"
    context_length: int | None = None
    dropout: float = 0.0
    max_steps: int = 500
    batch_size: int = 16
    max_lr: float = 3e-3
    warmup_steps: int = 30
    eval_interval: int = 100
    eval_batches: int = 4
    seed: int = 1234
    precision: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.preset not in GPTConfig.presets():
            raise ValueError(f"unknown preset {self.preset!r}: expected one of {sorted(GPTConfig.presets())}")
        TrainConfig(**self._train_fields())  # checks the training numbers, with clear errors

    def _train_fields(self) -> dict:
        return dict(max_steps=self.max_steps, batch_size=self.batch_size, max_lr=self.max_lr,
                    warmup_steps=self.warmup_steps, eval_interval=self.eval_interval,
                    eval_batches=self.eval_batches, seed=self.seed, device=self.device, precision=self.precision)

    def model_config(self, vocab_size: int) -> GPTConfig:
        overrides = {"vocab_size": vocab_size, "dropout": self.dropout}
        if self.context_length is not None:
            overrides["context_length"] = self.context_length
        return getattr(GPTConfig, self.preset)(**overrides)

    def train_config(self, *, progress: bool = False) -> TrainConfig:
        return TrainConfig(**self._train_fields(), eval_train=False, log_interval=10, progress=progress)

    def key(self) -> str:
        """A short digest of the settings: runs with different settings live in different folders."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]

    def run_dir(self) -> Path:
        return artifacts_dir("pretraining", f"run-{self.key()}", create=False)


@dataclass
class PretrainedRun:
    """A pre-trained model with its data, history and folder; ``trained_now`` says whether it was just trained."""

    model: nn.Module
    data: CourseData
    history: list[dict]
    run_dir: Path
    settings: PretrainSettings
    trained_now: bool


def pretrain(
    settings: PretrainSettings = PretrainSettings(),
    *,
    data: CourseData | None = None,
    callback: Callable[[int, nn.Module, dict], None] | None = None,
    progress: bool = False,
) -> PretrainedRun:
    """Trains the course model from scratch with ``settings`` into ``settings.run_dir()``.

    A previous run in that folder is replaced when this one has finished (training happens in a
    folder of its own, renamed into place at the end, so two processes never write into one run).
    The tokenizer is saved in the folder and its fingerprint goes into the checkpoint, the validation text's size into the history (``val_bpc``), and ``settings.json``
    is written last, so a run stopped half-way is never taken for a finished one.
    """
    if not isinstance(settings, PretrainSettings):
        raise TypeError(f"settings must be a PretrainSettings, got {type(settings).__name__}")
    data = course_data(settings.vocab_size, settings.subset, split_seed=settings.split_seed) if data is None else data
    run_dir = settings.run_dir()
    # Train in a folder of this process's own, renamed into place at the end: a run that another
    # chapter (another process) is training or reading at the same time is never clobbered.
    partial = run_dir.with_name(f"{run_dir.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    data.tokenizer.save(partial / TOKENIZER_NAME)  # the run folder is complete on its own
    seed_everything(settings.seed)
    model = GPT(settings.model_config(data.tokenizer.vocab_size))
    try:
        history = train(
            model, data.train_ids, data.val_ids, settings.train_config(progress=progress), out_dir=partial,
            tokenizer=tokenizer_fingerprint(data.tokenizer, run_dir / TOKENIZER_NAME),
            val_stats=text_stats(data.val_ids, data.tokenizer), callback=callback,
        )
        atomic_write_text(partial / SETTINGS_NAME, json.dumps(dataclasses.asdict(settings), indent=1))
        # Two renames, then the old run's removal: a chapter loading the run in another process
        # (a second nbval lane) finds a complete folder at every moment but between the renames.
        retired = run_dir.with_name(f"{run_dir.name}.old-{os.getpid()}")
        if run_dir.exists():
            os.replace(run_dir, retired)
        os.replace(partial, run_dir)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PretrainedRun(model, data, history, run_dir, settings, trained_now=True)


def _finished_run(settings: PretrainSettings, data: CourseData) -> str | None:
    """Why the folder of ``settings`` holds no usable finished run (``None``: it does)."""
    run_dir = settings.run_dir()
    if not (run_dir / SETTINGS_NAME).is_file() or not (run_dir / CHECKPOINT_NAME).is_file():
        return f"no finished run in {run_dir}"
    if json.loads((run_dir / SETTINGS_NAME).read_text()) != dataclasses.asdict(settings):
        return f"the run in {run_dir} has other settings"
    try:
        saved = load_checkpoint(run_dir / CHECKPOINT_NAME)  # metadata only
    except ValueError as err:
        return f"its checkpoint cannot be read ({err})"
    if (saved["tokenizer"] or {}).get("sha256") != data.tokenizer.fingerprint():
        return "it was trained with another tokenizer"
    if saved["step"] != settings.max_steps:
        return f"it stopped at step {saved['step']}"
    return None


def pretrained_model(
    settings: PretrainSettings = PretrainSettings(), *, device: str | torch.device | None = None
) -> PretrainedRun:
    """The model of the chapter "Pre-training" for ``settings``: loaded when that run exists, else trained.

    Chapters that build on the pre-trained model call this; when the chapter "Pre-training" has
    not been run with these settings (or its run is unfinished, or used another tokenizer), the
    same run is made here, which takes as long as it does there. The model is in eval mode on
    ``device`` (default: the settings' device).
    """
    if not isinstance(settings, PretrainSettings):
        raise TypeError(f"settings must be a PretrainSettings, got {type(settings).__name__}")
    data = course_data(settings.vocab_size, settings.subset, split_seed=settings.split_seed)
    device = torch.device(settings.device if device is None else device)
    why = _finished_run(settings, data)
    if why is None:
        model = GPT(settings.model_config(data.tokenizer.vocab_size))
        saved = load_checkpoint(settings.run_dir() / CHECKPOINT_NAME, model)
        return PretrainedRun(model.to(device).eval(), data, list(saved["history"]), settings.run_dir(), settings,
                             trained_now=False)
    logger.warning("training the pre-training chapter's model here (%s): %s steps", why, settings.max_steps)
    run = pretrain(settings, data=data)
    run.model.to(device).eval()
    return run
