"""``vlfuse caption`` on good and bad files, checkpoints round trip, bad configs, unknown models."""
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FLICKR, REPO, bad_images, huge_png, photo, write_config
from PIL import Image

from vlfuse.cli.main import main
from vlfuse.data.images import load_image
from vlfuse.errors import ImageError


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    names = (FLICKR / "val.txt").read_text().split()[:2]
    good = [shutil.copy(FLICKR / "images" / n, folder / n) for n in names]
    good.append(str(photo(folder / "synthetic.png", seed=3)))
    return folder, sorted(str(g) for g in good), bad_images(folder)


EXPECTED_PROBLEM = {"empty": "file is empty", "truncated": "truncated or corrupt", "text": "not a recognised image",
                    "huge": "30000x30000"}


def test_load_image_rejects_huge_png_from_the_header(tmp_path):
    path = huge_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 200
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    load_image(photo(tmp_path / "warm.png"))  # PIL's PNG plugin is imported once, outside the timing
    t0, cpu0 = time.perf_counter(), time.process_time()
    with pytest.raises(ImageError, match=r"bomb.png: image is 30000x30000 = 900,000,000 pixels, over the limit"):
        load_image(path)
    # never decoded (decoding would allocate 2.7 GB and take seconds); CPU time is immune to a busy machine
    assert time.process_time() - cpu0 < 0.1 and time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100_000
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path.read_bytes())


def test_load_image_inputs(tmp_path):
    p = photo(tmp_path / "a.jpg")
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (96, 80)
    assert load_image(p.read_bytes()).size == (96, 80)
    assert load_image(np.zeros((5, 7), np.uint8)).size == (7, 5)
    assert load_image(Image.new("L", (3, 4))).mode == "RGB"
    with pytest.raises(ImageError, match="missing.jpg: file does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_caption_folder_with_bad_files(trained_run, mixed_folder, capsys):
    folder, good, bad = mixed_folder
    code = main(["caption", str(folder), "--model", str(trained_run / "best"), "--json", "--beam", "2"])
    out, err = capsys.readouterr()
    assert code == 2
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["image"] for r in rows) == good
    assert all(r["caption"].strip() and isinstance(r["score"], float) for r in rows)
    lines = err.splitlines()
    assert len(lines) == len(bad), err
    for kind, path in bad.items():
        mine = [ln for ln in lines if str(path) in ln]
        assert len(mine) == 1, (kind, err)
        assert mine[0].startswith("vlfuse caption: error: ") and EXPECTED_PROBLEM[kind] in mine[0]
    assert "Traceback" not in err


def test_caption_good_files_exit_0(trained_run, mixed_folder, capsys):
    _, good, _ = mixed_folder
    assert main(["caption", *good, "--model", str(trained_run / "best"), "--beam", "1"]) == 0
    out, err = capsys.readouterr()
    assert [ln.split("\t")[0] for ln in out.splitlines()] == good and err == ""


def test_caption_cli_process_reports_bad_files_without_traceback(trained_run, mixed_folder):
    folder, good, bad = mixed_folder
    env = dict(os.environ, PYTHONPATH=str(REPO), VLFUSE_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "vlfuse", "caption", str(folder), "--model", str(trained_run / "best")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stdout.splitlines()) == len(good)
    assert len(proc.stderr.splitlines()) == len(bad) and "Traceback" not in proc.stderr


