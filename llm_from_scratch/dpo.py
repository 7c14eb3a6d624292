"""Direct preference optimisation (DPO), from scratch.

Explained in the chapter "Following instructions" (chapters/10_instructions.ipynb). Given a
prompt with a preferred ("chosen") and a dispreferred ("rejected") response, DPO trains the
policy so that, relative to a frozen reference model, the chosen response gains log-probability
over the rejected one (Rafailov et al., 2023)::

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

With ``nll_weight`` > 0 the step adds that multiple of the chosen responses' negative
log-likelihood per token (DPO + NLL, as in Pang et al., 2024, "Iterative reasoning preference
optimization"): plain DPO can lower the probability of the chosen answer too, as long as the
rejected one falls faster, and the term holds it up.

This module holds ``response_logprobs`` (the summed log-probability of the response tokens),
``dpo_loss`` (the formula above, with the implicit rewards), ``preference_pairs`` (a wrong
answer of the same task as the rejected response) and ``on_policy_pairs`` (the model's own wrong
answer where it has one), ``PreferenceDataset`` / ``collate_pairs``, ``dpo_step`` and ``train_dpo``.

What it does not do: sample several responses from the policy and rank them with a judge, a
reward model, or PPO. It builds on ``instruct.py`` (template, masked labels).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_from_scratch.bpe import BPETokenizer
from llm_from_scratch.instruct import (
    Example,
    _check_text,
    collate,
    encode_example,
    scheduled_batches,
)
from llm_from_scratch.model import GPT, IGNORE_INDEX
from llm_from_scratch.train import configure_optimizer


def response_logprobs(model: GPT, inputs: Tensor, labels: Tensor) -> Tensor:
    """``(B,)``: the sum of ``log p(label)`` over the labelled positions of each row (the response)."""
    keep = labels != IGNORE_INDEX  # (B, T)
    logits = model.lm_head(model.hidden(inputs)[keep]).float()  # (N, V): the labelled positions alone
    picked = torch.gather(F.log_softmax(logits, dim=-1), 1, labels[keep][:, None])[:, 0]  # (N,)
    rows = keep.nonzero()[:, 0]  # (N,): the row of each labelled position
    return torch.zeros(inputs.size(0), dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss (mean over the batch) and the implicit rewards of the chosen and rejected responses.

    Each argument is ``(B,)``: a response's summed log-probability under the policy or the
    reference. The reward of a response is ``beta * (log pi - log ref)``; the loss is
    ``-log sigmoid(reward_chosen - reward_rejected)``, ``ln 2`` when the policy is the reference.
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred response."""

    instruction: str
    chosen: str
    rejected: str
    item: str


def preference_pairs(examples: Sequence[Example], *, seed: int = 0) -> list[PreferencePair]:
    """One pair per example: its answer as chosen, another valid answer of its task, drawn at random, as rejected."""
    rng = random.Random(seed)
    pairs = []
    for e in examples:
        wrong = [c for c in e.choices if c != e.response]
        if not wrong:
            raise ValueError(f"example {e.item} ({e.task}) has no wrong answer among its choices {e.choices}")
        pairs.append(PreferencePair(e.instruction, e.response, rng.choice(wrong), e.item))
    return pairs


def on_policy_pairs(examples: Sequence[Example], answers: Sequence[str], *, seed: int = 0) -> list[PreferencePair]:
    """Pairs whose rejected response is the model's own wrong answer (``answers[i]`` to ``examples[i]``).

    Where the answer is right or empty, the rejected response is another valid answer drawn at
    random, as in ``preference_pairs`` (same ``seed``, same draws).
    """
    if len(answers) != len(examples):
        raise ValueError(f"need one answer per example, got {len(answers)} answers for {len(examples)} examples")
    fallback = preference_pairs(examples, seed=seed)
    return [PreferencePair(e.instruction, e.response, a.strip(), e.item)
            if a.strip() and a.strip() != e.response.strip() else p
            for e, a, p in zip(examples, answers, fallback, strict=True)]


