"""Video -> subtitles: reading videos (good, rotated, variable frame rate, large, bad), shots, cues, the SRT / WebVTT
/ JSON files, the Subtitler over a caption model, and `vlfuse subtitle`. Every video is made here with PyAV."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_helpers import make_tiny_captioner
from video_helpers import SHOT_COLOURS, shot_frames, with_unknown_codec, write_audio_only, write_video

from vlfuse.cli.main import main
from vlfuse.data.video import VideoLimits, VideoReader
from vlfuse.errors import ConfigError, ModelNotFoundError, VideoError, VideoTooLongError
from vlfuse.tasks.subtitle.cues import Captioned, CueOptions, build_cues, display_lines
from vlfuse.tasks.subtitle.formats import timestamp
from vlfuse.tasks.subtitle.shots import ShotOptions, segments

pytestmark = pytest.mark.usefixtures("one_thread")

SHOTS = [1.0, 1.5, 1.2]  # seconds: cuts at 1.0 and 2.5
FPS = 10


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """3.7 s at 10 fps, 64x48: three shots of different colours."""
    return write_video(tmp_path_factory.mktemp("video") / "three shots.mp4", shot_frames(SHOTS, FPS, (64, 48)), FPS)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_captioner(tmp_path_factory.mktemp("tiny") / "tiny-caption")


@pytest.fixture(scope="module")
def subtitler(tiny_model):
    from vlfuse.tasks.subtitle import Subtitler

    return Subtitler.from_pretrained(str(tiny_model))


# -- reading ---------------------------------------------------------------------------------------------------
def test_reader_streams_small_frames_with_their_times(clip):
    reader = VideoReader(clip)
    assert (reader.info.width, reader.info.height, reader.info.fps, reader.info.codec) == (64, 48, 10.0, "h264")
    assert reader.info.duration == pytest.approx(3.7, abs=0.01)
    frames = list(reader.frames((32, 24)))
    assert len(frames) == 37
    assert [f.time for f in frames[:3]] == pytest.approx([0.0, 0.1, 0.2])
    assert frames[0].bgr.shape == (24, 32, 3)
    assert frames[0].bgr.reshape(-1, 3).mean(0) == pytest.approx(SHOT_COLOURS[0][::-1], abs=12)  # in BGR order
    assert reader.warnings == []


def test_rotated_video_is_turned_upright(tmp_path):
    """A phone video stored 64x48 whose display matrix says 90 degrees: shown 48x64, the stored left half (white)
    at the bottom."""
    picture = np.zeros((48, 64, 3), np.uint8)
    picture[:, :32] = 255
    reader = VideoReader(write_video(tmp_path / "phone.mp4", [picture] * 3, rotation=90))
    assert (reader.info.rotation, reader.info.width, reader.info.height) == (90, 48, 64)
    frame = next(reader.frames())
    assert frame.bgr.shape == (64, 48, 3)
    assert frame.bgr[:24].mean() < 30 and frame.bgr[-24:].mean() > 225
    assert frame.picture((24, 32))[-8:].mean() > 225  # the caption model's picture is upright too


def test_variable_frame_rate_is_timed_by_timestamps(tmp_path):
    times = [0, .05, .1, .3, .35, .6, .65, .7, .95, 1.1, 1.4, 1.45, 1.5, 1.9, 2.0, 2.05, 2.1, 2.5]
    path = write_video(tmp_path / "vfr.mp4", shot_frames([1.0, 1.0], 9, (64, 48)), fps=9, times=times)
    reader = VideoReader(path)
    assert reader.info.variable_frame_rate
    assert [f.time for f in reader.frames((32, 24))] == pytest.approx(times)
    segs = list(segments(reader.frames((32, 24)), reader.info.fps, (32, 32), ShotOptions(min_shot_s=0.3)))
    assert [(s.start, s.cut) for s in segs] == [(0.0, True), (1.1, True)]  # the second shot's first frame: 1.1 s


def test_4k_frames_are_scaled_while_decoding_and_a_frame_limit_refuses_them(tmp_path):
    path = write_video(tmp_path / "uhd.mp4", [np.full((2160, 3840, 3), 128, np.uint8)], FPS)
    reader = VideoReader(path)
    assert (reader.info.width, reader.info.height) == (3840, 2160)
    assert next(reader.frames((160, 90))).bgr.shape == (90, 160, 3)
    with pytest.raises(VideoTooLongError, match=r"uhd.mp4: frames are 3840x2160 = 8,294,400 pixels, over the limit"):
        VideoReader(path, VideoLimits(max_pixels=1920 * 1080))


def test_a_duration_limit_refuses_longer_videos(clip):
    with pytest.raises(VideoTooLongError, match=r"three shots.mp4: is 3.7 s long, over the limit of 2 s"):
        VideoReader(clip, VideoLimits(max_duration_s=2))


def bad_videos(folder: Path, good: Path):
    """name -> (path, the problem its message must name)."""
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("these are not moving pictures\n")
    data = good.read_bytes()
    (folder / "cut-short.mp4").write_bytes(data[: len(data) // 2])  # the index (moov box) was at the end
    Image.new("RGB", (40, 30), "red").save(folder / "photo.jpg")
    return {"empty": (folder / "empty.mp4", "file is empty"),
            "photo": (folder / "photo.jpg", "is a still image (JPEG), not a video"),
            "not a video": (folder / "notes.mp4", "not a video file"),
            "truncated, index lost": (folder / "cut-short.mp4", "MP4 file is truncated or corrupt: its index"),
            "audio only": (write_audio_only(folder / "voice.wav"), "has no video stream (it holds audio streams"),
            "unknown codec": (with_unknown_codec(good, folder / "odd.mp4"), "codec is not one the FFmpeg inside"),
            "missing": (folder / "absent.mp4", "file does not exist"),
            "directory": (folder, "is a directory")}


@pytest.mark.parametrize("kind", ["empty", "photo", "not a video", "truncated, index lost", "audio only",
                                  "unknown codec", "missing", "directory"])
def test_bad_videos_raise_one_video_error_naming_file_and_problem(tmp_path, clip, kind):
    path, problem = bad_videos(tmp_path, clip)[kind]
    with pytest.raises(VideoError) as err:
        VideoReader(path)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)


def test_truncated_video_with_its_index_first_gives_what_decodes_and_a_warning(tmp_path):
    path = write_video(tmp_path / "whole.mp4", shot_frames(SHOTS, FPS, (64, 48)), FPS, faststart=True)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    reader = VideoReader(cut)
    frames = list(reader.frames((32, 24)))
    assert 5 < len(frames) < 37
    assert len(reader.warnings) == 1
    assert reader.warnings[0].startswith(f"{cut}: frames end at") and "truncated or corrupt" in reader.warnings[0]


# -- shots -----------------------------------------------------------------------------------------------------
def test_shots_are_cut_where_the_colour_changes_each_with_a_middle_keyframe(clip):
    reader = VideoReader(clip)
    segs = list(segments(reader.frames((32, 24)), reader.info.fps, (16, 16)))
    assert [(s.start, s.end, s.cut) for s in segs] == [(0.0, 1.0, True), (1.0, 2.5, True), (2.5, 3.7, True)]
    for s in segs:
        assert s.start <= s.keyframe_time < s.end
        assert abs(s.keyframe_time - (s.start + s.end) / 2) <= 0.25
    assert segs[1].keyframe.shape == (16, 16, 3)
    assert segs[1].keyframe.reshape(-1, 3).mean(0) == pytest.approx(SHOT_COLOURS[1], abs=12)  # the 2nd shot's, RGB


def faded(seconds_a: float, fade_frames: int, seconds_b: float, fps: int = FPS):
    """Frames of shot 0, a linear cross-fade of ``fade_frames`` into shot 1, then shot 1."""
    a = shot_frames([seconds_a], fps, (64, 48))
    b = shot_frames([0.0, seconds_b], fps, (64, 48))
    blend = [((1 - w) * a[0] + w * b[0]).astype(np.uint8)
             for w in np.arange(1, fade_frames + 1) / (fade_frames + 1)]
    return a + blend + b


def test_a_cross_fade_is_one_cut_at_its_middle_which_consecutive_frames_miss(tmp_path):
    """Shot 0 for 1.5 s, a 0.5 s fade (frames 15-19), shot 1: the crossfade detector cuts at the fade's middle
    (1.75 s, give or take a frame); PySceneDetect's ContentDetector sees too little change from frame to frame."""
    path = write_video(tmp_path / "fade.mp4", faded(1.5, 5, 1.5), FPS)
    found = {}
    for detector in ("crossfade", "content"):
        reader = VideoReader(path)
        segs = list(segments(reader.frames((32, 24)), FPS, (16, 16), ShotOptions(detector=detector)))
        found[detector] = [s.start for s in segs if s.cut]
    assert found["crossfade"][0] == 0.0 and found["crossfade"][1:] == [pytest.approx(1.75, abs=0.11)]
    assert found["content"] == [0.0]


