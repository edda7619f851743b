"""Word-level tokenizer with a pluggable segmenter (English words now, Chinese later).

Special ids are fixed: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Sequence

from ..errors import ConfigError
from ..io import atomic_write
from ..registry import SEGMENTERS

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


@SEGMENTERS.register("english")
class EnglishSegmenter:
    """Lower-cased words and numbers; punctuation dropped. Decoded with spaces."""

    joiner = " "
    _word = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

    def __call__(self, text: str) -> List[str]:
        return self._word.findall(text.lower())


@SEGMENTERS.register("chinese-char")
class ChineseCharSegmenter:
    """One token per Chinese character (Latin words and numbers kept whole); punctuation dropped."""

    joiner = ""
    _token = re.compile(r"[\u4e00-\u9fff]|[a-z0-9]+")

    def __call__(self, text: str) -> List[str]:
        return self._token.findall(text.lower())


class Tokenizer:
    """Maps text to ids and back with a fixed vocabulary built from training captions."""

    def __init__(self, vocab: Sequence[str], segmenter: str = "english"):
        if list(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ConfigError(f"vocabulary must start with {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.segmenter_name = segmenter
        self.segmenter = SEGMENTERS.build(segmenter)

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 5, max_size: int = 0,
              segmenter: str = "english") -> "Tokenizer":
        """Vocabulary of tokens seen at least ``min_count`` times (most frequent first)."""
        seg = SEGMENTERS.build(segmenter)
        counts = Counter(tok for t in texts for tok in seg(t))
        words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
        if max_size:
            words = words[: max(0, max_size - len(SPECIALS))]
        return cls(SPECIALS + words, segmenter)

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> List[str]:
        return self.segmenter(text)

    def encode(self, text: str, max_len: int = 0, add_special: bool = True) -> List[int]:
        """Text -> ids, with <bos>/<eos> around when ``add_special``; truncated to ``max_len`` tokens of text."""
        ids = [self.index.get(t, UNK) for t in self.tokenize(text)]
        if max_len:
            ids = ids[:max_len]
        return [BOS] + ids + [EOS] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at <eos> and skipping other specials."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIALS):
                words.append(self.vocab[i])
        return self.segmenter.joiner.join(words)

    def save(self, directory: str | Path) -> None:
        atomic_write(Path(directory) / "vocab.json",
                     json.dumps({"segmenter": self.segmenter_name, "vocab": self.vocab}, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        path = Path(directory) / "vocab.json"
        if not path.is_file():
            raise ConfigError(f"no vocab.json in '{directory}'")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["vocab"], data.get("segmenter", "english"))
