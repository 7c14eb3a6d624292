"""Training against the clock: a time budget, a schedule in fractions of it, and the recipe.

Explained in the chapter "Pre-training" (chapters/05_pretraining.ipynb), section "How good can
five minutes get". The question is not "how low does the loss go in N steps" but "how good a
model does a fixed amount of compute buy": every choice (model size, vocabulary, batch, learning
rate, precision) changes both what one step achieves and how long it takes. This module holds:

* ``lr_at_fraction``: the learning rate as a function of the *fraction of the budget used*,
  either warm-up / constant / linear decay to a floor ("WSD", warm-up-stable-decay, also
  called trapezoidal) or warm-up then cosine;
* ``Budget`` and ``budget_clock``: a budget in wall-clock seconds, in process CPU seconds per
  thread (for measuring on a shared machine, where the wall clock counts other programs' time),
  or in steps (for reproducible runs: the chapter trains a fixed number of steps);
* ``cpu_supports_bf16`` and ``resolve_precision``: bf16 autocast where the processor has bf16
  instructions (``avx512_bf16`` or AMX), fp32 elsewhere;
* ``heldout_data``: the course's tokenized corpus with one work held out (Macbeth, the held-out
  work of the "small" subset), for any subset, so the full 5 MB corpus and the subset are scored
  on the same text; the tokenizer is trained on the training works only;
* ``Recipe``, ``build_model``, ``train_for_budget`` and ``run_recipe``: a whole run, from data
  to bits per character on every window of the held-out work.

It reuses the package's trainer pieces (``train.configure_optimizer``, ``train.train_step``,
``train.bits_per_char``, ``data.get_batch``) and copies none of them. It does not evaluate during
training (the budget is for optimizer steps only), write checkpoints or resume: a run that must
be kept goes through ``train.train`` (see ``pretrained.pretrain``).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm_from_scratch.bpe import ENDOFTEXT, BPETokenizer, CourseData, course_data, encode_documents, train_bpe
from llm_from_scratch.data import CharTokenizer, get_batch, load_documents, shakespeare_files
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.modern import ModernConfig, TransformerLM
from llm_from_scratch.train import bits_per_char, configure_optimizer, lr_at, train_step
from llm_from_scratch.utils import artifacts_dir, get_device, portable_math, seed_everything

SCHEDULES = ("wsd", "cosine")
CLOCKS = ("wall", "cpu")
ARCHS = ("llama", "gpt")
PRECISIONS = ("auto", "bf16", "fp32")
#: The work every speedrun is scored on: the held-out work of the course's "small" split.
HELDOUT_WORK = "macbeth"


# --------------------------------------------------------------------------------------------
# The schedule, in fractions of the budget
# --------------------------------------------------------------------------------------------


def lr_at_fraction(
    fraction: float,
    *,
    max_lr: float,
    min_lr: float = 0.0,
    warmup_fraction: float = 0.02,
    decay_fraction: float = 0.4,
    schedule: str = "wsd",
) -> float:
    """The learning rate when ``fraction`` (in ``[0, 1]``) of the budget has been used.

    Both schedules warm up linearly from 0 to ``max_lr`` over the first ``warmup_fraction``.
    ``"wsd"``: then constant at ``max_lr`` until ``1 - decay_fraction``, then linear down to
    ``min_lr`` at 1. ``"cosine"``: then ``min_lr + (max_lr - min_lr) * (1 + cos(pi * r)) / 2``
    with ``r`` going from 0 (end of warm-up) to 1 (end of the budget); ``decay_fraction`` is
    not used. A budget measured in time does not know in advance how many steps it holds, so
    the schedule cannot be written in steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if not 0 <= warmup_fraction < 1 or not 0 <= decay_fraction <= 1 or warmup_fraction + decay_fraction > 1:
        raise ValueError(
            f"need warmup_fraction in [0, 1), decay_fraction in [0, 1] and their sum <= 1, got "
            f"{warmup_fraction} and {decay_fraction}"
        )
    f = min(max(float(fraction), 0.0), 1.0)
    if f < warmup_fraction:
        return max_lr * f / warmup_fraction
    if schedule == "cosine":
        r = (f - warmup_fraction) / (1 - warmup_fraction)
        return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * r))
    decay_start = 1 - decay_fraction
    if f < decay_start or decay_fraction == 0:
        return max_lr
    return min_lr + (max_lr - min_lr) * (1 - f) / decay_fraction


