"""Tests of llm_from_scratch.train: schedule, weight decay, accumulation, exact resume, checkpoints."""

from __future__ import annotations

import copy
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from llm_from_scratch import train as train_mod
from llm_from_scratch.data import load_corpus
from llm_from_scratch.model import GPT, GPTConfig
from llm_from_scratch.train import (
    NonFiniteLossError,
    TrainConfig,
    configure_optimizer,
    decay_parameter_names,
    evaluate,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    train,
    train_step,
)

VOCAB = 64


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=VOCAB, context_length=16, d_model=32, n_layers=2, n_heads=2, dropout=0.0)
    return GPTConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def quick_config(**overrides) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, warmup_steps=2, eval_interval=3, eval_batches=2, log_interval=1,
                progress=False, device="cpu", precision="fp32")
    return TrainConfig(**{**base, **overrides})


# --- schedule ---------------------------------------------------------------------------------


def test_lr_schedule_key_steps():
    kw = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # (0 + 1) / 10 of max
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)  # half-way: the mean of peak and floor
    assert lr_at(35, **kw) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    assert lr_at(10_000, **kw) == pytest.approx(1e-4)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, **kw)


# --- weight decay -----------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_applies_to_exactly_the_matrices(tie):
    model = tiny_model(tie_weights=tie)
    decay, no_decay = decay_parameter_names(model)
    expected = {n for n, _ in model.named_parameters()
                if n.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))}
    if not tie:
        expected.add("lm_head.weight")
    assert set(decay) == expected
    assert "transformer.wte.weight" in no_decay and "transformer.wpe.weight" in no_decay
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}

    # Behaviour, checked against AdamW's formula: with zero gradients Adam's update is 0, so a
    # step only multiplies decayed weights by (1 - lr * weight_decay) and leaves the rest alone.
    lr, wd = 0.1, 0.5
    opt = configure_optimizer(model, lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = (1 - lr * wd) if n in expected else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=1e-7, msg=n)


# --- gradient accumulation --------------------------------------------------------------------


def test_grad_accumulation_equals_larger_batch():
    model_a = tiny_model(1)
    model_b = copy.deepcopy(model_a)
    data = random_tokens(8 * 17, seed=3).view(8, 17)
    inputs, targets = data[:, :-1], data[:, 1:]
    opt_a = configure_optimizer(model_a, lr=1e-2, fused=False)
    opt_b = configure_optimizer(model_b, lr=1e-2, fused=False)
    # Reference: one batch of 8, one plain backward (torch computes the mean over all tokens).
    loss_big, norm_big = train_step(model_a, opt_a, [(inputs, targets)], grad_clip=1.0)
    micro = [(inputs[i : i + 2], targets[i : i + 2]) for i in range(0, 8, 2)]  # k = 4 micro-batches
    loss_acc, norm_acc = train_step(model_b, opt_b, micro, grad_clip=1.0)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    assert norm_acc == pytest.approx(norm_big, rel=1e-4)
    # Adam's first step is about lr * sign(gradient): rounding in a near-zero gradient entry can move
    # a weight by ~1e-6, a wrong gradient by ~lr = 1e-2.
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=5e-6, msg=name)


# --- exact resume -----------------------------------------------------------------------------


def _losses(history):
    keys = ("train_loss", "val_loss", "train_eval_loss", "lr", "grad_norm")
    return [(row["step"], {k: row[k] for k in keys if k in row}) for row in history]


def test_exact_resume_bit_for_bit(tmp_path):
    data = random_tokens(3000, seed=5)
    train_data, val_data = data[:2500], data[2500:]
    cfg = dict(dropout=0.1)  # dropout draws random numbers: the resumed run must draw the same ones
    full_cfg = quick_config(max_steps=8, decay_steps=8, eval_interval=4)

    full = tiny_model(0, **cfg)
    history_full = train(full, train_data, val_data, full_cfg, out_dir=tmp_path / "full")

    half = tiny_model(0, **cfg)
    train(half, train_data, val_data, dataclass_replace(full_cfg, max_steps=4), out_dir=tmp_path / "half")
    # A fresh state: other weights, other global RNG states.
    torch.manual_seed(12345)
    np.random.seed(1)
    random.seed(2)
    resumed = tiny_model(99, **cfg)
    history_resumed = train(resumed, train_data, val_data, full_cfg, out_dir=tmp_path / "half",
                            resume_from=tmp_path / "half")

    assert _losses(history_resumed) == _losses(history_full)  # exact equality of floats
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    a = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "half" / "checkpoint.safetensors")
    assert a["step"] == b["step"] == 8
    assert a["data_state"] == b["data_state"]


