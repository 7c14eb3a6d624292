"""Data-parallel training throughput: 1 process against 2 (DDP and FSDP), launched by torchrun.

    .venv/bin/python benchmarks/distributed.py                 # CPU, gloo, loopback
    .venv/bin/python benchmarks/distributed.py --steps 20      # longer timing

Every configuration trains the same GPT on the same global batch (``--global-batch`` windows
of ``--context-length`` tokens; with 2 processes each takes half), with the package's
``configure_optimizer`` and ``train_step``, so the work per step is identical and only the way
it is split differs. Each configuration runs in its own ``torchrun`` (loopback only), times
``--steps`` steps after ``--warmup`` and reports tokens/s. Rows:

* 1 process, 1 thread: the unit of work; the scaling efficiency of 2 processes is
  ``tokens/s(2 processes) / (2 x tokens/s(1 process, 1 thread))``;
* 1 process, 2 threads: the same cores used by intra-op threads instead of processes;
* 2 processes x 1 thread, DDP and FSDP: each process on one core, gradients all-reduced
  (DDP) or parameters gathered and gradients reduce-scattered (FSDP).

On a GPU machine (``--device cuda``, one process per GPU) the same rows measure NCCL scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    import torch

    from llm_from_scratch import distributed
    from llm_from_scratch.model import GPT, GPTConfig
    from llm_from_scratch.train import configure_optimizer, resolve_precision, train_step

    torch.set_num_threads(args.threads)
    env, device = distributed.setup(args.device)
    try:
        if args.global_batch % env.world_size:
            raise ValueError(f"--global-batch {args.global_batch} is not divisible by {env.world_size} processes")
        per_rank = args.global_batch // env.world_size
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
                           n_layers=args.n_layers, n_heads=args.n_heads, dropout=0.0)
        model = distributed.wrap_model(GPT(config), args.strategy, device=device)
        optimizer = configure_optimizer(model, lr=1e-4)
        amp = resolve_precision(args.precision, device)
        g = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(args.warmup + args.steps):
            data = torch.randint(0, args.vocab_size, (args.global_batch, args.context_length + 1), generator=g)
            rows = data[env.rank * per_rank:(env.rank + 1) * per_rank]  # this rank's shard
            batches.append((rows[:, :-1].to(device), rows[:, 1:].to(device)))
        for x, y in batches[: args.warmup]:
            train_step(model, optimizer, [(x, y)], autocast_dtype=amp)
        distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x, y in batches[args.warmup:]:
            train_step(model, optimizer, [(x, y)], autocast_dtype=amp)  # its loss all-reduce syncs the ranks
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if env.is_main:
            tokens = args.steps * args.global_batch * args.context_length
            print("RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "s_per_step": seconds / args.steps}))
    finally:
        distributed.teardown()


def launch(args, nproc: int, threads: int, strategy: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker",
               "--threads", str(threads), "--strategy", strategy]
    for name in ("device", "precision", "global_batch", "context_length", "d_model", "n_layers", "n_heads",
                 "vocab_size", "steps", "warmup"):
        command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all rows; the best round is kept")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    rows = [("1 process x 1 thread", 1, 1, "ddp"), ("1 process x 2 threads", 1, 2, "ddp"),
            ("2 processes x 1 thread, DDP", 2, 1, "ddp"), ("2 processes x 1 thread, FSDP", 2, 1, "fsdp")]
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # rounds interleave the rows, so a busy machine slows all alike
        for name, nproc, threads, strategy in rows:
            tps = launch(args, nproc, threads, strategy)["tokens_per_s"]
            best[name] = max(best.get(name, 0.0), tps)
    base = best[rows[0][0]]
    print(f"GPT d_model={args.d_model} n_layers={args.n_layers} vocab={args.vocab_size}, global batch "
          f"{args.global_batch} x {args.context_length} tokens, {args.device}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; best of {args.repeats} rounds of {args.steps} steps")
    print(f"{'configuration':32s} {'tokens/s':>10s} {'vs 1x1':>8s} {'scaling efficiency':>19s}")
    for name, nproc, threads, _ in rows:
        workers = nproc * threads
        print(f"{name:32s} {best[name]:10,.0f} {best[name] / base:7.2f}x {best[name] / (workers * base):18.0%}")


if __name__ == "__main__":
    main()