# --------------------------------------------------------------------------------------------
# Budgets and clocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How long a run may train: ``seconds`` on a ``clock``, or exactly ``steps`` optimizer steps.

    ``clock="wall"``: seconds of the wall clock (``time.perf_counter``). ``clock="cpu"``: the
    process's CPU time divided by its number of threads, which does not count the time other
    programs hold the cores, so runs on a shared machine compare with each other (with one
    thread it is exact; with more it is the mean per thread). With ``steps`` the schedule's
    fraction is ``step / steps`` and the run does not depend on the machine's speed.
    """

    seconds: float | None = None
    clock: str = "wall"
    steps: int | None = None

    def __post_init__(self) -> None:
        if (self.seconds is None) == (self.steps is None):
            raise ValueError(f"give exactly one of seconds and steps, got seconds={self.seconds}, steps={self.steps}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"Budget.seconds must be positive, got {self.seconds!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"Budget.steps must be a positive int, got {self.steps!r}")
        if self.clock not in CLOCKS:
            raise ValueError(f"Budget.clock must be one of {CLOCKS}, got {self.clock!r}")

    def describe(self) -> str:
        if self.steps is not None:
            return f"{self.steps} steps"
        if self.clock == "cpu":
            return f"{self.seconds:g} s of process CPU time per thread ({torch.get_num_threads()} threads)"
        return f"{self.seconds:g} s of wall-clock time"


def budget_clock(clock: str) -> Callable[[], float]:
    """A function returning the seconds elapsed on ``clock`` (``"wall"`` or ``"cpu"``) since this call."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "wall":
        start = time.perf_counter()
        return lambda: time.perf_counter() - start
    threads = torch.get_num_threads()
    start = time.process_time()
    return lambda: (time.process_time() - start) / threads


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    """The processor's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (``avx512_bf16`` or AMX), so bf16 autocast can pay off.

    Without those instructions PyTorch still runs bf16 on the CPU, by converting to float32 and
    back, which is slower than float32: ``resolve_precision("auto")`` then picks fp32.
    """
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``None``: plain fp32).

    ``"auto"``: bf16 on a CUDA GPU that supports it and on a CPU with bf16 instructions
    (``cpu_supports_bf16``), fp32 elsewhere, and fp32 on any CPU in portable mode
    (``utils.portable_math``: bf16 products run on instructions some CPUs have and others lack).
    ``"bf16"`` forces autocast, ``"fp32"`` turns it off.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() and not portable_math() else None


# --------------------------------------------------------------------------------------------
# Data: one work held out, any subset
# --------------------------------------------------------------------------------------------


def _work_name(path: Path) -> str:
    return path.name.removesuffix("_gut.txt")


def _split_by_work(subset: str | None, heldout: str) -> tuple[list[str], list[str]]:
    """The documents of ``subset``: every work but ``heldout`` (training), and ``heldout`` (validation)."""
    names = [_work_name(p) for p in shakespeare_files(subset)]
    if heldout not in names:
        raise ValueError(f"work {heldout!r} is not in the subset {subset!r}: expected one of {names}")
    documents = load_documents("shakespeare", subset=subset)
    train_docs = [d for n, d in zip(names, documents, strict=True) if n != heldout]
    val_docs = [d for n, d in zip(names, documents, strict=True) if n == heldout]
    return train_docs, val_docs