def dataclass_replace(config: TrainConfig, **changes) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


# --- the loss falls on real text --------------------------------------------------------------


def test_loss_falls_on_real_text():
    text = load_corpus("shakespeare", subset="tiny")
    ids = torch.tensor(list(text.encode("utf-8")[:60_000]), dtype=torch.long)  # bytes: vocabulary 256
    split = int(0.9 * len(ids))
    model = tiny_model(0, vocab_size=256, context_length=32)
    cfg = quick_config(max_steps=40, batch_size=8, max_lr=3e-3, warmup_steps=5, eval_interval=40,
                       eval_batches=4, log_interval=10)
    history = train(model, ids[:split], ids[split:], cfg)
    evals = [row for row in history if "val_loss" in row]
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert abs(first - math.log(256)) < 0.15  # an untrained model guesses uniformly
    assert last < first - 1.5  # byte frequencies alone are worth more than 1.5 nats


def test_evaluate_matches_direct_cross_entropy():
    model = tiny_model(2)
    data = random_tokens(16 * 5 + 1, seed=9)
    loss = evaluate(model, data, batch_size=2, context_length=16, max_batches=None)
    windows = data[:80].view(5, 16), data[1:81].view(5, 16)
    with torch.no_grad():
        logits = model(windows[0])
    expected = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), windows[1].reshape(-1)).item()
    assert loss == pytest.approx(expected, rel=1e-5)


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_with_tied_weights(tmp_path):
    model = tiny_model(0)
    opt = configure_optimizer(model)
    train_step(model, opt, [(random_tokens(16).view(1, 16), random_tokens(16, 1).view(1, 16))])
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, step=1, tokenizer={"path": "t", "sha256": "x"})
    other = tiny_model(7)
    other_opt = configure_optimizer(other)
    meta = load_checkpoint(path, other, other_opt)
    assert meta["step"] == 1 and meta["tokenizer"]["sha256"] == "x"
    assert other.lm_head.weight is other.transformer.wte.weight  # still tied
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for key in sa[pid]:
            assert torch.equal(torch.as_tensor(sa[pid][key]), torch.as_tensor(sb[pid][key]))


def test_interrupted_checkpoint_write_leaves_previous_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    model = tiny_model(0)
    save_checkpoint(path, model, step=1)
    good = path.read_bytes()
    changed = tiny_model(1)

    def interrupted(src, dst):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, changed, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]  # the temp file was removed
    assert load_checkpoint(path, tiny_model(3))["step"] == 1


def test_corrupt_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", tiny_model(0), step=1)
    blob = path.read_bytes()
    cases = {
        "truncated": blob[: len(blob) // 2],
        "garbage": b"not a checkpoint at all",
        "flipped": blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:],
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="not a valid checkpoint"):
            load_checkpoint(bad, tiny_model(0))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_resume_refuses_other_model_or_tokenizer(tmp_path):
    data = random_tokens(2000)
    tok = {"path": "a.json", "sha256": "aaa"}
    train(tiny_model(0), data, None, quick_config(max_steps=2), out_dir=tmp_path, tokenizer=tok)
    with pytest.raises(ValueError, match="another model configuration.*d_model"):
        train(tiny_model(0, d_model=64), data, None, quick_config(max_steps=4), resume_from=tmp_path, tokenizer=tok)
    with pytest.raises(ValueError, match="another tokenizer"):
        train(tiny_model(0), data, None, quick_config(max_steps=4), resume_from=tmp_path,
              tokenizer={"path": "b.json", "sha256": "bbb"})
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_model(0), data, None, quick_config(max_steps=4, batch_size=2), resume_from=tmp_path, tokenizer=tok)


# --- bad input and divergence -----------------------------------------------------------------


