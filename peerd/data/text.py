"""Character-level tokenisation and windowing of text.

Tokenisation is character-level. The vocabulary is the sorted (by Unicode code
point) set of distinct characters of the whole corpus, so it is deterministic and
identical on every peer that loads the same corpus; token id ``i`` is the ``i``-th
character of that sorted set. For the King James Bible this gives 63 tokens
(newline, space, punctuation, letters and the right single quotation mark).

Each natural group (a book of the Bible, or one ``*.txt`` file of a user
directory) is encoded separately and cut into non-overlapping windows of
``block_size + 1`` tokens; a window ``w`` gives inputs ``w[:-1]`` and targets ``w[1:]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _code_points(text: str) -> np.ndarray:
    # UTF-32 gives one uint32 per character, which lets numpy do the per-char work.
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


@dataclass(frozen=True)
class CharVocab:
    """Character vocabulary; ``chars[i]`` is the character of token id ``i``."""

    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if list(self.chars) != sorted(set(self.chars)) or not self.chars:
            raise ValueError("CharVocab.chars must be non-empty, sorted and without duplicates")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharVocab.chars must hold single characters")

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> CharVocab:
        if not texts:
            raise ValueError("cannot build a vocabulary from an empty list of texts")
        codes = np.unique(np.concatenate([_code_points(t) for t in texts]))
        return cls(tuple(chr(c) for c in codes))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of ``text``; every character must be in the vocabulary."""
        table = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        codes = _code_points(text)
        ids = np.searchsorted(table, codes)
        unknown = (ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != codes)
        if unknown.any():
            bad = sorted({chr(c) for c in codes[unknown]})
            raise ValueError(f"characters {bad!r} are not in the vocabulary of {self.size} chars")
        return ids.astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"token ids must be in [0, {self.size}), got {ids.min()}..{ids.max()}")
        return "".join(self.chars[i] for i in ids.tolist())


def windows(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """Cut ``tokens`` into non-overlapping windows of ``block_size + 1`` tokens (tail dropped)."""
    width = block_size + 1
    count = len(tokens) // width
    return tokens[: count * width].reshape(count, width)
