"""Text for next-token prediction, held as token tensors (characters, or words: see
`normbench.data.tokenize`; which one a text file gives is `normbench.data.corpus`'s).

Two shapes of data, one dataset class:

- a *stream* (sample=window): training batches are windows of `seq_len` tokens cut from
  the training text. Each epoch shifts the window grid by a random offset and visits the
  windows in a fresh random order; no padding.
- *rows* (synthetic_text's sentences, a text file's lines): one sentence or line per row,
  right-padded; a batch is cut to its longest row and carries a mask that is True on real
  tokens.

Validation is always a set of padded rows: for a stream, consecutive non-overlapping
windows, the last one shorter. A row holds `seq_len + 1` tokens: x = row[:-1], y = row[1:].
Padding holds id 0, which is also a real token (the first character, or `<unk>`): what is
padding is said by the row lengths and the batch's mask alone, never by a token's value.
As with images, a batch is an index into tensors; nothing loops over samples in Python.
"""

from __future__ import annotations

import codecs
import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

from normbench.data import Batch, DataInfo
from normbench.data.sampling import ShuffledEpochs
from normbench.errors import UserError
from normbench.paths import path_error

TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                       "data/tinyshakespeare/input.txt")
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_FILE = "tinyshakespeare.txt"


class CharVocab:
    """Characters <-> token ids, in sorted order (so a text always maps the same way)."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


def stream_rows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive non-overlapping windows covering every target of `tokens` once.

    Returns rows (n, seq_len + 1), right-padded with 0, and the number of real targets in
    each row: all `seq_len` but possibly the last.
    """
    n_targets = tokens.numel() - 1
    starts = torch.arange(0, n_targets, seq_len)
    lengths = (n_targets - starts).clamp(max=seq_len)
    padded = torch.cat([tokens, tokens.new_zeros(seq_len)])
    rows = padded[starts[:, None] + torch.arange(seq_len + 1)]
    rows[torch.arange(seq_len + 1) > lengths[:, None]] = 0
    return rows, lengths


