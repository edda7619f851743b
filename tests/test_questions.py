"""Questions made from captions (vlfuse.data.questions, `vlfuse data make-qa`): each type from hand-written
captions, yes/no negatives from other images, filters, determinism, the JSONL read back, bad inputs."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from vlfuse.cli.main import main
from vlfuse.data.captions import CaptionSet
from vlfuse.data.vqa import read_jsonl
from vlfuse.errors import DataError

from vlfuse.data import questions

NLP = questions.load_english()  # spaCy and its English pipeline are in vlfuse[all]: missing, these tests fail


def asked(caption: str, qtype: str):
    """(question, answer) pairs of one type that a caption gives."""
    return [(q.question, q.answer) for q in questions.caption_questions(NLP(caption)) if q.qtype == qtype]


def test_object_questions_ask_for_the_object_and_the_subject():
    assert ("what is the man riding?", "horse") in asked("A man is riding a horse .", "object")
    assert ("what is the man riding?", "horse") in asked("A man rides a horse .", "object")  # "rides" -> "riding"
    assert ("what is running through the snow?", "dog") in asked("A dog runs through the snow .", "object")
    assert ("who is riding the horse?", "man") in asked("A man is riding a horse .", "object")
    # a plural subject is not asked for ("what are playing ...?"), and "is" is no action
    assert asked("Two dogs play in the snow .", "object") == []
    assert asked("The dog is brown .", "object") == []


def test_number_questions_count_two_to_ten_in_words():
    assert asked("Two dogs play in the snow .", "number") == [("how many dogs are playing in the snow?", "two")]
    assert asked("Three children are in the pool .", "number") == [("how many children are in the pool?", "three")]
    assert asked("4 boys stand .", "number") == [("how many boys are standing?", "four")]
    assert asked("One dog runs in the snow .", "number") == []  # COCO-QA counts 2-10
    assert asked("A dog runs in the snow .", "number") == []


def test_color_questions_take_one_basic_colour_of_a_noun():
    assert asked("A black dog runs through the grass .", "color") == [("what color is the dog?", "black")]
    assert asked("Two brown dogs play .", "color") == [("what color are the dogs?", "brown")]
    assert ("what color is the shirt?", "red") in asked("A man in a red shirt is climbing a rock .", "color")
    assert asked("A black and white dog runs .", "color") == []  # two colours: no single answer
    assert asked("A big dog runs .", "color") == []


def test_location_questions_answer_with_the_place():
    assert asked("A girl is sitting on a bench .", "location") == [("where is the girl sitting?", "bench")]
    assert asked("Two dogs play in the snow .", "location") == [("where are the dogs playing?", "snow")]
    assert asked("A girl on a bench .", "location") == [("where is the girl?", "bench")]
    assert asked("A man in a red shirt .", "location") == []  # clothes are no place
    assert asked("A dog with a ball in its mouth .", "location") == []  # nor body parts


def flickr_folder(tmp_path, captions: dict, split: str = "train"):
    """A Flickr-layout folder: tiny PNGs, captions.txt and <split>.txt."""
    root = tmp_path / "flickr"
    (root / "images").mkdir(parents=True)
    lines = []
    for k, (name, caps) in enumerate(captions.items()):
        Image.new("RGB", (8, 8), (k * 40 % 256, 90, 160)).save(root / "images" / name)
        lines += [f"{name}\t{c}" for c in caps]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / f"{split}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return root


CAPTIONS = {
    "dog.png": ["A black dog runs through the snow .", "Two dogs play in the snow .", "A dog is running in the snow .",
                "A black dog is running through the snow .", "The dogs are playing in the snow ."],
    "horse.png": ["A man is riding a horse .", "A man rides a brown horse on the beach .",
                  "A person is riding a horse on the sand .", "A man riding a horse .", "A horse on the beach ."],
    "bench.png": ["A girl is sitting on a bench .", "A girl sits on a wooden bench in the park .",
                  "A little girl is sitting on a bench .", "A girl holding a ball sits on a bench .",
                  "A child on a bench ."],
    "ball.png": ["A boy kicks a red ball on the grass .", "A boy is kicking a ball .", "A boy plays with a ball .",
                 "A boy kicks a red ball .", "A child kicks a ball on the grass ."],
}


def caption_set(captions=CAPTIONS) -> CaptionSet:
    return CaptionSet([f"/imgs/{name}" for name in captions], [list(c) for c in captions.values()])


def test_yes_no_is_balanced_and_no_names_a_thing_of_another_image_never_mentioned_here():
    data = caption_set()
    result = questions.generate_questions(data, NLP, seed=0, min_answer_count=1)
    yes_no = [it for it in result.items if it.qtype == "yes/no"]
    answers = [it.answer for it in yes_no]
    assert answers.count("yes") == answers.count("no") > 0
    mentioned = [" ".join(caps).lower() for caps in data.captions]
    for it in yes_no:
        thing = it.question.split(" in the picture?")[0].split()[-1]
        if it.answer == "yes":
            assert thing in mentioned[it.image] and thing in it.caption.lower()
        else:
            assert thing not in mentioned[it.image]  # by lemma and by surface form
            assert any(thing in m for j, m in enumerate(mentioned) if j != it.image)  # another image's thing
            assert it.caption == ""


def test_duplicates_are_merged_and_answers_are_majority_votes():
    result = questions.generate_questions(caption_set(), NLP, seed=0, min_answer_count=1, max_answer_share={})
    pairs = [(it.image, it.question) for it in result.items]
    assert len(pairs) == len(set(pairs))
    by_question = {(it.image, it.question): it.answer for it in result.items}
    # four captions ask "where is the girl sitting?", all answer bench
    assert by_question[(2, "where is the girl sitting?")] == "bench"
    assert by_question[(0, "what color is the dog?")] == "black"
    assert by_question[(0, "how many dogs are playing in the snow?")] == "two"


def test_rare_answers_are_dropped_by_count_over_the_split():
    data = caption_set()
    everything = questions.generate_questions(data, NLP, seed=0, min_answer_count=1, max_answer_share={})
    counts = {}
    for it in everything.items:
        counts[(it.qtype, it.answer)] = counts.get((it.qtype, it.answer), 0) + 1
    filtered = questions.generate_questions(data, NLP, seed=0, min_answer_count=2, max_answer_share={})
    kept = {(it.qtype, it.answer) for it in filtered.items if it.qtype != "yes/no"}
    assert kept and all(counts[key] >= 2 for key in kept)
    assert any(n == 1 for key, n in counts.items() if key[0] != "yes/no")  # there was something to drop
    assert sum(filtered.dropped["rare"].values()) > 0
    assert questions.default_min_answer_count(30_000) == 5 and questions.default_min_answer_count(400) == 1


def test_over_common_answers_are_downsampled_to_their_share():
    data = caption_set()
    share = {"object": 0.2, "location": 0.5}
    result = questions.generate_questions(data, NLP, seed=0, min_answer_count=1, max_answer_share=share)
    for qtype, most in share.items():
        answers = [it.answer for it in result.items if it.qtype == qtype]
        assert answers and max(answers.count(a) for a in answers) <= most * len(answers)
    assert sum(result.dropped["capped"].values()) > 0


def test_answer_share_cap():
    # 10 answers of counts 50, 5 x 9: at most 25 % each -> the big one keeps c with c <= 0.25 (c + 45)
    cap = questions._cap([50] + [5] * 9, 0.25)
    assert cap == 15 and cap <= 0.25 * (cap + 45)
    assert questions._cap([3, 3, 3, 3], 0.5) == 3  # nothing to cap


def test_cli_writes_a_jsonl_that_read_jsonl_reads_from_anywhere(tmp_path, monkeypatch, capsys):
    root = flickr_folder(tmp_path, CAPTIONS)
    out = tmp_path / "sets" / "qa" / "train.jsonl"
    argv = ["data", "make-qa", "--data", str(root), "--split", "train", "--out", str(out), "--min-answer-count", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "object" in printed and "yes/no" in printed and "total" in printed
    first = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == first  # same input, same seed: the same file
    other = tmp_path / "seed1.jsonl"
    assert main(argv[:-4] + ["--out", str(other), "--seed", "1", "--min-answer-count", "1"]) == 0
    assert other.read_bytes() != first  # another seed draws other negatives and keeps other capped questions
    records = [json.loads(line) for line in first.decode().splitlines()]
    assert {r["type"] for r in records} == {"object", "number", "color", "location", "yes/no"}
    assert all(not os.path.isabs(r["image"]) and r["answer"] == r["answer"].lower() for r in records)
    assert all(set(r) == {"image", "question", "answer", "type", "caption"} for r in records)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = read_jsonl(out)
    assert len(data) == len(records) and not data.skipped
    assert sorted(os.path.basename(p) for p in data.images) == sorted(CAPTIONS)
    assert [q.qtype for q in data.questions] == [r["type"] for r in records]
    assert data.questions[0].answers == [records[0]["answer"]]


def test_read_jsonl_type_is_optional_and_checked(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "q.jsonl").write_text(
        '{"image": "a.png", "question": "what?", "answer": "dog"}\n'
        '{"image": "a.png", "question": "what?", "answer": "dog", "type": "object"}\n'
        '{"image": "a.png", "question": "what?", "answer": "dog", "type": ""}\n'
        '{"image": "a.png", "question": "what?", "answer": "dog", "type": 3}\n')
    data = read_jsonl(tmp_path / "q.jsonl")
    assert [q.qtype for q in data.questions] == ["", "object"]
    assert [s.split(":")[0] for s in data.skipped] == ["line 3", "line 4"]
    assert all("'type' must be a non-empty string" in s for s in data.skipped)


@pytest.mark.parametrize("case", ["missing folder", "unknown split", "no captions file", "bad count"])
def test_cli_bad_inputs_are_clear_errors(tmp_path, capsys, case):
    root = flickr_folder(tmp_path, {"a.png": ["A dog runs ."]})
    data, split, extra = str(root), "train", []
    if case == "missing folder":
        data = str(tmp_path / "nowhere")
    elif case == "unknown split":
        split = "test"
    elif case == "no captions file":
        (root / "captions.txt").unlink()
    else:
        extra = ["--min-answer-count", "0"]
    status = main(["data", "make-qa", "--data", data, "--split", split, "--out", str(tmp_path / "o.jsonl")] + extra)
    err = capsys.readouterr().err
    assert status == 2 and not (tmp_path / "o.jsonl").exists()
    expected = {"missing folder": "does not exist", "unknown split": "no split file test.txt (available splits: train)",
                "no captions file": "not in a known caption layout", "bad count": "--min-answer-count must be at least 1"}
    assert expected[case] in err


def test_a_caption_spacy_fails_on_is_skipped(monkeypatch):
    class Flaky:
        """Fails on one caption, in a batch and alone."""

        def pipe(self, texts, batch_size):
            return [self(t) for t in texts]

        def __call__(self, text):
            if "boom" in text:
                raise ValueError("cannot parse")
            return NLP(text)

    data = CaptionSet(["/i/a.png", "/i/b.png"], [["boom", "A man is riding a horse ."], ["A dog runs in the snow ."]])
    result = questions.generate_questions(data, Flaky(), min_answer_count=1)
    assert result.skipped_captions == 1
    assert any(it.question == "what is the man riding?" for it in result.items)


def test_missing_spacy_names_the_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_spacy(name, *args, **kwargs):
        if name == "spacy":
            raise ImportError("no spacy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spacy)
    with pytest.raises(DataError, match=r'pip install "vlfuse\[qa\]"'):
        questions.load_english()


def test_unknown_pipeline_names_the_pip_command():
    with pytest.raises(DataError, match=r'no spaCy English pipeline.*pip install "vlfuse\[qa\]"'):
        questions.load_english("en_core_web_nonexistent")


def test_ing_forms():
    class Tok:
        def __init__(self, text, tag, lemma=""):
            self.text, self.tag_, self.lemma_ = text, tag, lemma or text

    cases = [("runs", "VBZ", "running"), ("rides", "VBZ", "riding"), ("lies", "VBZ", "lying"), ("sits", "VBZ", "sitting"),
             ("catches", "VBZ", "catching"), ("carries", "VBZ", "carrying"), ("play", "VBP", "playing"),
             ("swim", "VBP", "swimming"), ("jumping", "VBG", "jumping"), ("climbs", "VBZ", "climbing"),
             ("goes", "VBZ", "going"), ("visit", "VB", "visiting")]
    assert [questions.ing_form(Tok(t, tag)) for t, tag, _ in cases] == [want for _, _, want in cases]
    assert questions.ing_form(Tok("rode", "VBD", "ride")) == "riding"


def test_read_vqa_makes_the_questions_of_a_captioned_folder(tmp_path):
    """`vlfuse train` / `evaluate` given a Flickr-layout folder: the same questions make-qa writes, no file."""
    from vlfuse.data.vqa import read_vqa

    root = flickr_folder(tmp_path, CAPTIONS)
    out = tmp_path / "qa.jsonl"
    assert main(["data", "make-qa", "--data", str(root), "--split", "train", "--out", str(out)]) == 0
    written, made = read_jsonl(out), read_vqa(str(root), "train")
    assert made.name == "flickr/train" and len(made) == len(written) > 0
    pairs = lambda d: sorted((os.path.basename(d.images[q.image]), q.question, q.answers[0], q.qtype)  # noqa: E731
                             for q in d.questions)
    assert pairs(made) == pairs(written)