def heldout_data(vocab_size: int = 4096, subset: str | None = "small", *, heldout: str = HELDOUT_WORK) -> CourseData:
    """The corpus ``subset`` split into every work but ``heldout`` (training) and ``heldout`` (validation).

    The BPE tokenizer is trained on the training works only and cached under
    ``artifacts_dir("tokenizers")``. For the "small" subset and Macbeth this is exactly
    ``course_data(vocab_size, "small")`` (the course split holds out Macbeth), and that is what
    it returns; for the full corpus (``subset=None``, 41 training works) the validation text is
    the same play, so the two compare.
    """
    if subset == "small" and heldout == HELDOUT_WORK:
        data = course_data(vocab_size, "small")
        if len(data.val_docs) == 1 and data.val_docs[0].lstrip().upper().startswith(heldout.upper()):
            return data
    train_docs, val_docs = _split_by_work(subset, heldout)
    path = artifacts_dir("tokenizers") / f"shakespeare-{subset or 'full'}-without-{heldout}-{vocab_size}-lexicographic.json"
    if path.exists():
        tokenizer = BPETokenizer.load(path)
    else:
        vocab, merges = train_bpe(ENDOFTEXT.join(train_docs), vocab_size, (ENDOFTEXT,))
        tokenizer = BPETokenizer(vocab, merges, [ENDOFTEXT])
        tokenizer.save(path)
    return CourseData(tokenizer, train_docs, val_docs, *encode_documents(tokenizer, train_docs, val_docs))


@dataclass
class CharData:
    """``CourseData``'s fields for a character-level model: one token per character."""

    tokenizer: CharTokenizer
    train_docs: list[str]
    val_docs: list[str]
    train_ids: torch.Tensor
    val_ids: torch.Tensor


def heldout_char_data(subset: str | None = "small", *, heldout: str = HELDOUT_WORK) -> CharData:
    """The split of ``heldout_data`` for a character-level model.

    The vocabulary is the characters of the training works (plus the newline that joins them);
    a character of the held-out work outside it raises ``KeyError`` (none does in this corpus).
    """
    train_docs, val_docs = _split_by_work(subset, heldout)
    train_text, val_text = "\n\n".join(train_docs), "\n\n".join(val_docs)
    tokenizer = CharTokenizer.from_text(train_text)
    return CharData(tokenizer, train_docs, val_docs, torch.tensor(tokenizer.encode(train_text), dtype=torch.int64),
                    torch.tensor(tokenizer.encode(val_text), dtype=torch.int64))


