"""Training on many devices: processes and ranks, DDP and FSDP, and the arithmetic of scale.

Explained in the chapter "Training on many devices" (chapters/07_distributed.ipynb). This
module holds:

* ``DistributedEnv`` / ``read_torchrun_env``: what ``torchrun`` tells each process (its
  ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), checked;
* ``setup`` / ``teardown``: join and leave the process group, with the backend chosen by the
  device (``gloo`` on the CPU, ``nccl`` on CUDA GPUs), and the device of this process;
* ``wrap_model``: ``DistributedDataParallel`` (every rank holds the whole model, gradients
  are averaged by all-reduce) or FSDP (``fully_shard``: parameters, gradients and optimizer
  state sharded across the ranks, gathered one block at a time);
* the arithmetic of scale: bytes per parameter in training, the ``6 N D`` FLOPs rule, the
  compute-optimal number of tokens, training time at a given MFU, and the ring all-reduce's
  traffic.

It does not train: the loop in ``train.py`` works unchanged on a wrapped model (its batches,
loss logging and checkpoints already know about ranks). It does not start processes either:
``torchrun`` does (``torchrun --nproc_per_node 2 -m llm_from_scratch train ...``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llm_from_scratch.train import _Runtime
from llm_from_scratch.utils import get_device

#: Data-parallel strategies ``wrap_model`` knows.
STRATEGIES = ("ddp", "fsdp")

#: Bytes per parameter of the model state in training with AdamW (weights, gradients, the two
#: moments; "mixed" adds the fp32 master weights kept beside bf16 weights and gradients).
BYTES_PER_PARAMETER = {
    "fp32": {"weights": 4, "gradients": 4, "optimizer": 8},
    "mixed": {"weights": 2, "gradients": 2, "optimizer": 12},
}


# --------------------------------------------------------------------------------------------
# Processes and ranks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedEnv(_Runtime):
    """Where this process stands: ``rank`` among ``world_size`` processes, ``local_rank`` on its machine.

    ``is_main`` (rank 0: the process that logs and writes files) and ``is_distributed``
    (``world_size > 1``) come from the trainer's own view of the ranks.
    """

    local_rank: int = 0


def read_torchrun_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """The ``DistributedEnv`` that ``torchrun`` describes in ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``.

    Without those variables (a plain ``python`` run) it is one process, rank 0. Values that are
    not integers, or a rank outside ``[0, WORLD_SIZE)``, raise ``ValueError``.
    """
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return DistributedEnv()
    values = {}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        raw = environ.get(key, "0")
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {key}={raw!r} is not an integer (is torchrun setting it?)") from None
    rank, local_rank, world_size = values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"]
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank <= rank:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size}")
    return DistributedEnv(rank=rank, local_rank=local_rank, world_size=world_size)


def backend_for(device: torch.device | str) -> str:
    """The collective-communication backend for ``device``: ``nccl`` for CUDA, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def current_env() -> DistributedEnv:
    """This process's place in the initialised process group (rank 0 of 1 when there is none)."""
    runtime = _Runtime.current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if runtime.is_distributed else 0
    return DistributedEnv(rank=runtime.rank, world_size=runtime.world_size, local_rank=local_rank)


def setup(
    device: str | torch.device | None = "auto",
    *,
    backend: str | None = None,
    timeout_s: float = 300.0,
) -> tuple[DistributedEnv, torch.device]:
    """Joins the process group ``torchrun`` set up and returns ``(env, device of this process)``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1): on CUDA each process takes GPU ``LOCAL_RANK``;
    the backend is ``backend_for(device)`` unless given; ``timeout_s`` bounds how long a
    collective waits for a missing rank. In a plain run it only resolves the device: one
    process, no group. Calling it again in the same process returns the same answer.
    """
    env = read_torchrun_env()
    device = get_device(device)
    if device.type == "cuda" and env.is_distributed:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not env.is_distributed:
        return env, device
    if not torch.distributed.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: it cannot run under torchrun")
    backend = backend_for(device) if backend is None else backend
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return env, device


def teardown() -> None:
    """Leaves the process group (no-op when there is none). Call it in a ``finally``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Waits until every rank gets here (no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------
# Data parallelism
# --------------------------------------------------------------------------------------------


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the members of every ``nn.ModuleList`` (GPT's ``transformer.h``, Llama's ``model.layers``)."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def wrap_model(model: nn.Module, strategy: str = "ddp", *, device: torch.device | str | None = None) -> nn.Module:
    """``model`` on ``device``, made data-parallel over the initialised process group.

    ``"ddp"``: ``DistributedDataParallel``: each rank holds the whole model; after each
    backward the gradients are averaged across ranks (all-reduce, in buckets that overlap with
    the backward pass). ``"fsdp"``: ``fully_shard`` on each transformer block, then on the
    whole model: each rank keeps ``1 / world_size`` of every parameter, its gradient and its
    optimizer state; a block's parameters are all-gathered just before it runs and freed after,
    and gradients are reduce-scattered. Build the optimizer *after* wrapping. Without a process
    group the model is returned as it is (on ``device``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = next(model.parameters()).device if device is None else torch.device(device)
    model = model.to(device)
    if not current_env().is_distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # forward_sync_buffers=False: our only buffers are constant masks and rotary tables.
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )
    from torch.distributed.fsdp import fully_shard

    for block in _repeated_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


