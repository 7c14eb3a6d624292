"""Greedy generation on the CPU: our ``generate`` with and without the KV cache vs Hugging Face ``generate``.

    .venv/bin/python benchmarks/generate.py [--new-tokens 512] [--no-cache-tokens 64] [--prompt-length 16]
                                            [--preset gpt2_small] [--threads 0] [--repeats 3]

A GPT-2-small-sized model with random weights (seeded) is built with our ``GPT`` and the same weights are loaded
into ``transformers.GPT2LMHeadModel`` (through HF's own GPT-2 state-dict layout, the inverse of
``GPT.from_hf_gpt2``). All three generate greedily from the same prompt; the tokens are checked to be identical before
the table is printed. Ours with the cache and HF are timed in ``--repeats`` pairs, the order alternating (HF first,
then ours first, ...) so that a machine shared with other programs slows both alike. The table gives tokens/s (new
tokens / wall time, prefill included, median of the runs) and the ratios:

* ``cache speed-up``: ours with the cache / ours without it (target: >= 10x at 512 new tokens);
* ``vs HF``: ours with the cache / HF ``generate(use_cache=True)`` (target: >= 1): the median of the pairs' ratios,
  each pair listed. The load average (``os.getloadavg``) before and after is printed: compare runs on an idle machine.

Both run in float32 with the same number of torch threads (``--threads``). Ours spreads each one-token matrix-vector
product over those threads (``llm_from_scratch.generate._ParallelMatVec``); with ``--threads 1`` it has none to spread
over. HF's model sends its products to MKL's matrix-vector routine, which is no faster on two threads than on one.

Without the cache every step recomputes the whole sequence, so its total cost grows with the square of the length:
on a 2-core CPU all 512 tokens take most of an hour. ``--no-cache-tokens N`` (default 64) runs the real uncached loop
for the first N new tokens only (timed, and its tokens checked against the cached run). The time of the full 512-token
uncached run is then *estimated*: one uncached step (a forward pass over the whole sequence + the argmax) is timed at
``--grid`` evenly spaced sequence lengths from the first step's to the last one's, interpolated linearly for every
step and summed. The table shows that estimate next to the measured N-token run and the estimate for those N tokens
(a check of the estimate). ``--no-cache-tokens`` equal to ``--new-tokens`` times the whole uncached run instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from llm_from_scratch.generate import generate
from llm_from_scratch.model import GPT, GPTConfig

_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf(model: GPT):
    """The same weights in a ``transformers.GPT2LMHeadModel`` (HF's Conv1D stores (in, out): transpose)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.d_model, n_layer=c.n_layers,
        n_head=c.n_heads, layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=c.tie_weights,
    )
    hf = GPT2LMHeadModel(hf_config)
    state = {k: (v.t() if k.endswith(_TRANSPOSED) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit HF's GPT-2: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _pairs(ours, reference, repeats: int) -> tuple[list[float], list[float], torch.Tensor, torch.Tensor]:
    """Times ``ours`` and ``reference`` in ``repeats`` back-to-back pairs, alternating which goes first."""
    times: dict = {ours: [], reference: []}
    outputs: dict = {}
    for r in range(repeats):
        for fn in ((reference, ours) if r % 2 == 0 else (ours, reference)):
            t, outputs[fn] = _timed(fn)
            times[fn].append(t)
    return times[ours], times[reference], outputs[ours], outputs[reference]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--no-cache-tokens", type=int, default=64,
                        help="new tokens of the real uncached run (default: 64; the rest is estimated)")
    parser.add_argument("--grid", type=int, default=9, help="sequence lengths timed for the estimate")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--preset", default="gpt2_small")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed (HF, ours) pairs of the cached contenders, alternating order (median kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_new = args.new_tokens
    n_nocache = min(args.no_cache_tokens, n_new)

    torch.manual_seed(args.seed)
    model = GPT(getattr(GPTConfig, args.preset)()).eval()
    hf = to_hf(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_length),
                           generator=torch.Generator().manual_seed(args.seed))

    def ours_cache(n=n_new):
        return generate(model, prompt, n, temperature=0.0, use_cache=True)

    def ours_nocache(n=n_nocache):
        return generate(model, prompt, n, temperature=0.0, use_cache=False)

    def hf_cache(n=n_new):
        with torch.inference_mode():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, use_cache=True, pad_token_id=0)

    # Warm-up (allocator, thread pools), then the checks on a short run.
    for fn in (ours_cache, hf_cache, ours_nocache):
        fn(8)
    load_before = os.getloadavg()
    times_cache, times_hf, out_cache, out_hf = _pairs(ours_cache, hf_cache, max(1, args.repeats))
    ratios = [h / o for h, o in zip(times_hf, times_cache, strict=True)]  # per pair: > 1 means ours is faster
    t_cache, t_hf = statistics.median(times_cache), statistics.median(times_hf)
    t_nocache, out_nocache = _timed(ours_nocache)
    if not torch.equal(out_cache, out_hf):
        same = int((out_cache == out_hf).long().cumprod(dim=1).sum()) - args.prompt_length
        raise SystemExit(f"our cached tokens differ from HF's after {same} new tokens")
    if not torch.equal(out_nocache, out_cache[:, : args.prompt_length + n_nocache]):
        raise SystemExit("our tokens with and without the cache differ")

    def step_time(length: int) -> float:  # one uncached step at this sequence length
        seq = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        start = time.perf_counter()
        with torch.no_grad():
            model(seq)[:, -1, :].argmax(dim=-1)
        return time.perf_counter() - start

    def estimate(n: int) -> float:  # uncached time of n new tokens: steps at lengths P .. P + n - 1
        first, last = args.prompt_length, args.prompt_length + n - 1
        grid = sorted({round(first + (last - first) * i / max(1, args.grid - 1)) for i in range(args.grid)})
        times = torch.tensor([step_time(length) for length in grid], dtype=torch.float64)
        lengths = torch.arange(first, last + 1, dtype=torch.float64)
        g = torch.tensor(grid, dtype=torch.float64)
        j = torch.searchsorted(g, lengths).clamp(1, len(grid) - 1) if len(grid) > 1 else None
        if j is None:
            return float(times[0]) * n
        w = (lengths - g[j - 1]) / (g[j] - g[j - 1])
        return float(((1 - w) * times[j - 1] + w * times[j]).sum())

    if n_nocache < n_new:
        est_full, est_part = estimate(n_new), estimate(n_nocache)
        full_name = f"ours, no cache ({n_new} tokens, estimated)"
        print(f"uncached: measured {t_nocache:.2f} s for {n_nocache} tokens; the estimate for them: {est_part:.2f} s")
    else:
        est_full, full_name = t_nocache, f"ours, no cache ({n_new} tokens)"

    rate = {
        "ours, KV cache": n_new / t_cache,
        f"ours, no cache ({n_nocache} tokens)": n_nocache / t_nocache,
        "HF GPT2LMHeadModel.generate, cache": n_new / t_hf,
    }
    times = {"ours, KV cache": t_cache, f"ours, no cache ({n_nocache} tokens)": t_nocache,
             "HF GPT2LMHeadModel.generate, cache": t_hf}
    if n_nocache < n_new:
        rate[full_name], times[full_name] = n_new / est_full, est_full
    print(f"greedy generation, {args.preset} ({model.num_parameters() / 1e6:.1f}M parameters, random weights), "
          f"prompt {args.prompt_length} tokens, {n_new} new tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("tokens identical: ours with cache == HF (all new tokens) == ours without cache (the tokens it made)")
    print(f"cached contenders: median of {len(times_cache)} runs each")
    print(f"| {'contender':<40} | {'time (s)':>9} | {'tokens/s':>9} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|")
    for name, r in rate.items():
        print(f"| {name:<40} | {times[name]:>9.2f} | {r:>9.1f} |")
    speedup = rate["ours, KV cache"] / rate[full_name]
    how = "" if n_nocache == n_new else " (no cache: estimated, see the docstring)"
    print(f"cache speed-up at {n_new} tokens (ours cache / ours no cache): {speedup:.1f}x{how}   target >= 10x")
    if n_nocache < n_new:
        lower = rate["ours, KV cache"] / rate[f"ours, no cache ({n_nocache} tokens)"]
        print(f"  lower bound, measured only: ours cache over {n_new} / ours no cache over its first {n_nocache}:"
              f" {lower:.1f}x")
    pairs = ", ".join(f"{r:.3f}" for r in ratios)
    print(f"vs HF (HF time / ours, median of {len(ratios)} alternating pairs): {statistics.median(ratios):.2f}x "
          f"(pairs: {pairs})   target >= 1")
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before the timed runs: {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {', '.join(f'{x:.2f}' for x in load_after)}")


if __name__ == "__main__":
    main()
