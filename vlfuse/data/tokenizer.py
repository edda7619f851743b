"""Word-level tokenizer with a pluggable segmenter (``SEGMENTERS``: English words, Chinese words, Chinese characters).

A segmenter is called on text and returns its tokens; ``join(tokens)`` writes tokens back as text.
Special ids are fixed: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import unicodedata
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
    """Lower-cased words and numbers; punctuation dropped. Joined with spaces."""

    _word = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

    def __call__(self, text: str) -> List[str]:
        return self._word.findall(text.lower())

    def join(self, tokens: Sequence[str]) -> str:
        return " ".join(tokens)


# Chinese text: Han characters of the unified block, extension A and the compatibility block; Latin words and numbers
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAN_OR_LATIN = re.compile(f"[{_HAN}]+|[a-z0-9]+")
_LATIN_END = re.compile(r"[a-z0-9]$")


_T2S = None  # OpenCC's traditional -> simplified converter, made on first use
_T2S_LOCK = threading.Lock()


def _simplified(text: str) -> str:
    """Traditional characters written as simplified ones (OpenCC's 't2s' tables: 兩隻狗 -> 两只狗); simplified text
    is unchanged. Vocabularies are built from simplified captions, so without it a traditional query would be
    mostly unknown words."""
    global _T2S
    if _T2S is None:
        with _T2S_LOCK:
            if _T2S is None:
                try:
                    import opencc
                except ImportError:
                    raise ConfigError("Chinese text needs OpenCC to read traditional characters: pip install opencc "
                                      "(or pip install 'vlfuse[zh]')") from None
                _T2S = opencc.OpenCC("t2s")
    return _T2S.convert(text)


def _chinese_text(text: str) -> str:
    """NFKC (full-width Latin letters and digits become ASCII ones), lower-cased, traditional characters as
    simplified ones."""
    return _simplified(unicodedata.normalize("NFKC", text).lower())


def _join_chinese(tokens: Sequence[str]) -> str:
    """Chinese is written without spaces; two Latin words or numbers in a row keep one between them."""
    out: List[str] = []
    for tok in tokens:
        if out and _LATIN_END.search(out[-1]) and tok[:1].isascii() and tok[:1].isalnum():
            out.append(" ")
        out.append(tok)
    return "".join(out)


@SEGMENTERS.register("chinese-char")
class ChineseCharSegmenter:
    """One token per Chinese character (Latin words and numbers kept whole); punctuation dropped."""

    _token = re.compile(f"[{_HAN}]|[a-z0-9]+")

    def __call__(self, text: str) -> List[str]:
        return self._token.findall(_chinese_text(text))

    def join(self, tokens: Sequence[str]) -> str:
        return _join_chinese(tokens)


@SEGMENTERS.register("jieba")
class JiebaSegmenter:
    """Chinese words by jieba's bundled dictionary (as Flickr8k-CN's authors split them); Latin words kept whole.

    Latin words and numbers are lower-cased; punctuation, emoji, symbols and spaces are dropped.

    Deterministic and offline: the dictionary ships inside the ``jieba`` package, and its HMM guesser of unknown words
    is off, so every token is a dictionary word or a single character (a guess such as 裡玩 would only add rare
    words to a vocabulary). Traditional characters are read as simplified ones (OpenCC). One private
    ``jieba.Tokenizer`` per segmenter, loaded on first use (~1 s, cached by jieba in the temporary folder)."""

    _lock = threading.Lock()

    def __init__(self):
        try:
            import jieba
        except ImportError:
            raise ConfigError("the 'jieba' segmenter needs the jieba package: pip install jieba "
                              "(or pip install 'vlfuse[zh]')") from None
        jieba.setLogLevel(logging.WARNING)  # its dictionary loader logs at DEBUG to stderr by default
        self._jieba = jieba.Tokenizer()
        self._ready = False

    def __call__(self, text: str) -> List[str]:
        if not self._ready:
            with self._lock:  # the dictionary loads once, even when threads segment at once
                self._jieba.initialize()
                self._ready = True
        words = self._jieba.lcut(_chinese_text(text), HMM=False)
        return [piece for word in words for piece in _HAN_OR_LATIN.findall(word)]

    def join(self, tokens: Sequence[str]) -> str:
        return _join_chinese(tokens)


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
        return self.segmenter.join(words)

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
