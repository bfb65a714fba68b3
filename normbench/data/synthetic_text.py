"""`synthetic_text`: an embedded toy language, generated deterministically from a seed.

Sentences come from a small grammar with recursion: a noun phrase may carry a relative
clause in parentheses, whose verb phrase may hold another noun phrase, and so on up to
`max_depth`. Predicting the next character then needs the words (local statistics), the
grammar (what may follow what) and the nesting depth (how many ')' close the sentence).
Sentences vary in length, one per row, so batches are padded and carry masks.

Each row is "\\n" + sentence + "\\n": the model reads the opening newline as a start
token and must predict the closing one.
"""

from __future__ import annotations

import random

import torch

from normbench.data.text import CharVocab, TextDataset, pad_rows
from normbench.errors import UserError

DETERMINERS = ("the", "a", "every", "no", "some")
NOUNS = ("cat", "dog", "bird", "fox", "king", "child", "ship", "queen", "horse")
VERBS = ("sees", "likes", "chases", "finds", "helps", "follows", "hears")
ADJECTIVES = ("red", "old", "small", "quiet", "brave")
PUNCTUATION = " ().\n"
VOCAB = CharVocab("".join(DETERMINERS + NOUNS + VERBS + ADJECTIVES) + PUNCTUATION + ",")


class Grammar:
    """sentence -> clause (", and " clause)? "."
    clause -> np " " vp;  vp -> verb (" " np)?
    np -> det (" " adj)? " " noun (" (that " vp ")")?   (the relative clause nests)"""

    def __init__(self, rng: random.Random, max_depth: int, p_nest: float = 0.4):
        self.rng = rng
        self.max_depth = max_depth
        self.p_nest = p_nest

    def noun_phrase(self, depth: int) -> str:
        r = self.rng
        words = [r.choice(DETERMINERS)]
        if r.random() < 0.3:
            words.append(r.choice(ADJECTIVES))
        words.append(r.choice(NOUNS))
        phrase = " ".join(words)
        if depth < self.max_depth and r.random() < self.p_nest:
            phrase += f" (that {self.verb_phrase(depth + 1)})"
        return phrase

    def verb_phrase(self, depth: int) -> str:
        verb = self.rng.choice(VERBS)
        if self.rng.random() < 0.7:
            return f"{verb} {self.noun_phrase(depth)}"
        return verb

    def clause(self) -> str:
        return f"{self.noun_phrase(0)} {self.verb_phrase(0)}"

    def sentence(self) -> str:
        text = self.clause()
        if self.rng.random() < 0.25:
            text += f", and {self.clause()}"
        return text + "."


def generate_sentences(n: int, seed: int, max_len: int, max_depth: int) -> list[str]:
    """`n` sentences of at most `max_len` characters (longer draws are rejected)."""
    grammar = Grammar(random.Random(seed), max_depth)
    out = []
    while len(out) < n:
        s = grammar.sentence()
        if len(s) <= max_len:
            out.append(s)
    return out


def encode_rows(sentences: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, seq_len + 1) of "\\n" + sentence + "\\n", right-padded, and real targets per row."""
    return pad_rows([VOCAB.encode(f"\n{s}\n") for s in sentences], seq_len)


def synthetic_text_dataset(n_train: int = 4000, n_val: int = 500, seq_len: int = 48,
                           max_depth: int = 2, seed: int = 0) -> TextDataset:
    """Deterministic in `seed`, independent of the training seed."""
    if seq_len < 24:
        raise UserError(f"dataset.seq_len={seq_len} is too short for synthetic_text sentences",
                        "use dataset.seq_len=24 or more")
    if max_depth < 0:
        raise UserError(f"dataset.max_depth={max_depth} must be 0 or more", "use e.g. 2")
    max_len = seq_len - 1  # the two newlines make seq_len + 1 tokens
    tr, tl = encode_rows(generate_sentences(n_train, 2 * seed, max_len, max_depth), seq_len)
    vr, vl = encode_rows(generate_sentences(n_val, 2 * seed + 1, max_len, max_depth), seq_len)
    return TextDataset(VOCAB, seq_len, vr, vl, train_rows=tr, train_lengths=tl,
                       name="synthetic_text")
