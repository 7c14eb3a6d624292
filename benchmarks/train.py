"""Training throughput: our GPT and trainer step against Hugging Face's GPT2LMHeadModel.

    .venv/bin/python benchmarks/train.py                      # CPU, a small GPT (see --help)
    .venv/bin/python benchmarks/train.py --device cuda        # GPT-2 small in bf16, with MFU

Both models get the same configuration (GPT-2's architecture at the chosen size), the same
batches of random token ids, the same loss (mean cross-entropy over every position), the same
optimizer (``configure_optimizer``: AdamW, fused where available, weight decay on matrices) and
the same step (``train_step``: forward, backward, gradient clipping, optimizer step). Only the
model differs. A row times HF's model the way HF users usually train it: its own loss
(``labels=``) and ``torch.optim.AdamW`` with its defaults (not fused). On the CPU, a last row
times our GPT with its linear layers' products on ``F.linear`` (PyTorch's BLAS) instead of
oneDNN (``set_onednn(model, False)``), to show how much of the difference that accounts for. The models are timed in
rounds of ``--steps`` steps each, one after the other, the order reversed every round, so that
a machine shared with other programs slows them alike. The table shows each model's median
time per step and the median (and range) of the per-round ratios to ours. On the CPU with one
thread the ratio of process CPU time is printed too: it does not count the time other programs
hold the core, so it stays close to the idle machine's ratio under load. The load average
before and after the timed rounds is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from llm_from_scratch.linear import set_onednn
from llm_from_scratch.model import GPT, GPTConfig, estimate_flops_per_token
from llm_from_scratch.train import configure_optimizer, peak_flops, resolve_precision, train_step
from llm_from_scratch.utils import get_device


class HFAdapter(nn.Module):
    """``GPT2LMHeadModel`` behind our interface: ``forward(idx, targets) -> (logits, loss)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.d_model,
            n_layer=config.n_layers, n_head=config.n_heads, activation_function="gelu_new",
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.layer_norm_eps, tie_word_embeddings=config.tie_weights,
            bos_token_id=None, eos_token_id=None,
        )
        hf_config._attn_implementation = "sdpa"  # PyTorch's fused attention, like ours
        self.hf = GPT2LMHeadModel(hf_config)
        self.config = config

    def forward(self, idx, targets):
        logits = self.hf(input_ids=idx).logits  # (B, T, vocab_size)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


class HFOwnLoss(HFAdapter):
    """``GPT2LMHeadModel`` as its users train it: its own loss (``labels=``, shifted inside)."""

    def forward(self, idx, targets):
        out = self.hf(input_ids=idx, labels=idx)  # predicts idx[:, 1:] from idx[:, :-1]
        return out.logits, out.loss


def time_steps(model, optimizer, batches, amp_dtype, device) -> tuple[float, float]:
    """Seconds per optimizer step over ``batches`` (one batch per step): wall clock and process CPU time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    for x, y in batches:
        train_step(model, optimizer, [(x, y)], grad_clip=1.0, autocast_dtype=amp_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches), (time.process_time() - start_cpu) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--n-layers", type=int, default=None)
    parser.add_argument("--n-heads", type=int, default=None)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()

    device = get_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # CPU: a small GPT whose blocks, not the output layer, dominate; GPU: GPT-2 small.
    base = GPTConfig.gpt2_small() if gpu else GPTConfig(vocab_size=2048, context_length=256, d_model=256,
                                                         n_layers=4, n_heads=4)
    overrides = {k: v for k, v in dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                                       context_length=args.context_length, vocab_size=args.vocab_size).items()
                 if v is not None}
    config = GPTConfig(**{**vars(base), **overrides})
    batch_size = args.batch_size or (16 if gpu else 8)
    steps = args.steps or (10 if gpu else 5)
    rounds = args.rounds or 5
    amp_dtype = resolve_precision(args.precision, device)

    torch.manual_seed(0)
    models = {"ours (GPT)": GPT(config).to(device), "HF GPT2LMHeadModel": HFAdapter(config).to(device),
              "HF, default AdamW + HF loss": HFOwnLoss(config).to(device)}
    if device.type == "cpu":
        models["ours, products on F.linear"] = set_onednn(GPT(config), False)
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    optimizers = {name: configure_optimizer(m, lr=3e-4) for name, m in models.items()}
    # The recipe HF users usually write: torch's AdamW with its defaults (foreach, not fused),
    # same hyperparameters, decay on every parameter.
    optimizers["HF, default AdamW + HF loss"] = torch.optim.AdamW(
        models["HF, default AdamW + HF loss"].parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if args.compile:
        models = {name: torch.compile(m) for name, m in models.items()}
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (steps, batch_size, config.context_length + 1), generator=g)
    batches = [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]

    for name, m in models.items():  # warm-up: allocator, kernels, compilation
        time_steps(m, optimizers[name], batches[:2], amp_dtype, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    load_before = os.getloadavg()
    for r in range(rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):  # ABC, CBA, ABC, ...
            wall, cpu = time_steps(models[name], optimizers[name], batches, amp_dtype, device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    load_after = os.getloadavg()

    tokens_per_step = batch_size * config.context_length
    flops_per_token = estimate_flops_per_token(config)
    peak = peak_flops(device)
    fused = optimizers["ours (GPT)"].defaults.get("fused")
    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else 'CPU'}), threads "
          f"{torch.get_num_threads()}, precision {amp_dtype or torch.float32}, fused AdamW {bool(fused)}")
    print(f"config d_model={config.d_model} n_layers={config.n_layers} n_heads={config.n_heads} "
          f"context={config.context_length} vocab={config.vocab_size}; batch {batch_size}; "
          f"{steps} steps x {rounds} rounds; {flops_per_token / 1e6:.1f} MFLOP/token")
    print()
    print("| model | parameters | ms/step | tokens/s | MFU | ours is faster by (median of rounds, range) |")
    print("|---|---:|---:|---:|---:|---:|")
    ours = "ours (GPT)"
    for name in models:
        t = statistics.median(times[name])
        tps = tokens_per_step / t
        mfu = f"{tps * flops_per_token / peak:.1%}" if peak else "n/a"
        ratios = [a / b for a, b in zip(times[name], times[ours], strict=True)]
        print(f"| {name} | {n_params[name] / 1e6:.2f}M | {t * 1000:.1f} | {tps:,.0f} | {mfu} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    print()
    if device.type == "cpu" and torch.get_num_threads() == 1:
        cpu_ratios = {name: statistics.median(a / b for a, b in zip(cpu_times[name], cpu_times[ours], strict=True))
                      for name in models if name != ours}
        print("process CPU time, ours is faster by (median of rounds): "
              + "; ".join(f"{name} {r:.2f}x" for name, r in cpu_ratios.items()))
    print(f"load average (1, 5, 15 min) before the timed rounds: {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {', '.join(f'{x:.2f}' for x in load_after)}")
    print()
    print("Rows 1-2: same step, loss and optimizer (configure_optimizer); only the model differs. Row 3: HF's")
    print("model with its own loss and torch.optim.AdamW's defaults (foreach), as HF training code usually does.")
    if device.type == "cpu":
        print("Row 4: our GPT with its linear layers' products on F.linear (PyTorch's BLAS) instead of oneDNN.")


if __name__ == "__main__":
    main()
