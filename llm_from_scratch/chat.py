"""Chatting with an instruction-tuned model: the conversation loop, a terminal and a local web page.

Explained in the chapter "Following instructions" (chapters/10_instructions.ipynb). The
conversation loop is shared by both front ends:

* ``build_prompt`` renders the history and the new message in the chat template and drops the
  oldest turns until the prompt and the answer fit the model's context; a message that cannot
  fit on its own, or an empty one, raises ``MessageError`` (its text is meant for the user);
* ``stream_reply`` yields the answer's text piece by piece, stopping at ``<|end|>``;
* ``ChatSession`` keeps the history (``/reset`` empties it) for ``python -m llm_from_scratch chat RUN_DIR``;
* ``create_app`` is a small Starlette (ASGI) app for ``python -m llm_from_scratch serve RUN_DIR``:
  one self-contained HTML page (no asset from the internet) that streams the answer token by
  token as server-sent events. The page keeps the history, so the server holds no state;
  decoding steps of concurrent requests take turns on one lock. It binds 127.0.0.1 unless told
  otherwise.

What it does not do: authentication, several models, or batching concurrent requests together.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from llm_from_scratch.bpe import ENDOFTEXT, BPETokenizer
from llm_from_scratch.generate import stream_generate
from llm_from_scratch.instruct import ASSISTANT, CHAT_TOKENS, END, USER, check_chat_tokenizer, load_chat_model
from llm_from_scratch.model import GPT

logger = logging.getLogger(__name__)

#: Longest message accepted, in characters (checked before tokenizing).
MAX_MESSAGE_CHARS = 4000


class MessageError(ValueError):
    """A message the model cannot take (empty, or too long); the text says why, for the user."""


@dataclass(frozen=True)
class ChatSettings:
    """How answers are sampled: ``temperature`` 0 is greedy; ``seed`` fixes the draws (None: random)."""

    max_new_tokens: int = 48
    temperature: float = 0.7
    top_k: int | None = 40
    seed: int | None = None


def build_prompt(
    tokenizer: BPETokenizer,
    history: Sequence[tuple[str, str]],
    message: str,
    *,
    context_length: int,
    max_new_tokens: int,
) -> tuple[list[int], int]:
    """Token ids of the conversation so far plus ``message``, ending with ``<|assistant|>``.

    ``history`` holds ``(user, assistant)`` turns, oldest first. The oldest turns are dropped
    until the prompt leaves ``max_new_tokens`` free in ``context_length``. Returns the ids and
    the number of turns kept. ``MessageError`` if the message is empty, contains a template
    token, or is too long to fit with room for an answer even with no history.
    """
    check_chat_tokenizer(tokenizer)
    if not isinstance(message, str) or not message.strip():
        raise MessageError("The message is empty: type something for the model to answer.")
    if len(message) > MAX_MESSAGE_CHARS:
        raise MessageError(f"The message is too long: {len(message)} characters, at most {MAX_MESSAGE_CHARS}.")
    inside = [t for t in CHAT_TOKENS if t in message]
    if inside:
        raise MessageError(f"The message may not contain the template token(s) {inside}.")
    budget = context_length - max_new_tokens
    new = tokenizer.encode(f"{USER}{message.strip()}{ASSISTANT}")
    if len(new) > budget:
        raise MessageError(
            f"The message is too long for this model: {len(new)} tokens, but it reads at most {context_length} "
            f"tokens and {max_new_tokens} of them are kept for its answer, so at most {budget} remain. Shorten it."
        )
    turns = [tokenizer.encode(f"{USER}{u}{ASSISTANT}{a}{END}") for u, a in history]
    kept, used = 0, len(new)
    for ids in reversed(turns):
        if used + len(ids) > budget:
            break
        used += len(ids)
        kept += 1
    prompt = [t for ids in turns[len(turns) - kept:] for t in ids] + new
    return prompt, kept


def stream_reply(
    model: GPT, tokenizer: BPETokenizer, prompt: list[int], settings: ChatSettings, *,
    lock: threading.Lock | None = None, generator: torch.Generator | None = None,
) -> Iterator[str]:
    """The answer's text, piece by piece, as the model produces it; stops at ``<|end|>`` or a role marker.

    A piece is emitted only when its bytes form whole characters. ``lock``, when given, is held
    during each decoding step (concurrent requests then take turns, step by step).
    """
    stops = set(check_chat_tokenizer(tokenizer).values())
    if ENDOFTEXT in tokenizer.special_tokens:
        stops.add(tokenizer.special_tokens[ENDOFTEXT])
    room = model.config.context_length - len(prompt)
    if room < 1:
        raise MessageError(f"The conversation fills the model's context ({model.config.context_length} tokens).")
    if generator is None and settings.seed is not None:
        generator = torch.Generator().manual_seed(settings.seed)
    idx = torch.tensor([prompt], device=next(model.parameters()).device)
    steps = stream_generate(model, idx, min(settings.max_new_tokens, room), temperature=settings.temperature,
                            top_k=settings.top_k, generator=generator)
    produced: list[int] = []
    shown = ""
    try:
        while True:
            if lock is None:
                token = next(steps, None)
            else:
                with lock:
                    token = next(steps, None)
            if token is None or int(token) in stops:
                break
            produced.append(int(token))
            text = tokenizer.decode(produced)  # decode all: a character may span several tokens
            if not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        rest = tokenizer.decode(produced)[len(shown):]
        if rest:
            yield rest
    finally:
        steps.close()


class ChatSession:
    """A conversation with a model: ``send(message)`` streams the answer and remembers the turn."""

    def __init__(self, model: GPT, tokenizer: BPETokenizer, settings: ChatSettings = ChatSettings()) -> None:
        check_chat_tokenizer(tokenizer)
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.history: list[tuple[str, str]] = []
        self.generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None

    def reset(self) -> None:
        self.history.clear()

    def send(self, message: str) -> Iterator[str]:
        """Stream the answer to ``message`` (``MessageError`` at once if it cannot be taken)."""
        prompt, _ = build_prompt(self.tokenizer, self.history, message, context_length=self.model.config.context_length,
                                 max_new_tokens=self.settings.max_new_tokens)
        return self._answer(message, prompt)

    def _answer(self, message: str, prompt: list[int]) -> Iterator[str]:
        pieces = []
        for piece in stream_reply(self.model, self.tokenizer, prompt, self.settings, generator=self.generator):
            pieces.append(piece)
            yield piece
        self.history.append((message.strip(), "".join(pieces).strip()))


def run_terminal(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The terminal chat: a line is a message (``\\n`` typed in it is a line break); ``/reset`` forgets the
    conversation, ``/quit`` (or end of input) ends."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stdout.write("Type a message and press Enter (\\n in it starts a new line). /reset forgets the conversation, "
                 "/quit ends.\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return 0
        message = line.rstrip("\n").replace("\\n", "\n")  # one line per message: \n typed as two characters
        if message.strip() == "/quit":
            return 0
        if message.strip() == "/reset":
            session.reset()
            stdout.write("(conversation forgotten)\n")
            continue
        try:
            pieces = session.send(message)
        except MessageError as err:
            stdout.write(f"({err})\n")
            continue
        stdout.write("model> ")
        for piece in pieces:
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")


# --------------------------------------------------------------------------------------------
# The web page
# --------------------------------------------------------------------------------------------
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chat with your model</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }
#log { border: 1px solid #ccc; border-radius: 6px; padding: .5rem 1rem; min-height: 6rem; }
.msg { white-space: pre-wrap; margin: .6rem 0; }
.user::before { content: "you: "; font-weight: bold; }
.assistant::before { content: "model: "; font-weight: bold; color: #2a6; }
#status.error { color: #b00; font-weight: bold; }
textarea { width: 100%; box-sizing: border-box; font: inherit; }
</style>
</head>
<body>
<h1>Chat with your model</h1>
<p id="about">__ABOUT__</p>
<div id="log" aria-live="polite"></div>
<form id="form">
<textarea id="message" rows="3" placeholder="Ask something, e.g. Which play is this from? ..."></textarea>
<button id="send" type="submit">Send</button> <button id="reset" type="button">Reset</button>
</form>
<p id="status" role="status"></p>
<script>
"use strict";
const history = [];
const log = document.getElementById("log"), box = document.getElementById("message");
const status = document.getElementById("status"), sendButton = document.getElementById("send");
function setStatus(text, isError) { status.textContent = text; status.className = isError ? "error" : ""; }
function add(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role; div.textContent = text; log.appendChild(div); return div;
}
async function send(message) {
  sendButton.disabled = true; setStatus("", false);
  try {
    const response = await fetch("api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify({message: message, history: history})});
    if (!response.ok) {
      let text = "The server answered " + response.status + ".";
      try { text = (await response.json()).error || text; } catch (e) {}
      setStatus(text, true); return;
    }
    add("user", message); box.value = "";
    const answer = add("assistant", ""); answer.dataset.chunks = "0";
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", reply = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.text !== undefined) {
          reply += event.text; answer.textContent = reply;
          answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        } else if (event.error !== undefined) {
          setStatus(event.error, true);
        } else if (event.done) {
          answer.dataset.done = "true"; history.push([message, reply.trim()]);
        }
      }
    }
  } catch (err) {
    setStatus("No answer from the server: " + err, true);
  } finally {
    sendButton.disabled = false;
  }
}
document.getElementById("form").addEventListener("submit", (e) => { e.preventDefault(); send(box.value); });
document.getElementById("reset").addEventListener("click", () => {
  history.length = 0; log.textContent = ""; setStatus("Conversation forgotten.", false);
});
// A link like /?q=Hello sends its message at once.
const query = new URLSearchParams(window.location.search);
if (query.has("q")) { box.value = query.get("q"); send(query.get("q")); }
</script>
</body>
</html>
"""


