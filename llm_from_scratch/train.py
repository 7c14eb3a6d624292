"""Pre-training: the optimizer, the learning-rate schedule, the loop, checkpoints.

Explained in the chapter "Pre-training" (chapters/05_pretraining.ipynb). This module holds:

* ``TrainConfig``: every knob of a run (batch, schedule, optimizer, precision, intervals);
* ``configure_optimizer``: AdamW with weight decay on matrices only (see its docstring for
  exactly which parameters decay);
* ``lr_at``: linear warm-up, then cosine decay to a floor;
* ``train_step``: one optimizer step over ``k`` micro-batches (gradient accumulation);
* ``evaluate``: the mean loss over fixed, evenly spaced windows of held-out tokens;
* ``train``: the loop, with a ``tqdm`` bar (tokens/s, loss), a history (list of dicts, also
  written as JSON and CSV), periodic checkpoints and exact resume;
* ``save_checkpoint`` / ``load_checkpoint``, ``tokenizer_fingerprint``, ``CHECKPOINT_NAME`` and
  ``CHECKPOINT_FORMAT`` live in ``checkpoint.py`` (the loop writes a checkpoint at every
  interval); they are imported here too, so ``from llm_from_scratch.train import
  save_checkpoint`` keeps working.

It does not build models (``model.py``), tokenize (``bpe.py``), read corpora (``data.py``) or
sample text (``generate.py``). Nothing here is global: everything a run needs is in its
arguments, and the parts that depend on the process's rank (writing files, the progress bar,
the data stream's seed) go through ``_Runtime``, so the same loop can later run under
``torchrun`` with one process per GPU.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from llm_from_scratch import metrics

# Checkpoints and the rank view have their own module; these names stay importable from here.
from llm_from_scratch.checkpoint import (  # noqa: F401
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    _is_sharded,
    _Runtime,
    _unwrap,
    load_checkpoint,
    save_checkpoint,
    tokenizer_fingerprint,
)
from llm_from_scratch.data import get_batch as _get_batch_from_array
from llm_from_scratch.utils import atomic_write_text, get_device

logger = logging.getLogger(__name__)

#: Dense bf16 peak FLOP/s (no sparsity) of some accelerators, for model FLOPs utilisation.
PEAK_FLOPS_BF16 = {
    # Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity). Keys are the
    # words of the name the driver reports (torch.cuda.get_device_name), all of which must
    # appear: "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe card.
    "H100 HBM3": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}
#: Tensor-core fp16 peaks of GPUs without bf16 support (before Ampere): MFU is measured in fp16.
PEAK_FLOPS_FP16 = {
    "T4": 65e12,
    "V100": 125e12,
}

_PRECISIONS = ("auto", "bf16", "fp32")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of a training run. Steps count optimizer updates, not micro-batches.

    One step sees ``batch_size * grad_accum_steps * context_length`` tokens.
    ``context_length=None`` uses the model's. The learning rate warms up linearly for
    ``warmup_steps`` steps to ``max_lr``, then follows a cosine down to ``min_lr`` (default
    ``max_lr / 10``) at ``decay_steps`` (default ``max_steps``) and stays there.
    ``precision``: ``"auto"`` (bf16 autocast on a CUDA GPU that supports it, else fp32),
    ``"bf16"`` (autocast on any device; on the CPU it is correct but rarely faster) or ``"fp32"``.
    ``checkpoint_interval=None`` writes a checkpoint at every evaluation and at the end (when
    ``train`` gets an ``out_dir``); ``0`` only at the end. ``eval_batches`` batches of
    held-out windows per evaluation; ``eval_train`` also measures the loss on as many
    training windows (to see overfitting).
    """

    max_steps: int = 1000
    batch_size: int = 16
    context_length: int | None = None
    grad_accum_steps: int = 1
    max_lr: float = 6e-4
    min_lr: float | None = None
    warmup_steps: int = 100
    decay_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    eval_interval: int = 100
    eval_batches: int = 10
    eval_train: bool = True
    eval_at_start: bool = True
    log_interval: int = 10
    checkpoint_interval: int | None = None
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    fused_optimizer: bool | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "eval_batches", "log_interval")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative int, got {value!r}")
        for name in ("context_length", "decay_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be a positive int or None, got {value!r}")
        ci = self.checkpoint_interval
        if ci is not None and (isinstance(ci, bool) or not isinstance(ci, int) or ci < 0):
            raise ValueError(f"TrainConfig.checkpoint_interval must be None or an int >= 0, got {ci!r}")
        if not (isinstance(self.max_lr, (int, float)) and self.max_lr > 0):
            raise ValueError(f"TrainConfig.max_lr must be a positive number, got {self.max_lr!r}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"TrainConfig.min_lr must be in [0, max_lr={self.max_lr}], got {self.min_lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            raise ValueError(
                f"TrainConfig.decay_steps ({self.decay_steps}) must be >= warmup_steps ({self.warmup_steps})"
            )

    @property
    def resolved_min_lr(self) -> float:
        return self.max_lr / 10 if self.min_lr is None else self.min_lr

    @property
    def resolved_decay_steps(self) -> int:
        return max(self.max_steps, self.warmup_steps) if self.decay_steps is None else self.decay_steps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**d)


#: Fields that change what the optimizer computes: a resumed run must keep them.
_RESUME_FIXED_FIELDS = ("batch_size", "context_length", "grad_accum_steps", "seed")


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def decay_parameter_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Splits the parameter names into ``(decay, no_decay)``.

    Decayed: every parameter with 2 or more dimensions that is not the weight of an
    ``nn.Embedding``, i.e. the linear layers' weight matrices (``attn.c_attn``, ``attn.c_proj``,
    ``mlp.c_fc``, ``mlp.c_proj`` and an untied ``lm_head``). Not decayed: biases and layer-norm
    weights (1 dimension) and the token and position embeddings. With tied weights the output
    layer *is* the token embedding (one tensor, listed once under its first name,
    ``transformer.wte.weight``), so it is not decayed either.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # a shared tensor appears once
        if not param.requires_grad:
            continue
        if param.dim() >= 2 and id(param) not in embedding_ids:
            decay.append(name)
        else:
            no_decay.append(name)
    return decay, no_decay


