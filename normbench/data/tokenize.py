"""Word-level units of a text: the tokenizer and a vocabulary capped by frequency.

Tokens are
- words: runs of letters and digits, joined through inner apostrophes ("don't", "o'er"
  and "Citizen's" are one word each; a leading or trailing apostrophe is a mark of its own),
- every other visible character alone (each punctuation mark is a token),
- the line break "\\n", a token of its own: it carries a text's layout (verse lines, a
  speaker's name on its own line) and frames the rows of line sampling.
Other whitespace only separates. Case is kept: "The" and "the" are different tokens, as
capitals are different characters at the character level and different entries of the
sub-word vocabularies of translation data; the model has to predict them either way.

The vocabulary is `<unk>` (id 0), the line break (id 1) and the most frequent other tokens
of the training text, `size` tokens with the line break; equal counts are ordered by the
tokens' code points, so a text always maps to the same ids. Everything else is `<unk>`.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

LINE_BREAK = "\n"
UNK = "<unk>"
# A line break, a word (letters/digits with inner apostrophes), or any other visible
# character alone. [^\W_] is \w without the underscore: "_" is a mark, not a letter.
_TOKEN = re.compile(r"\n|[^\W_]+(?:['’][^\W_]+)*|\S")


def tokenize(text: str) -> list[str]:
    """The word-level tokens of `text`, in order."""
    return _TOKEN.findall(text)


class WordVocab:
    """Tokens <-> ids for the `size` most frequent training tokens (the line break always
    among them) plus `<unk>`; see the module docstring."""

    def __init__(self, train_tokens: list[str], size: int):
        if size < 2:
            raise ValueError("a word vocabulary needs room for the line break and a word")
        counts = Counter(train_tokens)
        counts.pop(LINE_BREAK, None)  # placed first, whatever its count
        ranked = sorted(counts, key=lambda token: (-counts[token], token))
        self.tokens = [UNK, LINE_BREAK, *ranked[:size - 1]]
        self.index = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str]) -> torch.Tensor:
        return torch.tensor([self.index.get(t, 0) for t in tokens], dtype=torch.long)

    def decode(self, ids) -> str:
        return " ".join(self.tokens[int(i)] for i in ids)
