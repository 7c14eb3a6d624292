"""Run by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node 2`` (gloo, loopback only).

Trains the tests' tiny GPT on the same random tokens in every process, with each strategy:

* ``<out>/<strategy>/full``: ``steps`` steps in one go;
* ``<out>/<strategy>/resumed``: ``steps // 2`` steps, then a second call of ``train`` that
  resumes from that checkpoint and runs to ``steps``.

The test compares the checkpoints with a single process trained on the global batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llm_from_scratch import distributed
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.train import TrainConfig, train

VOCAB = 64


def model_config() -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB, context_length=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0)


def train_config(steps: int, max_steps: int, batch_size: int) -> TrainConfig:
    return TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum_steps=2, warmup_steps=1,
                       decay_steps=steps, max_lr=3e-3, eval_interval=2, eval_batches=1, log_interval=1,
                       progress=False, device="cpu", precision="fp32", seed=7)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(0))


def fresh_model(strategy: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return distributed.wrap_model(GPT(model_config()), strategy, device="cpu")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    args = parser.parse_args()
    env, _ = distributed.setup("cpu")
    if env.world_size != 2:
        print(f"expected 2 processes, got {env.world_size}", file=sys.stderr)
        return 1
    data = tokens()
    try:
        for strategy in distributed.STRATEGIES:
            full, resumed = args.out / strategy / "full", args.out / strategy / "resumed"
            train(fresh_model(strategy), data, data[:1000], train_config(args.steps, args.steps, args.batch_size),
                  out_dir=full)
            half = args.steps // 2
            train(fresh_model(strategy), data, data[:1000], train_config(args.steps, half, args.batch_size),
                  out_dir=resumed)
            train(fresh_model(strategy), data, data[:1000], train_config(args.steps, args.steps, args.batch_size),
                  out_dir=resumed, resume_from=resumed)
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