def configure_optimizer(
    model: nn.Module,
    *,
    lr: float = 6e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with two parameter groups: weight decay on matrices, none on the rest.

    The groups come from ``decay_parameter_names`` (decay: linear weights; no decay: biases,
    norms, embeddings). ``betas=(0.9, 0.95)`` is what GPT-3 and most LLMs since use.
    ``fused=None`` uses PyTorch's fused kernel (one kernel for all parameters) when it is
    available for the parameters' device (CUDA, and the CPU in recent PyTorch), else the
    ``foreach`` implementation.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    decay, no_decay = decay_parameter_names(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    if fused is None:
        fused = _fused_adamw_available(next(model.parameters()).device)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=bool(fused) or None)


def _fused_adamw_available(device: torch.device) -> bool:
    try:
        probe = torch.zeros(1, device=device, requires_grad=True)
        opt = torch.optim.AdamW([probe], fused=True)
        probe.grad = torch.zeros_like(probe)
        opt.step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Warm-up: ``max_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (so step
    ``warmup_steps - 1`` uses ``max_lr``). Then cosine decay:
    ``min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2`` with
    ``r = (step - warmup_steps) / (decay_steps - warmup_steps)``, and ``min_lr`` from
    ``decay_steps`` on.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if warmup_steps < 0 or decay_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= decay_steps, got {warmup_steps} and {decay_steps}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


# --------------------------------------------------------------------------------------------
# Device and precision (the rank view, ``_Runtime``, is in checkpoint.py)
# --------------------------------------------------------------------------------------------



def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: plain fp32)."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` from ``PEAK_FLOPS_BF16`` (``None`` when unknown, e.g. CPUs).

    GPUs without bf16 (T4, V100) report their fp16 tensor-core peak from ``PEAK_FLOPS_FP16``.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _peak_for_name(torch.cuda.get_device_name(device))


