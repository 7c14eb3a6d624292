"""Tests of llm_from_scratch.dpo: the loss against a hand computation, ln 2 at the start, gradients.

References: the DPO formula evaluated here with ``math`` on hand-picked log-probabilities, and
``torch.log_softmax`` summed over the response positions for the sequence log-probabilities.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llm_from_scratch.dpo import (
    PreferenceDataset,
    PreferencePair,
    collate_pairs,
    dpo_loss,
    dpo_step,
    frozen_copy,
    on_policy_pairs,
    preference_pairs,
    response_logprobs,
    train_dpo,
)
from llm_from_scratch.instruct import END, Example, collate, encode_example
from tests.test_instruct import tiny_chat_model

PAIRS = [
    PreferencePair("Which play is this from?\nIf music be the food of love", "Twelfth Night", "As You Like It", "a"),
    PreferencePair("Who speaks these lines in Twelfth Night?\nWhat country, friends, is this?", "VIOLA", "SIR TOBY",
                   "b"),
    PreferencePair("Which play is this from?\nThe quality of mercy", "The Merchant of Venice", "Twelfth Night", "c"),
]


def test_loss_matches_hand_computation():
    pc, pr, rc, rr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5]), torch.tensor([-3.5, -1.2]), \
        torch.tensor([-3.0, -0.7])
    beta = 0.5
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta)
    # Row 0: rewards 0.5 * (-3 + 3.5) = 0.25 and 0.5 * (-4 + 3) = -0.5, margin 0.75.
    # Row 1: rewards 0.5 * (-1 + 1.2) = 0.1 and 0.5 * (-0.5 + 0.7) = 0.1, margin 0.
    expected = (math.log(1 + math.exp(-0.75)) + math.log(2)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.25, 0.1])
    assert rejected.tolist() == pytest.approx([-0.5, 0.1])
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_beta_scales_the_gradient_at_the_start():
    for beta in (0.1, 0.5, 2.0):
        pc = torch.zeros(1, requires_grad=True)
        loss, _, _ = dpo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=beta)
        loss.backward()
        assert float(pc.grad) == pytest.approx(-beta / 2)  # d/dm -log sigmoid(beta m) at m = 0


def _batch(tokenizer):
    dataset = PreferenceDataset(PAIRS, tokenizer, context_length=64)
    return dataset, collate_pairs([dataset[i] for i in range(len(dataset))], pad_id=tokenizer.special_tokens[END])


def test_response_logprobs_sum_the_response_tokens():
    model, tokenizer = tiny_chat_model()
    x, y = encode_example(tokenizer, PAIRS[1].instruction, PAIRS[1].chosen)
    inputs, labels = collate([(torch.tensor(x), torch.tensor(y))], pad_id=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs).double(), dim=-1)[0]
        expected = sum(float(logp[t, label]) for t, label in enumerate(y) if label != -100)
        assert float(response_logprobs(model, inputs, labels)[0]) == pytest.approx(expected, rel=1e-5)


def test_loss_is_ln2_at_the_start_and_gradients_reach_only_the_policy():
    policy, tokenizer = tiny_chat_model()
    reference = frozen_copy(policy)
    _, (inputs, labels) = _batch(tokenizer)
    logps = response_logprobs(policy, inputs, labels)
    with torch.no_grad():
        ref = response_logprobs(reference, inputs, labels)
    loss, _, _ = dpo_loss(logps[:3], logps[3:], ref[:3], ref[3:], beta=0.1)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    before_ref = [p.clone() for p in reference.parameters()]
    before_policy = [p.clone() for p in policy.parameters()]
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    stats = dpo_step(policy, reference, inputs, labels, optimizer, beta=0.1)
    assert stats["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before_ref, reference.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_policy, policy.parameters(), strict=True))


def test_training_raises_the_margin():
    policy, tokenizer = tiny_chat_model()
    dataset, _ = _batch(tokenizer)
    history = train_dpo(policy, dataset, steps=15, beta=0.5, batch_size=3, lr=3e-3, warmup_steps=1,
                        pad_id=tokenizer.special_tokens[END])
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["margin"] > 0
    assert history[-1]["accuracy"] == 1.0


def test_pairs_and_their_errors():
    examples = [Example("Who?", "VIOLA", "speaker", "x", ("VIOLA", "OLIVIA", "CLOWN"))] * 5
    pairs = preference_pairs(examples, seed=3)
    assert all(p.chosen == "VIOLA" and p.rejected in ("OLIVIA", "CLOWN") for p in pairs)
    assert pairs == preference_pairs(examples, seed=3)
    with pytest.raises(ValueError, match="no wrong answer"):
        preference_pairs([Example("Who?", "VIOLA", "speaker", "x", ("VIOLA",))])
    _, tokenizer = tiny_chat_model()
    with pytest.raises(ValueError, match="same"):
        PreferenceDataset([PreferencePair("Who?", "VIOLA", "VIOLA", "x")], tokenizer, context_length=64)
    with pytest.raises(ValueError, match="rejected response is empty"):
        PreferenceDataset([PreferencePair("Who?", "VIOLA", " ", "x")], tokenizer, context_length=64)


def test_nll_term_adds_the_chosen_negative_log_likelihood_per_token():
    """The step minimises dpo_loss + w * (-sum log p(chosen tokens) / number of chosen tokens)."""
    policy, tokenizer = tiny_chat_model()
    reference = frozen_copy(policy)
    _, (inputs, labels) = _batch(tokenizer)
    # Reference: log_softmax gathered by hand (float64) over the chosen rows' labelled positions.
    logp = torch.log_softmax(policy(inputs[:3]).double(), dim=-1)
    mask = labels[:3] != -100
    picked = logp.gather(2, labels[:3].clamp(min=0)[..., None])[..., 0]
    nll = -(picked * mask).sum() / mask.sum()
    nll.backward()
    nll_grad = policy.lm_head.weight.grad.clone()
    grads = {}
    for weight in (0.0, 0.5):
        model = copy.deepcopy(policy)
        model.zero_grad(set_to_none=True)
        stats = dpo_step(model, reference, inputs, labels, torch.optim.SGD(model.parameters(), lr=0.0), beta=0.1,
                         nll_weight=weight, grad_clip=math.inf)
        assert stats["nll"] == pytest.approx(nll.item(), rel=1e-5)
        grads[weight] = model.lm_head.weight.grad
    assert torch.allclose(grads[0.5] - grads[0.0], 0.5 * nll_grad.float(), atol=1e-6)
    assert not torch.allclose(grads[0.5], grads[0.0])
    with pytest.raises(ValueError, match="nll_weight"):
        dpo_step(policy, reference, inputs, labels, torch.optim.SGD(policy.parameters(), lr=0.0), beta=0.1,
                 nll_weight=-1.0)


def test_on_policy_pairs_reject_the_models_own_wrong_answer():
    examples = [Example("Who?", "VIOLA", "speaker", str(i), ("VIOLA", "OLIVIA", "CLOWN", "MARIA")) for i in range(4)]
    answers = ["OLIVIA", "VIOLA", "", "SIR TOBY BELCH"]
    pairs = on_policy_pairs(examples, answers, seed=1)
    random_pairs = preference_pairs(examples, seed=1)
    assert pairs[0].rejected == "OLIVIA" and pairs[3].rejected == "SIR TOBY BELCH"  # its own wrong answers
    assert pairs[1] == random_pairs[1] and pairs[2] == random_pairs[2]  # right or empty: a random wrong choice
    assert all(p.chosen == "VIOLA" != p.rejected for p in pairs)
    with pytest.raises(ValueError, match="one answer per example"):
        on_policy_pairs(examples, answers[:2])
