"""Greedy generation on the CPU: our ``generate`` with and without the KV cache vs Hugging Face ``generate``.

    .venv/bin/python benchmarks/generate.py [--new-tokens 512] [--no-cache-tokens 64] [--prompt-length 16]
                                            [--preset gpt2_small] [--threads 0] [--repeats 3]
                                            [--formats fp32,fp32-kernel,bf16,int8,w8a8] [--batch-sizes 1,8]
                                            [--formats-only]
                                            [--gguf-dir artifacts/bench] [--no-llama-cpp]
                                            [--llama-cpp-extra-buffers auto|on|off]

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

Weight formats and the roofline (``--formats fp32,fp32-kernel,bf16,int8,w8a8``, ``--batch-sizes 1,8``;
``--formats-only`` skips the comparisons above): the same model as it is (float32, ``nn.Linear``) and through
``quantize.quantize_model`` (float32 weights unchanged in the kernel's layers, "fp32-kernel"; bfloat16; int8 with
scales per 32 weights; w8a8, the same int8 weights with each token vector rounded to int8 in the same groups of 32),
each generating ``--new-tokens`` greedy tokens with the cache at every batch size (a batch
repeats the prompt with different random tokens). The rows are timed in ``--repeats`` rounds, the order rotating
every round; medians. The machine's read bandwidth is measured in the same run, before and after the rows (a torch
sum over 1 GiB of float32 on the same threads, best of 5), and each row's *roofline* is what that bandwidth allows
if a step did nothing but read its bytes once: every weight matrix in its format (biases, layer norms and the looked-up
embedding rows are under 0.2% and left out) plus the key/value cache the step attends over, averaged over the run.
A batch reads the weights once per step for all its rows, so its roofline in tokens/s is
``B * bandwidth / (weights + B * cache)``. The column "of roofline" is tokens/s / roofline. The quantized kernels
are built (or loaded from the cache) before the timed runs.

llama.cpp beside ours (optional, never needed by the tests): when ``llama_cpp`` (llama-cpp-python) and ``gguf`` are
importable and ``--gguf-dir`` holds this model as GGUF files (``<preset>-seed<seed>-{f32,f16,q8_0}.gguf``, written
by ``scripts/gpt2_to_gguf.py``; ``bash scripts/build_llama_cpp.sh`` builds llama.cpp with ``-DGGML_NATIVE=ON`` in
a separate venv and writes them), the table gets rows "llama.cpp f32 / f16 / q8_0" at batch 1: the same weights,
greedy (temperature 0, top-k 1, no repetition penalty), the same prompt and number of new tokens, ``n_threads`` = torch's threads, timed in the same rotating rounds. Their roofline counts the
GGUF weight matrices at their sizes in the file (f32 4 bytes, f16 2, q8_0 34 per 32 weights; the tied embedding
once, as the output matrix) plus llama.cpp's key/value cache (float16, its default). "vs fp32" of a llama.cpp row
is against llama.cpp f32; "ours / llama.cpp" is our matching row's tokens/s over llama.cpp's (``LLAMA_CPP_MATCH``:
fp32-kernel, or fp32 when it is not in ``--formats``, vs f32; bf16 vs f16; w8a8, or int8 without it, vs q8_0, whose
products round the token vectors to 8 bits too); "same tokens as fp32" compares with our fp32 tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from llm_from_scratch.generate import generate
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.quantize import kernels, quantize_model
from llm_from_scratch.roofline import kv_cache_bytes, read_bandwidth, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
#: The GGUF type of each llama.cpp row -> our formats it compares with, the first one in --formats (q8_0
#: quantizes the token vectors too, as w8a8 does; f32 against the kernel's float32 when it is there).
LLAMA_CPP_MATCH = {"f32": ("fp32-kernel", "fp32"), "f16": ("bf16",), "q8_0": ("w8a8", "int8")}
#: Our formats: the model as it is ("fp32", nn.Linear), or quantize_model's dtype for the others.
QUANTIZE_DTYPES = {"fp32-kernel": "fp32", "bf16": "bf16", "int8": "int8", "w8a8": "w8a8"}
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


def cache_bytes(config: GPTConfig, prompt_length: int, new_tokens: int) -> float:
    """Key/value cache bytes one row's decode step reads, averaged over the run (float32 keys and values)."""
    return kv_cache_bytes(config, 1) * (prompt_length + (new_tokens - 1) / 2)


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the weight matrices one llama.cpp decode step reads: the 2-D tensors of the GGUF file at their stored
    sizes, less the looked-up position embedding, and the token embedding only as the (tied) output matrix."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    skip = {"position_embd.weight"} | ({"token_embd.weight"} if "output.weight" in tensors else set())
    return sum(int(t.n_bytes) for name, t in tensors.items() if name not in skip)