def _peak_for_name(name: str) -> float | None:
    """The peak of the table entry whose words all appear in ``name`` (longest key first)."""
    words = set(name.replace("-", " ").split())
    table = {**PEAK_FLOPS_FP16, **PEAK_FLOPS_BF16}
    for key in sorted(table, key=len, reverse=True):
        if all(part in words for part in key.split()):
            return table[key]
    return None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _check_token_source(name: str, data, min_tokens: int, hint: str) -> None:
    if isinstance(data, (str, bytes)) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(
            f"{name} must be a sequence of token ids (TokenFile, tensor, numpy array), got {type(data).__name__}"
        )
    if len(data) < min_tokens:
        raise ValueError(f"{name} has {len(data)} tokens, fewer than {hint} = {min_tokens}")


def _sample_batch(
    data, batch_size: int, context_length: int, generator: torch.Generator, runtime: _Runtime | None = None
) -> tuple[Tensor, Tensor]:
    """This process's share of a random batch: ``(inputs, targets)``, each ``(B, T)`` int64.

    Every rank draws the same global batch of ``batch_size * world_size`` windows from
    ``generator`` (seeded alike on every rank) and keeps rows ``rank * B`` to ``(rank + 1) * B``,
    like ``DistributedSampler``: the ranks' shards never overlap, and together they are
    exactly the batch one process would draw with ``batch_size * world_size``.
    """
    runtime = _Runtime() if runtime is None else runtime
    global_batch = batch_size * runtime.world_size
    if hasattr(data, "get_batch"):
        x, y = data.get_batch(global_batch, context_length, generator)
    else:
        x, y = _get_batch_from_array(data, global_batch, context_length, generator)
    rows = slice(runtime.rank * batch_size, (runtime.rank + 1) * batch_size)
    return x[rows].long(), y[rows].long()


