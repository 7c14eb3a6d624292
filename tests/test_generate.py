"""Tests of llm_from_scratch.generate: decoding filters, the cached decode loop, the command line.

References: a plain recompute-everything loop written here with ``model(seq)`` (for the cache), Hugging Face's
``GPT2LMHeadModel.generate`` (greedy tokens) and its ``TopKLogitsWarper`` / ``TopPLogitsWarper`` (filters), hand-computed
filter results, and ``torch.softmax`` (sampling frequencies).
"""

from __future__ import annotations

import argparse
import io
import math
from contextlib import redirect_stdout

import pytest
import torch

from llm_from_scratch.generate import (
    add_generate_parser,
    generate,
    generate_text,
    load_model,
    pad_prompts,
    sample_next_token,
    stream_generate,
    top_k_filter,
    top_p_filter,
)
from llm_from_scratch.model import GPT, GPTConfig

VOCAB = 97


def _model(context_length: int = 32, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB, context_length=context_length, d_model=32, n_layers=2, n_heads=4, **overrides)
    model = GPT(config).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: peaked, varied next-token distributions
        for p in model.parameters():
            p.mul_(8.0 if p.dim() == 2 else 1.0)
    return model


def _reference_greedy(model: GPT, idx: torch.Tensor, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Recompute everything each step, crop to the context window: the textbook loop."""
    seq, all_logits = idx, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq[:, -model.config.context_length:])[:, -1, :]
            all_logits.append(logits)
            seq = torch.cat([seq, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return seq, all_logits


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,prompt_length", [(1, 1), (1, 7), (3, 5), (4, 16)])
def test_cached_and_uncached_agree_with_reference_loop(batch, prompt_length):
    model = _model()
    idx = torch.randint(0, VOCAB, (batch, prompt_length), generator=torch.Generator().manual_seed(prompt_length))
    n = 12
    ref_seq, ref_logits = _reference_greedy(model, idx, n)
    for use_cache in (True, False):
        steps = list(stream_generate(model, idx, n, temperature=0.0, use_cache=use_cache, return_logits=True))
        tokens = torch.stack([t for t, _ in steps], dim=1)
        assert torch.equal(torch.cat([idx, tokens], dim=1), ref_seq)
        for (_, logits), ref in zip(steps, ref_logits, strict=True):
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    assert torch.equal(generate(model, idx, n, temperature=0.0), ref_seq)


def test_sliding_window_past_the_context_length():
    model = _model(context_length=8)
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    ref_seq, ref_logits = _reference_greedy(model, idx, 10)  # 15 tokens > context 8
    for use_cache in (True, False):
        steps = list(stream_generate(model, idx, 10, temperature=0.0, use_cache=use_cache, return_logits=True))
        assert torch.equal(torch.cat([idx, torch.stack([t for t, _ in steps], 1)], 1), ref_seq)
        for (_, logits), ref in zip(steps, ref_logits, strict=True):
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    # A prompt longer than the window: only its last context_length tokens are seen.
    long = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate(model, long, 3, temperature=0.0), _reference_greedy(model, long, 3)[0])


def test_matches_hugging_face_greedy_generate():
    transformers = pytest.importorskip("transformers")
    model = _model(context_length=64)
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=c.context_length, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf.load_state_dict({k: v.t() if k.endswith(transposed) else v for k, v in model.state_dict().items()}, strict=False)
    idx = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, min_new_tokens=20,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, idx, 20, temperature=0.0), expected)


def test_ragged_batch_matches_each_prompt_alone():
    model = _model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 9, 1, 6)]
    idx, mask = pad_prompts(prompts, pad_id=5)
    assert idx.shape == (4, 9) and mask.sum(1).tolist() == [3, 9, 1, 6] and bool(mask[:, -1].all())
    for use_cache in (True, False):
        steps = list(stream_generate(model, idx, 8, temperature=0.0, attention_mask=mask, use_cache=use_cache,
                                     return_logits=True))
        for row, prompt in enumerate(prompts):
            ref_seq, ref_logits = _reference_greedy(model, prompt[None], 8)
            assert torch.equal(torch.stack([t[row] for t, _ in steps]), ref_seq[0, len(prompt):])
            for (_, logits), ref in zip(steps, ref_logits, strict=True):
                torch.testing.assert_close(logits[row], ref[0], atol=1e-5, rtol=0)


def test_ragged_batch_sliding_window():
    model = _model(context_length=8)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8, 9])]
    idx, mask = pad_prompts(prompts)
    for use_cache in (True, False):
        out = generate(model, idx, 7, temperature=0.0, attention_mask=mask, use_cache=use_cache)
        for row in range(len(prompts)):
            # A padded row sees padding inside its window: compare with the same row padded alone.
            ref = generate(model, idx[row : row + 1], 7, temperature=0.0, attention_mask=mask[row : row + 1],
                           use_cache=False)
            assert torch.equal(out[row], ref[0])
        assert torch.equal(out[1, 6:], _reference_greedy(model, prompts[1][None], 7)[0][0, 6:])


@pytest.mark.parametrize("out_features,bias", [(96, True), (128, False), (58, True), (64, True)])
def test_one_token_linear_matches_f_linear(out_features, bias):
    from llm_from_scratch.generate import _one_token_linear
    from llm_from_scratch.linear import Linear

    g = torch.Generator().manual_seed(out_features)
    layer = Linear(40, out_features, bias=bias)  # the model's layers
    x = torch.randn(1, 1, 40, generator=g)
    parts = 29 if out_features == 58 else 2
    with torch.no_grad():
        torch.testing.assert_close(_one_token_linear(layer.weight, layer.bias, parts, x), layer(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(_one_token_linear(layer.weight, layer.bias, parts, x[0]), layer(x[0]), atol=1e-6,
                                   rtol=0)
        rows = torch.randn(2, 3, 40, generator=g)  # several tokens: the layer's own product
        assert torch.equal(_one_token_linear(layer.weight, layer.bias, parts, rows), layer(rows))


def test_decode_steps_split_the_linear_layers_and_leave_the_model_alone(monkeypatch):
    import llm_from_scratch.generate as gen

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the split needs 2 threads or more
    monkeypatch.setattr(gen, "_MIN_SPLIT_NUMEL", 0)  # and matrices larger than this test's
    model = _model(context_length=48)
    params = {name: (p.data_ptr(), p.stride(), p.detach().clone()) for name, p in model.named_parameters()}
    split_seen = []
    hooks = [m.register_forward_pre_hook(lambda module, args: split_seen.append("forward" in vars(module)))
             for m in (model.transformer.h[0].mlp.c_fc, model.lm_head)]
    idx = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(6))
    n = 50  # 55 tokens: past the window of 48 too
    ref_seq, ref_logits = _reference_greedy(model, idx, n)
    split_seen.clear()
    stream = stream_generate(model, idx, n, temperature=0.0, return_logits=True)
    steps = [next(stream) for _ in range(3)]
    # Suspended between steps: every layer has its own forward again.
    assert not any("forward" in vars(m) for m in model.modules())
    steps += list(stream)
    for h in hooks:
        h.remove()
    # c_fc (128 outputs) is split at every one-token step; lm_head (97 outputs, prime) never is.
    c_fc_calls, head_calls = split_seen[0::2], split_seen[1::2]
    assert c_fc_calls[0] and not head_calls[0]  # the prompt (5 tokens) runs F.linear inside the split forward
    assert all(c_fc_calls) and not any(head_calls)
    assert torch.equal(torch.cat([idx, torch.stack([t for t, _ in steps], 1)], 1), ref_seq)
    for (_, logits), ref in zip(steps, ref_logits, strict=True):
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        ptr, stride, value = params[name]
        assert p.data_ptr() == ptr and p.stride() == stride and torch.equal(p, value), name
    # One thread: nothing to split.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    hook = model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(
        lambda module, args: split_seen.append("forward" in vars(module)))
    split_seen.clear()
    assert torch.equal(generate(model, idx, 4, temperature=0.0), ref_seq[:, :9])
    hook.remove()
    assert split_seen and not any(split_seen)


def test_model_mode_restored_and_one_dimensional_prompt():
    model = _model().train()
    out = generate(model, torch.tensor([1, 2, 3]), 4, temperature=0.0)
    assert out.shape == (7,) and model.training
    assert torch.equal(out, _reference_greedy(model.eval(), torch.tensor([[1, 2, 3]]), 4)[0][0])


# --------------------------------------------------------------------------------------------
# Decoding strategies
# --------------------------------------------------------------------------------------------
def test_top_k_hand_computed():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, -1.0, 5.0, 4.0]])
    inf = float("-inf")
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[inf, 3.0, 2.0, inf], [inf, inf, 5.0, 4.0]]))
    assert torch.equal(top_k_filter(logits, 1), torch.tensor([[inf, 3.0, inf, inf], [inf, inf, 5.0, inf]]))
    assert torch.equal(top_k_filter(logits, 10), logits)  # more than the vocabulary: keep all


def test_top_p_hand_computed():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None]
    inf = float("-inf")
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [True, True, False, False]  # 0.5 < 0.7, then 0.8 >= 0.7: stop
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.1) == [True, False, False, False]  # the top token is always kept
    assert kept(1.0) == [True] * 4
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary does not matter
    assert torch.isfinite(top_p_filter(shuffled, 0.7))[0].tolist() == [False, True, False, True]
    assert torch.equal(top_p_filter(logits, 0.7)[0, :2], logits[0, :2])  # kept logits unchanged
    assert top_p_filter(logits, 0.7)[0, 2] == inf


def test_filters_match_hugging_face_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(5)) * 3
    for k in (1, 5, 50):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.05, 0.3, 0.9, 0.99):
        ours = torch.isfinite(top_p_filter(logits, p))
        theirs = torch.isfinite(TopPLogitsWarper(p)(None, logits.clone()))
        assert torch.equal(ours, theirs)


def test_temperature_near_zero_is_greedy_and_zero_is_argmax():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, temperature=1e-4, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))
    model = _model()
    idx = torch.tensor([[3, 1, 4]])
    cold = generate(model, idx, 10, temperature=1e-5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cold, generate(model, idx, 10, temperature=0.0))


def test_sampling_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20000
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 3)):
        rows = logits.expand(n, 4)
        draws = sample_next_token(rows, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(7))
        freq = torch.bincount(draws, minlength=4).double() / n
        expected = logits.double() / temperature
        if top_k is not None:
            expected[3] = -math.inf
        expected = torch.softmax(expected, dim=0)
        assert (freq - expected).abs().max() < 0.015, (temperature, freq, expected)


def test_same_seed_same_text():
    model = _model()
    idx = torch.tensor([[5, 6, 7], [8, 9, 10]])
    kw = dict(temperature=1.0, top_k=20, top_p=0.95)
    a = generate(model, idx, 15, generator=torch.Generator().manual_seed(42), **kw)
    b = generate(model, idx, 15, generator=torch.Generator().manual_seed(42), **kw)
    c = generate(model, idx, 15, generator=torch.Generator().manual_seed(43), **kw)
    d = generate(model, idx, 15, generator=torch.Generator().manual_seed(42), use_cache=False, **kw)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


def test_stops_at_eos():
    model = _model()
    idx = torch.tensor([[1, 2, 3]])
    free = generate(model, idx, 20, temperature=0.0)[0, 3:].tolist()
    eos = free[4]
    first = free.index(eos)
    out = generate(model, idx, 20, temperature=0.0, eos_id=eos)
    assert out[0, 3:].tolist() == free[: first + 1]  # includes the eos, nothing after
    streamed = [int(t) for t in stream_generate(model, idx, 20, temperature=0.0, eos_id=eos)]
    assert streamed == free[: first + 1]
    # In a batch, a finished row repeats eos until every row is finished.
    batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free_b = generate(model, batch, 20, temperature=0.0)
    eos = int(free_b[0, 3])
    out_b = generate(model, batch, 20, temperature=0.0, eos_id=eos)
    row1 = free_b[1, 3:].tolist()
    stop = row1.index(eos) + 1 if eos in row1 else 20
    assert out_b.shape[1] == 3 + stop
    assert (out_b[0, 3:] == eos).all() and out_b[1, 3:].tolist() == row1[:stop]


def test_zero_new_tokens_returns_the_prompt():
    idx = torch.tensor([[1, 2]])
    out = generate(_model(), idx, 0)
    assert torch.equal(out, idx) and out is not idx


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[1]]), 3, **kwargs)
    with pytest.raises(ValueError, match=match):
        sample_next_token(torch.zeros(1, 5), **kwargs)
    with pytest.raises(ValueError, match=match):
        stream_generate(model, torch.tensor([[1]]), 3, **kwargs)  # checked at the call, not the first step


def test_bad_prompts():
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        generate(model, torch.tensor([[1, VOCAB]]), 3)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        generate(model, torch.tensor([[-1, 2]]), 3)
    with pytest.raises(TypeError, match="integer"):
        generate(model, torch.tensor([[1.0, 2.0]]), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.tensor([[1]]), -1)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.tensor([[1, 2]]), 2, attention_mask=torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1, 2], []])


# --------------------------------------------------------------------------------------------
# Checkpoints and the command line
# --------------------------------------------------------------------------------------------
def test_generate_command(tmp_path):
    from llm_from_scratch.bpe import BPETokenizer, train_bpe
    from llm_from_scratch.train import save_checkpoint

    text = "to be or not to be, that is the question. " * 20
    vocab, merges = train_bpe(text, 300)
    tokenizer = BPETokenizer(vocab, merges, ["<|endoftext|>"])
    tokenizer.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, d_model=32, n_layers=2, n_heads=4))
    save_checkpoint(tmp_path / "checkpoint.safetensors", model)

    loaded, _ = load_model(tmp_path)
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))

    def run(*extra: str) -> str:
        args = parser.parse_args(["generate", "--checkpoint", str(tmp_path), "--prompt", "to be", *extra])
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            assert args.func(args) == 0
        return buffer.getvalue()

    encoding = tokenizer.to_tiktoken()
    ids = torch.tensor([encoding.encode("to be")])
    eos = encoding.encode("<|endoftext|>", allowed_special="all")[0]
    greedy = generate(model.eval(), ids, 10, temperature=0.0, eos_id=eos)[0, ids.size(1):].tolist()
    greedy = greedy[: greedy.index(eos)] if eos in greedy else greedy
    assert run("--temperature", "0", "--max-new-tokens", "10") == "to be" + encoding.decode(greedy) + "\n"
    sampled = run("--seed", "3", "--max-new-tokens", "12", "--top-k", "5", "--top-p", "0.9")
    assert sampled == run("--seed", "3", "--max-new-tokens", "12", "--top-k", "5", "--top-p", "0.9", "--no-cache")
    assert sampled.startswith("to be")
    args = parser.parse_args(["generate", "--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError):
        args.func(args)


def test_sample_next_token_names_bad_logits():
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"NaN or \+inf in batch row\(s\) \[1\]"):
            sample_next_token(logits, temperature=temperature)
    logits = torch.zeros(2, 4)
    logits[0] = float("-inf")
    with pytest.raises(ValueError, match="every logit of batch row 0 is -inf"):
        sample_next_token(logits)
    masked = torch.tensor([[0.0, float("-inf"), 1.0]])  # -inf alone is a token never chosen: fine
    assert sample_next_token(masked, temperature=0).item() == 2


def test_generate_text_is_prompt_plus_the_greedy_continuation():
    from llm_from_scratch.data import CharTokenizer

    text = "".join(chr(32 + i) for i in range(VOCAB))  # 97 printable characters: one id each
    tokenizer = CharTokenizer.from_text(text)
    model = _model()
    prompt = "To be, or"
    expected, _ = _reference_greedy(model, torch.tensor([tokenizer.encode(prompt)]), 12)
    got = generate_text(model, tokenizer, prompt, 12, temperature=0)
    assert got == tokenizer.decode(expected[0].tolist()) and got.startswith(prompt) and len(got) == len(prompt) + 12
    sampled = [generate_text(model, tokenizer, prompt, 12, temperature=0.8, top_k=50, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded: the same text every time
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        generate_text(model, tokenizer, "", 5)
