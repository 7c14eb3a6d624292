"""Checkpoints: one ``.safetensors`` file per run, written atomically, checked when read.

Explained in the chapter "Pre-training" (chapters/05_pretraining.ipynb), section on
checkpoints; the chapter "Fine-tuning for classification" saves its classifiers the same way.
This module holds:

* ``save_checkpoint`` / ``load_checkpoint``: one file (no pickle) holding the model, the
  optimizer, the step, every random number generator's state, the data position, both
  configurations, the tokenizer's fingerprint and the history; a sha256 of the tensors catches
  a corrupt or truncated file, and loading checks that the model has the checkpoint's
  configuration;
* ``tokenizer_fingerprint``: what a checkpoint records of its tokenizer, to catch mix-ups;
* the view of the process's rank (``_Runtime``) and the FSDP helpers that saving under
  ``torchrun`` needs (every rank gathers, rank 0 writes).

It does not train (``train.py``, which calls it at every checkpoint interval) nor choose the
model class of a checkpoint (``registry.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor, nn

from llm_from_scratch.utils import atomic_write_bytes

if TYPE_CHECKING:
    from llm_from_scratch.train import TrainConfig

#: File name of the checkpoint inside a run folder.
CHECKPOINT_NAME = "checkpoint.safetensors"
#: Identifies our checkpoints (and their layout version) inside the safetensors metadata.
CHECKPOINT_FORMAT = "llm_from_scratch.checkpoint/1"


# --------------------------------------------------------------------------------------------
# The process's rank and sharded tensors
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Runtime:
    """What depends on the process: its rank among ``world_size`` (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls) -> _Runtime:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def _is_sharded(t: Tensor) -> bool:
    """A ``DTensor``: a parameter (or optimizer state) sharded across processes by FSDP."""
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _full(t: Tensor) -> Tensor:
    """The whole tensor on the CPU; for a sharded one this is a collective (every rank must call it)."""
    if _is_sharded(t):
        t = t.full_tensor()
    return t.detach().contiguous().cpu()