def test_a_one_frame_flash_is_no_cut(tmp_path):
    frames = shot_frames([2.0], FPS, (64, 48))
    frames[10] = np.full_like(frames[10], 255)
    reader = VideoReader(write_video(tmp_path / "flash.mp4", frames, FPS))
    assert [s.start for s in segments(reader.frames((32, 24)), FPS, (16, 16))] == [0.0]


def test_long_shots_are_split_every_n_seconds(clip):
    reader = VideoReader(clip)
    segs = list(segments(reader.frames((32, 24)), reader.info.fps, (16, 16), ShotOptions(split_every_s=0.5)))
    assert [s.start for s in segs if s.cut] == [0.0, 1.0, 2.5]
    assert [s.start for s in segs if not s.cut] == pytest.approx([0.5, 1.5, 2.0, 3.0, 3.5])
    assert max(s.end - s.start for s in segs) <= 0.5 + 1e-6


@pytest.mark.parametrize("every", [0.3, 0.7, 0.9])
def test_pieces_of_long_shots_keep_every_cut_and_leave_no_gap(clip, every):
    """Cuts are reported a few frames late: a piece closed meanwhile must not swallow one, and a sliver between a
    piece's end and a cut (no frame sampled in it) joins the piece before."""
    reader = VideoReader(clip)
    segs = list(segments(reader.frames((32, 24)), reader.info.fps, (16, 16), ShotOptions(split_every_s=every)))
    assert [s.start for s in segs if s.cut] == [0.0, 1.0, 2.5]
    assert all(a.end == b.start for a, b in zip(segs, segs[1:])) and segs[-1].end == pytest.approx(3.7)
    assert max(s.end - s.start for s in segs) < every + ShotOptions().sample_every_s


