"""Fine-tuning steps: the output layer at the labelled positions alone against the full logits.

    .venv/bin/python benchmarks/sft.py                 # the chapter "Following instructions"'s sizes, 1 thread
    .venv/bin/python benchmarks/sft.py --threads 2 --rounds 7

In supervised fine-tuning only the answer tokens have a label (``-100`` elsewhere), and DPO scores
the same positions. ``instruct.sft_loss`` and ``dpo.response_logprobs`` therefore run the model up
to its final layer norm (``GPT.hidden``) and apply the output layer to the labelled positions only.
The reference computes the full ``(B, T, vocab)`` logits and lets ``F.cross_entropy`` (or a
gather) skip the ignored positions, as ``GPT.forward(idx, targets)`` does. Each row times one
optimizer step (forward, backward, AdamW) on batches of the chapter's real examples (its chat
template and course tokenizer, batches of similar length, as ``train_sft`` and ``train_dpo`` make
them), with the chapter's model size (the ``tiny`` preset, randomly initialised: the time does not
depend on the weights). Rounds alternate the two versions; the table shows the median time per
step, the median of the per-round ratios, and the largest difference between the two losses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from llm_from_scratch.bpe import course_data
from llm_from_scratch.dpo import (
    PreferenceDataset,
    collate_pairs,
    dpo_loss,
    frozen_copy,
    preference_pairs,
    response_logprobs,
)
from llm_from_scratch.instruct import (
    END,
    InstructionDataset,
    chat_tokenizer,
    collate,
    length_batches,
    sft_loss,
    shakespeare_instructions,
)
from llm_from_scratch.model import GPT, IGNORE_INDEX, GPTConfig


def full_sft_loss(model, inputs, labels):
    """The reference: every position's logits, the ignored ones skipped by the loss."""
    return F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def full_response_logprobs(model, inputs, labels):
    """The reference for DPO: every position's log-probabilities, the labelled ones summed per row."""
    logp = F.log_softmax(model(inputs).float(), dim=-1)  # (B, T, V)
    keep = labels != IGNORE_INDEX
    return (logp.gather(2, labels.clamp(min=0)[..., None])[..., 0] * keep).sum(dim=1)


def sft_step(model, reference, optimizer, batch, loss_fn):
    loss = loss_fn(model, *batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def dpo_step(model, reference, optimizer, batch, logprob_fn):
    inputs, labels = batch
    half = inputs.size(0) // 2
    logps = logprob_fn(model, inputs, labels)
    with torch.no_grad():
        ref = logprob_fn(reference, inputs, labels)
    loss = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta=0.1)[0]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the chapter)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating the two versions (default 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples (SFT) or pairs (DPO) per step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = chat_tokenizer(course_data(4096, "small").tokenizer)
    examples = shakespeare_instructions()
    pad = tokenizer.special_tokens[END]
    sft_set = InstructionDataset(examples, tokenizer, context_length=128)
    pair_set = PreferenceDataset(preference_pairs(examples, seed=0), tokenizer, context_length=128)
    sft_batches = [collate([sft_set[i] for i in b], pad)
                   for b in length_batches(sft_set.lengths(), args.batch_size, seed=0)[:args.steps]]
    dpo_batches = [collate_pairs([pair_set[i] for i in b], pad)
                   for b in length_batches(pair_set.lengths(), args.batch_size, seed=0)[:args.steps]]
    base = GPT(GPTConfig.tiny(vocab_size=tokenizer.vocab_size))
    reference = frozen_copy(base)  # DPO's frozen reference: the starting weights
    rows = [
        ("SFT step", sft_batches, sft_step, sft_loss, full_sft_loss),
        ("DPO step", dpo_batches, dpo_step, response_logprobs, full_response_logprobs),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}; "
          f"GPT tiny, vocabulary {tokenizer.vocab_size}; {args.rounds} rounds of {args.steps} steps")
    print("| step | tokens/step | labelled | ours (ms) | full logits (ms) | full / ours | max loss difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, batches, step, ours_fn, ref_fn in rows:
        times = {"ours": [], "full": []}
        diff = 0.0
        for r in range(args.rounds):
            order = [("ours", ours_fn), ("full", ref_fn)]
            losses = {}
            for key, fn in order if r % 2 == 0 else order[::-1]:
                model = GPT(base.config)
                model.load_state_dict(base.state_dict())
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
                step(model, reference, optimizer, batches[0], fn)  # warm-up
                start = time.perf_counter()
                losses[key] = [step(model, reference, optimizer, b, fn) for b in batches]
                times[key].append((time.perf_counter() - start) / len(batches))
            diff = max(diff, max(abs(a - b) for a, b in zip(losses["ours"], losses["full"], strict=True)))
        tokens = statistics.mean(b[0].numel() for b in batches)
        labelled = statistics.mean(float((b[1] != IGNORE_INDEX).float().mean()) for b in batches)
        ratio = statistics.median(f / o for f, o in zip(times["full"], times["ours"], strict=True))
        print(f"| {name} | {tokens:.0f} | {labelled:.1%} | {1e3 * statistics.median(times['ours']):.1f} | "
              f"{1e3 * statistics.median(times['full']):.1f} | {ratio:.2f}x | {diff:.1e} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
