"""Tests of llm_from_scratch.pretrained: the pre-training run is made once, reused only when it matches."""

from __future__ import annotations

import pytest
import torch

from llm_from_scratch.pretrained import SETTINGS_NAME, PretrainSettings, pretrain, pretrained_model
from llm_from_scratch.train import evaluate

TINY = dict(subset="tiny", vocab_size=300, context_length=32, max_steps=4, batch_size=2, warmup_steps=1,
            eval_interval=2, eval_batches=1)


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_FROM_SCRATCH_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return tmp_path


def test_trained_once_then_loaded_with_the_same_weights(artifacts):
    settings = PretrainSettings(**TINY)
    first = pretrained_model(settings)
    assert first.trained_now and (first.run_dir / SETTINGS_NAME).is_file()
    assert (first.run_dir / "tokenizer.json").is_file()  # the run folder is complete: `generate` needs nothing else
    again = pretrained_model(settings)
    assert not again.trained_now
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # The loaded weights score what the run recorded at its end, on the same validation windows.
    recorded = [r for r in again.history if "val_loss" in r][-1]
    measured = evaluate(again.model, again.data.val_ids, batch_size=2, max_batches=1)
    assert measured == pytest.approx(recorded["val_loss"], abs=1e-5)
    assert recorded["val_bpc"] > 0


def test_other_settings_or_unfinished_runs_are_never_substituted(artifacts):
    settings = PretrainSettings(**TINY)
    pretrain(settings)
    other = PretrainSettings(**{**TINY, "max_steps": 2})
    assert other.run_dir() != settings.run_dir()
    assert pretrained_model(other).trained_now
    (settings.run_dir() / SETTINGS_NAME).unlink()  # as if the run had been stopped half-way
    assert pretrained_model(settings).trained_now


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        PretrainSettings(preset="huge")
    with pytest.raises(ValueError, match="max_steps"):
        PretrainSettings(max_steps=0)
    with pytest.raises(TypeError, match="PretrainSettings"):
        pretrained_model({"subset": "tiny"})


def test_generate_command_uses_the_run_folder_and_refuses_another_tokenizer(artifacts, capsys):
    from llm_from_scratch.__main__ import main
    from llm_from_scratch.bpe import BPETokenizer

    run = pretrain(PretrainSettings(**TINY))
    assert [p.name for p in run.run_dir.parent.iterdir()] == [run.run_dir.name]  # no partial folder left
    assert main(["generate", "--checkpoint", str(run.run_dir), "--prompt", "HAMLET.", "--max-new-tokens", "3",
                 "--seed", "1", "--device", "cpu"]) == 0
    other = BPETokenizer.from_gpt2().save(artifacts / "gpt2.json")
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(run.run_dir), "--prompt", "HAMLET.", "--tokenizer", str(other),
              "--device", "cpu"])
    assert "is not the tokenizer the model was trained with" in capsys.readouterr().err