# -- cues and files --------------------------------------------------------------------------------------------
def test_cues_merge_equal_captions_absorb_flashes_and_cap_their_duration():
    spans = [Captioned(0.0, 2.0, "a dog"), Captioned(2.0, 3.0, "a dog"), Captioned(3.0, 3.3, "a flash"),
             Captioned(3.3, 15.0, "a long shot of a beach"), Captioned(15.0, 16.5, "a cat")]
    cues = build_cues(spans, CueOptions(min_duration_s=1.0, max_duration_s=7.0))
    assert [(c.start, c.end, c.text) for c in cues] == [
        (0.0, 3.3, "a dog"), (3.3, 10.3, "a long shot of a beach"), (15.0, 16.5, "a cat")]
    first_short = build_cues([Captioned(0.0, 0.4, "a blink"), Captioned(0.4, 3.0, "a dog")])
    assert [(c.start, c.end, c.text) for c in first_short] == [(0.0, 3.0, "a dog")]


def test_lines_are_wrapped_in_sentence_case():
    assert display_lines("a man in a red shirt is climbing a rock wall next to a river", 30) == [
        "A man in a red shirt is", "climbing a rock wall next to a", "river"]
    assert all(len(line) <= 42 for line in display_lines("word " * 30, 42))


def test_timestamps_round_to_milliseconds():
    assert timestamp(3725.0456, ",") == "01:02:05,046"
    assert timestamp(0.0, ".") == "00:00:00.000"