def without_extra_buffers(llama_cpp) -> None:
    """Make every ``llama_cpp.Llama`` created from now on load its weights without extra buffer types.

    Extra buffer types are llama.cpp's AMX and repacked-weight layouts. On a CPU with AMX, llama-cpp-python 0.3.36's
    q8_0 crashed in them (segmentation fault, 2026-12-03); the plain CPU buffers compute the same function.
    ``Llama`` takes no argument for it, so the default model parameters it starts from are wrapped.
    """
    default_params = llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = plain_buffers


def llama_cpp_rows(args, model: GPT, formats: list[str]) -> dict:
    """``{row name: (our format, Llama, weight bytes)}`` of the llama.cpp rows, or ``{}`` with a line saying why."""
    if args.no_llama_cpp:
        return {}
    how = "bash scripts/build_llama_cpp.sh (then run this script with the python of the venv it prints)"
    if 1 not in [int(b) for b in args.batch_sizes.split(",") if b]:
        print("llama.cpp rows skipped: they run at batch 1, which --batch-sizes leaves out")
        return {}
    for module in ("llama_cpp", "gguf"):  # gguf: the tensor sizes of the roofline
        if importlib.util.find_spec(module) is None:
            print(f"llama.cpp rows skipped: {module} is not importable; to get them: {how}")
            return {}
    import llama_cpp

    extra_buffers = args.llama_cpp_extra_buffers
    if extra_buffers == "auto":  # off where the CPU has AMX: llama.cpp's AMX buffers crashed there with q8_0
        cpuinfo = Path("/proc/cpuinfo")
        has_amx = cpuinfo.exists() and "amx_int8" in cpuinfo.read_text(errors="replace")
        extra_buffers = "off" if has_amx else "on"
    if extra_buffers == "off":
        print("llama.cpp rows: extra buffer types off (no AMX or repacked weights: use_extra_bufts=False)")
        without_extra_buffers(llama_cpp)
    gguf_dir = args.gguf_dir or ROOT / "artifacts" / "bench"
    matches = {kind: next((name for name in ours if name in formats), None) for kind, ours in LLAMA_CPP_MATCH.items()}
    files = {name: gguf_dir / f"{args.preset}-seed{args.seed}-{kind}.gguf" for kind, name in matches.items() if name}
    missing = [str(path) for path in files.values() if not path.exists()]
    if missing:
        print(f"llama.cpp rows skipped: no {', '.join(missing)}; to get them: {how}")
        return {}
    rows = {}
    for name, path in files.items():
        llm = llama_cpp.Llama(
            str(path), n_ctx=args.prompt_length + args.new_tokens + 16, n_batch=max(512, args.prompt_length),
            n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
            type_k=llama_cpp.GGML_TYPE_F16, type_v=llama_cpp.GGML_TYPE_F16, verbose=False,
        )
        if llm.n_vocab() != model.config.vocab_size:
            raise SystemExit(f"{path}: vocabulary {llm.n_vocab()}, ours {model.config.vocab_size}: not this model")
        rows[f"llama.cpp {path.stem.rsplit('-', 1)[1]}"] = (name, llm, gguf_weight_bytes(path))
    return rows


