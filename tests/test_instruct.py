"""Tests of llm_from_scratch.instruct (and the special tokens of bpe): template, masking, data, saving.

References: a loss computed here from ``torch.log_softmax`` over the response positions only, the
tokenizer's own ids before special tokens are added, and hand-written expected labels.
"""

from __future__ import annotations

import pytest
import torch

from llm_from_scratch.bpe import ENDOFTEXT, BPETokenizer, train_bpe
from llm_from_scratch.instruct import (
    ASSISTANT,
    CHAT_TOKENS,
    END,
    USER,
    Example,
    InstructionDataset,
    chat_tokenizer,
    collate,
    encode_example,
    exact_match,
    examples_from_rows,
    format_example,
    format_prompt,
    generate_answers,
    length_batches,
    load_chat_model,
    parse_response,
    play_speeches,
    python_instructions,
    resize_token_embeddings,
    save_chat_model,
    sft_loss,
    shakespeare_instructions,
    split_by_item,
)
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.train import CHECKPOINT_NAME, save_checkpoint, tokenizer_fingerprint

TEXT = ("Who speaks these lines? VIOLA speaks them. Which play is this from? Twelfth Night. " * 20
        + "The quality of mercy is not strained; it droppeth as the gentle rain from heaven. " * 10)


def base_tokenizer() -> BPETokenizer:
    vocab, merges = train_bpe(TEXT, 300, (ENDOFTEXT,))
    return BPETokenizer(vocab, merges, [ENDOFTEXT])


def tiny_chat_model(seed: int = 0, context_length: int = 64) -> tuple[GPT, BPETokenizer]:
    """A random GPT with a small tokenizer that carries the chat tokens (for tests)."""
    tokenizer = chat_tokenizer(base_tokenizer())
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=context_length, d_model=32, n_layers=2,
                       n_heads=2)
    return GPT(config).eval(), tokenizer


# --------------------------------------------------------------------------------------------
# Special tokens and the template
# --------------------------------------------------------------------------------------------
def test_special_tokens_are_appended_and_old_ids_unchanged(tmp_path):
    base = base_tokenizer()
    chat = base.with_special_tokens(CHAT_TOKENS)
    assert [chat.special_tokens[t] for t in CHAT_TOKENS] == [base.vocab_size, base.vocab_size + 1, base.vocab_size + 2]
    assert chat.vocab_size == base.vocab_size + 3
    assert chat.special_tokens[ENDOFTEXT] == base.special_tokens[ENDOFTEXT]
    for i, token in base.vocab.items():
        assert chat.vocab[i] == token
    text = "Which play is this from?" + ENDOFTEXT + " mercy"
    assert chat.encode(text) == base.encode(text)
    loaded = BPETokenizer.load(chat.save(tmp_path / "tok.json"))
    assert loaded.special_tokens == chat.special_tokens
    assert loaded.encode(USER + "hi" + END) == chat.encode(USER + "hi" + END)
    with pytest.raises(ValueError, match="already tokens"):
        chat.with_special_tokens([END])
    with pytest.raises(ValueError, match="already tokens"):
        base.with_special_tokens(["e"])  # the bytes of an ordinary token


def test_template_round_trips():
    tokenizer = chat_tokenizer(base_tokenizer())
    text = format_example("Which play is this from?\nIf music be the food of love", "Twelfth Night")
    assert text == f"{USER}Which play is this from?\nIf music be the food of love{ASSISTANT}Twelfth Night{END}"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.special_tokens[END]) == 1
    assert parse_response(text.split(ASSISTANT, 1)[1]) == "Twelfth Night"
    assert parse_response(" VIOLA<|end|>junk") == "VIOLA"
    assert chat_tokenizer(tokenizer) is tokenizer


def test_labels_mask_exactly_the_prompt():
    tokenizer = chat_tokenizer(base_tokenizer())
    prompt = tokenizer.encode(format_prompt("Who speaks?"))
    answer = tokenizer.encode("VIOLA") + [tokenizer.special_tokens[END]]
    inputs, labels = encode_example(tokenizer, "Who speaks?", "VIOLA")
    assert inputs == (prompt + answer)[:-1]
    assert labels == [-100] * (len(prompt) - 1) + answer
    _, unmasked = encode_example(tokenizer, "Who speaks?", "VIOLA", mask_prompt=False)
    assert unmasked == (prompt + answer)[1:]