def test_dataset_smaller_than_one_batch():
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(tiny_model(0), random_tokens(4 * 16), None, quick_config())  # needs 4 * 16 + 1
    with pytest.raises(ValueError, match="val_data"):
        train(tiny_model(0), random_tokens(1000), random_tokens(10), quick_config())
    with pytest.raises(TypeError, match="train_data"):
        train(tiny_model(0), "some text", None, quick_config())


def test_bad_config_values():
    for bad in (dict(max_steps=0), dict(batch_size=-1), dict(precision="fp16"), dict(betas=(0.9, 1.5)),
                dict(max_lr=0), dict(grad_clip=0), dict(min_lr=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


class _Diverging(nn.Module):
    """Wraps a GPT; its loss turns NaN from the ``bad_call``-th forward pass on."""

    def __init__(self, inner: GPT, bad_call: int):
        super().__init__()
        self.inner, self.config, self.bad_call, self.calls = inner, inner.config, bad_call, 0

    def forward(self, idx, targets=None):
        self.calls += 1
        logits, loss = self.inner(idx, targets)
        return logits, loss * float("nan") if self.calls >= self.bad_call else loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = _Diverging(tiny_model(0), bad_call=4)
    cfg = quick_config(max_steps=10, checkpoint_interval=1, eval_interval=100, eval_at_start=False, eval_train=False)
    with pytest.raises(NonFiniteLossError, match=r"step 3.*nan.*last good checkpoint"):
        train(model, random_tokens(2000), None, cfg, out_dir=tmp_path)
    saved = load_checkpoint(tmp_path / "checkpoint.safetensors", model)  # loads into the live model
    assert saved["step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_history_files(tmp_path):
    history = train(tiny_model(0), random_tokens(2000), random_tokens(500, 1), quick_config(), out_dir=tmp_path)
    assert json.loads((tmp_path / "history.json").read_text()) == history
    header = (tmp_path / "history.csv").read_text().splitlines()[0].split(",")
    assert {"step", "tokens", "lr", "train_loss", "val_loss", "tokens_per_s"} <= set(header)
    steps = [row["step"] for row in history if "val_loss" in row]
    assert steps == [0, 3, 6]


# --- the command line -------------------------------------------------------------------------


def test_cli_train_and_resume(tmp_path, monkeypatch, capsys):
    from llm_from_scratch.__main__ import main

    monkeypatch.setenv("LLM_FROM_SCRATCH_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    run = tmp_path / "run"
    common = ["--subset", "tiny", "--vocab-size", "300", "--preset", "tiny", "--batch-size", "2",
              "--context-length", "32", "--eval-interval", "2", "--eval-batches", "1"]
    assert main(["train", *common, "--max-steps", "2", "--out", str(run), "--device", "cpu"]) == 0
    for name in ("run.json", "tokenizer.json", "train.bin", "val.bin", "checkpoint.safetensors",
                 "history.json", "history.csv", "loss.png"):
        assert (run / name).is_file(), name
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--device", "cpu"]) == 0
    history = json.loads((run / "history.json").read_text())
    assert [row["step"] for row in history if "val_loss" in row] == [0, 2, 4]
    assert "step 4: validation loss" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a run folder is never overwritten
        main(["train", *common, "--max-steps", "2", "--out", str(run)])
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(run), "--batch-size", "8"])
    assert "--batch-size cannot change" in capsys.readouterr().err


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # the SXM part, as the driver names it
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),  # not the L4's
    ("Tesla T4", 65e12),  # fp16: the T4 has no bf16
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("Some Unknown GPU", None),
])
def test_peak_flops_names_the_driver_reports(name, peak):
    assert train_mod._peak_for_name(name) == peak


def test_history_reports_bits_per_character():
    from llm_from_scratch.metrics import TextStats

    model, data = tiny_model(3), random_tokens(400, seed=4)
    stats = TextStats(tokens=400, chars=1000, bytes=1200)
    history = train(model, data, data, quick_config(max_steps=3, eval_interval=3), val_stats=stats)
    rows = [r for r in history if "val_loss" in r]
    for row in rows:
        assert row["val_bpc"] == pytest.approx(row["val_loss"] / math.log(2) * 0.4)
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2) * 400 / 1200)
