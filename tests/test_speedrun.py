import math

import pytest
import torch

from llm_from_scratch import speedrun
from llm_from_scratch.speedrun import (
    Budget,
    Recipe,
    build_model,
    lr_at_fraction,
    resolve_precision,
    train_for_budget,
)

TINY = Recipe(vocab_size=64, arch="llama", d_model=32, n_layers=1, n_heads=2, context_length=16, batch_size=4,
              max_lr=1e-2, warmup_fraction=0.1, decay_fraction=0.4, precision="fp32")


def tiny_ids(n: int = 2000) -> torch.Tensor:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(0))


# --- the schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.0, 0.0), (0.05, 0.5), (0.1, 1.0), (0.3, 1.0), (0.6, 1.0), (0.7, 0.775), (0.8, 0.55), (0.9, 0.325),
     (1.0, 0.1), (1.5, 0.1)],
)
def test_wsd_schedule_against_hand_values(fraction, expected):
    # warm-up to 1.0 over 10%, constant to 60%, then linear from 1.0 to 0.1 over the last 40%
    lr = lr_at_fraction(fraction, max_lr=1.0, min_lr=0.1, warmup_fraction=0.1, decay_fraction=0.4)
    assert lr == pytest.approx(expected)


def test_cosine_schedule_against_hand_values():
    kw = dict(max_lr=2.0, min_lr=0.0, warmup_fraction=0.2, schedule="cosine")
    assert lr_at_fraction(0.1, **kw) == pytest.approx(1.0)  # half-way through the warm-up
    assert lr_at_fraction(0.2, **kw) == pytest.approx(2.0)
    assert lr_at_fraction(0.6, **kw) == pytest.approx(1.0)  # half-way through the cosine: the mean
    assert lr_at_fraction(0.4, **kw) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert lr_at_fraction(1.0, **kw) == pytest.approx(0.0, abs=1e-12)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        lr_at_fraction(0.5, max_lr=1.0, schedule="linear")
    with pytest.raises(ValueError, match="sum"):
        lr_at_fraction(0.5, max_lr=1.0, warmup_fraction=0.7, decay_fraction=0.5)
    with pytest.raises(ValueError, match="min_lr"):
        lr_at_fraction(0.5, max_lr=1.0, min_lr=2.0)


# --- budgets -----------------------------------------------------------------------------------


def test_budget_needs_exactly_one_limit():
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(seconds=1.0, steps=3)
    with pytest.raises(ValueError, match="clock"):
        Budget(seconds=1.0, clock="gpu")
    with pytest.raises(ValueError, match="steps"):
        Budget(steps=0)


class FakeClock:
    """Time advances 0.5 s per reading: the loop reads it once at the start and once after each step."""

    def __init__(self):
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return 0.5 * (self.readings - 1)


def test_time_budget_stops_before_a_step_that_would_not_fit():
    torch.manual_seed(0)
    model = build_model(TINY, 64)
    run = train_for_budget(model, tiny_ids(), TINY, Budget(seconds=10.0), clock=FakeClock(), log_interval=1000)
    # step k starts at 0.5 k s and the steps so far took 0.5 s each: it starts while 0.5 k + 0.5 <= 10
    assert run.steps == 20
    assert run.tokens == 20 * TINY.batch_size * TINY.context_length
    assert run.seconds == 10.0


def test_wall_clock_budget_is_respected():
    torch.manual_seed(0)
    model = build_model(TINY, 64)
    run = train_for_budget(model, tiny_ids(), TINY, Budget(seconds=1.0, clock="wall"))
    assert run.steps >= 1
    # The rule (tested exactly with a fake clock above) predicts the next step from the slowest
    # recent one; on a shared machine one step can still run slower than that prediction, so the
    # wall clock may pass the budget by a little (a tiny step here takes ~7 ms); 0.1 s is many steps.
    assert run.seconds <= 1.0 + 0.1
    assert run.seconds > 0.5, run.seconds  # it used the budget rather than stopping early
    assert run.tokens_per_s > 0