def test_masked_loss_equals_hand_computation_and_ignores_prompt_tokens():
    model, tokenizer = tiny_chat_model()
    rows = [encode_example(tokenizer, q, a) for q, a in (("Who speaks?", "VIOLA"), ("Which play is this from?",
                                                                                     "Twelfth Night"))]
    inputs, labels = collate([(torch.tensor(x), torch.tensor(y)) for x, y in rows], pad_id=0)
    loss = sft_loss(model, inputs, labels).detach()
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs).double(), dim=-1)
    terms = [-logp[b, t, labels[b, t]] for b in range(2) for t in range(labels.size(1)) if labels[b, t] != -100]
    assert len(terms) == sum(len(y) - y.count(-100) for _, y in rows)
    assert float(loss) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)
    # No gradient reaches the final hidden state at a position that predicts a prompt token.
    first_answer = [y.index(next(v for v in y if v != -100)) for _, y in rows]
    captured, hidden = {}, model.hidden

    def spy(*args, **kwargs):
        captured["h"] = hidden(*args, **kwargs)
        captured["h"].retain_grad()
        return captured["h"]

    model.hidden = spy
    sft_loss(model, inputs, labels).backward()
    for b, cut in enumerate(first_answer):
        assert torch.count_nonzero(captured["h"].grad[b, :cut]) == 0  # no gradient at any prompt position
        assert torch.count_nonzero(captured["h"].grad[b, cut]) > 0


def test_masked_loss_and_gradients_equal_torch_cross_entropy_of_the_full_logits():
    model, tokenizer = tiny_chat_model()
    rows = [encode_example(tokenizer, q, a) for q, a in (("Who speaks?", "SIR TOBY BELCH"), ("Which play?", "Hamlet"))]
    inputs, labels = collate([(torch.tensor(x), torch.tensor(y)) for x, y in rows], pad_id=0)
    ours = sft_loss(model, inputs, labels)
    ours_grads = torch.autograd.grad(ours, list(model.parameters()))
    reference = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=-100)
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="labels must be a tensor of the inputs' shape"):
        sft_loss(model, inputs, labels[:, :-1])


def test_collate_pads_right_and_batches_cover_every_example():
    a, b = (torch.tensor([1, 2, 3]), torch.tensor([-100, 2, 3])), (torch.tensor([4]), torch.tensor([5]))
    inputs, labels = collate([a, b], pad_id=9)
    assert inputs.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert labels.tolist() == [[-100, 2, 3], [5, -100, -100]]
    lengths = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    batches = length_batches(lengths, 4, seed=0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches == length_batches(lengths, 4, seed=0)


def test_resized_model_keeps_old_outputs():
    tokenizer = base_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, d_model=32, n_layers=1, n_heads=2)).eval()
    bigger = resize_token_embeddings(model, tokenizer.vocab_size + 3).eval()
    idx = torch.randint(0, tokenizer.vocab_size, (2, 10))
    with torch.no_grad():
        old, new = model(idx), bigger(idx)
    torch.testing.assert_close(new[..., : tokenizer.vocab_size], old)
    assert bigger.lm_head.weight is bigger.transformer.wte.weight
    torch.testing.assert_close(bigger.transformer.wte.weight[-1], model.transformer.wte.weight.mean(0))
    with pytest.raises(ValueError, match="smaller"):
        resize_token_embeddings(model, 10)


# --------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------
def test_speeches_and_instructions_from_the_corpus():
    speeches = play_speeches("twelfth_night")
    assert speeches[0].speaker == "DUKE" and speeches[0].lines[0].startswith("If music be the food of love")
    assert {"VIOLA", "SIR TOBY", "MALVOLIO"} <= {s.speaker for s in speeches}
    assert not any(line.startswith("[") for s in speeches for line in s.lines)
    examples = shakespeare_instructions({"twelfth_night": "Twelfth Night"}, speakers_per_play=3)
    assert {e.task for e in examples} == {"play", "speaker"}
    assert all(e.response in e.choices for e in examples)
    train, test = split_by_item(examples, 0.2, seed=1)
    assert len(train) + len(test) == len(examples)
    assert not {e.item for e in train} & {e.item for e in test}
    with pytest.raises(FileNotFoundError, match="no play"):
        play_speeches("no_such_play")


def test_bad_rows_and_responses_raise_clear_errors():
    good = examples_from_rows([{"instruction": "Say hi.", "response": "hi"}])
    assert good[0].response == "hi"
    with pytest.raises(ValueError, match="row 1 is malformed"):
        examples_from_rows([{"instruction": "a", "response": "b"}, {"instruction": "a"}])
    with pytest.raises(ValueError, match="row 0: response is empty"):
        examples_from_rows([{"instruction": "a", "response": "  "}])
    tokenizer = chat_tokenizer(base_tokenizer())
    with pytest.raises(ValueError, match="response is empty"):
        encode_example(tokenizer, "Who?", "")
    with pytest.raises(ValueError, match="template token"):
        encode_example(tokenizer, f"Who? {END}", "VIOLA")
    with pytest.raises(ValueError, match="lacks the chat template tokens"):
        encode_example(base_tokenizer(), "Who?", "VIOLA")
    with pytest.raises(ValueError, match="example 0 .* context_length"):
        InstructionDataset([Example("x " * 100, "y", "t", "i", ())], tokenizer, context_length=16)


