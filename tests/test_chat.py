"""Tests of llm_from_scratch.chat: the prompt keeps within the context, the loops never crash at the limit.

References: token counts computed here from the tokenizer, and the template written out by hand.
"""

from __future__ import annotations

import io
import sys

import pytest

from llm_from_scratch.__main__ import main
from llm_from_scratch.chat import (
    ChatSession,
    ChatSettings,
    MessageError,
    build_prompt,
    run_terminal,
    stream_reply,
)
from llm_from_scratch.instruct import ASSISTANT, END, USER, save_chat_model
from tests.test_instruct import tiny_chat_model


def test_prompt_renders_the_template_and_drops_the_oldest_turns():
    _, tokenizer = tiny_chat_model()
    history = [("Who speaks?", "VIOLA"), ("Which play is this from?", "Twelfth Night")]
    prompt, kept = build_prompt(tokenizer, history, "And this?", context_length=1000, max_new_tokens=10)
    text = (f"{USER}Who speaks?{ASSISTANT}VIOLA{END}{USER}Which play is this from?{ASSISTANT}Twelfth Night{END}"
            f"{USER}And this?{ASSISTANT}")
    assert kept == 2 and tokenizer.decode(prompt) == text
    last_turn = len(tokenizer.encode(f"{USER}Which play is this from?{ASSISTANT}Twelfth Night{END}"))
    new = len(tokenizer.encode(f"{USER}And this?{ASSISTANT}"))
    prompt, kept = build_prompt(tokenizer, history, "And this?", context_length=new + last_turn + 10, max_new_tokens=10)
    assert kept == 1 and tokenizer.decode(prompt).startswith(f"{USER}Which play")
    prompt, kept = build_prompt(tokenizer, history, "And this?", context_length=new + 10, max_new_tokens=10)
    assert kept == 0 and len(prompt) == new


def test_empty_and_too_long_messages_are_refused_with_a_reason():
    _, tokenizer = tiny_chat_model()
    with pytest.raises(MessageError, match="empty"):
        build_prompt(tokenizer, [], "   ", context_length=64, max_new_tokens=8)
    with pytest.raises(MessageError, match="too long for this model: .* at most 64 tokens"):
        build_prompt(tokenizer, [], "mercy " * 60, context_length=64, max_new_tokens=8)
    with pytest.raises(MessageError, match="characters"):
        build_prompt(tokenizer, [], "x" * 10_000, context_length=64, max_new_tokens=8)
    with pytest.raises(MessageError, match="template token"):
        build_prompt(tokenizer, [], f"hi {END}", context_length=64, max_new_tokens=8)


def test_a_long_conversation_stays_within_the_context():
    model, tokenizer = tiny_chat_model(context_length=48)
    session = ChatSession(model, tokenizer, ChatSettings(max_new_tokens=16, temperature=1.0, top_k=None, seed=0))
    for turn in range(12):
        message = f"Which play is this from? mercy {turn}"
        prompt, _ = build_prompt(tokenizer, session.history, message, context_length=48, max_new_tokens=16)
        assert len(prompt) + 16 <= 48
        assert len(list(session.send(message))) <= 16  # a piece per token at most
    assert len(session.history) == 12
    session.reset()
    assert session.history == []


def test_the_reply_stops_at_the_context_limit():
    model, tokenizer = tiny_chat_model(context_length=32)
    prompt = tokenizer.encode(f"{USER}{'mercy ' * 10}{ASSISTANT}")[:31]
    pieces = list(stream_reply(model, tokenizer, prompt, ChatSettings(max_new_tokens=50, temperature=1.0, seed=1)))
    assert len(pieces) <= 1  # room for one token only
    with pytest.raises(MessageError, match="fills"):
        list(stream_reply(model, tokenizer, tokenizer.encode("mercy " * 40)[:32], ChatSettings()))


def test_terminal_loop_resets_and_quits():
    model, tokenizer = tiny_chat_model()
    session = ChatSession(model, tokenizer, ChatSettings(max_new_tokens=4, seed=0))
    out = io.StringIO()
    assert run_terminal(session, io.StringIO("Who speaks?\n\n/reset\nWhich play?\n/quit\nnever read\n"), out) == 0
    text = out.getvalue()
    assert text.count("model> ") == 2 and "(conversation forgotten)" in text and "empty" in text
    assert len(session.history) == 1 and session.history[0][0] == "Which play?"
    run_terminal(session, io.StringIO("Which play is this from?\\nIf music be the food of love\n"), io.StringIO())
    assert session.history[-1][0] == "Which play is this from?\nIf music be the food of love"


def test_chat_command(tmp_path, monkeypatch, capsys):
    model, tokenizer = tiny_chat_model()
    save_chat_model(tmp_path / "run", model, tokenizer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who speaks?\n"))
    assert main(["chat", str(tmp_path / "run"), "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert "model> " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["chat", str(tmp_path / "missing")])
