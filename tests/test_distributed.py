"""Tests of llm_from_scratch.distributed: torchrun's environment, the arithmetic of scale, and a
real 2-process data-parallel run (gloo on the loopback interface) against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_from_scratch import distributed
from llm_from_scratch.distributed import (
    DistributedEnv,
    activation_memory,
    backend_for,
    compute_optimal_tokens,
    read_torchrun_env,
    ring_allreduce_bytes,
    ring_allreduce_time,
    training_flops,
    training_memory,
    training_time,
    wrap_model,
)
from llm_from_scratch.model import GPT
from llm_from_scratch.train import CHECKPOINT_NAME, load_checkpoint, train

from .distributed_worker import model_config, tokens, train_config

ROOT = Path(__file__).resolve().parents[1]

# --- torchrun's environment -------------------------------------------------------------------


def test_env_without_torchrun_is_one_process():
    env = read_torchrun_env({})
    assert env == DistributedEnv(rank=0, local_rank=0, world_size=1)
    assert env.is_main and not env.is_distributed


def test_env_from_torchrun_variables():
    env = read_torchrun_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 4)
    assert env.is_distributed and not env.is_main


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "RANK='x'"),
        ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "inconsistent"),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "0"}, "inconsistent"),
    ],
)
def test_env_rejects_bad_variables(environ, match):
    with pytest.raises(ValueError, match=match):
        read_torchrun_env(environ)


def test_backend_follows_the_device():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda:1") == "nccl"


def test_wrap_model_checks_and_passes_through_in_one_process():
    model = GPT(model_config())
    with pytest.raises(ValueError, match="strategy"):
        wrap_model(model, "zero")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        wrap_model("model")
    assert wrap_model(model, "ddp") is model  # no process group: nothing to wrap


# --- the arithmetic of scale (values worked out by hand) ---------------------------------------


def test_training_memory_is_16_bytes_per_parameter_with_adamw():
    fp32 = training_memory(1_000_000, precision="fp32")
    assert fp32 == {"weights": 4e6, "gradients": 4e6, "optimizer": 8e6, "total": 16e6}
    mixed = training_memory(1_000_000, precision="mixed")
    assert (mixed["weights"], mixed["gradients"], mixed["optimizer"]) == (2e6, 2e6, 12e6)
    assert training_memory(1_000_000, precision="mixed", shards=8)["total"] == 2e6  # FSDP over 8 devices
    with pytest.raises(ValueError, match="precision"):
        training_memory(10, precision="fp8")
    with pytest.raises(ValueError, match="shards"):
        training_memory(10, shards=0)


def test_activation_memory_matches_korthikanti_formula():
    # s=1024, b=1, h=768, a=12, 12 layers, 16-bit: 12 * s*b*h*(34 + 5*a*s/h) bytes
    s, b, h, a, layers = 1024, 1, 768, 12, 12
    expected = layers * s * b * h * (34 + 5 * a * s / h)
    got = activation_memory(batch_size=b, context_length=s, d_model=h, n_layers=layers, n_heads=a,
                            flash_attention=False)
    assert got == pytest.approx(expected)
    flash = activation_memory(batch_size=b, context_length=s, d_model=h, n_layers=layers, n_heads=a)
    assert flash == pytest.approx(layers * 34 * s * b * h)
    assert activation_memory(batch_size=1, context_length=4, d_model=8, n_layers=1, n_heads=1,
                             bytes_per_value=4) == 2 * 34 * 4 * 8


def test_flops_tokens_and_time():
    assert training_flops(124e6, 1e9) == pytest.approx(7.44e17)
    assert compute_optimal_tokens(124e6) == pytest.approx(2.48e9)
    # 6 * 1e9 * 2e10 = 1.2e20 FLOPs at 1e15 * 0.5 * 8 = 4e15 FLOP/s: 30,000 s
    assert training_time(1e9, 2e10, peak_flops=1e15, mfu=0.5, n_devices=8) == pytest.approx(30_000)
    with pytest.raises(ValueError, match="mfu"):
        training_time(1e9, 1e9, peak_flops=1e15, mfu=1.5)


def test_ring_allreduce_cost():
    assert ring_allreduce_bytes(1000, 1) == 0
    assert ring_allreduce_bytes(1000, 2) == 1000  # each rank sends half, twice
    assert ring_allreduce_bytes(1000, 4) == 1500
    # 8 ranks, 1 GB at 100 GB/s, 10 us per message: 2*7*1e-5 + 1.75e9/1e11
    assert ring_allreduce_time(1e9, 8, bandwidth=1e11, latency=1e-5) == pytest.approx(14e-5 + 0.0175)
    with pytest.raises(ValueError, match="world_size"):
        ring_allreduce_bytes(1000, 0)


# --- a real 2-process run ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Runs tests/distributed_worker.py under torchrun with 2 CPU processes (loopback only)."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(ROOT / "tests" / "distributed_worker.py"), "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    model = GPT(model_config())
    load_checkpoint(path / CHECKPOINT_NAME, model)
    return model.state_dict()


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The same steps in this process with the global batch (2 x the per-process batch)."""
    out = tmp_path_factory.mktemp("single")
    torch.manual_seed(0)
    data = tokens()
    train(GPT(model_config()), data, data[:1000], train_config(4, 4, batch_size=4), out_dir=out)
    return out


@pytest.mark.parametrize("strategy", distributed.STRATEGIES)
def test_two_processes_equal_one_process_over_the_global_batch(two_process_runs, one_process_run, strategy):
    ours, reference = _weights(two_process_runs / strategy / "full"), _weights(one_process_run)
    initial = GPT(model_config()).state_dict()
    for name, expected in reference.items():
        torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.allclose(reference[n], initial[n]) for n in reference)  # training moved the weights
    meta = load_checkpoint(two_process_runs / strategy / "full" / CHECKPOINT_NAME)
    assert meta["data_state"]["world_size"] == 2
    single = load_checkpoint(one_process_run / CHECKPOINT_NAME)
    losses = [r["train_loss"] for r in meta["history"] if "train_loss" in r]
    expected_losses = [r["train_loss"] for r in single["history"] if "train_loss" in r]
    assert losses == pytest.approx(expected_losses, rel=1e-5)


@pytest.mark.parametrize("strategy", distributed.STRATEGIES)
def test_resumed_distributed_run_continues_where_it_stopped(two_process_runs, strategy):
    full, resumed = two_process_runs / strategy / "full", two_process_runs / strategy / "resumed"
    assert load_checkpoint(resumed / CHECKPOINT_NAME)["step"] == 4
    for name, expected in _weights(full).items():
        torch.testing.assert_close(_weights(resumed)[name], expected, rtol=0, atol=1e-6, msg=name)


def test_resuming_with_another_number_of_processes_is_refused(two_process_runs, tmp_path):
    data = tokens()
    with pytest.raises(ValueError, match="2 process"):
        train(GPT(model_config()), data, None, train_config(4, 6, batch_size=2), out_dir=tmp_path,
              resume_from=two_process_runs / "ddp" / "full")