def _shard_like(full: Tensor, template: Tensor) -> Tensor:
    """``full`` cut the way ``template`` (a DTensor) is; every rank holds ``full``, so no traffic."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(template.device, template.dtype), template.device_mesh, template.placements,
                             src_data_rank=None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or compiled) wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)



# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _tensor_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over the names and raw bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rng_state(generator: torch.Generator | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every random number generator a run touches: tensors + JSON-able values."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.torch_cuda.{i}"] = state
    if generator is not None:
        tensors["rng.batch_generator"] = generator.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss},
    }
    return tensors, meta


def _process_rng() -> dict[str, Tensor]:
    """This process's torch generators (the CPU's and its current GPU's)."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any], generator: torch.Generator | None) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.torch_cuda."))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in sorted(cuda, key=lambda k: int(k.rsplit(".", 1)[1]))]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    runtime = _Runtime.current()
    own = f"rng.rank{runtime.rank}."
    if runtime.is_distributed and own + "torch_cpu" in tensors:  # a distributed run: each rank its own
        torch.set_rng_state(tensors[own + "torch_cpu"])
        if own + "torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[own + "torch_cuda"])
    if generator is not None and "rng.batch_generator" in tensors:
        generator.set_state(tensors["rng.batch_generator"])
    npm = meta["numpy"]
    keys = tensors["rng.numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((npm["kind"], keys, npm["pos"], npm["has_gauss"], npm["cached_gaussian"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def _model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(_unwrap(model), "config", None)
    if config is None:
        return None
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    return json.loads(json.dumps(fields))  # as the checkpoint stores it: tuples become lists


def tokenizer_fingerprint(tokenizer, path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"path", "sha256", "vocab_size"}`` of a tokenizer, stored in checkpoints to catch mix-ups.

    ``tokenizer`` is a saved tokenizer file or a ``BPETokenizer`` (its sha256 equals that of the
    file ``save`` writes; ``path`` says where that file is, when there is one).
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        file = Path(tokenizer)
        data = file.read_bytes()
        from llm_from_scratch.bpe import BPETokenizer

        vocab_size = BPETokenizer.load(file).vocab_size
        return {"path": str(file), "sha256": hashlib.sha256(data).hexdigest(), "vocab_size": vocab_size}
    if not hasattr(tokenizer, "fingerprint"):
        raise TypeError(
            f"tokenizer must be a BPETokenizer or the path of a saved one, got {type(tokenizer).__name__}"
        )
    return {"path": "" if path is None else str(path), "sha256": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int = 0,
    train_config: TrainConfig | None = None,
    generator: torch.Generator | None = None,
    data_state: dict[str, Any] | None = None,
    tokenizer: dict[str, str] | None = None,
    history: list[dict] | None = None,
) -> Path:
    """Writes everything needed to resume training into one safetensors file, atomically.

    Tensors: the model's weights (``model.*``; a tied tensor is stored once), the optimizer's
    state (``optimizer.*``), the states of the random number generators (``rng.*``: torch
    CPU, every CUDA device, NumPy, the batch ``generator``). Metadata (JSON): the step, both
    configurations, the data position ``data_state``, the tokenizer fingerprint, the
    optimizer's hyperparameters, Python's RNG state, the history and a sha256 of all tensors.
    Nothing is pickled, so loading cannot run code.

    Under ``torchrun`` every rank must call it (it is a collective): parameters and optimizer
    state sharded by FSDP are gathered whole, each rank's random number generators are
    collected (``rng.rank<r>.*``), and rank 0 alone writes the file.
    """
    inner = _unwrap(model)
    runtime = _Runtime.current()
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in inner.state_dict(keep_vars=True).items():
        if t.numel() and id(t) in seen:  # a tied weight (one Parameter under two names): store it once
            aliases[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[f"model.{name}"] = _full(t)
    optim_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalar_state: dict[str, dict[str, Any]] = {}
        for pid, state in sorted(sd["state"].items()):  # one order on every rank: gathers pair up
            for key, value in sorted(state.items()):
                if torch.is_tensor(value):
                    tensors[f"optimizer.state.{pid}.{key}"] = _full(value)
                else:
                    scalar_state.setdefault(str(pid), {})[key] = value
        optim_meta = {"class": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalar_state": scalar_state}
    rng_tensors, rng_meta = _rng_state(generator)
    tensors.update(rng_tensors)
    if runtime.is_distributed:  # dropout differs between ranks: keep every rank's generators
        per_rank: list[Any] = [None] * runtime.world_size
        torch.distributed.all_gather_object(per_rank, _process_rng())
        for rank, states in enumerate(per_rank):
            tensors.update({f"rng.rank{rank}.{name}": state for name, state in states.items()})
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "model_class": type(inner).__name__,
        "model_config": _model_config_dict(inner),
        "aliases": aliases,
        "train_config": None if train_config is None else train_config.to_dict(),
        "data_state": data_state or {},
        "tokenizer": tokenizer,
        "optimizer": optim_meta,
        "rng": rng_meta,
        "history": history or [],
        "tensors_sha256": _tensor_digest(tensors),
    }
    path = Path(path)
    if runtime.is_main:
        atomic_write_bytes(path, _st_save(tensors, metadata={"llm_from_scratch": json.dumps(meta)}))
    if runtime.is_distributed:  # nobody reads the file before it is complete
        torch.distributed.barrier()
    return path


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid checkpoint (corrupt or truncated?): {why}")


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if len(data) < 8:
        raise _corrupt(path, f"only {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise _corrupt(path, f"the header claims {header_len} bytes, the file has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["llm_from_scratch"])
    except (ValueError, KeyError, TypeError) as err:
        raise _corrupt(path, f"unreadable header ({err})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise _corrupt(path, f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    try:
        tensors = _st_load(data)
    except Exception as err:  # safetensors raises its own error type
        raise _corrupt(path, str(err)) from None
    if _tensor_digest(tensors) != meta["tensors_sha256"]:
        raise _corrupt(path, "the tensors' sha256 does not match the one recorded when it was written")
    return tensors, meta


def _config_differences(saved: dict | None, current: dict | None) -> list[str]:
    if saved is None or current is None:
        return []
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    generator: torch.Generator | None = None,
    restore_rng: bool = False,
) -> dict[str, Any]:
    """Reads a checkpoint written by ``save_checkpoint`` and returns its metadata.

    With ``model``, checks that its configuration is the checkpoint's (``ValueError`` listing
    the differences otherwise) and loads the weights; with ``optimizer``, loads its state; with
    ``restore_rng=True``, restores every random number generator (and ``generator``, the
    batch stream). A truncated, corrupt or foreign file raises ``ValueError``; a missing one
    ``FileNotFoundError``. The returned dict has ``step``, ``model_config``, ``train_config``,
    ``data_state``, ``tokenizer`` and ``history``.
    """
    path = Path(path)
    tensors, meta = _read_checkpoint(path)
    if model is not None:
        inner = _unwrap(model)
        diffs = _config_differences(meta["model_config"], _model_config_dict(inner))
        if diffs:
            raise ValueError(
                f"{path} was made with another model configuration: " + "; ".join(diffs)
            )
        state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        for alias, target in meta["aliases"].items():
            state[alias] = state[target]
        for name, t in inner.state_dict().items():  # FSDP: each rank keeps its shard of the whole tensor
            if _is_sharded(t) and name in state:
                state[name] = _shard_like(state[name], t)
        try:
            inner.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not fit this model: {err}") from None
    if optimizer is not None:
        om = meta["optimizer"]
        if om is None:
            raise ValueError(f"{path} holds no optimizer state")
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer.state."):
                _, _, pid, name = key.split(".", 3)
                opt_state.setdefault(int(pid), {})[name] = value
        for pid, values in om["scalar_state"].items():
            opt_state.setdefault(int(pid), {}).update(values)
        params = [p for group in optimizer.param_groups for p in group["params"]]  # state ids count these
        for pid, values in opt_state.items():
            if pid < len(params) and _is_sharded(params[pid]):
                for name, value in values.items():
                    if torch.is_tensor(value) and value.shape == params[pid].shape:
                        values[name] = _shard_like(value, params[pid])
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in om["param_groups"]]
        try:
            optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{path}: the optimizer state does not fit this optimizer: {err}") from None
    if restore_rng:
        _restore_rng(tensors, meta["rng"], generator)
    return {k: meta[k] for k in ("step", "model_config", "train_config", "data_state", "tokenizer", "history")}