def create_app(model: GPT, tokenizer: BPETokenizer, settings: ChatSettings = ChatSettings(), *, about: str = ""):
    """The Starlette app: ``GET /`` the page, ``POST /api/chat`` the streamed answer, ``GET /health``.

    ``POST /api/chat`` takes ``{"message": str, "history": [[user, assistant], ...]}``. A message
    the model cannot take gets status 400 and ``{"error": why}``; otherwise the answer streams as
    server-sent events: ``data: {"text": piece}`` per piece, then ``data: {"done": true}``.
    """
    import html

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    check_chat_tokenizer(tokenizer)
    model.eval()
    lock = threading.Lock()  # one decoding step at a time: the model's forward pass is not shared safely
    page = PAGE.replace("__ABOUT__", html.escape(about or "A model fine-tuned to follow instructions."))

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return PlainTextResponse("ok")

    async def chat(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "The request body is not JSON."}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "The request body must be a JSON object."}, status_code=400)
        message, history = body.get("message", ""), body.get("history", [])
        if not isinstance(message, str) or not isinstance(history, list) or not all(
                isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history):
            return JSONResponse({"error": "Expected a message (text) and a history of [user, model] pairs."},
                                status_code=400)
        try:
            prompt, _ = build_prompt(tokenizer, history, message, context_length=model.config.context_length,
                                     max_new_tokens=settings.max_new_tokens)
        except MessageError as err:
            return JSONResponse({"error": str(err)}, status_code=400)

        async def events():
            pieces = stream_reply(model, tokenizer, prompt, settings, lock=lock)
            try:
                while True:
                    piece = await run_in_threadpool(next, pieces, None)
                    if piece is None:
                        break
                    yield f"data: {json.dumps({'text': piece})}\n\n"
                yield f"data: {json.dumps({'done': True})}\n\n"
            except Exception as err:  # the page shows it; the server goes on
                logger.exception("generation failed")
                yield f"data: {json.dumps({'error': f'The model failed: {err}'})}\n\n"
            finally:
                await run_in_threadpool(pieces.close)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return Starlette(routes=[Route("/", index), Route("/health", health), Route("/api/chat", chat, methods=["POST"])])


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, settings: ChatSettings = ChatSettings(),
          device: str = "cpu") -> None:
    """Serve the chat page of the model in ``run_dir`` until interrupted (Ctrl+C or SIGTERM)."""
    import uvicorn

    model, tokenizer = load_chat_model(run_dir, device)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: every machine that can reach it can use the model", host)
    app = create_app(model, tokenizer, settings, about=f"Model: {Path(run_dir).resolve().name}")
    print(f"Chat page on http://{host}:{port}/ (Ctrl+C stops)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    # uvicorn finishes the open requests on SIGINT or SIGTERM, then passes the signal on: both end here.
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("Stopped.", flush=True)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def _settings(args) -> ChatSettings:
    return ChatSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k if args.top_k > 0 else None, seed=args.seed)


