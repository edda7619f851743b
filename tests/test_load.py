"""One ``from_pretrained`` (vlfuse.tasks.base.Pipeline) and ``vlfuse.load`` dispatching on a checkpoint's task."""
import json
import shutil

import pytest

import vlfuse
from vlfuse import Captioner, QuestionAnswerer, Retriever
from vlfuse.errors import ModelNotFoundError
from vlfuse.hub import resolve_model
from vlfuse.tasks.retrieval.pipeline import RetrievalImageTower


@pytest.mark.parametrize("name, pipeline", [("flickr8k-caption", Captioner), ("easyvqa", QuestionAnswerer),
                                            ("flickr8k-retrieval", Retriever)])
def test_load_dispatches_on_the_checkpoints_task(name, pipeline):
    loaded = vlfuse.load(name, device="cpu")  # keyword arguments reach the task's loader
    assert type(loaded) is pipeline and loaded.device.type == "cpu"
    assert type(pipeline.from_pretrained(name)) is pipeline


def test_load_passes_the_tasks_own_options():
    cap = vlfuse.load("flickr8k-caption", int8=False, onnx=False)
    assert cap.runtime.options.int8 is False and cap.runtime.backends()["image_encoder"] == "torch"
    with pytest.raises(TypeError, match="int8"):  # an option the task does not have is not silently ignored
        vlfuse.load("easyvqa", int8=False)


@pytest.mark.parametrize("load, expected", [
    (lambda: Captioner.from_pretrained("easyvqa"), "'easyvqa' is a vqa model, not a caption model; load it with "
                                                   "QuestionAnswerer.from_pretrained or vlfuse.load"),
    (lambda: QuestionAnswerer.from_pretrained("flickr8k-retrieval"), "is a retrieval model, not a vqa model"),
    (lambda: Retriever.from_pretrained("flickr8k-caption"), "is a caption model, not a retrieval model; load it "
                                                            "with Captioner.from_pretrained"),
    (lambda: RetrievalImageTower.from_pretrained("easyvqa"), "is a vqa model, not a retrieval model"),
])
def test_a_checkpoint_of_another_task_is_refused_by_name(load, expected):
    with pytest.raises(ModelNotFoundError) as err:
        load()
    assert expected in str(err.value)


def test_unknown_names_and_tasks(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        vlfuse.load("no-such-model")
    odd = tmp_path / "odd"
    shutil.copytree(resolve_model("easyvqa"), odd)
    raw = json.loads((odd / "config.json").read_text())
    raw["task"] = "subtitles"
    (odd / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelNotFoundError, match="has task 'subtitles' in its config.json; vlfuse loads 'caption'"):
        vlfuse.load(odd)
    del raw["task"]
    (odd / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelNotFoundError, match="has no 'task' in its config.json"):
        QuestionAnswerer.from_pretrained(odd)
