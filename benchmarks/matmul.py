"""Linear layers' products on the CPU: our ``Linear`` (oneDNN) against ``F.linear`` (PyTorch's BLAS).

    .venv/bin/python benchmarks/matmul.py              # PyTorch's default number of threads
    .venv/bin/python benchmarks/matmul.py --threads 1

For each shape ``(tokens, in, out)`` of a layer in a training step, times forward plus
backward (the three products ``x @ W.T``, ``grad @ W``, ``grad.T @ x``: 6 x tokens x in x out
FLOPs) of ``Linear`` with ``use_onednn`` on and off, in alternating rounds, and prints GFLOP/s
and the median ratio. The shapes are those of ``benchmarks/train.py``'s CPU model (d_model 256,
vocabulary 2,048, 2,048 tokens per batch) and of GPT-2 small's blocks (d_model 768).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_from_scratch.linear import ONEDNN_AVAILABLE, Linear

SHAPES = [  # (tokens, in_features, out_features, what)
    (2048, 256, 768, "d256 attention c_attn"),
    (2048, 256, 1024, "d256 MLP c_fc"),
    (2048, 1024, 256, "d256 MLP c_proj"),
    (2048, 256, 2048, "d256 output layer, vocab 2,048"),
    (2048, 768, 2304, "GPT-2 small c_attn"),
    (2048, 3072, 768, "GPT-2 small MLP c_proj"),
]


def seconds_per_step(layer: Linear, x: torch.Tensor, grad_out: torch.Tensor, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        layer(x).backward(grad_out)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="forward + backward passes per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ONEDNN_AVAILABLE:
        raise SystemExit("this PyTorch or CPU has no oneDNN path: Linear uses F.linear, there is nothing to compare")

    print(f"CPU, {torch.get_num_threads()} threads, float32, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print()
    print("| layer | tokens x in x out | F.linear GFLOP/s | Linear (oneDNN) GFLOP/s | oneDNN is faster by (median, range) |")
    print("|---|---|---:|---:|---:|")
    for tokens, d_in, d_out, what in SHAPES:
        torch.manual_seed(0)
        layer = Linear(d_in, d_out)
        x = torch.randn(tokens, d_in, requires_grad=True)
        grad_out = torch.randn(tokens, d_out)
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds + 1):
            for use_onednn in ((True, False) if r % 2 == 0 else (False, True)):
                layer.use_onednn = use_onednn
                t = seconds_per_step(layer, x, grad_out, args.repeats)
                if r > 0:  # round 0 warms up both
                    times[use_onednn].append(t)
        flops = 6 * tokens * d_in * d_out
        ratios = [b / a for a, b in zip(times[True], times[False], strict=True)]
        blas, onednn = (flops / statistics.median(times[k]) / 1e9 for k in (False, True))
        print(f"| {what} | {tokens} x {d_in} x {d_out} | {blas:.0f} | {onednn:.0f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    print()
    print("Forward + backward (x @ W.T, grad @ W, grad.T @ x, and the bias's sum) of one layer, float32.")


if __name__ == "__main__":
    main()