def _cmd_chat(args) -> int:
    model, tokenizer = load_chat_model(args.run_dir, args.device)
    if args.quantize is not None:
        from llm_from_scratch.quantize import quantize_model

        model = quantize_model(model, args.quantize, inplace=True)  # same conversation, smaller weights
    return run_terminal(ChatSession(model, tokenizer, _settings(args)))


def _cmd_serve(args) -> int:
    serve(args.run_dir, host=args.host, port=args.port, settings=_settings(args), device=args.device)
    return 0


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="folder of a chat model (checkpoint.safetensors and tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=ChatSettings.max_new_tokens)
    p.add_argument("--temperature", type=float, default=ChatSettings.temperature, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=ChatSettings.top_k, help="0 turns the filter off")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    p.add_argument("--device", default="cpu", help="cpu, auto, cuda, cuda:N or mps")


def add_chat_parsers(subparsers) -> None:
    """Register ``chat`` and ``serve`` on the ``subparsers`` of ``python -m llm_from_scratch``."""
    p = subparsers.add_parser("chat", help="chat with an instruction-tuned model in the terminal",
                              description="Chat in the terminal: /reset forgets the conversation, /quit ends.")
    _add_sampling(p)
    p.add_argument("--quantize", choices=("int8", "w8a8", "bf16"), default=None,
                   help="answer with int8 (scales per 32 weights), w8a8 (int8 weights and token vectors) "
                        "or bfloat16 weights (see quantize.py)")
    p.set_defaults(func=_cmd_chat, parser=p)
    p = subparsers.add_parser("serve", help="a local web page to chat with an instruction-tuned model",
                              description="Serve a chat page that streams the model's answers (local only by default).")
    _add_sampling(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_serve, parser=p)
