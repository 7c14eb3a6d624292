"""Fine-tuning for classification: a pre-trained GPT becomes a classifier of passages.

Explained in the chapter "Fine-tuning for classification" (chapters/09_classification.ipynb).
This module holds:

* the task: ``FOLIO_GENRES`` (the genre of each play, as the First Folio groups them),
  ``genre_split`` (which plays train, choose and test), ``play_passages`` (a play's spoken lines
  in passages of a few lines) and ``LabelledTexts`` (token ids and labels, with ``pad_batch``);
* the baselines to beat: ``majority_baseline`` and ``bag_of_words_baseline`` (logistic
  regression on token counts, a few lines of PyTorch);
* the model: ``ClassifierConfig`` and ``GPTClassifier``: the GPT without its output layer,
  one hidden state pooled per passage (the last real token's, or the mean), a linear head;
  optional LoRA adapters (``lora.py``) recorded in the configuration so checkpoints rebuild them;
* continued pre-training on the task's own text: ``plays_text`` and ``continue_pretraining``
  (more next-token training of the GPT on the training plays, labels unused, before fine-tuning);
* training and evaluation: ``set_trainable`` (head only, the last blocks, or everything),
  ``FinetuneConfig``, ``finetune`` (a small loop on the trainer's ``train_step``, ``lr_at`` and
  ``configure_optimizer``), ``evaluate_classifier``, ``confusion_matrix``;
* the command line: ``finetune-classifier`` and ``classify``.

It imports the model, the trainer and the checkpoints, never the reverse. It does not
pre-train (``pretrained.py``) and holds no LoRA code (``lora.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_from_scratch.bpe import ENDOFTEXT, BPETokenizer
from llm_from_scratch.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
    tokenizer_fingerprint,
)
from llm_from_scratch.data import SHAKESPEARE_SMALL, clean_text, read_text_file, shakespeare_files
from llm_from_scratch.linear import Linear
from llm_from_scratch.lora import ADAPTERS, GPT_EMBEDDING, GPT_TARGETS, apply_lora, merge_lora
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.registry import register_model
from llm_from_scratch.train import TrainConfig, configure_optimizer, lr_at, train, train_step
from llm_from_scratch.utils import atomic_write_text

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The task: passages of plays, labelled by genre
# --------------------------------------------------------------------------------------------

#: The three genres, in label order (label 0 is "comedy").
GENRES = ("comedy", "history", "tragedy")

#: Genre of each play of the corpus (file stems of ``data.shakespeare_files``), as the First Folio
#: (1623) groups them: its catalogue lists "Comedies", "Histories" and "Tragedies". Two plays sit
#: oddly there and keep the Folio's label: "Troilus and Cressida", printed between the histories
#: and the tragedies and headed "The Tragedie of Troylus and Cressida", and "Cymbeline", printed
#: last among the tragedies. "Pericles" is not in the Folio and the poems (the sonnets, "A Lover's
#: Complaint", "The Passionate Pilgrim", "The Phoenix and the Turtle", "The Rape of Lucrece") are
#: not plays: they have no label.
FOLIO_GENRES: dict[str, str] = {
    # Comedies
    "tempest": "comedy", "two_gentlemen_of_verona": "comedy", "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy", "comedy_of_errors": "comedy", "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy", "midsummer_nights_dream": "comedy", "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy", "taming_of_the_shrew": "comedy", "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy", "winters_tale": "comedy",
    # Histories
    "john": "history", "richard_ii": "history", "henry_iv_part_1": "history", "henry_iv_part_2": "history",
    "henry_v": "history", "henry_vi_part_1": "history", "henry_vi_part_2": "history",
    "henry_vi_part_3": "history", "richard_iii": "history", "henry_viii": "history",
    # Tragedies
    "troilus_and_cressida": "tragedy", "coriolanus": "tragedy", "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy", "timon_of_athens": "tragedy", "julius_caesar": "tragedy",
    "macbeth": "tragedy", "hamlet": "tragedy", "lear": "tragedy", "othello": "tragedy",
    "antony_and_cleopatra": "tragedy", "cymbeline": "tragedy",
}


@dataclass(frozen=True)
class GenreSplit:
    """Plays (file stems) for training, for choices (validation) and for the final test."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def genre_split(*, test_per_genre: int = 2, val_per_genre: int = 1, seed: int = 0) -> GenreSplit:
    """Splits the 36 labelled plays by play: no passage of a test play is ever trained on.

    Test and validation plays are drawn (with ``seed``, ``test_per_genre`` and ``val_per_genre``
    of each genre) from the plays *outside* the "small" subset, so that neither the pre-trained
    model nor the course tokenizer (both trained on that subset's works other than Macbeth) has
    read them. Every other play trains.
    """
    import random

    for name, value in (("test_per_genre", test_per_genre), ("val_per_genre", val_per_genre)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rng = random.Random(seed)
    test, val = [], []
    for genre in GENRES:
        unseen = sorted(p for p, g in FOLIO_GENRES.items() if g == genre and p not in SHAKESPEARE_SMALL)
        if len(unseen) < test_per_genre + val_per_genre + 1:
            raise ValueError(f"only {len(unseen)} {genre} plays outside the small subset")
        rng.shuffle(unseen)
        test += unseen[:test_per_genre]
        val += unseen[test_per_genre : test_per_genre + val_per_genre]
    train = [p for p in sorted(FOLIO_GENRES) if p not in test and p not in val]
    return GenreSplit(tuple(train), tuple(sorted(val)), tuple(sorted(test)))


_HEADING = re.compile(r"^(ACT|SCENE|PROLOGUE|INDUCTION|EPILOGUE|CHORUS)\b", re.IGNORECASE)


def spoken_lines(text: str) -> list[str]:
    """The lines that characters speak: no front matter, headings, speaker names or stage directions.

    Dropped: everything before the first act, scene, prologue or induction heading; those
    headings; lines without a lower-case letter (speaker names such as ``VIOLA.``, titles);
    stage directions in square brackets, also when they run over several lines.
    """
    lines = clean_text(text).split("\n")
    start = next((i for i, line in enumerate(lines) if _HEADING.match(line)), len(lines))
    spoken, in_direction = [], False
    for line in lines[start:]:
        line = line.strip()
        if in_direction:
            in_direction = "]" not in line
            continue
        if line.startswith("["):
            in_direction = "]" not in line
            continue
        if not line or _HEADING.match(line) or not any(c.islower() for c in line):
            continue
        spoken.append(line)
    return spoken


def _play_lines(play: str) -> list[str]:
    if play not in FOLIO_GENRES:
        raise ValueError(f"unknown play {play!r}: expected one of the labelled plays {sorted(FOLIO_GENRES)}")
    files = {f.name.removesuffix("_gut.txt"): f for f in shakespeare_files()}
    return spoken_lines(read_text_file(files[play]))


def play_passages(play: str, *, lines_per_passage: int = 8, max_passages: int | None = None) -> list[str]:
    """Passages of ``lines_per_passage`` consecutive spoken lines of ``play`` (a file stem).

    With ``max_passages``, that many passages evenly spaced through the play (the same ones
    every call), so that every play counts alike whatever its length.
    """
    lines = _play_lines(play)
    passages = ["\n".join(lines[i : i + lines_per_passage])
                for i in range(0, len(lines) - lines_per_passage + 1, lines_per_passage)]
    if max_passages is not None and len(passages) > max_passages:
        step = len(passages) / max_passages
        passages = [passages[int(i * step)] for i in range(max_passages)]
    return passages


@dataclass
class LabelledTexts:
    """A classification data set: ``texts[i]`` (its token ids ``ids[i]``) has class ``labels[i]``.

    ``classes`` names the labels (``labels`` are indices into it); ``groups[i]`` says where an
    example comes from (here: its play). Build one with ``LabelledTexts.encode``.
    """

    texts: list[str]
    ids: list[list[int]]
    labels: list[int]
    classes: tuple[str, ...]
    groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (len(self.texts) == len(self.ids) == len(self.labels)):
            raise ValueError(f"texts, ids and labels differ in length: {len(self.texts)}, {len(self.ids)}, "
                             f"{len(self.labels)}")
        bad = [y for y in self.labels if isinstance(y, bool) or not isinstance(y, int)
               or not 0 <= y < len(self.classes)]
        if bad:
            raise ValueError(f"label {bad[0]!r} is outside the classes 0..{len(self.classes) - 1} {self.classes}")
        if any(len(x) == 0 for x in self.ids):
            raise ValueError("every example needs at least one token")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def encode(cls, texts: Sequence[str], labels: Sequence[int | str], tokenizer: BPETokenizer, *,
               classes: Sequence[str], max_tokens: int, groups: Sequence[str] | None = None) -> LabelledTexts:
        """Tokenizes ``texts`` and keeps the first ``max_tokens`` tokens of each (truncation).

        ``labels`` are class indices or class names from ``classes``.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        classes = tuple(classes)
        index = []
        for y in labels:
            if isinstance(y, str):
                if y not in classes:
                    raise ValueError(f"label {y!r} is not one of the classes {classes}")
                y = classes.index(y)
            index.append(y)
        encoding = tokenizer.to_tiktoken()
        ids = [encoding.encode_ordinary(t)[:max_tokens] for t in texts]
        return cls(list(texts), ids, index, classes, list(groups) if groups is not None else [])

    def class_counts(self) -> list[int]:
        return [self.labels.count(k) for k in range(len(self.classes))]


def genre_dataset(plays: Sequence[str], tokenizer: BPETokenizer, *, lines_per_passage: int = 8,
                  passages_per_play: int | None = 60, max_tokens: int = 128) -> LabelledTexts:
    """Passages of ``plays`` labelled with their genre (``GENRES``), tokenized and truncated."""
    texts, labels, groups = [], [], []
    for play in plays:
        passages = play_passages(play, lines_per_passage=lines_per_passage, max_passages=passages_per_play)
        texts += passages
        labels += [FOLIO_GENRES[play]] * len(passages)
        groups += [play] * len(passages)
    return LabelledTexts.encode(texts, labels, tokenizer, classes=GENRES, max_tokens=max_tokens, groups=groups)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists as one right-padded batch: ``(idx (B, T_max), lengths (B,))``.

    ``pad_id`` fills the end of the shorter rows. With causal attention, padding on the right
    changes nothing before it: a row's real tokens never attend to the pad tokens after them.
    """
    if len(sequences) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    if int(lengths.min()) == 0:
        raise ValueError("every sequence needs at least one token")
    idx = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        idx[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return idx, lengths


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def majority_baseline(train: LabelledTexts, test: LabelledTexts) -> float:
    """Accuracy on ``test`` of always answering the most frequent class of ``train``."""
    counts = train.class_counts()
    majority = max(range(len(counts)), key=counts.__getitem__)
    return sum(y == majority for y in test.labels) / len(test)


def _flat_ids(data: LabelledTexts) -> tuple[Tensor, Tensor]:
    """Every example's token ids in one 1-D tensor, and where each example starts (``EmbeddingBag`` input)."""
    ids = torch.tensor([i for x in data.ids for i in x], dtype=torch.long)
    offsets = torch.tensor([0] + [len(x) for x in data.ids[:-1]], dtype=torch.long).cumsum(0)
    return ids, offsets


def bag_of_words_baseline(train: LabelledTexts, test: LabelledTexts, vocab_size: int, *, weight_decay: float = 1e-4,
                          steps: int = 200, lr: float = 0.1, seed: int = 0) -> tuple[float, nn.EmbeddingBag]:
    """Logistic regression on token frequencies: accuracy on ``test`` and the fitted weights.

    An example's features are how often each token id occurs in it, divided by its length; a
    linear layer on them is the mean of one learned row per token, which ``nn.EmbeddingBag``
    (``mode="mean"``, one column per class) computes without building the ``(N, vocab_size)``
    matrix. Full-batch Adam on the mean cross-entropy plus ``weight_decay`` times the squared
    weights. Word order is ignored entirely.
    """
    torch.manual_seed(seed)
    bag = nn.EmbeddingBag(vocab_size, len(train.classes), mode="mean")
    nn.init.zeros_(bag.weight)
    bias = nn.Parameter(torch.zeros(len(train.classes)))
    optimizer = torch.optim.Adam([bag.weight, bias], lr=lr)
    (ids, offsets), labels = _flat_ids(train), torch.tensor(train.labels)
    for _ in range(steps):
        loss = F.cross_entropy(bag(ids, offsets) + bias, labels) + weight_decay * bag.weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predictions = (bag(*_flat_ids(test)) + bias).argmax(-1)
    return (predictions == torch.tensor(test.labels)).float().mean().item(), bag


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------

_POOLINGS = ("last", "mean")


@dataclass
class ClassifierConfig(GPTConfig):
    """A ``GPTConfig`` plus what turns the GPT into a classifier.

    ``labels``: the class names (the head has one output per class). ``pooling``: ``"last"``
    (the hidden state of each passage's last real token) or ``"mean"`` (the mean over its real
    tokens). ``pad_id``: the token id that pads batches on the right; it must never occur in a
    text (the course uses ``<|endoftext|>``). ``lora_r > 0``: LoRA adapters of rank ``lora_r``
    and scale ``lora_alpha / lora_r`` on the layers ``lora_targets`` (unmerged adapters are part
    of the model, so a checkpoint must say how to rebuild them).
    """

    labels: tuple[str, ...] = GENRES
    pooling: str = "last"
    pad_id: int = 0
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = GPT_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.labels = tuple(self.labels)
        self.lora_targets = tuple(self.lora_targets)
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"ClassifierConfig.labels must be two or more distinct names, got {self.labels!r}")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"ClassifierConfig.pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"ClassifierConfig.pad_id must be a token id in [0, {self.vocab_size}), got {self.pad_id!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"ClassifierConfig.lora_r must be an int >= 0 (0: no adapters), got {self.lora_r!r}")

    def gpt_config(self) -> GPTConfig:
        """The configuration of the underlying GPT (this one without the classifier's fields)."""
        names = [f.name for f in dataclasses.fields(GPTConfig)]
        return GPTConfig(**{n: getattr(self, n) for n in names})


class GPTClassifier(nn.Module):
    """A GPT whose output layer is replaced by a classification head.

    ``forward(idx, targets=None, *, lengths=None)``: ``idx`` ``(B, T)`` right-padded token ids
    (``pad_batch``); ``lengths`` ``(B,)`` the real tokens of each row (default: counted as the
    tokens that are not ``config.pad_id``). Returns class logits ``(B, n_classes)``, or
    ``(logits, loss)`` with ``targets`` ``(B,)`` class indices (mean cross-entropy).
    ``self.gpt`` is a ``GPT`` whose ``lm_head`` is ``nn.Identity``: it returns hidden states.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"config must be a ClassifierConfig, got {type(config).__name__}")
        self.config = config
        self.gpt = GPT(config.gpt_config())
        self.gpt.lm_head = nn.Identity()  # the GPT now returns its final hidden states (B, T, d_model)
        self.head = Linear(config.d_model, len(config.labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if config.lora_r > 0:
            apply_lora(self.gpt, config.lora_targets, r=config.lora_r, alpha=config.lora_alpha)

    @classmethod
    def from_gpt(cls, gpt: GPT, labels: Sequence[str] = GENRES, *, pooling: str = "last", pad_id: int = 0,
                 seed: int = 0) -> GPTClassifier:
        """A classifier holding a copy of ``gpt``'s weights and a new head (initialised with ``seed``)."""
        if not isinstance(gpt, GPT):
            raise TypeError(f"gpt must be a GPT, got {type(gpt).__name__}")
        fields = dataclasses.asdict(gpt.config)
        config = ClassifierConfig(**fields, labels=tuple(labels), pooling=pooling, pad_id=pad_id)
        torch.manual_seed(seed)
        model = cls(config)
        state = {k: v for k, v in gpt.state_dict().items() if not k.startswith("lm_head.")}
        model.gpt.load_state_dict(state, strict=True)
        return model.to(next(gpt.parameters()).device)

    def add_lora(self, r: int = 8, alpha: float = 16.0, targets: Sequence[str] = GPT_TARGETS) -> list[str]:
        """Freezes the GPT, adds LoRA adapters to ``targets`` (the head stays trainable); returns their names."""
        names = apply_lora(self.gpt, targets, r=r, alpha=alpha)
        self.config = dataclasses.replace(self.config, lora_r=r, lora_alpha=float(alpha), lora_targets=tuple(targets))
        return names

    def merge_lora(self) -> GPTClassifier:
        """Folds the adapters into the weights (``lora.merge_lora``): a plain classifier again."""
        merge_lora(self.gpt)
        self.config = dataclasses.replace(self.config, lora_r=0)
        return self

    def lengths_of(self, idx: Tensor) -> Tensor:
        """Real tokens per row of a right-padded batch (those before the first ``pad_id``)."""
        real = idx != self.config.pad_id  # (B, T)
        lengths = real.sum(dim=1)
        if bool((real[:, 1:] & ~real[:, :-1]).any()) or int(lengths.min()) == 0:
            raise ValueError("each row must be real tokens then padding (right-padded, see pad_batch), "
                             "with at least one real token")
        return lengths

    def pool(self, hidden: Tensor, lengths: Tensor) -> Tensor:
        """One vector per row of ``hidden`` ``(B, T, d)``: the last real token's, or the mean of the real ones."""
        if self.config.pooling == "last":
            rows = torch.arange(hidden.size(0), device=hidden.device)
            return hidden[rows, lengths - 1]  # (B, d): the only position that has seen the whole text
        mask = torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]  # (B, T)
        return (hidden * mask[..., None]).sum(dim=1) / lengths[:, None]  # (B, d)

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, lengths: Tensor | None = None):
        if lengths is None:
            lengths = self.lengths_of(idx)
        lengths = lengths.to(idx.device)
        hidden = self.gpt(idx)  # (B, T, d_model): causal, so padding on the right changes nothing before it
        logits = self.head(self.pool(hidden, lengths))  # (B, n_classes)
        if targets is None:
            return logits
        n_classes = len(self.config.labels)
        if targets.shape != (idx.size(0),) or int(targets.min()) < 0 or int(targets.max()) >= n_classes:
            raise ValueError(f"targets must be {idx.size(0)} class indices in [0, {n_classes}), got "
                             f"{targets.tolist() if targets.numel() <= 8 else tuple(targets.shape)}")
        return logits, F.cross_entropy(logits, targets)