def test_unknown_model_and_missing_input(capsys, tmp_path):
    assert main(["caption", str(photo(tmp_path / "a.jpg")), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlfuse caption: error: unknown model 'no-such-model'") and len(err.splitlines()) == 1
    assert main(["caption", str(tmp_path / "empty_dir_does_not_exist.jpg"), "--model", str(tmp_path)]) == 2
    assert "not a vlfuse checkpoint directory" in capsys.readouterr().err


def test_checkpoint_round_trip_gives_identical_captions(trained_run, mixed_folder, tmp_path):
    from vlfuse.tasks.caption.pipeline import Captioner

    _, good, _ = mixed_folder
    cap = Captioner.from_pretrained(trained_run / "best")
    pil = Image.open(good[0])
    first = cap([*good, pil], beam_size=2)
    assert first[0] == first[-1]  # a path and the same image as a PIL object caption alike
    for half in (False, True):
        out = cap.save_pretrained(tmp_path / f"copy{half}", half=half)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
        again = Captioner.from_pretrained(out)
        assert again([*good, pil], beam_size=2) == first
    full = {k: v for k, v in cap.model.state_dict().items()}
    reloaded = Captioner.from_pretrained(tmp_path / "copyFalse").model.state_dict()
    assert all((full[k] == reloaded[k]).all() for k in full)
    # the frozen pretrained stem is rebuilt from its package, not stored: the checkpoint stays small
    assert (tmp_path / "copyTrue" / "model.safetensors").stat().st_size < 1_000_000


def test_a_checkpoints_decoding_default_drives_api_and_cli_until_overridden(trained_run, mixed_folder, tmp_path,
                                                                            capsys):
    from vlfuse.errors import ConfigError
    from vlfuse.tasks.caption.pipeline import Captioner
    from vlfuse.tasks.caption.rerank import CaptionDecodeConfig

    _, good, _ = mixed_folder
    # training saves the decoding the model was selected with on val (greedy) as its default
    trained = Captioner.from_pretrained(trained_run / "best")
    saved = json.loads((trained_run / "best" / "config.json").read_text())
    assert saved["decode"] == saved["training"]["val_decode"] and saved["decode"]["strategy"] == "greedy"
    assert trained.decode_defaults == CaptionDecodeConfig(**saved["training"]["val_decode"])
    # a checkpoint whose default is beam search of width 2 (and at most 4 words)
    trained.decode_defaults = CaptionDecodeConfig(strategy="beam", beam_size=2, max_len=4)
    ckpt = trained.save_pretrained(tmp_path / "beam2")
    cap = Captioner.from_pretrained(ckpt)
    assert cap.decode_defaults == CaptionDecodeConfig(strategy="beam", beam_size=2, max_len=4)
    explicit = cap(good, beam=2, max_len=4)
    assert cap(good) == explicit and all(len(c.split()) <= 4 for c in explicit)
    assert cap(good, beam=1) == cap(good, strategy="greedy", max_len=4)  # width 1 = greedy
    assert cap.decode_config(beam=5).strategy == "beam" and cap.decode_config(beam=5).max_len == 4

    def cli(*extra):
        assert main(["caption", *good, "--model", str(ckpt), "--json", *extra]) == 0
        return [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]

    assert cli() == explicit
    assert cli("--beam", "1") == cap(good, beam=1)
    assert cli("--max-len", "2") == cap(good, max_len=2) and all(len(c.split()) <= 2 for c in cli("--max-len", "2"))
    # a broken default in config.json names the key
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["decode"] = {"strategy": "beam", "beam_wdith": 2}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="decode.beam_wdith"):
        Captioner.from_pretrained(ckpt)


def test_train_config_typo_names_the_key(tmp_path, capsys):
    cfg = write_config(tmp_path / "bad.json", {"task": "caption", "train": {"epochs": 1, "bacth_size": 8}})
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()]
    assert "unknown config key 'train.bacth_size'" in err and "Did you mean 'train.batch_size'" in err
    assert main(["train", "--config", str(cfg), "train.bacth_size=1", "model.fusion.nme=x"]) == 2
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    cfg = write_config(tmp_path / "task.json", {"task": "captioning"})
    assert main(["train", "--config", str(cfg)]) == 2
    assert "config key 'task' is 'captioning'" in capsys.readouterr().err


def test_attention_map_uses_the_first_good_image(trained_run, mixed_folder, tmp_path, capsys):
    _, good, bad = mixed_folder
    out_png = tmp_path / "att.png"
    code = main(["caption", str(bad["truncated"]), good[0], "--model", str(trained_run / "best"),
                 "--attention-map", str(out_png)])
    err = capsys.readouterr().err
    assert code == 2 and "truncated.jpg" in err and "Traceback" not in err
    assert Image.open(out_png).size[0] > 160


def test_output_reader_going_away_is_not_a_traceback():
    """`vlfuse models | head -1`: the pipe closes before vlfuse has written everything; it stops quietly."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "vlfuse", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