# --------------------------------------------------------------------------------------------
# The arithmetic of scale
# --------------------------------------------------------------------------------------------


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def training_memory(n_params: int, *, precision: str = "mixed", shards: int = 1) -> dict[str, float]:
    """Bytes of model state per device when training ``n_params`` parameters with AdamW.

    ``precision``: ``"fp32"`` (4 + 4 + 8 = 16 bytes per parameter) or ``"mixed"`` (bf16
    weights and gradients, fp32 master weights and moments: 2 + 2 + 12 = 16 bytes).
    ``shards``: devices sharing the state as FSDP does (ZeRO stage 3): everything divided by
    ``shards``. Returns ``{"weights", "gradients", "optimizer", "total"}`` in bytes.
    Activations come on top (``activation_memory``).
    """
    _check_positive("n_params", n_params)
    if precision not in BYTES_PER_PARAMETER:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAMETER)}, got {precision!r}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    parts = {k: n_params * v / shards for k, v in BYTES_PER_PARAMETER[precision].items()}
    parts["total"] = sum(parts.values())
    return parts


def activation_memory(
    *, batch_size: int, context_length: int, d_model: int, n_layers: int, n_heads: int, bytes_per_value: int = 2,
    flash_attention: bool = True,
) -> float:
    """Bytes of activations a transformer keeps for its backward pass (no recomputation).

    Per layer, Korthikanti et al. (2022) count ``34 s b h`` values-bytes for 16-bit values
    (layer norms, Q/K/V, attention output, the 4x MLP, dropout masks), plus ``5 a s^2 b`` for
    the attention matrices, which a fused ("flash") attention never stores. Here the count is
    scaled to ``bytes_per_value``. Logits (``b s V``) come on top.
    """
    for name, value in (("batch_size", batch_size), ("context_length", context_length), ("d_model", d_model),
                        ("n_layers", n_layers), ("n_heads", n_heads), ("bytes_per_value", bytes_per_value)):
        _check_positive(name, value)
    s, b, h, a = context_length, batch_size, d_model, n_heads
    per_layer = 34 * s * b * h + (0 if flash_attention else 5 * a * s * s * b)  # bytes at 2 bytes per value
    return n_layers * per_layer * bytes_per_value / 2


def training_flops(n_params: float, n_tokens: float) -> float:
    """About ``6 N D``: 2 FLOPs per parameter per token forward, 4 backward (attention left out)."""
    _check_positive("n_params", n_params)
    _check_positive("n_tokens", n_tokens)
    return 6.0 * n_params * n_tokens


def compute_optimal_tokens(n_params: float, tokens_per_parameter: float = 20.0) -> float:
    """Training tokens for ``n_params`` at the compute-optimal ratio (about 20 per parameter, Hoffmann et al. 2022)."""
    _check_positive("n_params", n_params)
    _check_positive("tokens_per_parameter", tokens_per_parameter)
    return n_params * tokens_per_parameter


def training_time(n_params: float, n_tokens: float, *, peak_flops: float, mfu: float, n_devices: int = 1) -> float:
    """Seconds to train on ``n_tokens`` with ``n_devices`` of ``peak_flops`` each running at ``mfu``."""
    _check_positive("peak_flops", peak_flops)
    _check_positive("n_devices", n_devices)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    return training_flops(n_params, n_tokens) / (peak_flops * mfu * n_devices)


def ring_allreduce_bytes(n_bytes: float, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``n_bytes``: ``2 (p - 1) / p * n``.

    A reduce-scatter (``p - 1`` steps of ``n / p`` bytes) then an all-gather (as many): nearly
    ``2 n`` however many ranks there are, which is why data parallelism scales.
    """
    _check_positive("n_bytes", n_bytes)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    return 2 * (world_size - 1) / world_size * n_bytes


def ring_allreduce_time(n_bytes: float, world_size: int, *, bandwidth: float, latency: float = 0.0) -> float:
    """Seconds for a ring all-reduce: ``2 (p - 1)`` messages of latency plus the bytes over ``bandwidth`` (bytes/s)."""
    _check_positive("bandwidth", bandwidth)
    if latency < 0:
        raise ValueError(f"latency must be >= 0, got {latency!r}")
    return 2 * (world_size - 1) * latency + ring_allreduce_bytes(n_bytes, world_size) / bandwidth
