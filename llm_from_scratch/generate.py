"""Generating text: decoding strategies, the cached decode loop and the ``generate`` command.

Explained in the chapter "Generating text" (chapters/06_generation.ipynb). This module holds:

* ``top_k_filter`` / ``top_p_filter``: keep the ``k`` most likely tokens, or the smallest set
  whose probability reaches ``p`` (nucleus), by setting the others' logits to minus infinity;
* ``sample_next_token``: temperature, top-k, top-p, then a draw (temperature 0: greedy);
* ``stream_generate``: a generator that yields the new tokens one step at a time, with or
  without the key/value cache; ``generate``: the same, returned as one tensor;
* ``pad_prompts``: prompts of different lengths as one left-padded batch and its mask;
* ``load_model`` and ``add_generate_parser``: ``python -m llm_from_scratch generate`` (with
  ``--quantize int8|w8a8|bf16``, or a file written by ``python -m llm_from_scratch quantize``, it
  decodes with the quantized layers of ``quantize.py``).

It holds no model code: the key/value cache lives in ``attention.py`` (``KVCache``) and the
model (``model.py``) threads it through its layers. ``generate`` works with any model that has
``forward(idx, *, kv_cache=...)`` returning logits ``(B, T, vocab_size)``, ``new_kv_cache()``
and ``config.context_length`` (ragged batches also need ``padding_mask=`` and
``position_ids=``, which ``GPT`` accepts).

The context window: when the sequence grows longer than ``config.context_length``, generation
goes on with a *sliding window*: each step the model sees only the last ``context_length``
tokens (positions counted from the window's start). With learned absolute positions a cache
cannot slide (every cached key was computed at its old position), so from that point on each
step recomputes the whole window, with or without ``use_cache``: the two give the same tokens.

Speed on the CPU: a decode step is one matrix-vector product per weight matrix, bound by
reading the weights from memory. PyTorch's BLAS computes one no faster on several threads
than on one, so while generating, the model's ``nn.Linear`` layers compute a one-token
product as a batch of row slices, which does run on every thread (``_ParallelMatVec``); the
weights themselves are untouched.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from llm_from_scratch.linear import linear

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Decoding: filters and sampling
# --------------------------------------------------------------------------------------------
def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the others to ``-inf``.

    ``logits``: ``(..., vocab_size)``; returns a new tensor of the same shape. Ties with the
    ``k``-th value are kept. ``k`` larger than the vocabulary keeps everything.
    """
    _check_sampling(1.0, k, None)
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``.

    ``logits``: ``(..., vocab_size)``; returns a new tensor with the other logits at ``-inf``.
    Tokens are sorted by probability; a token is kept when the probability of the tokens
    before it is still below ``p``, so the most likely token is always kept and ``p = 1``
    keeps everything.
    """
    _check_sampling(1.0, None, p)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
    remove_sorted = before >= p  # (..., V), in sorted order
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def _check_logits(logits: Tensor) -> None:
    """Raise ``ValueError`` for logits with NaN or ``+inf`` (naming the rows) or a row that is all ``-inf``."""
    bad_rows = torch.isnan(logits).any(dim=-1) | torch.isposinf(logits).any(dim=-1)  # (B,)
    if bad_rows.any():
        rows = bad_rows.nonzero().flatten().tolist()
        raise ValueError(
            f"logits contain NaN or +inf in batch row(s) {rows[:8]}{' ...' if len(rows) > 8 else ''}: "
            "the model's output is broken (a diverged or corrupt checkpoint?); expected finite "
            "logits (-inf marks a token that is never chosen)"
        )
    if (logits == float("-inf")).all(dim=-1).any():
        row = int((logits == float("-inf")).all(dim=-1).nonzero()[0, 0])
        raise ValueError(f"every logit of batch row {row} is -inf: no token can be chosen")


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose the next token of each row from ``logits`` of shape ``(B, vocab_size)``; returns ``(B,)``.

    ``temperature`` divides the logits (below 1: sharper, above 1: flatter); ``0`` means
    greedy decoding (the argmax, no randomness). Then ``top_k`` and ``top_p`` filter (in that
    order) and a token is drawn from the softmax with ``generator`` (seed it for reproducible
    text). Raises ``ValueError`` for a negative temperature, ``top_k <= 0`` or ``top_p``
    outside ``(0, 1]``, and for logits with NaN or ``+inf`` (naming the rows) or a row that is
    all ``-inf``.
    """
    _check_sampling(temperature, top_k, top_p)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (batch, vocab_size), got {shape}")
    # One pass when every logit is finite (every step of a healthy model), _check_logits' row-by-row
    # checks otherwise: -inf (a token that is never chosen) is allowed but not finite.
    if not bool(torch.isfinite(logits).all()):
        _check_logits(logits)
    if temperature == 0:
        return torch.argmax(logits, dim=-1)  # (B,)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # draw where the generator lives, for reproducibility
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)  # (B,)


