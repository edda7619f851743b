"""``POST /v1/subtitle`` through FastAPI's TestClient: the Python API's subtitles in each format, every bad video a
4xx JSON error naming the upload, size and duration limits, and the service keeps serving after each."""
from __future__ import annotations

import json

import pytest
from serving_helpers import image_bytes, make_tiny_captioner
from video_helpers import shot_frames, with_unknown_codec, write_audio_only, write_video

fastapi = pytest.importorskip("fastapi")  # the "serve" extra; installed in CI
from fastapi.testclient import TestClient  # noqa: E402

from vlfuse.serving.app import create_app  # noqa: E402
from vlfuse.serving.models import ServiceModels  # noqa: E402
from vlfuse.serving.settings import ServeSettings  # noqa: E402
from vlfuse.tasks.caption.pipeline import Captioner  # noqa: E402
from vlfuse.tasks.subtitle import Subtitler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return Captioner.from_pretrained(make_tiny_captioner(tmp_path_factory.mktemp("cap") / "tiny-caption"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", shot_frames([1.0, 1.5, 1.2], 10, (64, 48)))


@pytest.fixture(scope="module")
def client(captioner):
    models = ServiceModels(captioner, names={"caption": "tiny-caption"})
    settings = ServeSettings(max_video_bytes=200_000, max_video_seconds=10.0)
    with TestClient(create_app(models, settings), raise_server_exceptions=False) as c:
        yield c


def post_video(client, data: bytes, name: str = "clip.mp4", **fields):
    return client.post("/v1/subtitle", files={"video": (name, data, "video/mp4")}, data=fields)


def assert_error(resp, status: int, code: str, words: str):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and words in error["message"], error
    return error["message"]


@pytest.mark.parametrize("fmt, media_type", [("vtt", "text/vtt"), ("srt", "application/x-subrip"),
                                             ("json", "application/json")])
def test_subtitles_equal_the_python_apis(client, captioner, clip, fmt, media_type):
    resp = post_video(client, clip.read_bytes(), format=fmt)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(media_type)
    subs = Subtitler(captioner, model_name="tiny-caption")(clip)
    if fmt == "json":
        body = resp.json()
        assert body["video"]["path"] == "clip.mp4"
        assert body["shots"] == json.loads(subs.write("json"))["shots"] and len(body["shots"]) == 3
    else:
        assert resp.text == subs.write(fmt)


def test_bad_videos_are_4xx_naming_the_upload_and_the_service_keeps_serving(client, clip, tmp_path):
    good = clip.read_bytes()
    cases = [(b"", "empty.mp4", 400, "bad_video", "empty.mp4: file is empty"),
             (b"not a video at all", "notes.mp4", 400, "bad_video", "notes.mp4: not a video file"),
             (good[: len(good) // 2], "cut.mp4", 400, "bad_video", "cut.mp4: MP4 file is truncated or corrupt"),
             (write_audio_only(tmp_path / "a.wav").read_bytes(), "voice.wav", 400, "bad_video",
              "voice.wav: has no video stream"),
             (with_unknown_codec(clip, tmp_path / "odd.mp4").read_bytes(), "odd.mp4", 400, "bad_video",
              "odd.mp4: its video codec is not one"),
             (image_bytes("red"), "photo.png", 400, "bad_video", "photo.png: is a still image (PNG), not a video")]
    for data, name, status, code, words in cases:
        message = assert_error(post_video(client, data, name), status, code, words)
        assert "vlfuse-upload-" not in message  # the temporary file's path is not shown
        assert post_video(client, good).status_code == 200


def test_limits_and_parameters(client, tmp_path):
    long_clip = write_video(tmp_path / "long.mp4", shot_frames([6.0, 6.0], 2, (32, 24)), fps=2)
    assert_error(post_video(client, long_clip.read_bytes(), "long.mp4"), 413, "video_too_large",
                 "long.mp4: is 12.0 s long, over the limit of 10 s")
    assert_error(post_video(client, b"\0" * 300_000), 413, "payload_too_large", "over the limit")
    assert_error(post_video(client, long_clip.read_bytes(), format="ass"), 422, "invalid_parameter", "format")
    assert_error(post_video(client, long_clip.read_bytes(), lang="zh"), 422, "invalid_parameter",
                 "this service captions in en, not 'zh'")
    assert_error(post_video(client, long_clip.read_bytes(), lang="xx"), 422, "invalid_parameter",
                 "unknown language 'xx'")
    assert client.get("/v1/models").json()["limits"]["max_video_seconds"] == 10.0