class PreferenceDataset(torch.utils.data.Dataset):
    """Encoded pairs: item ``i`` is ``(chosen_ids, chosen_labels, rejected_ids, rejected_labels)``."""

    def __init__(self, pairs: Sequence[PreferencePair], tokenizer: BPETokenizer, *, context_length: int) -> None:
        if len(pairs) == 0:
            raise ValueError("pairs is empty")
        self.pairs = list(pairs)
        self.rows = []
        for n, p in enumerate(self.pairs):
            _check_text("rejected response", p.rejected)
            if p.chosen.strip() == p.rejected.strip():
                raise ValueError(f"pair {n} ({p.item}): the chosen and rejected responses are the same")
            chosen = encode_example(tokenizer, p.instruction, p.chosen, context_length=context_length)
            rejected = encode_example(tokenizer, p.instruction, p.rejected, context_length=context_length)
            self.rows.append(tuple(torch.tensor(t) for t in (*chosen, *rejected)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.rows[index]

    def lengths(self) -> list[int]:
        return [max(len(r[0]), len(r[2])) for r in self.rows]


def collate_pairs(batch: Sequence[tuple[Tensor, ...]], pad_id: int) -> tuple[Tensor, Tensor]:
    """One padded batch of ``2B`` rows: the ``B`` chosen responses, then the ``B`` rejected ones."""
    rows = [(r[0], r[1]) for r in batch] + [(r[2], r[3]) for r in batch]
    return collate(rows, pad_id)


def dpo_step(
    policy: GPT, reference: GPT, inputs: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer, *,
    beta: float, nll_weight: float = 0.0, grad_clip: float = 1.0,
) -> dict:
    """One optimizer step on a batch from ``collate_pairs``; returns the losses, rewards, margin and accuracy.

    The minimised loss is ``dpo_loss + nll_weight * nll``, ``nll`` being the chosen responses'
    mean negative log-likelihood per token. The reference is scored without gradients, so only
    the policy's parameters change.
    """
    if not nll_weight >= 0:
        raise ValueError(f"nll_weight must be >= 0, got {nll_weight!r}")
    half = inputs.size(0) // 2
    policy_logps = response_logprobs(policy, inputs, labels)
    with torch.no_grad():
        ref_logps = response_logprobs(reference, inputs, labels)
    loss, chosen, rejected = dpo_loss(policy_logps[:half], policy_logps[half:], ref_logps[:half], ref_logps[half:],
                                      beta=beta)
    nll = -policy_logps[:half].sum() / (labels[:half] != IGNORE_INDEX).sum()
    optimizer.zero_grad(set_to_none=True)
    (loss + nll_weight * nll if nll_weight else loss).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "nll": nll.item(), "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean()), "margin": float((chosen - rejected).mean()),
            "accuracy": float((chosen > rejected).float().mean())}


def frozen_copy(model: GPT) -> GPT:
    """A copy of ``model`` in eval mode whose parameters need no gradients: the DPO reference."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def train_dpo(
    policy: GPT,
    dataset: PreferenceDataset,
    *,
    steps: int,
    beta: float = 0.1,
    batch_size: int = 16,
    lr: float = 1e-4,
    warmup_steps: int = 5,
    seed: int = 0,
    pad_id: int,
    reference: GPT | None = None,
    nll_weight: float = 0.0,
) -> list[dict]:
    """DPO on ``dataset``: ``policy`` is trained in place against ``reference`` (default: a frozen copy of it).

    ``nll_weight`` > 0 adds the chosen responses' negative log-likelihood (``dpo_step``).
    Returns the history, one row per step (``dpo_step``'s numbers and ``"step"``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    reference = frozen_copy(policy) if reference is None else reference
    torch.manual_seed(seed)
    optimizer = configure_optimizer(policy, lr=lr, weight_decay=0.0)  # fused, as train_sft's
    history = []
    policy.train()
    for step, batch in scheduled_batches(dataset, optimizer, steps=steps, batch_size=batch_size, lr=lr,
                                         warmup_steps=warmup_steps, seed=seed):
        inputs, labels = collate_pairs(batch, pad_id)
        history.append({"step": step + 1, **dpo_step(policy, reference, inputs, labels, optimizer, beta=beta,
                                                                 nll_weight=nll_weight)})
    policy.eval()
    return history
