"""The command line: ``python -m llm_from_scratch <command> ...``.

Commands (one function each, so that later chapters can add theirs, e.g. ``generate``):

* ``train``: tokenizer, token files, model, training loop, checkpoints and a loss plot, all in
  one run folder::

      python -m llm_from_scratch train --corpus shakespeare --preset tiny --max-steps 200 --out runs/tiny
      python -m llm_from_scratch train --resume runs/tiny --max-steps 400   # continue exactly

  The folder holds ``run.json`` (the arguments), ``tokenizer.json``, ``train.bin`` / ``val.bin``
  (token ids), ``checkpoint.safetensors``, ``history.json`` / ``history.csv`` and ``loss.png``.
  The same command runs data-parallel under ``torchrun`` (one process per device; DDP, or FSDP
  with ``--parallel fsdp``; ``--batch-size`` is per process)::

      torchrun --nproc_per_node 2 -m llm_from_scratch train --out runs/ddp --batch-size 8

* ``generate``: text from a checkpoint (see ``generate.add_generate_parser``).
* ``finetune-classifier`` and ``classify``: a pre-trained run fine-tuned to tell comedies,
  histories and tragedies apart, then used on a text (see ``finetune.add_finetune_parsers``)::

      python -m llm_from_scratch finetune-classifier --base runs/tiny --out runs/genre --max-steps 150
      python -m llm_from_scratch classify runs/genre "Now is the winter of our discontent"
* ``quantize``: a checkpoint's model with int8 or bfloat16 weights, in one file that ``generate``
  reads (see ``quantize.add_quantize_parser``; ``generate --quantize int8`` quantizes on the fly).
* ``chat`` / ``serve``: talk to an instruction-tuned model in the terminal or on a local web page
  (see ``chat.add_chat_parsers`` and the chapter "Following instructions").

Explained in the chapters "Pre-training" (chapters/05_pretraining.ipynb), "Training on many
devices" (chapters/07_distributed.ipynb) and "Fine-tuning for classification"
(chapters/09_classification.ipynb).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llm_from_scratch.utils import atomic_write_text

logger = logging.getLogger("llm_from_scratch")

#: Arguments of ``train`` that define a run; ``--resume`` reads them back from run.json.
_RUN_ARGS = (
    "corpus", "subset", "vocab_size", "val_fraction", "preset", "context_length", "dropout", "batch_size",
    "grad_accum_steps", "max_lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip", "eval_interval",
    "eval_batches", "seed", "split_seed",
)
_SUBSETS = {"full": None, "small": "small", "tiny": "tiny"}


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="pre-train a GPT on a corpus (tokenizer, data, training, checkpoints)",
        description="Pre-train a GPT. Start a run with --out DIR, continue one with --resume DIR.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="new run folder (created; must not hold a run already)")
    where.add_argument("--resume", type=Path, help="run folder to continue from its checkpoint")
    p.add_argument("--corpus", default="shakespeare", help="corpus name (default: shakespeare)")
    p.add_argument("--subset", default="small", choices=sorted(_SUBSETS), help="corpus subset (default: small)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096, the course tokenizer)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="documents held out (default: 0.1)")
    p.add_argument("--split-seed", type=int, default=2,
                   help="which documents are held out (default: 2, the chapters' split: Macbeth of the small subset)")
    p.add_argument("--preset", default="tiny", help="GPTConfig preset: tiny, small_cpu, gpt2_small, ...")
    p.add_argument("--context-length", type=int, default=None, help="tokens per window (default: the preset's)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps in total (default: 200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum-steps", type=int, default=1)
    p.add_argument("--max-lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=None, help="floor of the cosine (default: max-lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: max-steps / 10, at most 100")
    p.add_argument("--decay-steps", type=int, default=None, help="end of the cosine (default: max-steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                   help="under torchrun: DistributedDataParallel (default) or fully sharded data parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (TQDM_DISABLE=1 works too)")
    p.set_defaults(func=_cmd_train, parser=p)


def _prepare_data(args, run: Path):
    """Tokenizer and token files of the run folder, created when missing."""
    from llm_from_scratch.bpe import ENDOFTEXT, BPETokenizer, train_or_load_tokenizer
    from llm_from_scratch.data import TokenFile, load_documents, train_val_split, write_token_file

    tok_path = run / "tokenizer.json"
    if tok_path.exists():
        tokenizer = BPETokenizer.load(tok_path)
    else:
        logger.info("tokenizer: vocabulary %d on %s/%s", args.vocab_size, args.corpus, args.subset)
        # The course's cached tokenizer (trained on the training documents of this split only).
        tokenizer = train_or_load_tokenizer(vocab_size=args.vocab_size, subset=_SUBSETS[args.subset],
                                            val_fraction=args.val_fraction, split_seed=args.split_seed)
        tokenizer.save(tok_path)
    files = {"train": run / "train.bin", "val": run / "val.bin"}
    if not all(f.exists() for f in files.values()):
        documents = load_documents(args.corpus, subset=_SUBSETS[args.subset])
        train_docs, val_docs = train_val_split(documents, args.val_fraction, seed=args.split_seed)
        encoding = tokenizer.to_tiktoken()
        for name, docs in (("train", train_docs), ("val", val_docs)):
            ids = encoding.encode(ENDOFTEXT.join(docs), allowed_special={ENDOFTEXT})
            write_token_file(files[name], ids)
            logger.info("%s: %d documents, %d tokens", name, len(docs), len(ids))
    return tokenizer, tok_path, TokenFile(files["train"]), TokenFile(files["val"])


def _model_config(args, vocab_size: int):
    from llm_from_scratch.model import GPTConfig

    presets = GPTConfig.presets()
    name = args.preset.replace("-", "_")
    if name not in presets:
        raise ValueError(f"unknown preset {args.preset!r}: expected one of {sorted(presets)}")
    overrides = {"vocab_size": vocab_size, "dropout": args.dropout}
    if args.context_length is not None:
        overrides["context_length"] = args.context_length
    return getattr(GPTConfig, name)(**overrides)


def save_loss_plot(history: list[dict], path: Path) -> Path:
    """Training and validation loss against tokens seen, as a PNG (no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("train_loss", "training (batch)"), ("val_loss", "validation")):
        rows = [r for r in history if key in r]
        if rows:
            ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], label=label, marker="." if key == "val_loss" else None)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _cmd_train(args) -> int:
    from llm_from_scratch import distributed

    env, device = distributed.setup(args.device)
    try:
        return _train_run(args, env, device)
    finally:
        distributed.teardown()


