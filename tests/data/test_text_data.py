"""Text datasets: synthetic_text, local text files, the tiny-shakespeare download path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import normbench.data.text as text_mod
from normbench.data import build_dataset
from normbench.data.synthetic_text import VOCAB
from normbench.errors import UserError
from tests.helpers.common import FIXTURES

# Fourteen-line sonnets (Shakespeare, 1609; public domain): a small real text shipped with the tests.
SONNETS = FIXTURES / "sonnets.txt"


def small_synthetic(**kw):
    return build_dataset("synthetic_text", **{"n_train": 200, "n_val": 50, "seq_len": 48, **kw})


# ----------------------------------------------------------------------------- synthetic_text


def test_synthetic_text_is_deterministic_in_its_seed():
    a, b, c = small_synthetic(seed=0), small_synthetic(seed=0), small_synthetic(seed=1)
    assert torch.equal(a.train_rows, b.train_rows) and torch.equal(a.val_rows, b.val_rows)
    assert not torch.equal(a.train_rows, c.train_rows)
    assert not torch.equal(a.train_rows[:50], a.val_rows)  # val is drawn apart from train


def test_synthetic_sentences_nest_and_vary_in_length():
    ds = small_synthetic(max_depth=3, seq_len=64)
    texts = [VOCAB.decode(ds.train_rows[i, :ds.train_lengths[i] + 1]) for i in range(ds.n_train)]
    deepest = 0
    for s in texts:
        assert s.startswith("\n") and s.endswith("\n") and s[-2] == "."
        depth = 0
        for ch in s:  # parentheses balanced and never closed before opened
            depth += (ch == "(") - (ch == ")")
            assert depth >= 0
            deepest = max(deepest, depth)
        assert depth == 0
    assert 2 <= deepest <= 3  # clauses nest inside clauses, never beyond max_depth
    lengths = ds.train_lengths
    assert lengths.min() < lengths.max() <= ds.seq_len
    # Padding is zero past each row's end.
    steps = torch.arange(ds.seq_len + 1)
    assert (ds.train_rows[steps > lengths[:, None]] == 0).all()


def test_synthetic_batches_are_cut_to_the_longest_row_and_masked():
    ds = small_synthetic()
    loader = ds.train_loader(16, seed=3)
    batch = next(loader)
    idx = loader.perm[:16]
    lengths = ds.train_lengths[idx]
    assert batch.x.shape == (16, int(lengths.max()))
    assert torch.equal(batch.mask.sum(1), lengths)
    assert torch.equal(batch.mask, torch.arange(batch.x.shape[1]) < lengths[:, None])
    rows = ds.train_rows[idx]
    assert torch.equal(batch.x, rows[:, :batch.x.shape[1]])
    assert torch.equal(batch.y, rows[:, 1:batch.x.shape[1] + 1])


def test_rows_of_equal_length_need_no_mask():
    ds = small_synthetic()
    same = ds.train_lengths == ds.train_lengths[0]
    idx = torch.nonzero(same).flatten()[:2]
    batch = ds.rows_batch(ds.train_rows, ds.train_lengths, ds.train_lengths, idx, idx)
    assert batch.mask is None and batch.x.shape == (len(idx), int(ds.train_lengths[0]))


@pytest.mark.parametrize("source", ["synthetic", "stream"])
def test_loader_resumes_exactly_from_its_state(tmp_path, source):
    if source == "synthetic":
        ds = small_synthetic()
    else:
        path = tmp_path / "t.txt"
        path.write_text("".join(chr(97 + (i * 7) % 26) for i in range(3000)))
        ds = build_dataset("text", path=str(path), seq_len=32)
    loader = ds.train_loader(8, seed=5)
    for _ in range(loader.steps_per_epoch + 2):  # cross an epoch boundary
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(loader.steps_per_epoch)]
    fresh = ds.train_loader(8, seed=99)
    fresh.load_state_dict(state)
    for want in expected:
        got = next(fresh)
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)


# ----------------------------------------------------------------------------- text files


def write_text(tmp_path, text: str, name="corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_text_stream_windows_and_validation_cover_the_text(tmp_path):
    text = "".join(f"line {i}: to be or not to be, é\n" for i in range(120))
    ds = build_dataset("text", path=str(write_text(tmp_path, text)), seq_len=40, val_fraction=0.2)
    n_val = round(len(text) * 0.2)
    head, tail = text[:-n_val], text[-n_val:]
    assert ds.info.kind == "text" and ds.info.num_classes == len(set(text))
    assert ds.info.seq_len == 40
    # Training windows: contiguous slices of the head, y one step ahead, distinct in an epoch.
    loader = ds.train_loader(4, seed=0)
    seen = set()
    for _ in range(loader.steps_per_epoch):
        b = next(loader)
        assert b.mask is None and b.x.shape == (4, 40)
        assert torch.equal(b.x[:, 1:], b.y[:, :-1])
        for row_x, row_y in zip(b.x, b.y, strict=True):
            window = ds.vocab.decode(row_x) + ds.vocab.decode(row_y[-1:])
            assert window in head
            seen.add(window)
    assert len(seen) == loader.steps_per_epoch * 4
    # Validation: every target of the tail exactly once, in order; the last row padded.
    ys = []
    for b in ds.val_batches(3):
        for i in range(b.size):
            real = b.y[i] if b.mask is None else b.y[i][b.mask[i]]
            ys.append(ds.vocab.decode(real))
    assert "".join(ys) == tail[1:]
    assert ds.val_lengths[-1] < 40


def test_val_batches_in_random_order_hold_the_same_rows(tmp_path):
    ds = small_synthetic()
    fixed = torch.cat([b.y[:, 0] for b in ds.val_batches(7)])
    shuffled = torch.cat([b.y[:, 0] for b in ds.val_batches(7, shuffle_seed=1)])
    assert not torch.equal(fixed, shuffled)
    assert torch.equal(fixed.sort().values, shuffled.sort().values)


@pytest.mark.parametrize("content, words", [
    (b"", "empty"),
    (b"\xff\xfe\x01latin\x80\x81", "not UTF-8"),
    (b"text\x00with\x00nul bytes " * 20, "binary"),
    (b"too short", "shorter than one context"),
])
def test_bad_text_files_give_one_line_user_errors(tmp_path, content, words):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        build_dataset("text", path=str(path), seq_len=64)
    line = e.value.line()
    assert words in line and "\n" not in line and "Fix:" in line


def test_missing_or_unset_text_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_dataset("text", path=str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="dataset.path="):
        build_dataset("text", path=None)


def test_batch_larger_than_the_windows_is_a_user_error(tmp_path):
    ds = build_dataset("text", path=str(write_text(tmp_path, "abcdefgh" * 40)), seq_len=32)
    with pytest.raises(UserError, match="smaller batch_size"):
        ds.train_loader(ds.n_train + 1, seed=0)


# ----------------------------------------------------------------------------- tiny-shakespeare


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    """A generated corpus served from a file:// URL, with its checksum as the expected one."""
    source = tmp_path / "served" / "input.txt"
    source.parent.mkdir()
    source.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30)
    monkeypatch.setattr(text_mod, "TINYSHAKESPEARE_URL", source.as_uri())
    monkeypatch.setattr(text_mod, "TINYSHAKESPEARE_SHA256",
                        hashlib.sha256(source.read_bytes()).hexdigest())
    return source