def llama_cpp_generate(llm, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy generation with llama.cpp from a (1, T) prompt: (1, T + n_new) token ids, like our ``generate``."""
    llm.reset()  # forget the last run's cache: the prompt is evaluated again (prefill included, as for ours)
    ids = prompt[0].tolist()
    tokens = llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
    new = list(itertools.islice(tokens, n_new))
    return torch.tensor([ids + new])


def formats_table(args, model: GPT) -> None:
    """The weight formats against each other and against their rooflines (see the module docstring)."""
    formats = [f for f in args.formats.split(",") if f]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    unknown = [name for name in formats if name != "fp32" and name not in QUANTIZE_DTYPES]
    if unknown:
        raise SystemExit(f"--formats: unknown {', '.join(unknown)}; expected some of fp32, {', '.join(QUANTIZE_DTYPES)}")
    models = {"fp32": model}
    for name in formats:
        if name != "fp32":
            models[name] = quantize_model(model, QUANTIZE_DTYPES[name])
    if len(models) > 1 and kernels() is None:
        print("note: the quantized kernel is not available; kernel rows run the reference (dequantize + F.linear)")
    n_new = args.new_tokens
    llama = llama_cpp_rows(args, model, formats)  # {} without llama.cpp
    run = {name: (lambda p, n, m=m: generate(m, p, n, temperature=0.0)) for name, m in models.items()}
    run |= {name: (lambda p, n, llm=llm: llama_cpp_generate(llm, p, n)) for name, (_, llm, _) in llama.items()}
    rows = []  # (format, batch size, prompt)
    for batch in batch_sizes:
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_length),
                               generator=torch.Generator().manual_seed(args.seed + batch))
        rows += [(name, batch, prompt) for name in formats]
        if batch == 1:
            rows += [(name, batch, prompt) for name in llama]
    for name, _batch, prompt in rows:  # warm-up: kernels, allocator, thread pools
        run[name](prompt, 8)
    bandwidth_before = read_bandwidth()
    times: dict = {(name, batch): [] for name, batch, _ in rows}
    outputs: dict = {}
    load_before = os.getloadavg()
    for r in range(max(1, args.repeats)):
        order = rows[r % len(rows):] + rows[: r % len(rows)]  # rotate: no row always runs first
        for name, batch, prompt in order:
            t, outputs[name, batch] = _timed(lambda f=run[name], p=prompt: f(p, n_new))
            times[name, batch].append(t)
    load_after = os.getloadavg()
    bandwidth_after = read_bandwidth()
    bandwidth = (bandwidth_before + bandwidth_after) / 2
    kv = cache_bytes(model.config, args.prompt_length, n_new)
    rates = {key: key[1] * n_new / statistics.median(t) for key, t in times.items()}
    width = max(6, *(len(name) for name, _, _ in rows))
    extra_head, extra_rule = (f" {'ours / llama.cpp':>16} |", f"{'-' * 18}|") if llama else ("", "")
    print()
    print(f"weight formats: {args.preset}, greedy, prompt {args.prompt_length} tokens, {n_new} new tokens, "
          f"KV cache; median of {max(1, args.repeats)} rotating rounds; {torch.get_num_threads()} threads")
    print(f"read bandwidth (torch sum over 1 GiB): {bandwidth_before / 1e9:.1f} GB/s before, "
          f"{bandwidth_after / 1e9:.1f} GB/s after the rows; rooflines use the mean, {bandwidth / 1e9:.1f} GB/s")
    print(f"| {'format':<{width}} | {'batch':>5} | {'MB read/step':>12} | {'tokens/s':>9} | {'vs fp32':>7} | "
          f"{'roofline tok/s':>14} | {'of roofline':>11} | {'same tokens as fp32':>19} |{extra_head}")
    print(f"|{'-' * (width + 2)}|{'-' * 7}|{'-' * 14}|{'-' * 11}|{'-' * 9}|{'-' * 16}|{'-' * 13}|{'-' * 21}|"
          f"{extra_rule}")
    for name, batch, _ in rows:
        rate = rates[name, batch]
        base = "llama.cpp f32" if name in llama else "fp32"
        fp32_rate = rates.get((base, batch))
        if name in llama:
            step_bytes = llama[name][2] + batch * kv / 2  # its key/value cache is float16, ours float32
        else:
            step_bytes = weight_bytes(models[name]) + batch * kv
        roofline = batch * bandwidth / step_bytes
        out, ref = outputs[name, batch][:, args.prompt_length:], outputs.get(("fp32", batch))
        if ref is None:
            same = "-"
        else:
            agree = (out == ref[:, args.prompt_length:]).long().cumprod(dim=1).sum(dim=1)  # (B,): leading equal tokens
            same = f"{int(agree.min())}/{n_new}" + ("" if batch == 1 else " (worst row)")
        ratio = f"{rate / fp32_rate:.2f}x" if fp32_rate else "-"
        extra = ""
        if llama:
            ours = llama[name][0] if name in llama else None
            extra = f" {f'{rates[ours, 1] / rate:.2f}x' if ours and (ours, 1) in rates else '-':>16} |"
        print(f"| {name:<{width}} | {batch:>5} | {step_bytes / 1e6:>12.1f} | {rate:>9.1f} | {ratio:>7} | "
              f"{roofline:>14.1f} | {rate / roofline:>10.0%} | {same:>19} |{extra}")
    print(f"load average (1, 5, 15 min) before the rows: {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {', '.join(f'{x:.2f}' for x in load_after)}")


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
    parser.add_argument("--formats", default="fp32,fp32-kernel,bf16,int8,w8a8",
                        help="weight formats of the roofline table (fp32: nn.Linear; fp32-kernel: the same weights in "
                             "quantize_model's fp32 layers)")
    parser.add_argument("--batch-sizes", default="1,8", help="batch sizes of the roofline table")
    parser.add_argument("--formats-only", action="store_true",
                        help="only the weight-format table (skip HF and the uncached run)")
    parser.add_argument("--gguf-dir", type=Path, default=None,
                        help="GGUF files of the llama.cpp rows (default: artifacts/bench; scripts/gpt2_to_gguf.py)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave out the llama.cpp rows")
    parser.add_argument("--llama-cpp-extra-buffers", choices=("auto", "on", "off"), default="auto",
                        help="llama.cpp's extra buffer types (AMX, repacked weights); auto: off on CPUs with AMX, "
                             "where llama-cpp-python 0.3.36 crashed with q8_0 (segmentation fault)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_new = args.new_tokens
    n_nocache = min(args.no_cache_tokens, n_new)

    torch.manual_seed(args.seed)
    model = GPT(getattr(GPTConfig, args.preset)()).eval()
    if args.formats_only:
        formats_table(args, model)
        return
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
    if args.formats:
        formats_table(args, model)


if __name__ == "__main__":
    main()
