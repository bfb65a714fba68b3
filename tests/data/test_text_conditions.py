"""Text-file conditions: character or word units, contiguous windows or one line per row."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from normbench.data import build_dataset
from normbench.data.tokenize import UNK, WordVocab, tokenize
from normbench.engine.evaluation import forward, loss_and_counts
from normbench.engine.train import run_experiment
from normbench.errors import UserError
from normbench.models import build_model
from tests.helpers.common import FIXTURES, compose_config, read_scalars
from tests.helpers.config_defaults import model_options, norm_spec

# Digests of the char-unit, window-sampled dataset built from `corpus()` by the code as it
# was before units and line sampling existed: the default must stay the same bit for bit.
CHAR_WINDOW_EXPECTED = FIXTURES / "char_window_expected.json"


def corpus() -> str:
    """90 lines of words and punctuation, every seventh-ish line empty (generated, no RNG)."""
    words = ["to", "be", "or", "not", "that", "is", "the", "Question", "whether", "'tis",
             "nobler", "in", "mind", "suffer", "slings", "arrows", "o'er", "fortune"]
    marks = [".", ",", "!", "?", ";", ""]
    lines = []
    for i in range(90):
        n = (i * 7) % 11
        line = " ".join(words[(i * 5 + j * 3) % len(words)] for j in range(n))
        lines.append(line + marks[i % len(marks)] if n else "")
    return "\n".join(lines) + "\n"


def write_corpus(tmp_path, text: str | None = None) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus() if text is None else text, encoding="utf-8")
    return path


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_char_windows_are_what_they_were(tmp_path):
    want = json.loads(CHAR_WINDOW_EXPECTED.read_text())
    ds = build_dataset("text", path=str(write_corpus(tmp_path)), seq_len=16, val_fraction=0.15)
    loader = ds.train_loader(4, seed=2)
    batches = [next(loader) for _ in range(loader.steps_per_epoch + 3)]  # into a second epoch
    got = {"chars": len(corpus()), "num_classes": ds.info.num_classes, "n_train": ds.n_train,
           "n_val": ds.n_val, "train_stream": digest(ds.train_stream),
           "val_rows": digest(ds.val_rows), "val_lengths": digest(ds.val_lengths),
           "batches_x": digest(torch.stack([b.x for b in batches])),
           "batches_y": digest(torch.stack([b.y for b in batches]))}
    assert got == want


# ----------------------------------------------------------------------------- words


def test_the_tokenizer_splits_words_marks_and_line_breaks():
    text = "Don't stop—it's 3 o'clock, ROMEO!\n  'Tis my_friend's turn.\n\n"
    assert tokenize(text) == ["Don't", "stop", "—", "it's", "3", "o'clock", ",", "ROMEO", "!",
                              "\n", "'", "Tis", "my", "_", "friend's", "turn", ".", "\n", "\n"]


def test_the_vocabulary_keeps_the_most_frequent_training_tokens_and_unk_the_rest():
    train = tokenize("b a a c c c\nd d d d e\n")  # counts: d 4, c 3, a 2, \n 2, b 1, e 1
    vocab = WordVocab(train, size=3)
    assert vocab.tokens == [UNK, "\n", "d", "c"]  # the line break, then 2 most frequent
    ids = vocab.encode(tokenize("a d x c e d"))
    assert ids.tolist() == [0, 2, 0, 3, 0, 2]
    assert int((ids == 0).sum()) == 3  # a, x (never seen) and e are unknown
    assert vocab.decode(ids) == "<unk> d <unk> c <unk> d"
    everything = WordVocab(train, size=100)  # fewer types than the cap: all of them
    assert len(everything) == 1 + 6 and set(everything.tokens) == {UNK, *train}


def test_equal_counts_are_ordered_by_code_point_whatever_the_text_order():
    one = WordVocab(tokenize("z y x b a\nZ"), size=4)
    other = WordVocab(tokenize("a Z b\nx z y"), size=4)
    assert one.tokens == other.tokens == [UNK, "\n", "Z", "a", "b"]


def test_word_windows_count_the_vocabulary_on_the_training_part_only(tmp_path):
    text = corpus() + "zebra " * 40 + "\n"  # a word of the validation tail alone
    ds = build_dataset("text", path=str(write_corpus(tmp_path, text)), seq_len=8,
                       val_fraction=0.15, unit="word", sample="window", vocab_size=10)
    assert ds.info.num_classes == 11 and ds.info.unit == "word" and "zebra" not in ds.vocab.index
    head_tokens = ds.vocab.decode(ds.train_stream).split(" ")
    assert "zebra" not in head_tokens
    # The tail starts at a whitespace, no word cut: its targets decode to the tail's tokens.
    val_ids = torch.cat([b.y[b.mask] if b.mask is not None else b.y.flatten()
                         for b in ds.val_batches(4)])
    assert (val_ids == 0).sum() >= 40  # every zebra is <unk>
    assert ds.facts() == {"unit": "word", "sample": "window", "n_vocab": 11,
                          "unk_fraction": float((val_ids == 0).double().mean())}


# ----------------------------------------------------------------------------- lines


LINES = "first line, here\n\n   \nsecond\nthe third line is much longer than the others are\nfourth\n"


def test_line_rows_are_framed_padded_truncated_and_skip_blank_lines(tmp_path):
    ds = build_dataset("text", path=str(write_corpus(tmp_path, LINES * 4)), seq_len=6,
                       val_fraction=0.2, unit="word", sample="line", vocab_size=50)
    assert ds.sample == "line" and ds.train_rows.shape[1] == 7
    texts = [ds.vocab.decode(row[:n + 1]) for row, n in zip(ds.train_rows, ds.train_lengths,
                                                             strict=True)]
    one_copy = ["\n first line , here \n", "\n second \n",
                "\n the third line is much longer",  # cut to seq_len + 1 = 7 tokens: no end
                "\n fourth \n"]
    # 348 characters, the last 70 for validation: the split (278) falls at the end of the
    # fourth copy's first line, which starts before it and stays with training.
    assert texts == one_copy * 3 + one_copy[:1]  # the blank and spaces-only lines are skipped
    assert ds.train_lengths.tolist() == [5, 2, 6, 2] * 3 + [5]
    steps = torch.arange(7)
    assert (ds.train_rows[steps > ds.train_lengths[:, None]] == 0).all()  # padding
    val = [ds.vocab.decode(row[:n + 1]) for row, n in zip(ds.val_rows, ds.val_lengths,
                                                          strict=True)]
    assert val == one_copy[1:]  # the tail starts at a line start
    batch = next(ds.train_loader(4, seed=0))
    idx = ds.train_loader(4, seed=0).next_indices()[0]
    lengths = ds.train_lengths[idx]
    assert batch.x.shape == (4, int(lengths.max()))
    assert torch.equal(batch.mask, torch.arange(batch.x.shape[1]) < lengths[:, None])


def test_char_lines_keep_the_closing_line_break_id_0_as_a_real_target(tmp_path):
    ds = build_dataset("text", path=str(write_corpus(tmp_path, "ab\nc\n\nabc\n" * 6)),
                       seq_len=8, val_fraction=0.2, unit="char", sample="line")
    assert ds.vocab.chars[0] == "\n" and ds.info.num_classes == 4
    assert ds.train_lengths.tolist()[:3] == [3, 2, 4]
    # "\nc\n": the closing line break is id 0, like the padding after it; the length says
    # it is real, and the mask of a batch holding it follows the length.
    assert ds.train_rows[1].tolist() == [0, 3, 0, 0, 0, 0, 0, 0, 0]
    batch = ds.rows_batch(ds.train_rows, ds.train_lengths, ds.train_lengths,
                          torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert batch.mask.tolist() == [[True, True, False, False], [True] * 4]
    assert batch.y[0, :2].tolist() == [3, 0]


def test_an_unknown_word_at_the_end_of_a_line_is_a_real_target(tmp_path):
    text = "a b a\n" * 20 + "a rare\n" * 3
    ds = build_dataset("text", path=str(write_corpus(tmp_path, text)), seq_len=5,
                       val_fraction=0.1, unit="word", sample="line", vocab_size=3)
    assert ds.vocab.tokens == [UNK, "\n", "a", "b"]
    # The validation lines are "a rare": [\n, a, <unk>, \n] with 3 real targets, one <unk>.
    assert ds.val_rows[:, :4].tolist() == [[1, 2, 0, 1]] * ds.n_val
    assert ds.val_lengths.tolist() == [3] * ds.n_val
    assert ds.unk_fraction == pytest.approx(1 / 3)  # by the lengths: padding is not <unk>


# ----------------------------------------------------------------------------- errors


ONE_LINE = "one long line without a break " * 20


@pytest.mark.parametrize("options, words", [
    ({"unit": "words"}, "dataset.unit=words is not known"),
    ({"sample": "sentence"}, "dataset.sample=sentence is not known"),
    ({"unit": "word", "vocab_size": 1}, "dataset.vocab_size=1 must be an integer, 2 or more"),
    ({"sample": "line"}, "validation part of"),  # no line starts in the tail
    ({"unit": "word", "seq_len": 200}, "fewer than one context"),  # 108 training words
])
def test_bad_conditions_are_one_line_user_errors(tmp_path, options, words):
    with pytest.raises(UserError) as e:
        build_dataset("text", path=str(write_corpus(tmp_path, ONE_LINE)),
                      **{"seq_len": 8, "val_fraction": 0.1, **options})
    line = e.value.line()
    assert words in line and "Fix:" in line and "\n" not in line


@pytest.mark.slow
def test_the_cli_refuses_an_unknown_unit_before_running(cli, tmp_path):
    path = write_corpus(tmp_path)
    result = cli("train", "model=transformer", "dataset=text", f"dataset.path={path}",
                 "dataset.unit=syllable")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["normbench: error: dataset.unit=syllable is not known. "
                     "Fix: use dataset.unit=char or dataset.unit=word."]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- models

SMALL = {"transformer": {"depth": 1, "width": 16, "heads": 2},
         "lstm": {"depth": 1, "hidden": 16, "embed": 16}}


@pytest.mark.parametrize("model_name", ["transformer", "lstm"])
@pytest.mark.parametrize("unit, sample", [("char", "window"), ("char", "line"),
                                          ("word", "window"), ("word", "line")])
def test_every_condition_trains_a_batchnorm_step_in_both_models(tmp_path, model_name, unit,
                                                                sample):
    ds = build_dataset("text", path=str(write_corpus(tmp_path)), seq_len=16, val_fraction=0.15,
                       unit=unit, sample=sample, vocab_size=12)
    torch.manual_seed(0)
    model = build_model(model_options(model_name, **SMALL[model_name]), norm_spec("batch"),
                        ds.info).train()
    batch = next(ds.train_loader(8, seed=0))
    assert (batch.mask is not None) == (sample == "line")
    loss, _, count = loss_and_counts(forward(model, batch), batch)
    loss.backward()
    assert torch.isfinite(loss) and int(count) == (8 * 16 if batch.mask is None
                                                   else int(batch.mask.sum()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("model_name", ["transformer", "lstm"])
def test_batchnorm_never_sees_the_padding_of_line_rows(tmp_path, model_name):
    ds = build_dataset("text", path=str(write_corpus(tmp_path)), seq_len=16, val_fraction=0.15,
                       unit="word", sample="line", vocab_size=12)
    batch = next(ds.train_loader(8, seed=1))
    assert batch.mask is not None and not batch.mask.all()
    torch.manual_seed(0)
    model = build_model(model_options(model_name, **{**SMALL[model_name], "depth": 2}),
                        norm_spec("batch"), ds.info).train()
    clean = model(batch.x, mask=batch.mask)

    def extreme_padding(module, args, out):  # padding embeddings at 1e4: BN would notice
        return torch.where(batch.mask[..., None], out, torch.full_like(out, 1e4))

    handle = model.embed.register_forward_hook(extreme_padding)
    try:
        poisoned = model(batch.x, mask=batch.mask)
        unmasked = model(batch.x)  # the same embeddings, the padding counted as real
    finally:
        handle.remove()
    torch.testing.assert_close(poisoned[batch.mask], clean[batch.mask])
    assert not torch.allclose(unmasked[batch.mask], clean[batch.mask], atol=1e-3)


@pytest.mark.slow
def test_a_transformer_trains_on_word_lines_and_reports_bits_per_token(tmp_path):
    path = write_corpus(tmp_path)
    config = compose_config(["model=transformer", "norm=batch", "dataset=text",
                             f"dataset.path={path}", "dataset.unit=word", "dataset.sample=line",
                             "dataset.vocab_size=12", "dataset.seq_len=16",
                             "dataset.val_fraction=0.15", "batch_size=8", "steps=12",
                             "log_every=4", "eval_every=0", "eval_batch_size=64",
                             "precise_bn_batches=2", "optim=adamw", "lr=1e-2",
                             "model.width=16", "model.depth=1", "threads=1"])
    summary = run_experiment(config, tmp_path / "run", live=False)
    final = summary["final"]
    assert summary["status"] == "completed"
    assert summary["unit"] == "word" and summary["sample"] == "line"
    text = corpus()
    cut = len(text) - round(0.15 * len(text))
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    lines = [(start, text[start:].split("\n")[0]) for start in starts[:-1]]
    n_train = sum(1 for start, line in lines if start < cut and line.strip())
    assert summary["n_vocab"] == 13 and summary["n_train"] == n_train  # non-blank lines
    assert not any("bpc" in key for key in final)
    assert final["val_bpt"] == pytest.approx(final["val_loss"] / math.log(2))
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    assert math.isfinite(final["val_loss"]) and final["val_loss"] < math.log(13)
    scalars = read_scalars(tmp_path / "run")
    assert "train/bpt" in scalars and "train/bpc" not in scalars and "val/bpc" not in scalars
    assert "bn_gap/tid_sigma/blocks.0.norm1" in scalars
