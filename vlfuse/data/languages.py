"""The caption languages vlfuse knows: where a Flickr-layout folder keeps each one's captions, how its text splits
into words (vocabularies, rewards and metrics all split it this way), and how its captions are cleaned."""
from __future__ import annotations

import dataclasses
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