def _eval_windows(n_tokens: int, context_length: int, n_windows: int) -> list[int]:
    """Start positions of ``n_windows`` evenly spaced windows of ``context_length + 1`` tokens."""
    last = n_tokens - context_length - 1
    n_all = last // context_length + 1  # non-overlapping windows
    starts = [i * context_length for i in range(n_all)]
    if n_windows >= n_all:
        return starts
    picks = torch.linspace(0, n_all - 1, n_windows).round().long().tolist()
    return [starts[i] for i in picks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    *,
    batch_size: int = 16,
    context_length: int | None = None,
    max_batches: int | None = 10,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> float:
    """Mean next-token loss of ``model`` over fixed windows of ``data`` (no randomness).

    The windows are non-overlapping stretches of ``context_length + 1`` tokens, evenly spaced
    over the whole of ``data``; ``max_batches * batch_size`` of them (all when ``None``). The
    same windows every call, so evaluations at different steps compare like with like.
    Dropout is off during evaluation; the model's training mode is restored afterwards.
    """
    inner = _unwrap(model)
    if context_length is None:
        context_length = inner.config.context_length
    device = next(model.parameters()).device if device is None else torch.device(device)
    _check_token_source("data", data, context_length + 1, "context_length + 1")
    n_windows = None if max_batches is None else max_batches * batch_size
    starts = _eval_windows(len(data), context_length, n_windows if n_windows is not None else len(data))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dtype = resolve_precision(precision, device)
    try:
        for i in range(0, len(starts), batch_size):
            chunk = starts[i : i + batch_size]
            rows = np.stack([np.asarray(data[s : s + context_length + 1], dtype=np.int64) for s in chunk])
            batch = torch.from_numpy(rows).to(device)  # (B, T + 1)
            with _autocast(device, dtype):
                _, loss = model(batch[:, :-1], batch[:, 1:])
            total += loss.float().item() * len(chunk)
            count += len(chunk)
    finally:
        model.train(was_training)
    return total / count


def bits_per_char(
    model: nn.Module,
    token_ids,
    tokenizer,
    *,
    batch_size: int = 16,
    context_length: int | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Scores ``model`` on the whole of ``token_ids``: every non-overlapping window, no sampling.

    Returns ``{"nats_per_token", "bits_per_char", "bits_per_byte", "tokens", "chars", "bytes"}``:
    the mean loss and, through the text that the scored tokens decode to (``tokenizer``), the same
    information per character and per UTF-8 byte, a number that compares models whose tokenizers
    differ (characters, our BPE, GPT-2's). Explained in the chapter "Pre-training".
    """
    inner = _unwrap(model)
    if context_length is None:
        context_length = inner.config.context_length
    _check_token_source("token_ids", token_ids, context_length + 1, "context_length + 1")
    loss = evaluate(model, token_ids, batch_size=batch_size, context_length=context_length,
                    max_batches=None, device=device, precision=precision)
    n_windows = len(_eval_windows(len(token_ids), context_length, len(token_ids)))
    scored = token_ids[1 : 1 + n_windows * context_length]  # every window's targets, once each
    stats = metrics.text_stats(scored, tokenizer)
    return {"nats_per_token": loss, "bits_per_char": metrics.bits_per_char(loss, stats),
            "bits_per_byte": metrics.bits_per_byte(loss, stats), "tokens": stats.tokens,
            "chars": stats.chars, "bytes": stats.bytes}


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: training stopped before applying the update."""


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    *,
    lr: float | None = None,
    grad_clip: float | None = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """One optimizer update from ``k = len(micro_batches)`` micro-batches (gradient accumulation).

    Each micro-batch's mean loss is divided by ``k`` before ``backward``, so the summed
    gradients equal those of one batch ``k`` times larger. Then the gradients are clipped to
    norm ``grad_clip`` and the optimizer steps with learning rate ``lr``. Returns
    ``(mean loss, gradient norm before clipping)``. A NaN or infinite loss raises
    ``NonFiniteLossError`` *before* the update, so the weights stay as they were.
    """
    if len(micro_batches) == 0:
        raise ValueError("micro_batches must hold at least one (inputs, targets) pair")
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    device = next(model.parameters()).device
    k = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (inputs, targets) in enumerate(micro_batches):
        last = i == k - 1
        # Data-parallel: gradients are averaged across processes only once, on the last
        # micro-batch (DDP's no_sync; FSDP keeps unsharded gradients until then).
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        with sync:
            with _autocast(device, autocast_dtype):
                _, loss = model(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
            (loss / k).backward()
        total += loss.detach().float()
    runtime = _Runtime.current()
    if runtime.is_distributed:  # the loss of the global batch, the same on every rank (and so is a NaN stop)
        torch.distributed.all_reduce(total)
        total /= runtime.world_size
    mean_loss = (total / k).item()
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"the loss is {mean_loss}: the update was not applied")
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        grad_norm = float(norm.full_tensor() if _is_sharded(norm) else norm)  # FSDP: a replicated DTensor
    else:
        grad_norm = float("nan")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------



# --------------------------------------------------------------------------------------------
# History files
# --------------------------------------------------------------------------------------------


def write_history(history: list[dict], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Writes ``history.json`` and ``history.csv`` (one column per key seen) into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / "history.json", out_dir / "history.csv"
    atomic_write_text(json_path, json.dumps(history, indent=1))
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(csv_path, buf.getvalue())
    return json_path, csv_path


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Meter:
    """Tokens and seconds of training (evaluation excluded) since the last log line."""

    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    train_data,
    val_data=None,
    config: TrainConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    tokenizer: dict[str, str] | None = None,
    val_stats: metrics.TextStats | None = None,
    callback: Callable[[int, nn.Module, dict], None] | None = None,
) -> list[dict]:
    """Trains ``model`` on ``train_data`` and returns the history, a list of dicts.

    ``train_data`` / ``val_data``: token ids (a ``TokenFile``, a 1-D tensor or a numpy array).
    Every optimizer step draws ``grad_accum_steps`` random batches of ``batch_size`` windows
    from a ``torch.Generator`` seeded with ``config.seed``: that generator's state and the
    number of batches drawn are the data position.

    Under ``torchrun`` (a process group initialised, the model wrapped in
    ``DistributedDataParallel`` or sharded with FSDP; see ``llm_from_scratch.distributed``) the
    same call trains with ``world_size`` processes: every rank draws the same global batch of
    ``batch_size * world_size`` windows and keeps its own ``batch_size`` rows, so a step sees
    the batch one process would see with ``batch_size * world_size``. The logged loss is
    averaged over the ranks; checkpoints are gathered by every rank and written by rank 0,
    which alone writes the history and shows the progress bar.

    History rows: every ``log_interval`` steps ``{"step", "tokens", "lr", "train_loss",
    "grad_norm", "tokens_per_s", "mfu"?}`` (``train_loss`` averaged since the last row), and at
    every evaluation ``{"step", "tokens", "val_loss", "val_bpc"?, "val_bpb"?, "train_eval_loss"?}``.
    ``val_bpc`` / ``val_bpb`` (bits per character / byte) are there when ``val_stats``
    (``metrics.text_stats(val_data, tokenizer)``) says how much text ``val_data`` holds.

    ``out_dir``: where ``checkpoint.safetensors``, ``history.json`` and ``history.csv`` go.
    ``resume_from``: a checkpoint (or a folder holding one) to continue from exactly; the
    model's configuration, ``tokenizer`` (a ``tokenizer_fingerprint``) and the batch shape must
    match it. ``callback(step, model, row)`` runs after each evaluation, with its own copy of
    the random number generators (sampling text there does not change the run).

    A NaN or infinite loss raises ``NonFiniteLossError``: the failing update is not applied
    and the last checkpoint in ``out_dir`` (written before the failure) is left as it was.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    runtime = _Runtime.current()
    inner = _unwrap(model)
    model_context = getattr(getattr(inner, "config", None), "context_length", None)
    context_length = config.context_length or model_context
    if context_length is None:
        raise ValueError("TrainConfig.context_length is None and the model has no config.context_length")
    if model_context is not None and context_length > model_context:
        raise ValueError(f"TrainConfig.context_length={context_length} exceeds the model's {model_context}")
    one_batch = config.batch_size * context_length + 1
    _check_token_source("train_data", train_data, one_batch, "one batch (batch_size * context_length + 1)")
    if val_data is not None:
        _check_token_source("val_data", val_data, context_length + 1, "context_length + 1")

    device = get_device(config.device)
    model.to(device)
    amp_dtype = resolve_precision(config.precision, device)
    optimizer = configure_optimizer(
        model, lr=config.max_lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps,
        fused=config.fused_optimizer,
    )
    generator = torch.Generator().manual_seed(config.seed)  # the same stream on every rank
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    step, batches_drawn, history = 0, 0, []

    if resume_from is not None:
        resume_path = Path(resume_from)
        if resume_path.is_dir():
            resume_path = resume_path / CHECKPOINT_NAME
        saved = load_checkpoint(resume_path, model, optimizer, generator=generator, restore_rng=True)
        if saved["train_config"] is not None:
            before = TrainConfig.from_dict(saved["train_config"])
            diffs = [f"{f}: {getattr(before, f)!r} then, {getattr(config, f)!r} now"
                     for f in _RESUME_FIXED_FIELDS if getattr(before, f) != getattr(config, f)]
            if diffs:
                raise ValueError(f"cannot resume {resume_path} with another batch setup: " + "; ".join(diffs))
        saved_tok, now_tok = saved["tokenizer"], tokenizer
        if saved_tok is not None and now_tok is not None and saved_tok.get("sha256") != now_tok.get("sha256"):
            raise ValueError(
                f"{resume_path} was trained with another tokenizer: sha256 {saved_tok.get('sha256')} "
                f"({saved_tok.get('path')}), now {now_tok.get('sha256')} ({now_tok.get('path')})"
            )
        saved_world = saved["data_state"].get("world_size", 1)
        if saved_world != runtime.world_size:
            raise ValueError(
                f"{resume_path} was trained with {saved_world} process(es), now {runtime.world_size}: the global "
                f"batch would change; resume with torchrun --nproc_per_node {saved_world} (or without torchrun for 1)"
            )
        step = saved["step"]
        batches_drawn = saved["data_state"].get("batches_drawn", 0)
        history = list(saved["history"])
        model.to(device)

    tokens_per_step = config.batch_size * config.grad_accum_steps * context_length * runtime.world_size
    flops_per_token = _flops_per_token(inner, context_length)
    peak = peak_flops(device)

    def do_eval(at_step: int) -> dict:
        row: dict[str, Any] = {"step": at_step, "tokens": at_step * tokens_per_step}
        # Every rank evaluates the same windows, in batches of the global batch size: the numbers
        # are those of a single process (sharding the evaluation is left as an exercise).
        kwargs = dict(batch_size=config.batch_size * runtime.world_size, context_length=context_length,
                      max_batches=config.eval_batches, device=device, precision=config.precision)
        if val_data is not None:
            row["val_loss"] = evaluate(model, val_data, **kwargs)
            if val_stats is not None:
                row["val_bpc"] = metrics.bits_per_char(row["val_loss"], val_stats)
                row["val_bpb"] = metrics.bits_per_byte(row["val_loss"], val_stats)
        if config.eval_train:
            row["train_eval_loss"] = evaluate(model, train_data, **kwargs)
        history.append(row)
        if callback is not None:
            with _forked_rng(device):
                callback(at_step, model, row)
        return row

    def do_checkpoint(at_step: int) -> None:  # every rank takes part; rank 0 writes
        save_checkpoint(
            ckpt_path, model, optimizer, step=at_step, train_config=config, generator=generator,
            data_state={"batches_drawn": batches_drawn, "generator_seed": config.seed,
                        "world_size": runtime.world_size},
            tokenizer=tokenizer, history=history,
        )
        if runtime.is_main:
            write_history(history, out)

    model.train()
    if step == 0 and config.eval_at_start and (val_data is not None or config.eval_train):
        do_eval(0)
    # ``disable`` is passed only to switch the bar off: left out, tqdm reads TQDM_DISABLE.
    quiet = {} if config.progress and runtime.is_main else {"disable": True}
    bar = tqdm(total=config.max_steps, initial=step, unit="step", dynamic_ncols=True, **quiet)
    meter = _Meter()
    ckpt_every = config.eval_interval if config.checkpoint_interval is None else config.checkpoint_interval
    try:
        while step < config.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, max_lr=config.max_lr, min_lr=config.resolved_min_lr,
                       warmup_steps=config.warmup_steps, decay_steps=config.resolved_decay_steps)
            micro = [_sample_batch(train_data, config.batch_size, context_length, generator, runtime)
                     for _ in range(config.grad_accum_steps)]
            batches_drawn += config.grad_accum_steps
            try:
                loss, grad_norm = train_step(model, optimizer, micro, lr=lr, grad_clip=config.grad_clip,
                                             autocast_dtype=amp_dtype)
            except NonFiniteLossError as err:
                kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path is not None and ckpt_path.exists() \
                    else "no checkpoint was written"
                raise NonFiniteLossError(
                    f"training stopped at step {step}: {err}; {kept}. Try a lower max_lr or more warm-up."
                ) from None
            step += 1
            meter.seconds += time.perf_counter() - t0
            meter.tokens += tokens_per_step
            meter.losses.append(loss)
            bar.update(1)
            if step % config.log_interval == 0 or step == config.max_steps:
                tps = meter.tokens / max(meter.seconds, 1e-9)
                row = {"step": step, "tokens": step * tokens_per_step, "lr": lr,
                       "train_loss": sum(meter.losses) / len(meter.losses), "grad_norm": grad_norm,
                       "tokens_per_s": tps}
                if peak is not None and flops_per_token is not None:
                    row["mfu"] = tps * flops_per_token / (peak * runtime.world_size)
                history.append(row)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{tps:,.0f}")
                meter = _Meter()
            if step % config.eval_interval == 0 or step == config.max_steps:
                do_eval(step)
            if out is not None and (step == config.max_steps or (ckpt_every and step % ckpt_every == 0)):
                do_checkpoint(step)
    finally:
        bar.close()
    if out is not None and runtime.is_main:
        write_history(history, out)
    return history


def _flops_per_token(model: nn.Module, context_length: int) -> float | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    from llm_from_scratch.model import GPTConfig, estimate_flops_per_token

    if not isinstance(config, GPTConfig):
        return None
    return float(estimate_flops_per_token(config, seq_len=context_length))


@contextlib.contextmanager
def _forked_rng(device: torch.device):
    """Runs a block with copies of every RNG, so it cannot change the training run's randomness."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
