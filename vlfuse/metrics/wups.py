"""WUPS: answers scored by how close they are in WordNet's noun hierarchy, not only by exact match.

WUPS is Malinowski & Fritz's "A multi-world approach to question answering about real-world scenes based on
uncertain input" (NIPS 2014), the DAQUAR benchmark's metric, and COCO-QA's (Ren et al., "Exploring models and
data for image question answering", NIPS 2015). This module restates Malinowski's ``calculate_wups.py`` (its
``wup_measure``, ``fuzzy_set_membership_measure``, ``score_it``, ``get_metric_score``; COCO-QA uses the same
code, Ren's copy only caching word pairs and taking the whole answer as one item):

- an answer is a list of comma-separated items, each stripped of surrounding spaces (``"chair, table"`` is
  [chair, table]; a space does not split, so ``"fire hydrant"`` is one item);
- WUP(a, t) of two items is 1.0 when they are the same string; 0.0 when either has no noun synset
  (``wordnet.synsets(item, pos=NOUN)``, which lower-cases and applies WordNet's morphology: "dogs" -> dog);
  otherwise the largest Wu-Palmer similarity over all pairs of their noun synsets;
- at a threshold th, an item pair scores WUP if WUP >= th, else 0.1 * WUP (so WUPS 0.0 is WUP itself);
- the score of prediction P against reference T is
  min(prod_{t in T} max_{p in P} s(t, p), prod_{p in P} max_{t in T} s(p, t));
- WUPS@th of a set is the mean of the scores over its questions. WUPS 0.9 and WUPS 0.0 are the reported pair.

WordNet comes from disk, never from a download: Debian's ``wordnet-base`` (/usr/share/wordnet, WordNet 3.0) read
by NLTK's ``WordNetCorpusReader``, or any folder of WordNet 3.0 dictionary files (NLTK's own ``corpora/wordnet``
included). Debian leaves out the ``lexnames`` file NLTK reads first, and NLTK 3.10 refuses files reached through a
symbolic link out of the folder it reads and hard-linked files alike, so for such a folder a copy with
``lexnames`` is made once in a cache folder (~28 MB). Similarities with NLTK 3.10 and WordNet 3.0:
dog/cat 0.857, so WUPS 0.9 scores "cat" for "dog" 0.0857 and WUPS 0.0 scores it 0.857.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

from ..errors import DataError

DEBIAN_WORDNET = Path("/usr/share/wordnet")           # where Debian's wordnet-base puts WordNet 3.0
DEFAULT_CACHE_DIR = Path("~/.cache/vlfuse/wordnet")   # where a folder completed with lexnames is kept
INSTALL_HINT = ("install WordNet with `apt-get install wordnet-base` (scripts/install_system.sh does) and NLTK "
                "with `pip install nltk` (in vlfuse[train]), or give the folder of a WordNet 3.0 dictionary "
                "(the command line reads $VLFUSE_WORDNET)")
BELOW_THRESHOLD_WEIGHT = 0.1  # Malinowski's down-weighting of a similarity below the threshold

POS_NAMES = ("noun", "verb", "adj", "adv")
# the files NLTK opens when it starts; the data.* of other parts of speech are opened on use
REQUIRED_FILES = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in POS_NAMES) + tuple(
    f"{pos}.exc" for pos in POS_NAMES)
OPTIONAL_FILES = ("cntlist.rev", "index.sense")  # word frequencies and sense keys: copied where they exist

# WordNet 3.0's lexicographer files, numbered as in its lexnames(5WN) manual page; the third column of the
# ``lexnames`` file is the syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def lexnames_text() -> str:
    """The ``lexnames`` file of WordNet 3.0: ``NN<tab>name<tab>category`` per line."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def answer_items(answer: str) -> List[str]:
    """An answer's items as WUPS compares them: split at commas, each stripped (Malinowski's ``items2list``)."""
    return [item.strip() for item in answer.split(",")]