def sample_subtitles():
    from vlfuse.data.video import VideoInfo
    from vlfuse.tasks.subtitle.pipeline import ShotCaption, Subtitles

    info = VideoInfo("clip.mp4", 12.0, 25.0, 64, 48, 0, "h264", False)
    shots = [ShotCaption(0.0, 4.0, True, 2.0, "a dog runs on the grass"),
             ShotCaption(4.0, 12.0, True, 8.0, "two people walk on the beach <at> dusk --> home")]
    return Subtitles(info, "en", "tiny", shots, build_cues([Captioned(s.start, s.end, s.caption) for s in shots],
                                                           CueOptions(max_line_chars=20)), [])


def test_srt_and_webvtt_read_back_with_independent_parsers():
    import io

    import srt
    import webvtt

    subs = sample_subtitles()
    text = subs.write("srt")
    assert text.startswith("1\n00:00:00,000 --> 00:00:04,000\nA dog runs on the\ngrass\n\n2\n00:00:04,000 --> ")
    parsed = list(srt.parse(text))
    assert [(p.index, p.start.total_seconds(), p.end.total_seconds()) for p in parsed] == [(1, 0.0, 4.0),
                                                                                           (2, 4.0, 11.0)]
    assert parsed[0].content == "A dog runs on the\ngrass"
    vtt = subs.write("vtt")
    assert vtt.startswith("WEBVTT\n\n1\n00:00:00.000 --> 00:00:04.000\n")
    cues = list(webvtt.from_buffer(io.StringIO(vtt)))
    assert [(c.start, c.end) for c in cues] == [("00:00:00.000", "00:00:04.000"), ("00:00:04.000", "00:00:11.000")]
    assert "&lt;at&gt;" in vtt and "--&gt; home" in vtt and "<at>" in text  # WebVTT escapes markup, SRT keeps text


def test_json_has_duration_shots_and_cues():
    doc = json.loads(sample_subtitles().write("json"))
    assert doc["duration"] == 12.0 and doc["language"] == "en"
    assert [s["caption"] for s in doc["shots"]] == ["a dog runs on the grass",
                                                    "two people walk on the beach <at> dusk --> home"]
    assert doc["cues"][1] == {"start": 4.0, "end": 11.0, "text": "two people walk on the beach <at> dusk --> home",
                              "lines": ["Two people walk on", "the beach <at> dusk", "--> home"]}


# -- the Subtitler ---------------------------------------------------------------------------------------------
def test_subtitler_captions_each_shot_with_the_captioner(subtitler, clip):
    subs = subtitler(clip)
    assert [(s.start, s.end) for s in subs.shots] == [(0.0, 1.0), (1.0, 2.5), (2.5, 3.7)]
    reader = VideoReader(clip)
    segs = list(segments(reader.frames(subtitler.options.shots.analysis_size(64, 48)), reader.info.fps,
                         subtitler.keyframe_size))
    assert [s.caption for s in subs.shots] == subtitler.captioner([s.keyframe for s in segs],
                                                                 strategy=subtitler.decode.strategy)
    assert subs.cues and subs.duration == pytest.approx(3.7)


def test_subtitles_do_not_depend_on_the_batch_size(subtitler, clip):
    import dataclasses

    from vlfuse.tasks.subtitle import Subtitler

    one_at_a_time = Subtitler(subtitler.captioner, options=dataclasses.replace(subtitler.options, batch_size=1),
                              decode=subtitler.decode, model_name=subtitler.model_name)
    assert one_at_a_time(clip).to_dict() == subtitler(clip).to_dict()