def test_step_budget_follows_the_schedule_by_step():
    torch.manual_seed(0)
    model = build_model(TINY, 64)
    run = train_for_budget(model, tiny_ids(), TINY, Budget(steps=20), log_interval=1)
    assert run.steps == 20
    lrs = [row["lr"] for row in run.history]
    expected = [TINY.lr(step / 20, step) for step in range(20)]
    assert lrs == pytest.approx(expected)
    assert lrs[1] == pytest.approx(0.5e-2) and lrs[5] == pytest.approx(1e-2) and lrs[-1] < lrs[12]


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    ids = torch.arange(2000) % 7  # a periodic sequence, easy to learn
    model = build_model(TINY, 64)
    run = train_for_budget(model, ids, TINY.replace(max_lr=1e-2), Budget(steps=60), log_interval=10)
    assert run.history[-1]["train_loss"] < 0.5 * run.history[0]["train_loss"]


def test_schedule_in_steps_is_the_trainers_lr_at():
    from llm_from_scratch.train import lr_at

    recipe = TINY.replace(schedule_steps=50, warmup_steps=5)
    for step in (0, 4, 5, 30, 50, 80):
        assert recipe.lr(0.99, step) == lr_at(step, max_lr=recipe.max_lr, min_lr=recipe.max_lr / 10,
                                              warmup_steps=5, decay_steps=50)


# --- precision ---------------------------------------------------------------------------------


def test_auto_precision_falls_back_to_fp32_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(speedrun.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(speedrun, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert not speedrun.cpu_supports_bf16()
    assert resolve_precision("auto", "cpu") is None
    monkeypatch.setattr(speedrun, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert speedrun.cpu_supports_bf16()
    assert resolve_precision("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(speedrun.platform, "machine", lambda: "arm64")
    assert resolve_precision("auto", "cpu") is None


def test_explicit_precisions():
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")


def test_bf16_training_runs_on_the_cpu():
    torch.manual_seed(0)
    model = build_model(TINY, 64)
    run = train_for_budget(model, tiny_ids(), TINY.replace(precision="bf16"), Budget(steps=5), log_interval=1)
    assert all(math.isfinite(row["train_loss"]) for row in run.history)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32


# --- recipes -----------------------------------------------------------------------------------


def test_recipe_checks_its_choices():
    with pytest.raises(ValueError, match="dropout"):
        Recipe(arch="llama", dropout=0.1)
    with pytest.raises(ValueError, match="arch"):
        Recipe(arch="rnn")
    gpt = build_model(TINY.replace(arch="gpt", tie_weights=False), 64)
    assert gpt.lm_head.weight is not gpt.transformer.wte.weight
    llama = build_model(TINY, 64)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight


# --- devices and the recipes -------------------------------------------------------------------


def test_unknown_device_is_refused_before_training():
    model = build_model(TINY, 64)
    with pytest.raises(ValueError, match="device"):
        train_for_budget(model, tiny_ids(), TINY, Budget(steps=1), device="tpu")


def test_step_budget_on_the_cpu_device_equals_the_default():
    runs = []
    for kwargs in ({}, {"device": "cpu"}):
        torch.manual_seed(0)
        model = build_model(TINY, 64)
        train_for_budget(model, tiny_ids(), TINY, Budget(steps=3), **kwargs)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert next(iter(build_model(TINY, 64).parameters())).device.type == "cpu"
    assert torch.equal(runs[0], runs[1])


def test_the_gpu_recipe_is_the_cpu_recipe_scaled_up():
    cpu, gpu = speedrun.RECIPE, speedrun.GPU_RECIPE
    assert (gpu.subset, gpu.vocab_size, gpu.arch, gpu.schedule) == (cpu.subset, cpu.vocab_size, cpu.arch, cpu.schedule)
    assert gpu.d_model > cpu.d_model and gpu.context_length > cpu.context_length and gpu.batch_size > cpu.batch_size
    assert gpu.d_model % gpu.n_heads == 0
