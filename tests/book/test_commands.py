"""The shell commands that usage.md and README.md show in ```bash blocks: every one runs, at tiny sizes.

Each command is either run here or listed in NOT_RUN with the reason; a new command that is neither
makes test_every_command_is_run_or_listed fail. What "at tiny sizes" changes, and nothing else:

- papermill: the documented parameters must exist in the chapter's `parameters` cell (papermill itself
  would inject a misspelt name silently) and name real values (a GPTConfig preset, a device); the run
  adds the chapter's parameters from chapters/smoke.yml, `device=cpu` and the `tiny` preset;
- `python -m llm_from_scratch` and `torchrun -m llm_from_scratch`: the documented options must be valid
  (argparse, a real preset); the run swaps in the tiny corpus, vocabulary and model, a few steps, the CPU;
- paths under artifacts/ go to a temporary folder, and so does LLM_FROM_SCRATCH_ARTIFACTS.

About a minute on two cores (a chapter through papermill, three short CLI runs, two torchrun processes).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .test_smoke import SMOKE, declared_parameters

DOCUMENTS = ("usage.md", "README.md")
BIN = Path(sys.executable).parent

#: Commands shown but not run here, each with its reason (compared after joining continuation lines
#: and dropping comments).
NOT_RUN = {
    "make test": "runs every test, this one included",
    "make book": "builds the whole book (minutes); make test builds it with make html and make pdf",
    ".venv/bin/jupyter lab chapters/": "starts an interactive server that never exits",
    ".venv/bin/python -m llm_from_scratch chat artifacts/instructions/chat-<key>":
        "an interactive terminal loop on the instruction chapter's model; tests/test_chat.py drives the same loop",
    ".venv/bin/python -m llm_from_scratch serve artifacts/instructions/chat-<key>":
        "a server that runs until stopped; tests/book/test_serve_browser.py starts it and uses it in Chromium",
}

#: Options of `train --out` set to tiny values (added when the command does not give them).
TRAIN_TINY = {
    "--preset": "tiny", "--subset": "tiny", "--vocab-size": "512", "--context-length": "32", "--batch-size": "4",
    "--max-steps": "4", "--eval-interval": "2", "--eval-batches": "1", "--device": "cpu",
}
#: Options replaced where a command gives them (a resumed run keeps its recorded settings).
RESUME_TINY = {"--max-steps": "6", "--device": "cpu"}
GENERATE_TINY = {"--max-new-tokens": "5", "--device": "cpu"}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _bash_blocks(document: str) -> list[str]:
    """Commands of the ```bash blocks of a Markdown file, continuation lines joined, comments kept."""
    text = (ROOT / document).read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return commands


def _key(command: str) -> str:
    return " ".join(shlex.split(command, comments=True))


def _documented() -> list[tuple[str, str]]:
    return [(document, command) for document in DOCUMENTS for command in _bash_blocks(document)]


def _kind(argv: list[str]) -> str | None:
    program = Path(argv[0]).name
    if program == "papermill":
        return "papermill"
    if program.startswith("python") and argv[1:3] == ["-m", "llm_from_scratch"]:
        return "cli"
    if program == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["llm_from_scratch"]:
        return "torchrun"
    return None


def _program(name: str) -> str:
    """`.venv/bin/papermill` and friends: the same program of the environment running the tests."""
    program = BIN / Path(name).name
    if Path(name).name.startswith("python"):
        return sys.executable
    assert program.is_file(), f"{name}: {program} does not exist"
    return str(program)


def _relocate(arg: str, tmp: Path) -> str:
    return str(tmp / arg) if arg.startswith("artifacts/") else arg


def _set_options(args: list[str], values: dict[str, str], add_missing: bool) -> list[str]:
    args = list(args)
    for option, value in values.items():
        if option in args:
            args[args.index(option) + 1] = value
        elif add_missing:
            args += [option, value]
    return args


def _check_preset(value: str, where: str) -> None:
    from llm_from_scratch.model import GPTConfig

    presets = GPTConfig.presets()
    assert value.replace("-", "_") in presets, f"{where}: preset {value!r} does not exist; expected one of {sorted(presets)}"


def _papermill(argv: list[str], tmp: Path) -> list[str]:
    where = shlex.join(argv)
    notebook, output, rest = argv[1], argv[2], argv[3:]
    assert (ROOT / notebook).is_file(), f"{where}: {notebook} does not exist"
    params, options = {}, []
    i = 0
    while i < len(rest):
        if rest[i] in ("-p", "--parameters"):
            params[rest[i + 1]] = yaml.safe_load(rest[i + 2])  # papermill reads -p values as YAML scalars too
            i += 3
        else:
            options.append(rest[i])
            i += 1
    declared = declared_parameters(ROOT / notebook)
    unknown = sorted(set(params) - declared)
    assert not unknown, f"{where}: {unknown} are not parameters of {notebook} (it has {sorted(declared)})"
    if "preset" in params:
        _check_preset(str(params["preset"]), where)
    if "device" in params:
        assert DEVICE.match(str(params["device"])), f"{where}: unknown device {params['device']!r}"
    tiny = dict(SMOKE.get(Path(notebook).name) or {})
    tiny["device"] = "cpu"
    if "preset" in declared:
        tiny["preset"] = "tiny"
    params = {**params, **{k: v for k, v in tiny.items() if k in declared}}
    return [_program(argv[0]), notebook, _relocate(output, tmp), *options,
            "-y", yaml.safe_dump(params), "-k", "python3", "--no-progress-bar"]


def _llm_args(args: list[str], where: str) -> list[str]:
    """The arguments after `-m llm_from_scratch`, made tiny."""
    command = args[0]
    if "--preset" in args:
        _check_preset(args[args.index("--preset") + 1], where)
    if "--device" in args:
        assert DEVICE.match(args[args.index("--device") + 1]), f"{where}: unknown device"
    if command == "train" and "--resume" in args:
        return _set_options(args, RESUME_TINY, add_missing=False)
    if command == "train":
        return _set_options(args, TRAIN_TINY, add_missing=True)
    if command == "generate":
        return _set_options(args, GENERATE_TINY, add_missing=False)
    if command == "quantize":
        return args  # of the tiny run that the documented train command made
    raise AssertionError(f"{where}: no tiny version of the command {command!r}; add one to {__file__}")


def _tiny(argv: list[str], tmp: Path) -> list[str]:
    kind, where = _kind(argv), shlex.join(argv)
    if kind == "papermill":
        return _papermill(argv, tmp)
    start = argv.index("-m") + 2
    head = [_program(argv[0]), *argv[1:start]]
    if kind == "torchrun":
        assert "--standalone" in argv[:start], f"{where}: use torchrun --standalone (a free port, no clash)"
    return head + [_relocate(a, tmp) for a in _llm_args(argv[start:], where)]


def test_every_command_is_run_or_listed():
    unhandled = [f"{document}: {command}" for document, command in _documented()
                 if _key(command) not in NOT_RUN and _kind(shlex.split(command, comments=True)) is None]
    assert not unhandled, (
        "commands in the documentation that this test neither runs nor lists in NOT_RUN (with a reason):\n"
        + "\n".join(unhandled)
    )


def test_not_run_list_is_current():
    shown = {_key(command) for _, command in _documented()}
    stale = sorted(set(NOT_RUN) - shown)
    assert not stale, f"NOT_RUN lists commands the documentation no longer shows: {stale}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_commands_run(document, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FROM_SCRATCH_ARTIFACTS", str(tmp_path / "artifacts-env"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # The package of this checkout, also where .venv has another checkout installed in editable mode.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ran = 0
    for command in _bash_blocks(document):
        argv = shlex.split(command, comments=True)
        if _key(command) in NOT_RUN or _kind(argv) is None:
            continue
        for arg in argv:
            if arg.startswith("artifacts/"):
                (tmp_path / arg).parent.mkdir(parents=True, exist_ok=True)
        tiny = _tiny(argv, tmp_path)
        done = subprocess.run(tiny, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy())
        assert done.returncode == 0, (
            f"{document}: {command}\nran as: {shlex.join(tiny)}\nexit status {done.returncode}\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
        ran += 1
    if not ran:
        pytest.skip(f"{document} shows no command that can run in a test")
