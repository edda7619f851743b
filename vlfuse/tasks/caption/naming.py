"""How a caption model's training captions name the concepts an ImageNet classifier sees in their photos, and so
which words a caption must include to name a photo's concept (issue 20).

The consensus reranking can make a caption name its photo's confident concepts (``CaptionDecodeConfig.name_concepts``:
constrained beam search, Anderson et al. 2017, over the caption model's vocabulary). The concepts come from the
ImageNet classifier of the retrieval model's frozen backbone (``vlfuse.nn.concepts``), each with its caption word
("Yorkshire terrier" -> terrier). But the word a class is named by is not always the word captions use for such a
photo: the Flickr8k training photos the classifier calls "terrier" are captioned "dog" (1 % of their captions say
terrier, 73 % dog, 20 % dogs), and some concepts are rarely named at all (7 % of the captions of photos called "ski"
say ski; "snow", "skier", "skiing" are more common). So the words that name a concept are measured on the caption
model's own training photos and captions (``measure_naming``; ``vlfuse memory`` saves the table beside the caption
memory as ``concept_naming.json``):

* a concept word the classifier gives at least ``threshold`` on at least ``min_photos`` training photos is named by
  the concept words (and their plurals) that at least ``share`` of those photos' captions use — possibly none, and
  then a caption is never made to name it;
* a concept seen on fewer photos — an object the captions never learned, a "zebra", a "pizza" — is named by its own
  word or its plural.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ...config import save_json
from ...data.captions import CaptionSet
from ...data.tokenizer import Tokenizer
from ...errors import ConfigError

NAMING_FILE = "concept_naming.json"


def plural(word: str) -> str:
    """The regular English plural of a noun ("dog" -> "dogs", "bus" -> "buses", "puppy" -> "puppies")."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


@dataclasses.dataclass
class ConceptNaming:
    """For each concept word seen often enough on the training photos, the words that name it in their captions
    (``[]``: the captions do not name it); any other concept is named by its own word or its plural."""

    named_by: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    photos: Dict[str, int] = dataclasses.field(default_factory=dict)  # training photos each was measured on
    threshold: float = 0.3   # a photo shows a concept from this probability (vlfuse.nn.concepts.CONCEPT_THRESHOLD)
    min_photos: int = 10     # measured from this many photos; fewer: a novel concept, named by its own word
    share: float = 0.25      # a word names a concept if this share of such photos' captions use it

    def words_for(self, word: str) -> List[str]:
        """The words of which a caption must include one to name concept ``word``."""
        if word in self.named_by:
            return list(self.named_by[word])
        return [word, plural(word)]

    def save(self, directory: Union[str, Path]) -> Path:
        path = Path(directory) / NAMING_FILE
        save_json(dataclasses.asdict(self), path)
        return path

    @classmethod
    def load(cls, directory: Union[str, Path]) -> Optional["ConceptNaming"]:
        """The table saved in ``directory``, or None where there is none."""
        path = Path(directory) / NAMING_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(**raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path} is not a concept naming table ({e}); rebuild it with `vlfuse memory`") from None


def concept_words(words: Sequence[str], probabilities: torch.Tensor) -> List[Dict[str, float]]:
    """Classifier probabilities (B, C) of classes whose caption ``words`` are given -> each image's concepts as
    {caption word: probability}, the classes of one word summed (three elephant classes at 0.58, 0.17 and 0.13 make
    "elephant" 0.88); classes below 0.01 are left out."""
    out = []
    for row in probabilities.float().cpu():
        scores: Dict[str, float] = {}
        for i in (row >= 0.01).nonzero().flatten().tolist():
            scores[words[i]] = scores.get(words[i], 0.0) + float(row[i])
        out.append(scores)
    return out


def measure_naming(concepts: Sequence[Dict[str, float]], captions: Sequence[Sequence[Sequence[str]]],
                   concept_words: Sequence[str], threshold: float = 0.3, min_photos: int = 10,
                   share: float = 0.25) -> ConceptNaming:
    """The naming table of training photos whose concepts are ``concepts`` (per photo, concept word -> its
    probability, classes of one word summed) and whose captions are ``captions`` (per photo, its captions as
    token lists); a concept is named by words of ``concept_words`` and their plurals."""
    if len(concepts) != len(captions):
        raise ConfigError(f"naming needs the concepts and the captions of the same photos, got {len(concepts)} and "
                          f"{len(captions)}")
    known = set(concept_words)
    candidates = known | {plural(c) for c in known}
    photos: Dict[str, int] = Counter()
    used: Dict[str, Counter] = {}  # concept -> how many of its photos' captions use each candidate word
    caption_count: Dict[str, int] = Counter()
    for probs, caps in zip(concepts, captions):
        shown = [w for w, p in probs.items() if p >= threshold]
        if not shown:
            continue
        words_per_caption = [set(c) & candidates for c in caps]
        for w in shown:
            photos[w] += 1
            caption_count[w] += len(caps)
            counts = used.setdefault(w, Counter())
            for words in words_per_caption:
                counts.update(words)
    named_by = {}
    for w, n in photos.items():
        if n < min_photos:
            continue
        named = [v for v, k in used[w].most_common() if k >= share * caption_count[w]]
        named_by[w] = sorted(set(named) | {plural(v) for v in named if v in known})
    return ConceptNaming(named_by, dict(sorted(photos.items())), threshold, min_photos, share)


def naming_of_photos(retriever, data: CaptionSet, tokenizer: Tokenizer, batch_size: int = 32,
                     progress: bool = True) -> ConceptNaming:
    """The naming table of a caption model's training photos and captions ``data`` (tokenised by its
    ``tokenizer``), their concepts from the ImageNet classifier of ``retriever``'s frozen backbone (a
    ``Retriever``; its runtime's copy of the CNN, as the reranker runs it). A photo that fails to load is left
    out."""
    from ..retrieval.concepts import ConceptConfig, build_head, concept_probabilities

    head = build_head(ConceptConfig(), retriever.model.config.vision).to(retriever.device)
    probabilities, kept = concept_probabilities(retriever, head, data.images, batch_size, progress, "concept naming")
    captions = [[tokenizer.tokenize(t) for t in data.captions[i]] for i in kept]
    return measure_naming(concept_words(head.words, probabilities), captions, head.words)
