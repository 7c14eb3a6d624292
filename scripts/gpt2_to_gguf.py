"""The benchmark's random GPT-2 as GGUF files for llama.cpp (f32, f16, q8_0), checked against our model.

    /work/bench-venv/bin/python scripts/gpt2_to_gguf.py --sdist DIR/llama_cpp_python-0.3.36.tar.gz
                                [--out artifacts/bench] [--preset gpt2_small] [--seed 0] [--types f32,f16,q8_0]

``benchmarks/generate.py`` builds its model as ``torch.manual_seed(seed); GPT(GPTConfig.<preset>())``; this script
builds the same one, converts it with that script's ``to_hf`` to ``transformers.GPT2LMHeadModel`` and saves it as a
Hugging Face folder (``config.json``, ``model.safetensors``) with GPT-2's tokenizer, made offline from the package's
own GPT-2 ranks (``llm_from_scratch/assets/gpt2.tiktoken``): ``vocab.json`` and ``merges.txt`` as OpenAI's GPT-2
has them, loaded by ``GPT2TokenizerFast`` and saved as ``tokenizer.json``. The converter that ships inside the
llama.cpp source of the llama-cpp-python sdist (``vendor/llama.cpp/convert_hf_to_gguf.py``, its ``conversion``
package and its own ``gguf-py``) is extracted to ``<out>/llama.cpp-src`` and writes
``<out>/<preset>-seed<seed>-<type>.gguf`` for each type (files already there are kept unless ``--force``).

Then, if ``llama_cpp`` is importable, each GGUF model evaluates the same random token ids as our model and the
largest difference of their logits is printed, along with llama.cpp's tokenization of a test string against ours.
For f32 the largest difference is about 1e-3 on logits of magnitude ~2.5 (ours in float32 is within 4e-6 of
float64), with the same argmax everywhere: llama.cpp's CPU GELU rounds its input and output through a float16 table
(``GGML_GELU_FP16``), which alone moves our logits by about 1e-3; our model with that GELU is printed too. The check
fails if the argmax differs anywhere or the difference exceeds 2e-3 of the largest logit: a wrong or permuted
weight gives differences of the order of the logits themselves.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from llm_from_scratch.bpe import gpt2_encoding
from llm_from_scratch.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("f32", "f16", "q8_0")
#: What the converter needs from the sdist, under its ``vendor/llama.cpp/``.
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def gguf_path(out: Path, preset: str, seed: int, kind: str) -> Path:
    """Where the GGUF file of one weight type goes (``benchmarks/generate.py`` looks there too)."""
    return out / f"{preset}-seed{seed}-{kind}.gguf"


def benchmark_model(preset: str, seed: int) -> GPT:
    """The model of ``benchmarks/generate.py``: the same seed, the same construction."""
    torch.manual_seed(seed)
    return GPT(getattr(GPTConfig, preset)()).eval()


def _benchmark():
    """``benchmarks/generate.py`` as a module (a script, not a package: loaded from its file)."""
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the alphabet of ``vocab.json`` and ``merges.txt``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _split(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The merge that made ``token``: byte-pair encode it with the ranks below its own until two parts remain."""
    rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            raise ValueError(f"token {token!r} has no merge path below its rank {rank}")
        i = best[1]
        parts[i: i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def write_tokenizer(folder: Path) -> None:
    """GPT-2's tokenizer files in ``folder``, built from the packaged ranks (no network)."""
    from transformers import GPT2TokenizerFast

    enc = gpt2_encoding()
    ranks = enc._mergeable_ranks  # bytes -> rank (= token id), the 256 single bytes first
    chars = _bytes_to_unicode()
    text = {token: "".join(chars[b] for b in token) for token in ranks}
    vocab = {text[token]: rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = enc.eot_token
    merges = []
    for token, _rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _split(ranks, token)
            merges.append(f"{text[left]} {text[right]}")
    raw = folder / "raw-tokenizer"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = GPT2TokenizerFast.from_pretrained(raw, model_max_length=1024)  # <|endoftext|>: bos, eos and unk
    sample = "Hello, world! It's 2024: naïve café   spaces\n\ttabs 12345 <tags> don't<|endoftext|>"
    if tok.encode(sample) != enc.encode(sample, allowed_special="all") or len(tok) != enc.n_vocab:
        raise RuntimeError("the Hugging Face tokenizer built from the ranks does not match gpt2_encoding()")
    tok.save_pretrained(folder)


def save_hf(model: GPT, folder: Path) -> None:
    """The model as a Hugging Face GPT-2 folder with its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = _benchmark().to_hf(model)
    hf.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = model.config.context_length  # OpenAI's GPT-2 configs have it; the converter reads it
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(folder)


def converter(sdist: Path | None, out: Path) -> Path:
    """``convert_hf_to_gguf.py`` of the sdist's llama.cpp, extracted (once) to ``<out>/llama.cpp-src``."""
    dest = out / "llama.cpp-src"
    script = dest / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    if sdist is None:
        raise SystemExit("no converter yet: pass --sdist PATH/llama_cpp_python-<version>.tar.gz")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            head, sep, rest = member.name.partition("/vendor/llama.cpp/")
            if sep and "/" not in head and rest.startswith(_CONVERTER_PARTS) and (member.isfile() or member.isdir()):
                member.name = rest
                tar.extract(member, dest, filter="data")
    if not script.exists():
        raise SystemExit(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return script


def convert(script: Path, hf_dir: Path, outfile: Path, kind: str) -> None:
    tmp = outfile.with_suffix(".part")
    subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", kind, "--outfile", str(tmp)],
                   check=True)
    tmp.replace(outfile)


class Fp16TableGELU(torch.nn.Module):
    """GELU as llama.cpp's CPU backend computes it in float32 models (``GGML_GELU_FP16``): the input rounded to
    float16, looked up in a float16 table of tanh-GELU; 0 at or below -10, the identity at or above 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def with_fp16_gelu(model: GPT) -> GPT:
    """A copy of ``model`` whose GELUs round like llama.cpp's (see ``Fp16TableGELU``)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(getattr(module, "gelu", None), torch.nn.GELU):
            module.gelu = Fp16TableGELU()
    return twin


def check(model: GPT, files: dict[str, Path], n_tokens: int = 8) -> None:
    """Logits of each GGUF model (llama.cpp) against ours on the same random token ids; the tokenizer too.

    llama.cpp's float32 GELU goes through a float16 table, which alone moves the logits by about 1e-3; the logits of
    our model with that GELU (``with_fp16_gelu``) are compared too. The key/value cache is float32 here (llama.cpp's
    default is float16)."""
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp is not importable: the logits are not checked (bash scripts/build_llama_cpp.sh)")
        return
    ids = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None])[0].double()
        ours_fp16_gelu = with_fp16_gelu(model)(ids[None])[0].double()
    print(f"our logits on {n_tokens} random token ids: max |logit| {ours.abs().max():.3f}, std {ours.std():.3f}")
    _benchmark().without_extra_buffers(llama_cpp)  # no AMX or repacked weights for this check: they crashed with q8_0
    for kind, path in files.items():
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=torch.get_num_threads(),
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
        llm.eval(ids.tolist())
        theirs = torch.from_numpy(llm.scores[:n_tokens]).double()
        diff = (theirs - ours).abs().max().item()
        diff_gelu = (theirs - ours_fp16_gelu).abs().max().item()
        same = (theirs.argmax(-1) == ours.argmax(-1)).sum().item()
        print(f"{kind:>5}: max |llama.cpp - ours| logit difference {diff:.2e} "
              f"(ours with llama.cpp's float16 GELU table: {diff_gelu:.2e}), argmax equal at {same}/{n_tokens}")
        if kind == "f32":
            text = b"Hello, world! It's a test."
            tokens = llm.tokenize(text, add_bos=False, special=False)
            if tokens != gpt2_encoding().encode(text.decode()):
                raise SystemExit(f"llama.cpp tokenizes {text!r} as {tokens}, ours differently")
            print(f"  llama.cpp's tokens of {text!r} are ours: {tokens}")
            if same < n_tokens or diff > 2e-3 * max(1.0, ours.abs().max().item()):
                raise SystemExit("the f32 GGUF model is not our model (logits differ)")
        del llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help="the llama-cpp-python sdist whose llama.cpp converter is used")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--preset", default="gpt2_small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--force", action="store_true", help="convert again even if the files exist")
    parser.add_argument("--no-check", action="store_true", help="skip the logit check with llama_cpp")
    args = parser.parse_args()
    kinds = [k for k in args.types.split(",") if k]
    unknown = sorted(set(kinds) - set(TYPES))
    if unknown:
        raise SystemExit(f"unknown types {unknown}; choose from {TYPES}")
    args.out.mkdir(parents=True, exist_ok=True)
    model = benchmark_model(args.preset, args.seed)
    files = {k: gguf_path(args.out, args.preset, args.seed, k) for k in kinds}
    todo = [k for k, path in files.items() if args.force or not path.exists()]
    if todo:
        script = converter(args.sdist, args.out)
        hf_dir = args.out / f"hf-{args.preset}-seed{args.seed}"
        save_hf(model, hf_dir)
        for kind in todo:
            convert(script, hf_dir, files[kind], kind)
    for kind, path in files.items():
        print(f"{kind:>5}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if not args.no_check:
        check(model, files)


if __name__ == "__main__":
    main()