# --------------------------------------------------------------------------------------------
# Answers, scores, saving
# --------------------------------------------------------------------------------------------
def test_exact_match_and_its_standard_error():
    accuracy, se = exact_match(["VIOLA", " SIR TOBY", "CLOWN", "VIOLA"], ["VIOLA", "SIR TOBY", "VIOLA", "OLIVIA"])
    assert accuracy == 0.5 and se == pytest.approx((0.5 * 0.5 / 4) ** 0.5)
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_generate_answers_stops_at_end_token():
    model, tokenizer = tiny_chat_model()
    end = tokenizer.special_tokens[END]
    with torch.no_grad():  # <|end|> scores highest after any token: every answer is empty
        model.lm_head.weight[end] = model.transformer.ln_f.bias * 0 + 5.0
    answers = generate_answers(model, tokenizer, ["Who speaks?", "Which play is this from? Twelfth"], max_new_tokens=5)
    assert answers == ["", ""]
    assert answers == generate_answers(model, tokenizer, ["Who speaks?", "Which play is this from? Twelfth"],
                                       max_new_tokens=5)


def test_save_and_load_chat_model(tmp_path):
    model, tokenizer = tiny_chat_model()
    save_chat_model(tmp_path / "run", model, tokenizer)
    loaded, loaded_tokenizer = load_chat_model(tmp_path / "run")
    assert loaded_tokenizer.special_tokens == tokenizer.special_tokens
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_a_checkpoint_without_the_template_is_refused(tmp_path):
    tokenizer = base_tokenizer()
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, d_model=32, n_layers=1, n_heads=2))
    run = tmp_path / "plain"
    run.mkdir()
    path = tokenizer.save(run / "tokenizer.json")
    save_checkpoint(run / CHECKPOINT_NAME, model, tokenizer=tokenizer_fingerprint(tokenizer, path))
    with pytest.raises(ValueError, match="lacks the chat template tokens"):
        load_chat_model(run)
    with pytest.raises(ValueError, match="lacks the chat template tokens"):
        save_chat_model(tmp_path / "x", model, tokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_chat_model(tmp_path / "nothing")


def test_python_instructions_come_from_the_standard_library():
    import math
    import statistics

    examples = python_instructions(["math", "statistics"])
    by_question = {e.instruction: e for e in examples}
    where = by_question["In which module of Python's standard library is the function sqrt defined?"]
    assert where.response == "math" and where.task == "module" and where.choices == ("math", "statistics")
    what = by_question["What does the Python function math.sqrt do?"]
    assert what.response == math.sqrt.__doc__.strip().splitlines()[0] == "Return the square root of x."
    assert what.item == where.item == "python:math.sqrt"
    # statistics imports bisect_left from bisect: a re-export is not a statistics function
    assert hasattr(statistics, "bisect_left")
    assert "python:statistics.bisect_left" not in {e.item for e in examples}
    assert "python:statistics.median" in {e.item for e in examples}
    items = [e.item for e in examples]
    assert all(items.count(i) == 2 for i in items)  # two questions per function
    train, test = split_by_item(examples, 0.25, seed=0)
    assert {e.item for e in train}.isdisjoint({e.item for e in test})
    assert all(len(e.response.split()) <= 20 and "\n" not in e.response for e in examples)
    with pytest.raises(ValueError, match="non-empty list of module names"):
        python_instructions("math")
    with pytest.raises(ValueError, match="no module 'not_a_module'"):
        python_instructions(["not_a_module"])


def test_dolly_instructions_read_the_jsonl_rows(tmp_path):
    import json

    from llm_from_scratch.instruct import DOLLY_SHA256, DOLLY_URL, dolly_instructions

    rows = [
        {"instruction": "Name three colours.", "context": "", "response": "Red, green and blue.",
         "category": "brainstorming"},
        {"instruction": "Who wrote it?", "context": "Twelfth Night is a comedy by Shakespeare.",
         "response": "Shakespeare.", "category": "closed_qa"},
        {"instruction": "Why is the sky blue?", "context": "", "response": "x" * 500, "category": "open_qa"},
        {"instruction": "What is a sonnet?", "context": "", "response": "A poem of fourteen lines.",
         "category": "open_qa"},
    ]
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = dolly_instructions(path)  # default categories: open_qa, general_qa, brainstorming
    assert [(e.instruction, e.response, e.item) for e in examples] == [
        ("Name three colours.", "Red, green and blue.", "dolly:1"), ("What is a sonnet?", "A poem of fourteen lines.",
                                                                     "dolly:4")]  # row 3's answer is too long
    closed = dolly_instructions(path, categories=["closed_qa"])
    assert closed[0].instruction == "Who wrote it?\nTwelfth Night is a comedy by Shakespeare."
    assert all(e.task == "dolly" and e.choices == () for e in examples + closed)
    assert DOLLY_URL.endswith("databricks-dolly-15k.jsonl") and len(DOLLY_SHA256) == 64
    with pytest.raises(ValueError, match="categories"):
        dolly_instructions(path, categories=["poetry"])
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "Hi"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected str fields"):
        dolly_instructions(path)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        dolly_instructions(path)