def without_work(data, work: str, subset: str | None):
    """``(data with the work `work` taken out of its training ids, that work's ids)``: a dev set for a search.

    The tokenizer stays the one of ``data`` (it saw the dev work, never the held-out one), so a
    search can choose among recipes without looking at the held-out work.
    """
    names = [_work_name(p) for p in shakespeare_files(subset) if _work_name(p) != HELDOUT_WORK]
    if work not in names or len(names) != len(data.train_docs):
        raise ValueError(f"work {work!r} is not a training work of the subset {subset!r}: expected one of {names}")
    keep = [d for n, d in zip(names, data.train_docs, strict=True) if n != work]
    dev = data.train_docs[names.index(work)]
    if isinstance(data.tokenizer, CharTokenizer):
        enc = data.tokenizer.encode
        train_ids, dev_ids = enc("\n\n".join(keep)), enc(dev)
    else:
        encoding = data.tokenizer.to_tiktoken()
        train_ids = encoding.encode(ENDOFTEXT.join(keep), allowed_special={ENDOFTEXT})
        dev_ids = encoding.encode(dev)
    trimmed = dataclasses.replace(data, train_docs=keep, train_ids=torch.tensor(train_ids, dtype=torch.int64))
    return trimmed, torch.tensor(dev_ids, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Every choice of a speedrun: data, model, optimizer, schedule, precision.

    ``vocab_size=None`` trains a character-level model. ``arch``: ``"llama"`` (the chapter
    "Beyond GPT-2"'s ``TransformerLM``: RMSNorm, RoPE, SwiGLU, no biases) or ``"gpt"``
    (``model.GPT``). ``n_kv_heads=None``: as many as query heads. ``dropout`` exists for
    ``"gpt"`` only. The schedule is ``lr_at_fraction(schedule, warmup_fraction,
    decay_fraction)`` from ``max_lr`` to ``max_lr * min_lr_ratio``, unless ``schedule_steps``
    is set: then it is ``train.lr_at`` with ``warmup_steps`` and a cosine to ``max_lr / 10``
    at ``schedule_steps`` (the chapter's earlier recipe, whose schedule was written in steps).
    """

    subset: str | None = None
    vocab_size: int | None = 4096
    arch: str = "llama"
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    context_length: int = 256
    tie_weights: bool = True
    dropout: float = 0.0
    batch_size: int = 16
    max_lr: float = 2e-3
    min_lr_ratio: float = 0.0
    warmup_fraction: float = 0.02
    decay_fraction: float = 0.4
    schedule: str = "wsd"
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    seed: int = 1234
    schedule_steps: int | None = None
    warmup_steps: int = 30

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"Recipe.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.dropout and self.arch != "gpt":
            raise ValueError("Recipe.dropout needs arch='gpt' (the Llama-style model has no dropout)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Recipe.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"Recipe.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        lr_at_fraction(0.5, max_lr=self.max_lr, min_lr=self.max_lr * self.min_lr_ratio,
                       warmup_fraction=self.warmup_fraction, decay_fraction=self.decay_fraction,
                       schedule=self.schedule)  # checks the schedule's numbers

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    def lr(self, fraction: float, step: int) -> float:
        """The learning rate of step ``step``, taken when ``fraction`` of the budget is used."""
        if self.schedule_steps is not None:
            return lr_at(step, max_lr=self.max_lr, min_lr=self.max_lr / 10, warmup_steps=self.warmup_steps,
                         decay_steps=max(self.schedule_steps, self.warmup_steps))
        return lr_at_fraction(fraction, max_lr=self.max_lr, min_lr=self.max_lr * self.min_lr_ratio,
                              warmup_fraction=self.warmup_fraction, decay_fraction=self.decay_fraction,
                              schedule=self.schedule)


#: The chapter "Pre-training"'s earlier CPU run: tiny GPT, BPE 4096, batch 16, max_lr 3e-3, 500 steps' schedule.
PREVIOUS_RECIPE = Recipe(subset="small", vocab_size=4096, arch="gpt", d_model=128, n_layers=4, n_heads=4,
                         context_length=128, batch_size=16, max_lr=3e-3, schedule_steps=500, warmup_steps=30,
                         seed=1234)


#: The recipe of the chapter's section "How good can five minutes get" and of ``benchmarks/speedrun.py``,
#: chosen one change at a time by ``benchmarks/speedrun_search.py`` (the table in ``benchmarks/RESULTS.md``).
RECIPE = Recipe(subset=None, vocab_size=4096, arch="llama", d_model=256, n_layers=4, n_heads=4, context_length=64,
                tie_weights=False, batch_size=16, max_lr=1e-3, warmup_fraction=0.02, decay_fraction=0.4,
                schedule="wsd", precision="auto")

#: A larger starting point for a GPU (not measured by the course: no GPU run is recorded in
#: ``benchmarks/RESULTS.md``): 8 layers of width 512, context 512, batch 64.
GPU_RECIPE = RECIPE.replace(d_model=512, n_layers=8, n_heads=8, context_length=512, batch_size=64)


def build_model(recipe: Recipe, vocab_size: int) -> nn.Module:
    """The model of ``recipe`` for a vocabulary of ``vocab_size`` (its weights drawn from the current seed)."""
    if recipe.arch == "gpt":
        return GPT(GPTConfig(vocab_size=vocab_size, context_length=recipe.context_length, d_model=recipe.d_model,
                             n_layers=recipe.n_layers, n_heads=recipe.n_heads, dropout=recipe.dropout,
                             tie_weights=recipe.tie_weights))
    return TransformerLM(ModernConfig(vocab_size=vocab_size, context_length=recipe.context_length,
                                      d_model=recipe.d_model, n_layers=recipe.n_layers, n_heads=recipe.n_heads,
                                      n_kv_heads=recipe.n_kv_heads, tie_weights=recipe.tie_weights))


@dataclass
class BudgetRun:
    """What ``train_for_budget`` did: ``steps``, ``tokens`` seen, ``seconds`` on the budget's clock,
    ``wall_seconds``, and a ``history`` of ``{"step", "seconds", "lr", "train_loss"}`` rows."""

    steps: int
    tokens: int
    seconds: float
    wall_seconds: float
    history: list[dict]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train_for_budget(
    model: nn.Module,
    train_ids,
    recipe: Recipe,
    budget: Budget,
    *,
    log_interval: int = 25,
    clock: Callable[[], float] | None = None,
    device: str | torch.device = "cpu",
) -> BudgetRun:
    """Trains ``model`` on random windows of ``train_ids`` until ``budget`` is spent.

    Each step takes the learning rate of the fraction of the budget used so far
    (``recipe.lr``), draws ``recipe.batch_size`` windows of ``recipe.context_length + 1``
    tokens (``data.get_batch``, seeded with ``recipe.seed``) and runs ``train.train_step``. A
    time budget stops before a step that would not fit: when the seconds used plus the slowest
    of the last few steps would pass it. ``clock`` replaces the budget's clock (tests).
    ``device`` (``utils.get_device``'s names: ``"cpu"``, ``"cuda"``, ``"auto"``...) is where the
    model trains; the step's loss is read back every step, so the clock sees finished work.
    Returns a ``BudgetRun``; the model is left in training mode on ``device``.
    """
    device = get_device(device)
    model.to(device)
    optimizer = configure_optimizer(model, lr=recipe.max_lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    dtype = resolve_precision(recipe.precision, device)
    tokens_per_step = recipe.batch_size * recipe.context_length
    model.train()
    wall_start = time.perf_counter()
    timed = budget.seconds is not None
    if timed and clock is None:
        clock = budget_clock(budget.clock)  # started here: building the optimizer is not training
    used = clock() if timed else 0.0
    step, recent, history, losses = 0, [], [], []
    while True:
        if not timed:
            if step >= budget.steps:
                break
            fraction = step / budget.steps
        else:
            if used + (max(recent) if recent else 0.0) > budget.seconds:
                break
            fraction = used / budget.seconds
        lr = recipe.lr(fraction, step)
        batch = get_batch(train_ids, recipe.batch_size, recipe.context_length, generator)
        loss, _ = train_step(model, optimizer, [batch], lr=lr, grad_clip=recipe.grad_clip, autocast_dtype=dtype)
        step += 1
        losses.append(loss)
        if timed:
            now = clock()
            recent = (recent + [now - used])[-5:]
            used = now
        if step % log_interval == 0:
            seconds = used if timed else time.perf_counter() - wall_start
            history.append({"step": step, "seconds": seconds, "lr": lr, "train_loss": sum(losses) / len(losses)})
            losses = []
    wall = time.perf_counter() - wall_start
    seconds = used if timed else wall
    return BudgetRun(steps=step, tokens=step * tokens_per_step, seconds=seconds, wall_seconds=wall, history=history)


@dataclass
class RecipeResult:
    """A scored speedrun: the ``recipe``, its ``run``, the validation ``score`` (``train.bits_per_char``'s dict),
    the ``model`` and its ``tokenizer``."""

    recipe: Recipe
    run: BudgetRun
    score: dict
    model: nn.Module
    tokenizer: object
    n_parameters: int


def recipe_data(recipe: Recipe):
    """The data of ``recipe``: ``heldout_data`` (BPE) or ``heldout_char_data`` (``vocab_size=None``)."""
    if recipe.vocab_size is None:
        return heldout_char_data(recipe.subset)
    return heldout_data(recipe.vocab_size, recipe.subset)


def run_recipe(recipe: Recipe, budget: Budget, *, data=None, val_ids=None, log_interval: int = 25,
               device: str | torch.device = "cpu") -> RecipeResult:
    """Trains ``recipe`` within ``budget`` on ``device`` and scores it on every window of the held-out work.

    ``val_ids`` replaces the validation tokens (a dev set carved from the training works, for
    searching without looking at the held-out work). The score is computed in fp32 whatever
    the training precision.
    """
    data = recipe_data(recipe) if data is None else data
    seed_everything(recipe.seed)
    model = build_model(recipe, data.tokenizer.vocab_size)
    run = train_for_budget(model, data.train_ids, recipe, budget, log_interval=log_interval, device=device)
    score = bits_per_char(model, data.val_ids if val_ids is None else val_ids, data.tokenizer,
                          batch_size=16, context_length=recipe.context_length)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    return RecipeResult(recipe, run, score, model, data.tokenizer, n_params)