class Wups:
    """WUPS scores over a WordNet (an NLTK ``WordNetCorpusReader``); item similarities are cached, as answers
    repeat. Build it with ``Wups.from_wordnet()``.

    >>> wups = Wups.from_wordnet()
    >>> wups.score("cat", "dog", threshold=0.0), wups.score("cat", "dog", threshold=0.9)
    (0.857..., 0.0857...)
    """

    def __init__(self, wordnet):
        self.wordnet = wordnet
        self._synsets: Dict[str, list] = {}
        self._similarity: Dict[Tuple[str, str], float] = {}

    @classmethod
    def from_wordnet(cls, root: Union[str, Path, None] = None,
                     cache_dir: Union[str, Path, None] = None) -> "Wups":
        """WUPS over the WordNet in folder ``root`` (None: Debian's /usr/share/wordnet). A folder without NLTK's
        ``lexnames`` file is completed in a copy under ``cache_dir`` (None: ~/.cache/vlfuse/wordnet), made once.
        Raises ``DataError`` saying what to install where NLTK or the WordNet files are missing."""
        return cls(open_wordnet(root, cache_dir))

    def similarity(self, a: str, b: str) -> float:
        """WUP(a, b) of two items: 1.0 if they are the same string, 0.0 if either has no noun synset, else the
        largest Wu-Palmer similarity over pairs of their noun synsets."""
        if a == b:
            return 1.0
        key = (a, b)
        if key not in self._similarity:
            pairs = ((x, y) for x in self._noun_synsets(a) for y in self._noun_synsets(b))
            self._similarity[key] = max((x.wup_similarity(y) or 0.0 for x, y in pairs), default=0.0)
        return self._similarity[key]

    def item_score(self, a: str, b: str, threshold: float) -> float:
        """WUP(a, b), times 0.1 where it is below ``threshold``."""
        sim = self.similarity(a, b)
        return sim if sim >= threshold else BELOW_THRESHOLD_WEIGHT * sim

    def score(self, prediction: str, reference: str, threshold: float = 0.9) -> float:
        """WUPS@``threshold`` of one answer: identical answers score 1.0; multi-item answers (comma-separated)
        score min(prod over reference items of their best match among the prediction's, and the reverse)."""
        truth, predicted = answer_items(reference), answer_items(prediction)
        left = math.prod(max(self.item_score(t, p, threshold) for p in predicted) for t in truth)
        right = math.prod(max(self.item_score(p, t, threshold) for t in truth) for p in predicted)
        return min(left, right)

    def mean(self, predictions: Sequence[str], references: Sequence[str], threshold: float = 0.9) -> float:
        """WUPS@``threshold`` of a set: the mean score of each prediction against its one reference answer."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not len(predictions):
            return 0.0
        return sum(self.score(p, r, threshold) for p, r in zip(predictions, references)) / len(predictions)

    def _noun_synsets(self, item: str) -> list:
        if item not in self._synsets:
            self._synsets[item] = self.wordnet.synsets(item, pos="n")
        return self._synsets[item]


def open_wordnet(root: Union[str, Path, None] = None, cache_dir: Union[str, Path, None] = None):
    """NLTK's reader of the WordNet in ``root`` (see ``Wups.from_wordnet``)."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as exc:
        raise DataError(f"WUPS needs NLTK, which is not installed ({exc}): {INSTALL_HINT}") from exc
    folder = Path(DEBIAN_WORDNET if root is None else root).expanduser()
    if not folder.is_dir():
        raise DataError(f"no WordNet folder {folder}: {INSTALL_HINT}")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"no WordNet dictionary in {folder} (missing {', '.join(missing)}): {INSTALL_HINT}")
    if not (folder / "lexnames").is_file():
        folder = completed_folder(folder, cache_dir)

    class OfflineWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # NLTK maps every WordNet but its own downloaded "wordnet" corpus onto that one, for the Open
            # Multilingual WordNet only; WUPS is English, and the download is what this reader does without
            return None

    # NLTK opens only files under the folders of its data path
    resolved = str(folder.resolve())
    if resolved not in nltk.data.path:
        nltk.data.path.append(resolved)
    try:
        with warnings.catch_warnings():  # "multilingual functions are not available": none are used
            warnings.simplefilter("ignore", UserWarning)
            return OfflineWordNet(resolved, None)
    except (OSError, ValueError, LookupError, AssertionError) as exc:
        raise DataError(f"NLTK could not read the WordNet in {folder} ({exc}): {INSTALL_HINT}") from exc


def completed_folder(source: Path, cache_dir: Union[str, Path, None] = None) -> Path:
    """A folder holding ``source``'s WordNet files and a ``lexnames`` file, under ``cache_dir`` (None:
    ~/.cache/vlfuse/wordnet), built once. Its name hashes the source's path and its files' sizes and times, so a
    changed source gets a new folder, never a stale one."""
    try:
        cache = Path(DEFAULT_CACHE_DIR if cache_dir is None else cache_dir).expanduser()
    except RuntimeError as exc:  # no home directory to be found
        raise DataError(f"no folder to complete the WordNet in {source} in ({exc}): give a cache folder") from exc
    names = [n for n in REQUIRED_FILES + OPTIONAL_FILES if (source / n).is_file()]
    target = cache / f"wordnet-{_files_key(source, names)}"
    if (target / "lexnames").is_file():
        return target
    building = cache / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    try:
        building.mkdir(parents=True)
        for name in names:
            shutil.copyfile(source / name, building / name)
        (building / "lexnames").write_text(lexnames_text(), encoding="utf-8")
        try:  # in one step: another process building the same folder at once leaves one whole folder
            building.rename(target)
        except OSError:
            if not (target / "lexnames").is_file():
                raise
    except OSError as exc:
        raise DataError(f"could not complete the WordNet in {source} with lexnames under {cache} ({exc}): "
                        "give a writable cache folder") from exc
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _files_key(source: Path, names: Sequence[str]) -> str:
    h = hashlib.sha1(str(source.resolve()).encode())
    for name in names:
        st = (source / name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]

