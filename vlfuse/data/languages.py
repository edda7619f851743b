"""The caption languages vlfuse knows: where a Flickr-layout folder keeps each one's captions, how its text splits
into words (vocabularies, rewards and metrics all split it this way), and how its captions are cleaned."""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Language:
    code: str
    name: str
    captions_file: str     # the captions file of a Flickr-layout folder (captions.txt, captions_zh.txt)
    segmenter: str         # the registered segmenter its words come from (``vlfuse.registry.SEGMENTERS``)
    # drop a caption that repeats another of the same photo: Flickr8k-CN repeats short captions (看电视的人。 twice
    # for one photo; 1,711 of its 35,455 captions), which would weigh twice in training and in CIDEr's reference mean
    drop_repeated: bool = False


LANGUAGES: Dict[str, Language] = {
    "en": Language("en", "English", "captions.txt", "english"),
    "zh": Language("zh", "Chinese", "captions_zh.txt", "jieba", drop_repeated=True),
}


def language(code: str) -> Language:
    """The language of ``code`` ('en', 'zh'); any other code is a ConfigError naming the ones there are."""
    if code not in LANGUAGES:
        raise ConfigError(f"unknown language {code!r}; vlfuse knows {', '.join(LANGUAGES)}")
    return LANGUAGES[code]


def parse_languages(codes: str) -> List[str]:
    """'en,zh' -> ['en', 'zh'] (each checked, repeats dropped); empty -> ConfigError."""
    out: List[str] = []
    for code in (c.strip() for c in codes.split(",")):
        if code and language(code).code not in out:
            out.append(code)
    if not out:
        raise ConfigError(f"no language in {codes!r}; give one or more of {', '.join(LANGUAGES)}, comma-separated")
    return out


# Han characters (the unified block, extension A, the compatibility block) and Latin words
_HAN_CHARACTER = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile("[A-Za-z]+")


def detect_language(text: str) -> str:
    """The language a query is written in, told by its script: 'zh' when it has more Han characters than Latin
    words ('两只狗在雪地里玩', 'a dog 在草地上跑'), else 'en' ('a dog', 'a 狗', digits, emoji). A Chinese word is
    one to three characters, so a mixed query goes to the language it has more of."""
    han = len(_HAN_CHARACTER.findall(text))
    return "zh" if han and han > len(_LATIN_WORD.findall(text)) else "en"
