"""A text file as a dataset (`dataset=text`, `dataset=tinyshakespeare`), under a condition:

- `unit`: `char` (every character of the file is a token) or `word` (the tokens of
  `normbench.data.tokenize`, the vocabulary capped at `vocab_size` training tokens plus
  `<unk>`);
- `sample`: `window` (contiguous windows of `seq_len` tokens, as a novel is read in
  char-rnn) or `line` (one non-blank line per row: the tokens "\\n" + line + "\\n", cut to
  `seq_len + 1` tokens, right-padded and masked, as synthetic_text's sentences are: the
  opening line break is the row's start token, and the model must predict the closing
  one unless the line was cut).

The last `val_fraction` of the characters is the validation set. Characters in windows
split exactly there (the condition as it always was); the other conditions move the split
forward to the next line start (line rows) or whitespace (word windows), so that no line
or word is cut in two, and a line or word starting before it is training data. Word
vocabularies count the training part only; characters come from the whole file, plus the
line break that frames line rows.
"""

from __future__ import annotations

import re
from numbers import Integral
from pathlib import Path

import torch

from normbench.data.text import (
    CharVocab,
    TextDataset,
    check_split_options,
    fetch_tinyshakespeare,
    pad_rows,
    read_text_file,
    stream_dataset,
    stream_rows,
    validation_chars,
)
from normbench.data.tokenize import LINE_BREAK, WordVocab, tokenize
from normbench.errors import UserError

UNITS = ("char", "word")
SAMPLES = ("window", "line")


def check_condition(unit, sample, vocab_size) -> None:
    """One-line errors for an unknown unit or sampling, or a vocabulary too small to use."""
    if unit not in UNITS:
        raise UserError(f"dataset.unit={unit} is not known",
                        f"use dataset.unit={' or dataset.unit='.join(UNITS)}")
    if sample not in SAMPLES:
        raise UserError(f"dataset.sample={sample} is not known",
                        f"use dataset.sample={' or dataset.sample='.join(SAMPLES)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, Integral) or vocab_size < 2:
        raise UserError(f"dataset.vocab_size={vocab_size} must be an integer, 2 or more (the "
                        "line break and at least one word; <unk> comes on top)",
                        "use e.g. dataset.vocab_size=8000")


def split_text(text: str, val_fraction: float, sample: str) -> tuple[str, str]:
    """The training head and the validation tail, split at the first line start (line rows)
    or whitespace (word windows) at or after the last `val_fraction` of the characters."""
    cut = len(text) - validation_chars(text, val_fraction)
    boundary = re.compile(r"\n" if sample == "line" else r"\s")
    found = boundary.search(text, max(cut - 1, 0))
    start = found.end() if found else len(text)
    return text[:start], text[start:]


def line_sequences(part: str, unit: str, vocab) -> list[torch.Tensor]:
    """The token ids of "\\n" + line + "\\n" for every non-blank line of `part`."""
    lines = [line for line in part.split(LINE_BREAK) if line.strip()]
    if unit == "char":
        return [vocab.encode(f"{LINE_BREAK}{line}{LINE_BREAK}") for line in lines]
    return [vocab.encode([LINE_BREAK, *tokenize(line), LINE_BREAK]) for line in lines]


def unknown_fraction(rows: torch.Tensor, lengths: torch.Tensor) -> float:
    """The fraction of real targets that are `<unk>` (id 0): the lengths, not the ids,
    say which slots are real, since padding holds 0 as well."""
    targets = rows[:, 1:][torch.arange(rows.shape[1] - 1) < lengths[:, None]]
    return float((targets == 0).double().mean()) if targets.numel() else 0.0


def corpus_dataset(text: str, *, seq_len: int, val_fraction: float, unit: str = "char",
                   sample: str = "window", vocab_size: int = 8000, name: str,
                   source: str) -> TextDataset:
    """`text` under the condition (unit, sample); see the module docstring."""
    check_condition(unit, sample, vocab_size)
    if unit == "char" and sample == "window":
        return stream_dataset(text, seq_len, val_fraction, name, source)
    check_split_options(seq_len, val_fraction)
    head, tail = split_text(text, val_fraction, sample)
    if unit == "char":
        vocab = CharVocab(text + LINE_BREAK)
    else:
        vocab = WordVocab(tokenize(head), vocab_size)
    what = "characters" if unit == "char" else "word tokens"
    if sample == "window":  # words: chars in windows returned above
        train, val = vocab.encode(tokenize(head)), vocab.encode(tokenize(tail))
        if train.numel() < seq_len + 1:
            raise UserError(f"{source} has {train.numel()} {what} in its training part, fewer "
                            f"than one context of dataset.seq_len={seq_len} plus one",
                            "use a longer file or a smaller dataset.seq_len")
        if val.numel() < 2:
            raise UserError(f"the validation part of {source} (its last "
                            f"dataset.val_fraction={val_fraction}) holds fewer than 2 {what}",
                            "use a larger dataset.val_fraction or a longer file")
        val_rows, val_lengths = stream_rows(val, seq_len)
        ds = TextDataset(vocab, seq_len, val_rows, val_lengths, train_stream=train, name=name,
                         unit=unit)
    else:
        parts = {}
        for part_name, part in (("training", head), ("validation", tail)):
            sequences = line_sequences(part, unit, vocab)
            if not sequences:
                raise UserError(f"the {part_name} part of {source} has no line with text in "
                                f"it (validation: its last dataset.val_fraction={val_fraction})",
                                "use a file of several lines, or another dataset.val_fraction")
            parts[part_name] = pad_rows(sequences, seq_len)
        (train_rows, train_lengths), (val_rows, val_lengths) = parts["training"], parts["validation"]
        ds = TextDataset(vocab, seq_len, val_rows, val_lengths, train_rows=train_rows,
                         train_lengths=train_lengths, name=name, unit=unit, sample="line")
    if unit == "word":
        ds.unk_fraction = unknown_fraction(ds.val_rows, ds.val_lengths)
    return ds


def text_dataset(path: str | None = None, seq_len: int = 128, val_fraction: float = 0.1,
                 unit: str = "char", sample: str = "window",
                 vocab_size: int = 8000) -> TextDataset:
    """Any local UTF-8 file: the first (1 - val_fraction) for training, the rest for validation."""
    if not path:
        raise UserError("dataset=text needs a file", "add dataset.path=/path/to/file.txt")
    path = Path(path).expanduser()
    return corpus_dataset(read_text_file(path), seq_len=seq_len, val_fraction=val_fraction,
                          unit=unit, sample=sample, vocab_size=vocab_size,
                          name=f"text:{path.name}", source=str(path))


def tinyshakespeare_dataset(root: str = "data_cache", download: bool = True, seq_len: int = 128,
                            val_fraction: float = 0.1, unit: str = "char",
                            sample: str = "window", vocab_size: int = 8000) -> TextDataset:
    path = fetch_tinyshakespeare(root, download)
    return corpus_dataset(read_text_file(path), seq_len=seq_len, val_fraction=val_fraction,
                          unit=unit, sample=sample, vocab_size=vocab_size,
                          name="tinyshakespeare", source=str(path))