def pad_rows(sequences: list[torch.Tensor], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, seq_len + 1) of the sequences, each cut to its first seq_len + 1 tokens and
    right-padded with 0, and the number of real targets in each row (its tokens minus one)."""
    kept = [s[:seq_len + 1] for s in sequences]
    lengths = torch.tensor([s.numel() for s in kept], dtype=torch.long)
    rows = torch.zeros(len(kept), seq_len + 1, dtype=torch.long)
    # Row-major boolean assignment: the real slots of row 0, then row 1, ...
    rows[torch.arange(seq_len + 1) < lengths[:, None]] = torch.cat(kept)
    return rows, lengths - 1


class TextDataset:
    """Train and validation tokens for a vocabulary; see the module docstring.

    Give either `train_stream` (1-D tokens) or `train_rows` with `train_lengths`. `unit`
    ("char" or "word") names the bits metric; `sample` says what a training row is
    ("window" for a stream; "sentence" or "line" for rows).
    """

    def __init__(self, vocab, seq_len: int, val_rows: torch.Tensor,
                 val_lengths: torch.Tensor, *, train_stream: torch.Tensor | None = None,
                 train_rows: torch.Tensor | None = None,
                 train_lengths: torch.Tensor | None = None, name: str = "text",
                 unit: str = "char", sample: str | None = None):
        if (train_stream is None) == (train_rows is None):
            raise ValueError("give exactly one of train_stream and train_rows")
        self.name = name
        self.unit = unit
        self.sample = sample or ("window" if train_stream is not None else "sentence")
        self.vocab = vocab
        self.unk_fraction: float | None = None  # words: share of <unk> in validation targets
        self.seq_len = seq_len
        self.train_stream = train_stream
        self.train_rows, self.train_lengths = train_rows, train_lengths
        self.val_rows, self.val_lengths = val_rows, val_lengths
        # Lengths stay on the host as well: trimming a batch to its longest row then needs
        # no device-to-host transfer.
        self.val_lengths_dev = val_lengths
        self.train_lengths_dev = train_lengths
        self.info = DataInfo(kind="text", num_classes=len(vocab), seq_len=seq_len, unit=unit)
        if train_stream is not None:
            n_full = (train_stream.numel() - 1) // seq_len
            # One window fewer than fits leaves room to shift the grid each epoch.
            self.n_windows = n_full - 1 if n_full >= 2 else n_full
            self.max_offset = min(seq_len - 1, train_stream.numel() - 1 - self.n_windows * seq_len)

    @property
    def n_train(self) -> int:
        return self.n_windows if self.train_stream is not None else self.train_rows.shape[0]

    @property
    def n_val(self) -> int:
        return self.val_rows.shape[0]

    def facts(self) -> dict:
        """What summary.json records about the text besides the row counts."""
        out = {"unit": self.unit, "sample": self.sample, "n_vocab": len(self.vocab)}
        if self.unk_fraction is not None:
            out["unk_fraction"] = self.unk_fraction
        return out

    def to(self, device) -> TextDataset:
        for attr in ("train_stream", "train_rows", "val_rows"):
            if getattr(self, attr) is not None:
                setattr(self, attr, getattr(self, attr).to(device))
        self.val_lengths_dev = self.val_lengths.to(device)
        if self.train_lengths is not None:
            self.train_lengths_dev = self.train_lengths.to(device)
        return self

    def rows_batch(self, rows: torch.Tensor, lengths: torch.Tensor, lengths_dev: torch.Tensor,
                   idx_host, idx_dev) -> Batch:
        """A batch from padded rows, cut to its longest row; mask None when nothing is padded."""
        picked = lengths[idx_host]
        longest, shortest = int(picked.max()), int(picked.min())
        chunk = rows[idx_dev, :longest + 1]
        mask = None
        if shortest < longest:
            steps = torch.arange(longest, device=chunk.device)
            mask = steps < lengths_dev[idx_dev][:, None]  # (N, T)
        return Batch(chunk[:, :-1], chunk[:, 1:], mask)

    def train_loader(self, batch_size: int, seed: int) -> TextTrainLoader:
        return TextTrainLoader(self, batch_size, seed)

    def val_batches(self, batch_size: int, shuffle_seed: int | None = None):
        """Validation batches; in fixed order unless a shuffle seed is given."""
        n = self.n_val
        order = torch.arange(n)
        if shuffle_seed is not None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield self.rows_batch(self.val_rows, self.val_lengths, self.val_lengths_dev,
                                  idx, idx.to(self.val_rows.device))


class TextTrainLoader(ShuffledEpochs):
    """Endless stream of shuffled training batches; resumable via state_dict.

    As for images, each epoch is a fresh permutation and the incomplete last batch is
    dropped. For a stream the permutation is over windows of a grid shifted by a random
    offset drawn at the start of the epoch.
    """

    def __init__(self, ds: TextDataset, batch_size: int, seed: int):
        what = "windows of seq_len" if ds.train_stream is not None else f"{ds.sample}s"
        super().__init__(ds.n_train, batch_size, seed, f"training {what} of {ds.name}")
        self.ds = ds
        self.offset = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        ds = self.ds
        idx, new_epoch = self.next_indices()
        if new_epoch and ds.train_stream is not None:
            self.offset = int(torch.randint(0, ds.max_offset + 1, (), generator=self.generator))
        if ds.train_stream is None:
            return ds.rows_batch(ds.train_rows, ds.train_lengths, ds.train_lengths_dev,
                                 idx, idx.to(ds.train_rows.device))
        stream = ds.train_stream
        starts = (self.offset + idx * ds.seq_len).to(stream.device)
        window = stream[starts[:, None] + torch.arange(ds.seq_len + 1, device=stream.device)]
        return Batch(window[:, :-1], window[:, 1:])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.offset = state["offset"]


# ----------------------------------------------------------------------------- files


def read_text_file(path: Path) -> str:
    """The file's text, or a one-line UserError when it is missing, empty or not UTF-8."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UserError(f"text file {path} does not exist",
                            "set dataset.path to a UTF-8 text file")
        raw = path.read_bytes()
    except OSError as e:
        raise path_error(e, "the text file", path, "set dataset.path to a UTF-8 text file") from None
    if not raw:
        raise UserError(f"text file {path} is empty",
                        "point dataset.path at a file with text in it")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # its NUL bytes are text
        raise UserError(f"{path} is UTF-16 text, not UTF-8",
                        "convert it, e.g. iconv -f UTF-16 -t UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:  # text never holds NUL bytes; binary files nearly always do
        raise UserError(f"{path} is a binary file, not text (it contains NUL bytes, the first "
                        f"at offset {nul})", "give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} is not UTF-8 text (undecodable byte 0x{raw[e.start]:02x} at "
                        f"offset {e.start}, line {line})",
                        "give a UTF-8 text file, or convert it (e.g. iconv -t UTF-8)") from None
    return text


def check_split_options(seq_len: int, val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise UserError(f"dataset.val_fraction={val_fraction} must lie between 0 and 1",
                        "use e.g. dataset.val_fraction=0.1")
    if seq_len < 1:
        raise UserError(f"dataset.seq_len={seq_len} must be at least 1",
                        "use e.g. dataset.seq_len=128")


def validation_chars(text: str, val_fraction: float) -> int:
    """How many characters at the end of `text` make the validation tail."""
    return max(2, int(round(len(text) * val_fraction)))


def stream_dataset(text: str, seq_len: int, val_fraction: float, name: str,
                   source: str) -> TextDataset:
    """Characters in windows (the default condition): split `text` into a training head and
    a validation tail; build the dataset."""
    check_split_options(seq_len, val_fraction)
    n_val = validation_chars(text, val_fraction)
    n_train = len(text) - n_val
    if n_train < seq_len + 1:
        need = int((seq_len + 1) / (1 - val_fraction)) + 2
        raise UserError(f"{source} has {len(text)} characters: its training part ({n_train}) "
                        f"is shorter than one context of dataset.seq_len={seq_len} plus one",
                        f"use a file of at least {need} characters or a smaller dataset.seq_len")
    vocab = CharVocab(text)
    tokens = vocab.encode(text)
    val_rows, val_lengths = stream_rows(tokens[n_train:], seq_len)
    return TextDataset(vocab, seq_len, val_rows, val_lengths, train_stream=tokens[:n_train],
                       name=name)


# ----------------------------------------------------------------------------- tiny-shakespeare


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_tinyshakespeare(root: str | Path, download: bool = True) -> Path:
    """The verified corpus in `root`, downloaded there first when missing.

    The download goes to a temporary file in `root` and is renamed into place only once its
    checksum matches, so an interrupted or corrupted download never leaves a bad file behind.
    """
    root = Path(root).expanduser()
    target = root / TINYSHAKESPEARE_FILE
    by_hand = (f"put {TINYSHAKESPEARE_URL} at {target} (or set dataset.root to the folder "
               f"holding {TINYSHAKESPEARE_FILE})")
    try:
        present = target.is_file()
        digest = sha256_of(target) if present else None
    except OSError as e:
        raise path_error(e, "dataset.root", root, by_hand) from None
    if present:
        if digest != TINYSHAKESPEARE_SHA256:
            raise UserError(f"{target} does not have the expected sha256 checksum",
                            f"delete it to download it again, or {by_hand}")
        return target
    if not download:
        raise UserError(f"tinyshakespeare is not in {root} and dataset.download=false",
                        f"set dataset.download=true, or {by_hand}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{TINYSHAKESPEARE_FILE}.",
                                        suffix=".part")
    except OSError as e:  # before any download: the folder itself is the problem
        raise path_error(e, "dataset.root", root, by_hand) from None
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as out, urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as r:
            shutil.copyfileobj(r, out)
        if sha256_of(tmp) != TINYSHAKESPEARE_SHA256:
            raise UserError(f"the file downloaded from {TINYSHAKESPEARE_URL} has the wrong "
                            f"sha256 checksum", by_hand)
        tmp.replace(target)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"tinyshakespeare is not in {root} and could not be downloaded "
                        f"({type(e).__name__}: {str(e)[:120]})",
                        f"connect to the network, or {by_hand}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