def _train_run(args, env, device) -> int:
    import torch

    from llm_from_scratch import distributed
    from llm_from_scratch.metrics import text_stats
    from llm_from_scratch.model import GPT
    from llm_from_scratch.train import CHECKPOINT_NAME, TrainConfig, tokenizer_fingerprint, train

    if args.resume is not None:
        run = args.resume
        run_file = run / "run.json"
        if not (run / CHECKPOINT_NAME).exists() or not run_file.exists():
            raise ValueError(f"{run} holds no run to resume (expected run.json and {CHECKPOINT_NAME})")
        saved = json.loads(run_file.read_text())
        for key in _RUN_ARGS:
            given, default = getattr(args, key), args.parser.get_default(key)
            recorded = saved.get(key, default)  # a run recorded before the option existed used its default
            if given != default and given != recorded:
                option = "--" + key.replace("_", "-")
                raise ValueError(f"{option} cannot change when resuming: the run uses {recorded!r}")
            setattr(args, key, recorded)
        if args.max_steps is None:
            args.max_steps = saved["max_steps"]
    else:
        run = args.out
        if (run / "run.json").exists():
            raise ValueError(f"{run} already holds a run: continue it with --resume {run}, or pick another --out")
        distributed.barrier()  # every rank has seen the folder empty before rank 0 fills it
        run.mkdir(parents=True, exist_ok=True)
        if args.max_steps is None:
            args.max_steps = 200
        if args.decay_steps is None:
            args.decay_steps = args.max_steps
        if args.warmup_steps is None:
            args.warmup_steps = min(100, args.max_steps // 10)
    record = {key: getattr(args, key) for key in (*_RUN_ARGS, "max_steps")}

    if env.is_main:  # one process trains the tokenizer and writes the token files; the others wait, then read them
        prepared = _prepare_data(args, run)
    distributed.barrier()
    if not env.is_main:
        prepared = _prepare_data(args, run)
    tokenizer, tok_path, train_data, val_data = prepared
    config = TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, context_length=args.context_length,
        grad_accum_steps=args.grad_accum_steps, max_lr=args.max_lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval, eval_batches=args.eval_batches, seed=args.seed,
        device=str(device), precision=args.precision, progress=not args.no_progress,
        decay_steps=args.decay_steps,
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(_model_config(args, tokenizer.vocab_size))
    if env.is_main:
        logger.info("model: %s preset, %.2fM parameters; %d process(es)%s", args.preset,
                    model.num_parameters() / 1e6, env.world_size, f" ({args.parallel})" if env.is_distributed else "")
    if env.is_distributed:
        torch.manual_seed(args.seed + env.rank)  # but each rank its own dropout masks
        model = distributed.wrap_model(model, args.parallel, device=device)
    if env.is_main:
        atomic_write_text(run / "run.json", json.dumps(record, indent=1))  # before training: --resume needs it
    history = train(
        model, train_data, val_data, config, out_dir=run, resume_from=run if args.resume is not None else None,
        tokenizer=tokenizer_fingerprint(tok_path), val_stats=text_stats(val_data[:], tokenizer),
    )
    if not env.is_main:
        return 0
    plot = save_loss_plot(history, run / "loss.png")
    last = [r for r in history if "val_loss" in r][-1]
    bpc = f" ({last['val_bpc']:.3f} bits per character)" if "val_bpc" in last else ""
    print(f"step {last['step']}: validation loss {last['val_loss']:.4f}{bpc}; "
          f"checkpoint {run / CHECKPOINT_NAME}; plot {plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm_from_scratch", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(subparsers)
    from llm_from_scratch.generate import add_generate_parser

    add_generate_parser(subparsers)
    from llm_from_scratch.finetune import add_finetune_parsers

    add_finetune_parsers(subparsers)  # finetune-classifier, classify
    from llm_from_scratch.chat import add_chat_parsers

    add_chat_parsers(subparsers)  # chat, serve
    from llm_from_scratch.quantize import add_quantize_parser

    add_quantize_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from llm_from_scratch.train import NonFiniteLossError

    try:
        return args.func(args)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))  # exits with status 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
