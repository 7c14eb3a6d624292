"""Causal self-attention on the CPU: our MultiHeadAttention (SDPA path and explicit path) vs torch.nn.MultiheadAttention.

    .venv/bin/python benchmarks/attention.py [--lengths 128 256 512 1024] [--d-model 256] [--n-heads 8]

For each sequence length it times a forward pass (no grad) and a forward + backward pass, taking the best of
several interleaved runs after a warm-up, and prints a table in milliseconds with the ratio nn.MultiheadAttention / ours (SDPA):
a ratio >= 1 means our fused path is at least as fast as PyTorch's own layer. All three compute the same function
(checked before timing).
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import torch

from llm_from_scratch.attention import MultiHeadAttention, causal_mask


def _best_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Best (minimum) time of each function in ms. Runs are interleaved (a, b, c, a, b, c, ...) so that a
    change in machine load (other processes) hits every contender alike; the minimum is the run least
    disturbed by them."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def _step(run, x: torch.Tensor, xg: torch.Tensor, mask: torch.Tensor, backward: bool) -> None:
    if backward:
        run(xg, mask).sum().backward()
    else:
        with torch.no_grad():
            run(x, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    context = max(args.lengths)
    sdpa = MultiHeadAttention(args.d_model, args.n_heads, context_length=context, use_sdpa=True)
    explicit = MultiHeadAttention(args.d_model, args.n_heads, context_length=context, use_sdpa=False)
    explicit.load_state_dict(sdpa.state_dict())
    reference = torch.nn.MultiheadAttention(args.d_model, args.n_heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(sdpa.c_attn.weight)
        reference.in_proj_bias.copy_(sdpa.c_attn.bias)
        reference.out_proj.weight.copy_(sdpa.c_proj.weight)
        reference.out_proj.bias.copy_(sdpa.c_proj.bias)

    runners = {
        "ours SDPA": lambda x, mask: sdpa(x),
        "ours explicit": lambda x, mask: explicit(x),
        "nn.MHA": lambda x, mask: reference(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0],
    }
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"batch {args.batch}, d_model {args.d_model}, {args.n_heads} heads, float32, best of {args.repeats} interleaved runs"
    )
    header = (
        f"{'T':>5} | {'pass':>10} | " + " | ".join(f"{name:>13}" for name in runners) + " | nn.MHA / ours SDPA"
    )
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.d_model)
        mask = ~causal_mask(length)  # nn.MultiheadAttention: True = not allowed
        with torch.no_grad():
            outs = [run(x, mask) for run in runners.values()]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)
        xg = x.clone().requires_grad_()
        for label, backward in (("forward", False), ("fwd + bwd", True)):
            times = _best_ms(
                {name: functools.partial(_step, run, x, xg, mask, backward) for name, run in runners.items()},
                args.repeats,
            )
            cells = " | ".join(f"{times[name]:10.2f} ms" for name in runners)
            print(f"{length:5d} | {label:>10} | {cells} | {times['nn.MHA'] / times['ours SDPA']:18.2f}")

if __name__ == "__main__":
    main()