# --------------------------------------------------------------------------------------------
# The decode loop
# --------------------------------------------------------------------------------------------
def pad_prompts(prompts: Sequence[Sequence[int] | Tensor], *, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as one batch, padded on the left.

    Returns ``idx`` ``(B, T_max)`` (``pad_id`` before the shorter prompts) and
    ``attention_mask`` ``(B, T_max)`` bool, ``True`` for real tokens. Left padding puts every
    prompt's last token in the last column, where the next token is predicted.
    """
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token id sequences")
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if any(r.numel() == 0 for r in rows):
        raise ValueError("every prompt must hold at least one token")
    length = max(r.numel() for r in rows)
    idx = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, length - r.numel():] = r
        mask[i, length - r.numel():] = True
    return idx, mask


def _check_prompt(model: nn.Module, idx: Tensor, attention_mask: Tensor | None) -> Tensor:
    if not isinstance(idx, Tensor):
        raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (batch, tokens) or (tokens,), got {tuple(idx.shape)}")
    if idx.numel() == 0:
        raise ValueError(f"the prompt is empty (shape {tuple(idx.shape)}): give at least one token per row")
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got values in [{low}, {high}]")
    if getattr(config, "context_length", None) is None:
        raise TypeError("model must have config.context_length")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask must be a bool tensor (True for real tokens)")
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask must have the prompt's shape {tuple(idx.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        # Left padding: once a row's real tokens start, they go on to the end.
        if not bool(attention_mask[:, -1].all()) or bool((attention_mask[:, :-1] & ~attention_mask[:, 1:]).any()):
            raise ValueError("attention_mask must be left-padded (False* then True+ in every row); see pad_prompts")
    return idx


def _positions(mask: Tensor) -> Tensor:
    """Position of each token in its own row of a left-padded ``(B, T)`` mask (padding: 0)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _one_token_linear(weight: Tensor, bias: Tensor | None, parts: int, x: Tensor) -> Tensor:
    """``F.linear(x, weight, bias)``, for one token computed as ``parts`` slices of the output at once.

    ``weight`` ``(out, in)`` is viewed (no copy) as ``parts`` matrices of ``out // parts`` rows
    and one batched product (``torch.baddbmm``) computes the slices: PyTorch's BLAS spreads a
    batch over the CPU's threads, which a single matrix-vector product does not gain from.
    Anything but one token without gradients goes to ``linear`` (``Linear``'s own product).
    """
    out_features, in_features = weight.shape
    if x.numel() != in_features or torch.is_grad_enabled():
        return linear(x, weight, bias)
    w = weight.view(parts, out_features // parts, in_features).transpose(1, 2)  # (parts, in, out/parts): a view
    x_parts = x.reshape(1, 1, in_features).expand(parts, 1, in_features)
    y = torch.bmm(x_parts, w) if bias is None else torch.baddbmm(bias.view(parts, 1, -1), x_parts, w)
    return y.view(*x.shape[:-1], out_features)  # (parts, 1, out/parts) -> (..., out): slices in order


#: Smaller weight matrices are multiplied as they are: splitting them costs more than it saves.
_MIN_SPLIT_NUMEL = 2**17


class _ParallelMatVec:
    """Inside ``with``: the model's ``nn.Linear`` layers compute a one-token product on all CPU threads.

    A decode step multiplies one token's vector by every weight matrix: matrix-vector products
    that read each matrix once, so memory traffic sets the speed. On the CPU, PyTorch's BLAS
    (MKL) computes such a product as fast on one thread as on two, reading about 20 GB/s on
    the course's machine; cut into slices of rows computed as one batch
    (``_one_token_linear``) it uses every thread and reads about 33 GB/s
    (benchmarks/RESULTS.md, "Generation"). The float32 CPU layers
    whose number of outputs splits into at least as many slices as threads (of 16 rows or
    more) get that ``forward`` for the duration of ``with``, then their own again. The weights
    are not copied or changed; each output is still one dot product, in the BLAS's order.
    Multi-token inputs (the prompt) and anything with gradients run as usual (``linear``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[tuple[nn.Linear, functools.partial]] = []
        threads = torch.get_num_threads()
        if threads < 2 or hasattr(model, "_orig_mod"):  # one thread: nothing to gain; compiled models: as they are
            return
        for module in model.modules():
            w = getattr(module, "weight", None) if isinstance(module, nn.Linear) else None
            if (w is None or w.dim() != 2 or w.numel() < _MIN_SPLIT_NUMEL or w.device.type != "cpu"
                    or w.dtype != torch.float32 or type(w.data) is not Tensor or not w.is_contiguous()
                    or "forward" in vars(module)):
                continue  # small, GPU, other dtypes, sharded (DTensor), unusual or already patched: as they are
            out_features = w.size(0)
            parts = next((d for d in range(threads, out_features // 16 + 1) if out_features % d == 0), None)
            if parts is not None:  # GPT-2: 2 slices per block matrix, 29 for the 50,257-token output layer
                self.layers.append((module, functools.partial(_one_token_linear, w, module.bias, parts)))

    def __enter__(self) -> None:
        for module, forward in self.layers:
            module.forward = forward  # an instance attribute: found before nn.Linear.forward

    def __exit__(self, *exc) -> None:
        for module, _ in self.layers:
            del module.forward


def stream_generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    attention_mask: Tensor | None = None,
    return_logits: bool = False,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
    """Yield the new tokens as they are produced: one ``(B,)`` tensor per step.

    Arguments as in ``generate``. With ``return_logits=True`` each step yields
    ``(tokens, logits)``, ``logits`` ``(B, vocab_size)`` being the float32 scores the tokens
    were drawn from. Arguments are checked when this is called, not at the first step. The
    model is in eval mode while the generator runs (its mode is restored when it finishes or
    is closed).
    """
    idx = _check_prompt(model, idx, attention_mask)
    _check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)):
        raise ValueError(f"eos_id must be an int token id or None, got {eos_id!r}")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _decode(model, idx, max_new_tokens, sampling, eos_id, use_cache, attention_mask, return_logits)


def _decode(model, idx, max_new_tokens, sampling, eos_id, use_cache, attention_mask, return_logits):
    context_length = model.config.context_length
    ragged = attention_mask is not None and not bool(attention_mask.all())
    mask = attention_mask.to(idx.device) if ragged else None  # (B, T_total): grows with the sequence
    seq = idx  # (B, T_total)
    B = idx.size(0)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    cache, cached = None, 0  # the key/value caches and how many tokens they hold
    was_training = model.training
    model.eval()  # no dropout while generating
    # One token per step: every weight matrix is read for one matrix-vector product; on the CPU,
    # spread each product over all threads (see _ParallelMatVec).
    parallel = _ParallelMatVec(model)
    try:
        for _ in range(max_new_tokens):
            with torch.no_grad(), parallel:
                total = seq.size(1)
                kwargs = {}
                if use_cache and total <= context_length:
                    if cache is None:
                        cache = model.new_kv_cache()
                    start = cached  # prefill: the whole prompt; decode: the one newest token
                    kwargs["kv_cache"] = cache
                    if ragged:
                        kwargs["padding_mask"] = mask  # (B, total): cached keys and new ones
                        kwargs["position_ids"] = _positions(mask)[:, start:]
                else:
                    cache = None  # sliding window: recompute the last context_length tokens
                    start = max(0, total - context_length)
                    if ragged:
                        window = mask[:, start:]
                        kwargs["padding_mask"] = window
                        kwargs["position_ids"] = _positions(window)
                logits = model(seq[:, start:], **kwargs)[:, -1, :].float()  # (B, vocab_size)
                cached = total
                next_token = sample_next_token(logits, **sampling)  # (B,)
                if eos_id is not None:
                    next_token = torch.where(finished, eos_id, next_token)  # finished rows: eos again
                    finished |= next_token == eos_id
                seq = torch.cat([seq, next_token[:, None]], dim=1)
                if ragged:
                    mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            yield (next_token, logits) if return_logits else next_token
            if eos_id is not None and bool(finished.all()):
                return
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    attention_mask: Tensor | None = None,
) -> torch.LongTensor:
    """Continue the prompts ``idx`` by up to ``max_new_tokens`` tokens; returns prompt + new tokens.

    ``idx``: token ids ``(B, T)`` (or ``(T,)``, then the result is 1-D too). Each step the model
    scores the next token and ``sample_next_token`` picks it (``temperature`` 0: greedy;
    ``top_k``, ``top_p``: filters; ``generator``: a seeded ``torch.Generator`` gives the same
    text every time). ``eos_id``: a row that produces it is finished (it keeps producing
    ``eos_id``) and generation stops when every row is; the result then has fewer columns.
    ``use_cache``: feed one token per step and reuse the keys and values of the earlier ones
    (same tokens, much faster). ``attention_mask``: ``(B, T)`` bool for prompts of different
    lengths padded on the left (see ``pad_prompts``). Past ``config.context_length`` tokens a
    sliding window applies (see the module docstring).
    """
    squeeze = isinstance(idx, Tensor) and idx.dim() == 1
    steps = stream_generate(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
        generator=generator, use_cache=use_cache, attention_mask=attention_mask,
    )
    prompt = idx[None] if squeeze else idx
    new = list(steps)
    out = torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt.clone()  # (B, T + new)
    return out[0] if squeeze else out


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> str:
    """``prompt`` continued by up to ``max_new_tokens`` tokens, as text: encode, ``generate``, decode.

    ``tokenizer``: anything with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``
    (the course BPE, tiktoken, ``CharTokenizer``). ``seed``: sample with a CPU
    ``torch.Generator`` seeded with it (the same text every time). The prompt is part of the
    returned text.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    ids = tokenizer.encode(prompt)
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, generator=generator)
    return tokenizer.decode(out[0].tolist())


# --------------------------------------------------------------------------------------------
# Checkpoints and the command line
# --------------------------------------------------------------------------------------------
def _checkpoint_file(path: str | Path) -> Path:
    from llm_from_scratch.checkpoint import CHECKPOINT_NAME

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model saved in a training checkpoint (a run folder or its ``.safetensors`` file), in eval mode.

    The checkpoint's metadata names the model's class and holds its configuration; the class
    and its configuration class come from the registry (``registry.MODEL_CLASSES``: ``GPT``,
    the Llama-style ``TransformerLM``, the fine-tuning chapter's ``GPTClassifier``). Returns
    the model and the metadata of ``checkpoint.load_checkpoint``.
    """
    from safetensors import safe_open

    from llm_from_scratch.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
    from llm_from_scratch.registry import build_model

    path = _checkpoint_file(checkpoint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["llm_from_scratch"])
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a llm_from_scratch checkpoint: {err}") from None
    if meta.get("format") != CHECKPOINT_FORMAT or not meta.get("model_config"):
        raise ValueError(f"{path} is not a llm_from_scratch checkpoint with a model configuration")
    try:
        model = build_model(meta.get("model_class", "GPT"), meta["model_config"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    info = load_checkpoint(path, model)
    return model.to(device).eval(), info


def _load_tokenizer(run: Path, meta: dict, vocab_size: int, tokenizer_path: Path | None):
    from llm_from_scratch.bpe import BPETokenizer, gpt2_encoding

    candidates = [tokenizer_path] if tokenizer_path is not None else []
    folder = run if run.is_dir() else run.parent
    candidates.append(folder / "tokenizer.json")
    recorded = (meta.get("tokenizer") or {}).get("path")
    if recorded:
        candidates.append(Path(recorded))
    expected = (meta.get("tokenizer") or {}).get("sha256")
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            tokenizer = BPETokenizer.load(candidate)
            if expected and tokenizer.fingerprint() != expected:
                raise ValueError(
                    f"{candidate} is not the tokenizer the model was trained with: sha256 "
                    f"{tokenizer.fingerprint()}, the checkpoint records {expected}"
                )
            return tokenizer.to_tiktoken()
    if tokenizer_path is not None:
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path}")
    if vocab_size == 50257:
        return gpt2_encoding()
    raise FileNotFoundError(f"no tokenizer.json next to {run}: pass --tokenizer PATH")


def _load_for_generation(checkpoint: Path, device: torch.device, quantize: str | None) -> tuple[nn.Module, dict]:
    """A training checkpoint (quantized to ``quantize`` when given) or a file of ``quantize.save_quantized``."""
    # quantize.py belongs to the book's second half: only this command-line glue reaches into it.
    from llm_from_scratch import quantize as quantization

    path = _checkpoint_file(checkpoint)
    saved = quantization.read_quantized_metadata(path)
    if saved is not None:
        if quantize is not None and quantize != saved["quantization"]["dtype"]:
            raise ValueError(f"{path} holds {saved['quantization']['dtype']} weights, not {quantize}: "
                             "quantize the float32 checkpoint instead")
        return quantization.load_quantized(path, device)
    model, meta = load_model(path, device)
    if quantize is not None:
        model = quantization.quantize_model(model, quantize, inplace=True)
    return model, meta


def _cmd_generate(args) -> int:
    from llm_from_scratch.bpe import ENDOFTEXT
    from llm_from_scratch.utils import get_device

    device = get_device(args.device)
    model, meta = _load_for_generation(args.checkpoint, device, args.quantize)
    encoding = _load_tokenizer(Path(args.checkpoint), meta, model.config.vocab_size, args.tokenizer)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    ids = encoding.encode(prompt, allowed_special="all")
    if not ids:
        raise ValueError("the prompt is empty after tokenization: give --prompt some text")
    eos_id = encoding.encode(ENDOFTEXT, allowed_special="all")[0] if ENDOFTEXT in encoding.special_tokens_set else None
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
    idx = torch.tensor([ids], device=device)
    out = sys.stdout
    out.write(prompt)
    out.flush()
    produced: list[int] = []
    shown = ""
    for token in stream_generate(
        model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_id=eos_id, generator=generator, use_cache=not args.no_cache,
    ):
        if eos_id is not None and int(token) == eos_id:
            break
        produced.append(int(token))
        text = encoding.decode(produced)  # decode all: a character may span several tokens
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(encoding.decode(produced)[len(shown):] + "\n")
    out.flush()
    return 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``subparsers`` of ``python -m llm_from_scratch``."""
    p = subparsers.add_parser(
        "generate", help="generate text from a training checkpoint",
        description="Continue a prompt with a trained model, printing tokens as they come.",
    )
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="run folder (or its checkpoint.safetensors), or a file written by quantize")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--escapes", action="store_true", help=r"interpret backslash escapes in --prompt (\n, \t)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (same seed, same text)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: the run folder's)")
    p.add_argument("--no-cache", action="store_true", help="recompute every token each step (slow)")
    p.add_argument("--device", default="cpu", help="cpu, auto, cuda, cuda:N or mps")
    p.add_argument("--quantize", choices=("int8", "w8a8", "bf16"), default=None,
                   help="decode with int8 (scales per 32 weights), w8a8 (int8 weights and token vectors) "
                        "or bfloat16 weights (see quantize.py)")
    p.set_defaults(func=_cmd_generate, parser=p)
    return p