def test_tinyshakespeare_downloads_verifies_and_then_reads_the_cache(tmp_path, fake_corpus,
                                                                      monkeypatch):
    root = tmp_path / "cache"
    ds = build_dataset("tinyshakespeare", root=str(root), seq_len=32)
    cached = root / text_mod.TINYSHAKESPEARE_FILE
    assert cached.read_bytes() == fake_corpus.read_bytes()
    assert ds.name == "tinyshakespeare" and ds.info.num_classes == len(set(fake_corpus.read_text()))
    assert [p.name for p in root.iterdir()] == [cached.name]  # no temporary file left
    # Offline now: the cached, verified copy is used without any download.
    monkeypatch.setattr(text_mod, "TINYSHAKESPEARE_URL", (tmp_path / "gone.txt").as_uri())
    again = build_dataset("tinyshakespeare", root=str(root), seq_len=32)
    assert torch.equal(again.train_stream, ds.train_stream)


def test_tinyshakespeare_with_a_wrong_checksum_leaves_nothing_behind(tmp_path, fake_corpus,
                                                                     monkeypatch):
    monkeypatch.setattr(text_mod, "TINYSHAKESPEARE_SHA256", "0" * 64)
    root = tmp_path / "cache"
    with pytest.raises(UserError, match="checksum"):
        build_dataset("tinyshakespeare", root=str(root), seq_len=32)
    assert list(root.iterdir()) == []


def test_tinyshakespeare_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(text_mod, "TINYSHAKESPEARE_URL", (tmp_path / "unreachable.txt").as_uri())
    root = tmp_path / "cache"
    with pytest.raises(UserError) as e:
        build_dataset("tinyshakespeare", root=str(root))
    line = e.value.line()
    assert "could not be downloaded" in line and "\n" not in line
    assert str(root / "tinyshakespeare.txt") in line and "unreachable.txt" in line
    assert list(root.iterdir()) == []
    with pytest.raises(UserError, match="download=false"):
        build_dataset("tinyshakespeare", root=str(tmp_path / "empty"), download=False)


def test_a_real_text_file_loads_as_characters_and_round_trips():
    text = SONNETS.read_text()
    ds = build_dataset("text", path=str(SONNETS), seq_len=64, val_fraction=0.1)
    assert ds.info.num_classes == len(set(text))
    # Every character is a training input or a validation target, and the first one input.
    assert ds.train_stream.numel() + int(ds.val_lengths.sum()) + 1 == len(text)
    assert ds.vocab.decode(ds.train_stream[:40]) == text[:40]