register_model(GPTClassifier, ClassifierConfig)


def set_trainable(model: GPTClassifier, last_blocks: int | None = None) -> int:
    """Chooses what fine-tuning changes; returns the number of trainable parameters.

    ``last_blocks=None``: everything. ``0``: the head only (the GPT is a frozen feature
    extractor). ``k``: the head, the final layer norm and the last ``k`` blocks. A model with
    LoRA adapters keeps its adapters and head trainable and everything else frozen.
    """
    if not isinstance(model, GPTClassifier):
        raise TypeError(f"model must be a GPTClassifier, got {type(model).__name__}")
    n_layers = model.config.n_layers
    if last_blocks is not None and (isinstance(last_blocks, bool) or not isinstance(last_blocks, int)
                                    or not 0 <= last_blocks <= n_layers):
        raise ValueError(f"last_blocks must be None or an int in [0, {n_layers}], got {last_blocks!r}")
    adapters = [m for m in model.modules() if isinstance(m, ADAPTERS)]
    for p in model.parameters():
        p.requires_grad_(last_blocks is None and not adapters)
    if adapters:
        for m in adapters:
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    elif last_blocks is not None and last_blocks > 0:
        for block in model.gpt.transformer.h[n_layers - last_blocks:]:
            block.requires_grad_(True)
        model.gpt.transformer.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """Knobs of a fine-tuning run: ``max_steps`` updates of ``batch_size`` examples.

    The learning rate warms up for ``warmup_steps`` and decays (cosine) to ``max_lr / 10``; the
    batches are drawn without replacement, epoch after epoch, from a generator seeded with ``seed``.
    """

    max_steps: int = 200
    batch_size: int = 32
    max_lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_interval: int = 40
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FinetuneConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or \
                not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"FinetuneConfig.warmup_steps must be an int in [0, max_steps], got {self.warmup_steps!r}")
        if not self.max_lr > 0:
            raise ValueError(f"FinetuneConfig.max_lr must be positive, got {self.max_lr!r}")


