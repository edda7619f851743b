"""Caption dataset readers: Flickr layout, Karpathy JSON, COCO JSON, CSV and JSONL; detection; bad rows."""
import json

import pytest

from vlfuse.data.captions import detect_format, read_captions
from vlfuse.errors import ConfigError, DataError


def karpathy_file(tmp_path, with_filepath=True):
    images = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        im = {"filename": f"im{i}.jpg", "split": split,
              "sentences": [{"raw": f"A photo number {i}.", "tokens": []}, {"raw": f"Picture {i} here"}]}
        if with_filepath:
            im["filepath"] = "val2014" if split != "train" else "train2014"
        images.append(im)
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_splits_and_paths(tmp_path):
    path = karpathy_file(tmp_path)
    assert detect_format(path) == "karpathy"
    train = read_captions(path, split="train")  # train includes restval
    assert [p.name for p in train.images] == ["im0.jpg", "im1.jpg"]
    assert train.images[0] == tmp_path / "train2014" / "im0.jpg"
    assert train.images[1] == tmp_path / "val2014" / "im1.jpg"
    assert train.captions[0] == ["A photo number 0.", "Picture 0 here"]
    assert [p.name for p in read_captions(path, split="restval").images] == ["im1.jpg"]
    assert [p.name for p in read_captions(path, split="val").images] == ["im2.jpg"]
    assert [p.name for p in read_captions(path, split="test").images] == ["im3.jpg"]
    assert len(read_captions(path, split="all")) == 4
    # a directory holding one dataset_*.json is detected too; image_root overrides the folder
    assert len(read_captions(tmp_path, split="val")) == 1
    other = read_captions(path, split="val", image_root=str(tmp_path / "imgs"))
    assert other.images[0] == tmp_path / "imgs" / "val2014" / "im2.jpg"


def test_karpathy_errors(tmp_path):
    path = karpathy_file(tmp_path, with_filepath=False)
    with pytest.raises(DataError, match="no images in split 'dev'.*restval, test, train, val"):
        read_captions(path, split="dev")
    data = json.loads(path.read_text())
    del data["images"][2]["sentences"][1]["raw"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dataset_coco.json: images\[2\].sentences\[1\]: missing 'raw'"):
        read_captions(path, split="val")


def coco_file(tmp_path, name="captions_val2014.json"):
    data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "id": 1, "caption": "a cat"}, {"image_id": 9, "id": 2, "caption": "a dog"},
                            {"image_id": 7, "id": 3, "caption": "a cat on a mat "}]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_coco_reader(tmp_path):
    path = coco_file(tmp_path)
    assert detect_format(path) == "coco"
    data = read_captions(path, split="val")  # the file is named after its split
    assert data.images == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    assert data.captions == [["a cat", "a cat on a mat"], ["a dog"]]
    rooted = read_captions(path, split="all", image_root=str(tmp_path / "val2014"))
    assert rooted.images[1] == tmp_path / "val2014" / "b.jpg"
    # a single-split file cannot silently stand in for another split
    with pytest.raises(DataError, match="no split information.*split 'train'"):
        read_captions(path, split="train")


def test_coco_bad_annotation(tmp_path):
    path = coco_file(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"].append({"image_id": 123, "caption": "ghost"})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[3\]: image_id 123 is not in 'images'"):
        read_captions(path, split="all")
    path.write_text('{"images": [], "annotations": [\n  {"image_id": 1,}\n]}')
    with pytest.raises(DataError, match=r"captions_val2014.json:2: invalid JSON"):
        read_captions(path, split="all", fmt="coco")


def test_csv_and_jsonl(tmp_path):
    (tmp_path / "photos").mkdir()
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('image,caption\nphotos/a.jpg,"A dog, running."\nphotos/a.jpg,a brown dog\nphotos/b.jpg,a cat\n')
    assert detect_format(csv_path) == "csv"
    data = read_captions(csv_path, split="train")
    assert data.images == [tmp_path / "photos" / "a.jpg", tmp_path / "photos" / "b.jpg"]
    assert data.captions == [["A dog, running.", "a brown dog"], ["a cat"]]
    jl = tmp_path / "val.jsonl"
    jl.write_text('{"image": "photos/c.jpg", "caption": "a bird"}\n\n{"image": "photos/c.jpg", "caption": "x"}\n')
    assert detect_format(jl) == "jsonl"
    assert read_captions(jl, split="val").captions == [["a bird", "x"]]
    # a directory of <split>.csv / <split>.jsonl files picks the split's file
    assert read_captions(tmp_path, split="train").captions[1] == ["a cat"]
    assert read_captions(tmp_path, split="val").images == [tmp_path / "photos" / "c.jpg"]


def test_split_column(tmp_path):
    path = tmp_path / "all.jsonl"
    rows = [{"image": "a.jpg", "caption": "one", "split": "train"}, {"image": "b.jpg", "caption": "two", "split": "val"},
            {"image": "c.jpg", "caption": "three", "split": "restval"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [p.name for p in read_captions(path, split="train").images] == ["a.jpg", "c.jpg"]
    assert [p.name for p in read_captions(path, split="val").images] == ["b.jpg"]


@pytest.mark.parametrize("text,match", [
    ("image,caption\na.jpg,fine\nb.jpg\n", r"bad.csv:3: expected 2 fields"),
    ("image,caption\na.jpg,fine\nb.jpg,\n", r"bad.csv:3: missing or empty 'caption'"),
    ("img,caption\na.jpg,x\n", r"bad.csv:1: header must name the columns 'image' and 'caption'"),
])
def test_malformed_csv_names_file_and_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_captions(path, split="all")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg" "caption": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_captions(path, split="all")
    path.write_text('{"image": "a.jpg", "caption": "ok"}\n\n{"caption": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: missing or empty 'image'"):
        read_captions(path, split="all")


def test_flickr_layout_and_detection(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.txt").write_text("a.jpg#0\tA dog.\na.jpg#1\tA dog runs.\nb.jpg\tA cat.\n")
    (tmp_path / "train.txt").write_text("a.jpg\n")
    assert detect_format(tmp_path) == "flickr"
    data = read_captions(tmp_path, split="train")
    assert data.images == [tmp_path / "images" / "a.jpg"] and data.captions == [["A dog.", "A dog runs."]]
    with pytest.raises(DataError, match="no split file val.txt"):
        read_captions(tmp_path, split="val")
    with pytest.raises(ConfigError, match="caption format 'flickr' has no option 'image_root'"):
        read_captions(tmp_path, split="train", image_root="x")


def test_detection_failures(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_captions(tmp_path / "nope")
    with pytest.raises(DataError, match="not in a known caption layout"):
        read_captions(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot detect the caption format"):
        read_captions(tmp_path / "x.txt")
    (tmp_path / "y.json").write_text('{"foo": 1}')
    with pytest.raises(DataError, match="neither a Karpathy split file"):
        read_captions(tmp_path / "y.json")
    with pytest.raises(DataError, match="unknown caption format 'xml'"):
        read_captions(tmp_path / "y.json", fmt="xml")
