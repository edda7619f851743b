"""Caption metrics from pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr), on pycocoevalcap's own scale.

SPICE needs a model download that is impossible offline; it is reported as unavailable instead of crashing.
METEOR and the PTB tokenizer need Java; without it they are reported unavailable too.
Captions in another language than English are split into words by that language's segmenter (Chinese: jieba),
hypotheses and references alike, and scored on those words; METEOR does not apply to them (METEOR_NOT_APPLICABLE).
"""
from __future__ import annotations

import re
import shutil
from typing import Dict, List, Sequence

from ..data.languages import language
from ..data.tokenizer import SEGMENTERS  # (importing the tokenizer registers the segmenters)

ALL_METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")
# why METEOR is not reported for captions in other languages (pycocoevalcap's METEOR 1.5 is its English setting)
METEOR_NOT_APPLICABLE = ("not applicable: METEOR matches words through English stemming, WordNet synonyms and "
                         "English paraphrase tables; pycocoevalcap's METEOR has no {name} resources")


def _simple_tokenize(captions: Dict[str, List[str]]) -> Dict[str, List[str]]:
    return {k: [" ".join(re.findall(r"[a-z0-9]+", c.lower())) for c in v] for k, v in captions.items()}


def _ptb_tokenize(captions: Dict[str, List[str]]) -> Dict[str, List[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def _segment(captions: Dict[str, List[str]], segmenter) -> Dict[str, List[str]]:
    return {k: [" ".join(segmenter(c)) for c in v] for k, v in captions.items()}


def score_captions(references: Dict[str, List[str]], hypotheses: Dict[str, str],
                   metrics: Sequence[str] = ALL_METRICS, tokenizer: str = "ptb", lang: str = "en"
                   ) -> Dict[str, object]:
    """Corpus-level scores of one hypothesis per image against its references.

    English (``lang='en'``): ``tokenizer='ptb'`` is the standard COCO evaluation (Java); ``'simple'`` lower-cases
    and keeps alphanumeric words (fast, used for per-epoch validation). Any other language: the captions are split
    by the language's segmenter (``tokenizer`` does not apply) and METEOR is reported as not applicable.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = [k for k in hypotheses if k in references]
    refs = {k: references[k] for k in keys}
    hyps = {k: [hypotheses[k]] for k in keys}
    have_java = shutil.which("java") is not None
    unavailable = {"SPICE": "unavailable: SPICE needs a Stanford CoreNLP download, impossible offline"}
    captions_language = language(lang)
    if lang != "en":
        segmenter = SEGMENTERS.build(captions_language.segmenter)
        refs, hyps = _segment(refs, segmenter), _segment(hyps, segmenter)
        if "METEOR" in metrics:
            unavailable["METEOR"] = METEOR_NOT_APPLICABLE.format(name=captions_language.name)
            metrics = [m for m in metrics if m != "METEOR"]
    elif tokenizer == "ptb" and have_java:
        refs, hyps = _ptb_tokenize(refs), _ptb_tokenize(hyps)
    else:
        refs, hyps = _simple_tokenize(refs), _simple_tokenize(hyps)
    out: Dict[str, object] = {}
    if "BLEU" in metrics:
        bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
        out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
    if "METEOR" in metrics:
        if have_java:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            out["METEOR"] = float(meteor.compute_score(refs, hyps)[0])
            del meteor
        else:
            unavailable["METEOR"] = "unavailable: METEOR needs Java (apt-get install default-jre-headless)"
    if "ROUGE-L" in metrics:
        out["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
    if "CIDEr" in metrics:
        out["CIDEr"] = float(Cider().compute_score(refs, hyps)[0])
    out["images"] = len(keys)
    out["unavailable"] = unavailable
    return out