def _batches(n: int, batch_size: int, generator: torch.Generator):
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


@torch.no_grad()
def predict(model: GPTClassifier, data: LabelledTexts, *, batch_size: int = 64) -> Tensor:
    """Class probabilities ``(N, n_classes)`` of every example of ``data`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = []
    try:
        for i in range(0, len(data), batch_size):
            idx, lengths = pad_batch(data.ids[i : i + batch_size], model.config.pad_id)
            probs.append(torch.softmax(model(idx.to(device), lengths=lengths).float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(probs)


def evaluate_classifier(model: GPTClassifier, data: LabelledTexts, *, batch_size: int = 64) -> dict:
    """``{"accuracy", "loss", "predictions"}`` of ``model`` on ``data`` (loss: mean cross-entropy in nats)."""
    probs = predict(model, data, batch_size=batch_size)
    labels = torch.tensor(data.labels)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    predictions = probs.argmax(dim=-1)
    return {"accuracy": (predictions == labels).float().mean().item(), "loss": loss, "predictions": predictions}


def confusion_matrix(labels: Sequence[int] | Tensor, predictions: Sequence[int] | Tensor, n_classes: int) -> Tensor:
    """``counts[true, predicted]``: how often each class was predicted as each class, ``(n, n)`` int64."""
    labels, predictions = torch.as_tensor(labels).long(), torch.as_tensor(predictions).long()
    counts = torch.zeros(n_classes, n_classes, dtype=torch.long)
    counts.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    return counts


def finetune(model: GPTClassifier, train_data: LabelledTexts, val_data: LabelledTexts | None = None,
             config: FinetuneConfig | None = None) -> list[dict]:
    """Fine-tunes the trainable parameters of ``model`` (see ``set_trainable``); returns the history.

    Each step draws ``batch_size`` examples, pads them (``pad_batch``) and makes one update with
    the trainer's ``train_step`` (AdamW from ``configure_optimizer``, the ``lr_at`` schedule,
    gradient clipping). History rows: ``{"step", "train_loss"}`` every step, plus ``val_loss``
    and ``val_accuracy`` at every ``eval_interval`` and at the end (when ``val_data`` is given).
    """
    config = FinetuneConfig() if config is None else config
    if not isinstance(model, GPTClassifier):
        raise TypeError(f"model must be a GPTClassifier, got {type(model).__name__}")
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is not None and tuple(data.classes) != model.config.labels:
            raise ValueError(f"{name} has classes {data.classes}, the model {model.config.labels}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: see set_trainable")
    device = torch.device(config.device)
    model.to(device).train()
    optimizer = configure_optimizer(model, lr=config.max_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(len(train_data), config.batch_size, generator)
    labels = torch.tensor(train_data.labels)
    history: list[dict] = []
    for step in range(config.max_steps):
        rows = next(batches)
        idx, _ = pad_batch([train_data.ids[i] for i in rows], model.config.pad_id)
        lr = lr_at(step, max_lr=config.max_lr, min_lr=config.max_lr / 10, warmup_steps=config.warmup_steps,
                   decay_steps=config.max_steps)
        loss, _ = train_step(model, optimizer, [(idx, labels[rows])], lr=lr, grad_clip=config.grad_clip)
        row = {"step": step + 1, "train_loss": loss}
        if val_data is not None and ((step + 1) % config.eval_interval == 0 or step + 1 == config.max_steps):
            result = evaluate_classifier(model, val_data)
            row.update(val_loss=result["loss"], val_accuracy=result["accuracy"])
            model.train()
        history.append(row)
    model.eval()
    return history


# --------------------------------------------------------------------------------------------
# Continued pre-training on the task's own text
# --------------------------------------------------------------------------------------------


def plays_text(plays: Sequence[str]) -> str:
    """The spoken lines (``spoken_lines``) of ``plays``, one per line, the plays one after another."""
    if isinstance(plays, str) or not plays:
        raise ValueError(f"plays must be a non-empty list of play names, got {plays!r}")
    return "\n".join("\n".join(_play_lines(p)) for p in plays)


def continue_pretraining(gpt: GPT, plays: Sequence[str], tokenizer: BPETokenizer, *, max_steps: int = 300,
                         batch_size: int = 16, max_lr: float = 1e-3, seed: int = 0,
                         device: str = "cpu") -> list[dict]:
    """More next-token training of ``gpt`` (in place) on the spoken lines of ``plays``; returns the history.

    Task-adaptive pre-training (ULMFiT's second stage; Gururangan et al. 2020): before a
    classifier is fine-tuned, its language model reads the text of the task, without the
    labels. Pass the training plays only, so that the held-out plays stay unseen. The package
    trainer (``train.train``): AdamW, ``min(10, max_steps)`` warm-up steps, cosine decay to
    ``max_lr / 10``, windows of the model's context length drawn at random (seeded).
    """
    if not isinstance(gpt, GPT):
        raise TypeError(f"gpt must be a GPT, got {type(gpt).__name__}")
    ids = torch.tensor(tokenizer.encode(plays_text(plays)), dtype=torch.long)
    config = TrainConfig(max_steps=max_steps, batch_size=batch_size, max_lr=max_lr, warmup_steps=min(10, max_steps),
                         eval_interval=max_steps + 1, eval_train=False, eval_at_start=False, progress=False,
                         seed=seed, device=device)
    return train(gpt, ids, None, config)


# --------------------------------------------------------------------------------------------
# From a pre-training run, to a classifier run, and the command line
# --------------------------------------------------------------------------------------------

#: The tokenizer of a run folder (``pretrained.py`` and the ``train`` command write it there too).
TOKENIZER_NAME = "tokenizer.json"


def load_base(run_dir: str | Path, tokenizer: BPETokenizer | None = None) -> tuple[GPT, BPETokenizer]:
    """The GPT of a pre-training run folder and its tokenizer, checked to belong together.

    ``tokenizer``: the one the fine-tuning data will be encoded with (default: the folder's
    ``tokenizer.json``). A checkpoint that records another tokenizer raises ``ValueError``: its
    token ids would mean other pieces of text.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_NAME if run_dir.is_dir() else run_dir
    folder = path.parent
    if tokenizer is None:
        if not (folder / TOKENIZER_NAME).is_file():
            raise FileNotFoundError(f"no {TOKENIZER_NAME} in {folder}: pass the tokenizer")
        tokenizer = BPETokenizer.load(folder / TOKENIZER_NAME)
    meta = load_checkpoint(path)  # metadata only
    recorded = (meta["tokenizer"] or {}).get("sha256")
    if recorded is not None and recorded != tokenizer.fingerprint():
        raise ValueError(f"{path} was pre-trained with another tokenizer (sha256 {recorded[:12]}..., this one "
                         f"{tokenizer.fingerprint()[:12]}...): fine-tune with the tokenizer of its run")
    if meta["model_config"] is None or set(meta["model_config"]) != {f.name for f in dataclasses.fields(GPTConfig)}:
        raise ValueError(f"{path} does not hold a GPT language model")
    model = GPT(GPTConfig(**meta["model_config"]))
    load_checkpoint(path, model)
    return model.eval(), tokenizer


def save_classifier(out_dir: str | Path, model: GPTClassifier, tokenizer: BPETokenizer, *,
                    history: list[dict] | None = None, results: dict | None = None) -> Path:
    """Writes a classifier run folder: ``checkpoint.safetensors`` (configuration and labels inside),
    ``tokenizer.json`` and ``results.json``; returns the checkpoint's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = tokenizer.save(out / TOKENIZER_NAME)
    path = save_checkpoint(out / CHECKPOINT_NAME, model, step=len(history or []),
                           tokenizer=tokenizer_fingerprint(tokenizer, tokenizer_path), history=history)
    atomic_write_text(out / "results.json", json.dumps(results or {}, indent=1))
    return path


def _cmd_finetune(args) -> int:
    torch.manual_seed(args.seed)
    base, tokenizer = load_base(args.base)
    split = genre_split(seed=args.split_seed)
    kwargs = dict(lines_per_passage=args.lines, passages_per_play=args.passages_per_play, max_tokens=args.max_tokens)
    train_set = genre_dataset(split.train, tokenizer, **kwargs)
    val_set = genre_dataset(split.val, tokenizer, **kwargs)
    test_set = genre_dataset(split.test, tokenizer, **kwargs)
    if args.adapt_steps:
        continue_pretraining(base, split.train, tokenizer, max_steps=args.adapt_steps, seed=args.seed,
                             device=args.device)
    model = GPTClassifier.from_gpt(base.cpu(), GENRES, pooling=args.pooling,
                                   pad_id=tokenizer.special_tokens[ENDOFTEXT], seed=args.seed)
    if args.lora_r:
        targets = GPT_TARGETS + (GPT_EMBEDDING if args.lora_embedding else ())
        model.add_lora(r=args.lora_r, alpha=args.lora_alpha, targets=targets)
    trainable = set_trainable(model, None if args.last_blocks < 0 else args.last_blocks)
    config = FinetuneConfig(max_steps=args.max_steps, batch_size=args.batch_size, max_lr=args.max_lr,
                            warmup_steps=min(args.max_steps, max(1, args.max_steps // 10)),
                            eval_interval=max(1, args.max_steps // 4), seed=args.seed, device=args.device)
    history = finetune(model, train_set, val_set, config)
    if args.merge and model.config.lora_r:
        model.merge_lora()
    test = evaluate_classifier(model, test_set)
    results = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "trainable_parameters": trainable,
               "majority_baseline": majority_baseline(train_set, test_set), "split": dataclasses.asdict(split)}
    path = save_classifier(args.out, model.cpu(), tokenizer, history=history, results=results)
    print(f"test plays {', '.join(split.test)}: accuracy {test['accuracy']:.3f} "
          f"(majority {results['majority_baseline']:.3f}); {trainable:,} trainable parameters; checkpoint {path}")
    return 0


def load_classifier(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPTClassifier, BPETokenizer]:
    """The classifier and tokenizer of a folder written by ``save_classifier`` (adapters rebuilt if unmerged)."""
    from llm_from_scratch.generate import load_model

    run_dir = Path(run_dir)
    model, _ = load_model(run_dir, device)
    if not isinstance(model, GPTClassifier):
        raise ValueError(f"{run_dir} holds a {type(model).__name__}, not a GPTClassifier")
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    return model, BPETokenizer.load(folder / TOKENIZER_NAME)


def _cmd_classify(args) -> int:
    model, tokenizer = load_classifier(args.run, args.device)
    text = args.text.encode().decode("unicode_escape") if args.escapes else args.text
    ids = tokenizer.to_tiktoken().encode_ordinary(text)[: model.config.context_length]
    if not ids:
        raise ValueError("the text is empty after tokenization")
    data = LabelledTexts([text], [ids], [0], model.config.labels)
    probs = predict(model, data)[0]
    best = int(probs.argmax())
    print(f"{model.config.labels[best]}  (" + ", ".join(
        f"{name} {float(p):.3f}" for name, p in zip(model.config.labels, probs, strict=True)) + ")")
    return 0


def add_finetune_parsers(subparsers) -> None:
    """Register ``finetune-classifier`` and ``classify`` on the subparsers of ``python -m llm_from_scratch``."""
    p = subparsers.add_parser(
        "finetune-classifier", help="fine-tune a pre-trained GPT to tell comedies, histories and tragedies apart",
        description="Fine-tune the GPT of a pre-training run folder on passages labelled by genre "
                    "(split by play; the test plays are outside the pre-training subset).")
    p.add_argument("--base", type=Path, required=True, help="pre-training run folder (checkpoint + tokenizer.json)")
    p.add_argument("--out", type=Path, required=True, help="folder for the classifier's checkpoint")
    p.add_argument("--adapt-steps", type=int, default=0,
                   help="steps of continued pre-training on the training plays' text first (0: none)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-lr", type=float, default=1e-3)
    p.add_argument("--last-blocks", type=int, default=-1, help="train the head and the last N blocks (-1: all)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: no adapters, full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-embedding", action="store_true", help="adapt the token embedding table too")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapters into the weights before saving")
    p.add_argument("--pooling", default="last", choices=_POOLINGS)
    p.add_argument("--lines", type=int, default=8, help="spoken lines per passage")
    p.add_argument("--passages-per-play", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens kept per passage (truncation)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_finetune, parser=p)
    c = subparsers.add_parser("classify", help="classify a text with a fine-tuned classifier",
                              description="Print the class a fine-tuned classifier gives a text, and its probabilities.")
    c.add_argument("run", type=Path, help="classifier folder written by finetune-classifier")
    c.add_argument("text", help="the text to classify")
    c.add_argument("--escapes", action="store_true", help=r"interpret backslash escapes in the text (\n)")
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=_cmd_classify, parser=c)


__all__ = [
    "FOLIO_GENRES", "GENRES", "ClassifierConfig", "FinetuneConfig", "GPTClassifier", "GenreSplit", "LabelledTexts",
    "bag_of_words_baseline", "confusion_matrix", "continue_pretraining", "evaluate_classifier", "finetune",
    "genre_dataset", "genre_split", "load_base", "load_classifier", "majority_baseline", "pad_batch", "play_passages",
    "plays_text", "predict", "save_classifier", "set_trainable", "spoken_lines",
]
