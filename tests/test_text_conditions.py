"""Text-file conditions: character or word units, contiguous windows or one line per row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from normbench.data import build_dataset

# Digests of the char-unit, window-sampled dataset built from `corpus()` by the code as it
# was before units and line sampling existed: the default must stay the same bit for bit.
CHAR_WINDOW_EXPECTED = Path(__file__).parent / "data" / "char_window_expected.json"


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