def test_a_language_without_a_caption_model_is_named():
    from vlfuse.tasks.subtitle import Subtitler

    with pytest.raises(ModelNotFoundError, match=r"unknown language 'fr'.*write English \(en\), Chinese \(zh\)"):
        Subtitler.from_pretrained(lang="fr")


def test_chinese_subtitles_come_from_the_chinese_caption_model(clip):
    from vlfuse.tasks.subtitle import Subtitler

    subtitles = Subtitler.from_pretrained(lang="zh")(clip)
    assert subtitles.model == "flickr8k-caption-zh" and subtitles.language == "zh"
    assert subtitles.cues and all(any("\u4e00" <= ch <= "\u9fff" for ch in c.text) for c in subtitles.cues)
    with pytest.raises(ConfigError, match=r"writes English \(en\), not Chinese \(zh\)"):
        Subtitler(Subtitler.from_pretrained().captioner, "zh")


# -- the command -----------------------------------------------------------------------------------------------
def test_cli_writes_srt_next_to_the_video_and_vtt_and_json_where_asked(tmp_path, clip, tiny_model, subtitler,
                                                                       capsys):
    """The command writes what the Python API gives (the same model, options and decoding)."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(clip.read_bytes())
    assert main(["subtitle", str(video), "--model", str(tiny_model)]) == 0
    assert (tmp_path / "clip.srt").read_text() == subtitler(video).write("srt")
    assert main(["subtitle", str(video), "--model", str(tiny_model), "--format", "vtt", "-o",
                 str(tmp_path / "out.vtt")]) == 0
    assert (tmp_path / "out.vtt").read_text().startswith("WEBVTT\n")
    capsys.readouterr()
    assert main(["subtitle", str(video), "--model", str(tiny_model), "--format", "json", "-o", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["start"] for s in doc["shots"]] == [0.0, 1.0, 2.5]


@pytest.mark.parametrize("kind", ["empty", "not a video", "truncated, index lost", "audio only", "unknown codec"])
def test_cli_reports_a_bad_video_in_one_line_with_exit_2(tmp_path, clip, tiny_model, capsys, kind):
    path, problem = bad_videos(tmp_path, clip)[kind]
    assert main(["subtitle", str(path), "--model", str(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlfuse subtitle: error: {path}: ") and problem in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_warns_about_a_truncated_video_and_writes_what_decoded(tmp_path, tiny_model, capsys):
    path = write_video(tmp_path / "whole.mp4", shot_frames(SHOTS, FPS, (64, 48)), FPS, faststart=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    assert main(["subtitle", str(cut), "--model", str(tiny_model)]) == 0
    assert f"vlfuse subtitle: warning: {cut}: frames end at" in capsys.readouterr().err
    assert (tmp_path / "cut.srt").read_text().startswith("1\n00:00:00,000 --> ")


def test_cli_language_without_a_model_exits_2_naming_it(capsys):
    assert main(["subtitle", "--sample", "--lang", "fr"]) == 2
    err = capsys.readouterr().err
    assert "unknown language 'fr'" in err and "Traceback" not in err


def test_cli_sample_subtitles_scikit_videos_bikes_clip(tmp_path, capsys):
    """The real sample clip and the built-in English model: several shots, all captioned."""
    pytest.importorskip("onnxruntime")
    from vlfuse.data.samples import sample_video

    assert sample_video().name == "bikes.mp4"
    assert main(["subtitle", "--sample", "--format", "json", "-o", str(tmp_path / "bikes.json")]) == 0
    doc = json.loads((tmp_path / "bikes.json").read_text())
    assert doc["video"]["width"] == 640 and doc["duration"] == pytest.approx(10.0, abs=0.1)
    assert len(doc["shots"]) >= 3 and all(s["caption"] for s in doc["shots"])
    assert doc["cues"][0]["start"] == 0.0 and doc["cues"][-1]["end"] <= 10.01
