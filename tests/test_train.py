"""Caption training through ``vlfuse.cli.main.main``: best checkpoint, resume after a stop, bad images,
and 2-process data-parallel training (gloo on CPU)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FLICKR, REPO, bad_images, tiny_config, write_config

from vlfuse.cli.main import main
from vlfuse.tasks.caption.pipeline import Captioner


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_a_loadable_best_checkpoint(trained_run):
    assert sorted(p.name for p in (trained_run / "best").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    hist = records(trained_run)
    assert [h["epoch"] for h in hist] == [1, 2] and [h["step"] for h in hist] == [7, 14]  # 120 captions / 16
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    assert all(0 <= h["val_CIDEr"] for h in hist) and sum(h["best"] for h in hist) >= 1
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["train_images"] == 24 and summary["train_captions"] == 120 and summary["skipped_images"] == 0
    assert summary["best_CIDEr"] == max(h["val_CIDEr"] for h in hist)
    config = json.loads((trained_run / "best" / "config.json").read_text())
    assert config["task"] == "caption" and config["training"]["data"]["train_limit"] == 24
    cap = Captioner.from_pretrained(trained_run / "best")
    text = cap(str(FLICKR / "images" / (FLICKR / "val.txt").read_text().split()[0]), strategy="greedy")
    assert isinstance(text, str) and text.strip() and all(w in cap.tokenizer.index for w in text.split())
    assert (trained_run / "last.pt").is_file() and (trained_run / "curves.png").stat().st_size > 1000


def test_resume_continues_from_last_checkpoint(tmp_path, feature_cache, trained_run):
    cfg = write_config(tmp_path / "c.json", tiny_config(tmp_path, feature_cache))
    assert main(["train", "--config", str(cfg), "train.max_steps=3"]) == 0  # stopped ("killed") mid-epoch 1
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["state"]
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    assert main(["train", "--config", str(cfg), "--resume"]) == 0
    hist = records(tmp_path / "run")
    assert [h["step"] for h in hist] == [3, 7, 14]  # continued at step 4, not from scratch
    # same data order, RNG, optimizer state and schedule: the same weights as the uninterrupted run
    resumed = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    straight = torch.load(trained_run / "last.pt", weights_only=False)["model"]
    bad = {k: (resumed[k] - straight[k]).abs().max().item() for k in straight if not torch.allclose(resumed[k], straight[k], atol=1e-5)}
    assert not bad, bad


def test_training_skips_and_counts_bad_images(tmp_path, feature_cache):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    names = (FLICKR / "train.txt").read_text().split()[:10]
    for n in names:
        shutil.copy(FLICKR / "images" / n, data / "images" / n)
    bad = bad_images(tmp_path / "bad")
    for kind in ("empty", "truncated", "text"):
        shutil.copy(bad[kind], data / "images" / f"{kind}.jpg")
    extra = ["empty.jpg", "truncated.jpg", "text.jpg", "missing.jpg"]
    lines = [f"{n}\ta photo of something number {i}" for i, n in enumerate(names + extra) for _ in range(2)]
    (data / "captions.txt").write_text("\n".join(lines) + "\n")
    (data / "train.txt").write_text("\n".join(names[:8] + extra) + "\n")
    (data / "val.txt").write_text("\n".join(names[8:] + ["missing.jpg"]) + "\n")
    config = tiny_config(tmp_path, feature_cache, epochs=1)
    config["data"].update(path=str(data), train_limit=0, val_limit=0)
    cfg = write_config(tmp_path / "c.json", config)
    assert main(["train", "--config", str(cfg)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == 5 and summary["train_images"] == 8 and summary["train_captions"] == 16
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_two_process_data_parallel_training(tmp_path, feature_cache):
    cfg = write_config(tmp_path / "c.json", tiny_config(tmp_path, feature_cache, threads=1))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vlfuse", "train", "--config", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    hist = records(run)
    assert [h["epoch"] for h in hist] == [1, 2]  # rank 0 alone logs and checkpoints
    assert [h["step"] for h in hist] == [3, 6]  # 120 captions / (16 x 2 processes)
    assert proc.stdout.count('"best_dir"') == 1  # one summary, from rank 0
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.resolved.json", "curves.png", "last.pt",
                                                     "metrics.jsonl", "summary.json", "vocab.json"]
    Captioner.from_pretrained(run / "best")


def test_scst_fine_tunes_a_trained_model(tmp_path, feature_cache, trained_run):
    """scst.init_from: self-critical training starts from a trained model (no cross-entropy phase), samples
    captions, logs the reward, changes the weights and keeps whichever model is better on val. The phase runs
    on its own schedule (scst.*) and the rest of the train section (here its moving average)."""
    from safetensors.torch import load_file

    config = tiny_config(tmp_path, feature_cache, ema_decay=0.9)
    config["scst"] = {"epochs": 1, "samples": 3, "batch_images": 8, "lr": 1e-3, "max_len": 8, "warmup_steps": 1,
                      "init_from": str(trained_run / "best")}
    cfg = write_config(tmp_path / "c.json", config)
    assert main(["train", "--config", str(cfg)]) == 0
    run = tmp_path / "run"
    assert not (run / "metrics.jsonl").exists()  # no cross-entropy epochs were run
    hist = records(run / "scst")
    assert [h["step"] for h in hist] == [3]  # 24 images / 8 per step
    assert 0 <= hist[0]["train_reward"] and "val_CIDEr" in hist[0]
    start = load_file(str(trained_run / "best" / "model.safetensors"))
    last = torch.load(run / "scst" / "last.pt", weights_only=False)
    tuned = last["model"]
    assert last["ema"]  # train.ema_decay: the phase keeps (and validates) a moving average
    assert any(not torch.allclose(start[k].float(), tuned[k].float(), atol=1e-4) for k in start if k in tuned)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_dir"] in (str(run / "best"), str(run / "scst" / "best"))
    assert (run / "vocab.json").read_text() == (trained_run / "best" / "vocab.json").read_text()

    config["scst"]["epochs"] = 0  # init_from without an SCST phase is a config mistake, said plainly
    assert main(["train", "--config", str(write_config(tmp_path / "bad.json", config))]) != 0


def test_scst_runs_on_its_own_schedule_and_the_rest_of_the_train_section():
    """SCST's schedule is its own section's (explicit, with its own defaults), never the cross-entropy one's;
    every other trainer setting comes from ``train``."""
    from vlfuse.config import from_dict
    from vlfuse.training.caption import CaptionExperiment

    exp = from_dict(CaptionExperiment, {"train": {"lr": 1e-3, "batch_size": 16, "warmup_steps": 200, "patience": 3,
                                                  "min_lr_ratio": 0.02, "weight_decay": 0.05, "ema_decay": 0.5},
                                        "scst": {"epochs": 2, "lr": 5e-5}})
    cfg = exp.scst.train_config(exp.train, out_dir="run/scst")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, cfg.patience) == \
        (2, 32, 5e-5, 20, 0.5, 0)
    assert (cfg.weight_decay, cfg.ema_decay, cfg.out_dir) == (0.05, 0.5, "run/scst")
    cfg = from_dict(CaptionExperiment, {"scst": {"epochs": 1, "min_lr_ratio": 0.1, "patience": 2}}).scst.train_config(exp.train, "x")
    assert (cfg.min_lr_ratio, cfg.patience) == (0.1, 2)


def test_ema_weights_are_validated_saved_and_checkpointed(tmp_path):
    """With train.ema_decay the trainer validates and saves the moving average, not the live weights, and keeps
    the average in last.pt so a resumed run continues it."""
    from vlfuse.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5])
    model = torch.nn.Linear(4, 1)
    seen = {"evaluated": []}

    def loss_fn(net, idx):
        return {"loss": ((net(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()}

    def evaluate(net):
        seen["evaluated"].append(net.weight.detach().clone())
        with torch.no_grad():
            return {"CIDEr": -float(((net(x).squeeze(-1) - y) ** 2).mean())}

    def save_best(net, path):
        seen["best"] = net.weight.detach().clone()

    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, warmup_steps=0, out_dir=str(tmp_path / "run"),
                      progress=False, checkpoint_every=0, ema_decay=0.9)
    trainer = Trainer(model, list(range(64)), torch.tensor, loss_fn, evaluate, save_best, cfg)
    trainer.fit()
    ema = trainer.ema["weight"]
    assert torch.equal(seen["evaluated"][-1], ema) and not torch.allclose(ema, model.weight)  # live weights restored
    assert any(torch.equal(seen["best"], w) for w in seen["evaluated"])
    assert torch.equal(torch.load(tmp_path / "run" / "last.pt", weights_only=False)["ema"]["weight"], ema)


def test_grouped_mirrored_training(tmp_path, feature_cache):
    """data.group_by_image + data.mirror: batches of images with all their captions,
    resumable with the same weights as an uninterrupted run (the mirroring draws come from the saved RNG)."""
    overrides = ["data.group_by_image=true", "data.mirror=0.5", "train.batch_size=4"]
    straight_cfg = write_config(tmp_path / "a.json", tiny_config(tmp_path / "a", feature_cache))
    assert main(["train", "--config", str(straight_cfg), *overrides]) == 0
    hist = records(tmp_path / "a" / "run")
    assert [h["step"] for h in hist] == [6, 12]  # 24 images / 4 per batch, each with its 5 captions
    summary = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    assert summary["train_captions"] == 120 and summary["train_images"] == 24
    Captioner.from_pretrained(tmp_path / "a" / "run" / "best")

    cfg = write_config(tmp_path / "b.json", tiny_config(tmp_path / "b", feature_cache))
    assert main(["train", "--config", str(cfg), *overrides, "train.max_steps=4"]) == 0
    assert main(["train", "--config", str(cfg), *overrides, "--resume"]) == 0
    resumed = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)["model"]
    straight = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=False)["model"]
    bad = {k: (resumed[k] - straight[k]).abs().max().item() for k in straight if not torch.allclose(resumed[k], straight[k], atol=1e-5)}
    assert not bad, bad


def test_pretrained_lr_scale_slows_only_the_pretrained_weights(tmp_path):
    """Weights under the trainer's pretrained_prefixes learn at lr * train.pretrained_lr_scale (same schedule)."""
    from vlfuse.training.trainer import TrainConfig, Trainer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))  # "0." plays the pretrained part
    seen = []

    def loss_fn(net, idx):
        seen.append({tuple(g["params"][0].shape): g["lr"] for g in trainer.optimizer.param_groups})
        return {"loss": net(torch.randn(len(idx), 4)).pow(2).mean()}

    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, warmup_steps=2, out_dir=str(tmp_path / "run"),
                      progress=False, checkpoint_every=0, patience=0, select_metric="m", pretrained_lr_scale=0.25)
    trainer = Trainer(model, list(range(32)), torch.tensor, loss_fn, lambda net: {"m": 0.0}, lambda net, d: None,
                      cfg, pretrained_prefixes=("0.",))
    assert len(trainer.optimizer.param_groups) == 4  # (decay, no decay) x (pretrained, new)
    trainer.fit()
    for lrs in seen:  # pretrained matrix (4, 4) and bias (4,) vs new matrix (1, 4) and bias (1,)
        assert abs(lrs[(4, 4)] - 0.25 * lrs[(1, 4)]) < 1e-12 and abs(lrs[(4,)] - 0.25 * lrs[(1,)]) < 1e-12
    assert seen[0][(1, 4)] == 0.05 and seen[-1][(1, 4)] < seen[1][(1, 4)]  # warm-up, then cosine


def test_cpu_amp_runs_the_forward_pass_in_bfloat16_and_keeps_float_weights(tmp_path):
    """train.cpu_amp autocasts the loss function's forward pass to bfloat16 on the CPU (off by default); the
    weights, their gradients and the checkpoint stay float32."""
    from vlfuse.training.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    for cpu_amp in (False, True):
        model = torch.nn.Linear(8, 1)
        dtypes = []

        def loss_fn(net, idx):
            out = net(x[idx])
            dtypes.append(out.dtype)
            return {"loss": out.float().pow(2).mean()}

        cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, warmup_steps=0, out_dir=str(tmp_path / f"run{cpu_amp}"),
                          progress=False, checkpoint_every=0, patience=0, select_metric="m", cpu_amp=cpu_amp,
                          device="cpu")
        before = model.weight.detach().clone()
        Trainer(model, list(range(32)), torch.tensor, loss_fn, lambda net: {"m": 0.0}, lambda net, d: None,
                cfg).fit()
        assert set(dtypes) == {torch.bfloat16 if cpu_amp else torch.float32}
        assert model.weight.dtype == torch.float32 and not torch.equal(model.weight, before)
        saved = torch.load(tmp_path / f"run{cpu_amp}" / "last.pt", weights_only=False)["model"]
        assert saved["weight"].dtype == torch.float32


# -- mirroring: one knob (data.mirror, a probability), one mechanism (vlfuse.data.mirror) for every task --------

def test_mirror_text_swaps_left_and_right_as_whole_words():
    from vlfuse.data.mirror import mirror_text

    assert mirror_text("A dog on the left, a cat to the Right.") == "A dog on the right, a cat to the Left."
    assert mirror_text("LEFT or right-hand? leftover, lefty") == "RIGHT or left-hand? leftover, lefty"
    assert mirror_text(mirror_text("the left one and the right one")) == "the left one and the right one"


def test_a_mirrored_caption_sample_swaps_left_and_right():
    from pathlib import Path

    from vlfuse.data.captions import CaptionSet
    from vlfuse.data.tokenizer import Tokenizer
    from vlfuse.training.caption import encode_items, make_collate

    data = CaptionSet([Path("a.jpg"), Path("b.jpg")], [["a dog on the left", "the Right cat"], ["a cat"]])
    tok = Tokenizer.build(["a dog on the left", "a cat to the right of a dog"] * 5, min_count=1)
    items = encode_items(data, tok, max_len=10, group_by_image=True)
    feats = torch.arange(2 * 3 * 2 * 2, dtype=torch.float16).view(2, 3, 2, 2)
    acts, tokens, rows = make_collate(feats)(items)
    assert torch.equal(acts, feats.float()) and rows.tolist() == [0, 0, 1]
    assert [tok.decode(t.tolist()) for t in tokens] == ["a dog on the left", "the right cat", "a cat"]
    mirrored = feats + 100  # stands in for the cached stem outputs of the mirror images
    acts, tokens, rows = make_collate(feats, mirror=1.0, mirrored_features=mirrored)(items)
    assert torch.equal(acts, mirrored.float()) and rows.tolist() == [0, 0, 1]
    assert [tok.decode(t.tolist()) for t in tokens] == ["a dog on the right", "the left cat", "a cat"]


def test_a_mirrored_retrieval_sample_uses_its_captions_mirrored_text():
    from vlfuse.training.retrieval import make_collate, mirrored_rows

    captions = ["a dog on the left", "a cat", "the right hand"]
    changed, rows = mirrored_rows(captions)
    assert changed == ["a dog on the right", "the left hand"] and rows == [3, 1, 4]
    text = torch.arange(5.0)[:, None]  # each caption row's (pooled) text features: its row number
    cells, mirrored_cells = torch.zeros(3, 4, 8), torch.ones(3, 4, 8)
    items = [(0, [0]), (1, [1]), (2, [2])]
    got_cells, got_text, image_ids = make_collate(cells, text, mirrored_cells, 1.0, rows)(items)
    assert torch.equal(got_cells, mirrored_cells) and got_text[:, 0].tolist() == [3.0, 1.0, 4.0]
    got_cells, got_text, _ = make_collate(cells, text)(items)
    assert torch.equal(got_cells, cells) and got_text[:, 0].tolist() == [0.0, 1.0, 2.0]


def test_token_states_of_the_mirrored_captions_append_after_the_captions():
    """With a tuned text layer, retrieval caches token states per caption: those of the captions mirroring changes
    are appended (``TokenStates.cat``) and found at the rows ``mirrored_rows`` gives."""
    from vlfuse.training.retrieval import TokenStates

    def states(lengths, start):
        offsets = torch.tensor([0, *lengths]).cumsum(0)
        return TokenStates(torch.arange(start, start + int(offsets[-1]) * 2.0).view(-1, 2), offsets)

    plain, extra = states([3, 1], 0), states([2], 100)
    both = plain.cat(extra)
    assert len(both) == 3
    for row, (source, source_row) in enumerate([(plain, 0), (plain, 1), (extra, 0)]):
        assert all(torch.equal(a, b) for a, b in zip(both.batch([row]), source.batch([source_row])))


def test_a_mirrored_vqa_sample_swaps_left_and_right_in_questions_and_answers():
    from vlfuse.data.mirror import mirror_pixels
    from vlfuse.data.tokenizer import Tokenizer
    from vlfuse.data.vqa import VQAQuestion, VQASet
    from vlfuse.training.vqa import encode_items, make_collate

    data = VQASet(["a.png"], [VQAQuestion(0, "what is on the left?", ["circle"]),
                              VQAQuestion(0, "is the circle left or right?", ["left", "left", "right"])])
    tok = Tokenizer.build([q.question for q in data.questions], min_count=1)
    answers = ["circle", "left", "right"]
    items = encode_items(data, tok, answers, max_len=10)
    acts = torch.arange(2 * 3 * 2.0).view(1, 2, 3, 2).half()  # small-cnn: the stem outputs are the pixels
    collate = make_collate(acts, 3, 0, mirror=1.0, mirrored_acts=mirror_pixels(acts))
    acts_b, image_index, ids, _, targets = collate(items)
    assert torch.equal(acts_b, acts.float().flip(-1)) and image_index.tolist() == [0, 0]
    assert [tok.decode(q.tolist()) for q in ids] == ["what is on the right", "is the circle right or left"]
    assert torch.allclose(targets, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1 / 3, 2 / 3]]))  # 2 of 3 said "left"
    _, _, ids, _, targets = make_collate(acts, 3, 0)(items)
    assert [tok.decode(q.tolist()) for q in ids] == ["what is on the left", "is the circle left or right"]
    assert torch.allclose(targets, torch.tensor([[1.0, 0.0, 0.0], [0.0, 2 / 3, 1 / 3]]))


@pytest.mark.parametrize("task", ["caption", "retrieval", "vqa"])
def test_the_mirror_knob_is_one_probability_in_every_task(task):
    from vlfuse.config import from_dict
    from vlfuse.errors import ConfigError
    from vlfuse.training.caption import CaptionExperiment
    from vlfuse.training.retrieval import RetrievalExperiment
    from vlfuse.training.vqa import parse_experiment

    parse = {"caption": lambda raw: from_dict(CaptionExperiment, raw),
             "retrieval": lambda raw: from_dict(RetrievalExperiment, raw), "vqa": parse_experiment}[task]
    assert parse({"data": {"mirror": 0.5}}).data.mirror == 0.5
    assert parse({"data": {"mirror": 1}}).data.mirror == 1.0 and parse({}).data.mirror == 0.0
    for bad in (1.5, -0.1):
        with pytest.raises(ConfigError, match=r"data\.mirror is the probability .* must be in \[0, 1\], got"):
            parse({"data": {"mirror": bad}})
    old = {"data": {"flip": True}} if task == "vqa" else {"data": {"hflip": 0.5}}
    with pytest.raises(ConfigError, match=r"was removed.* Use 'data\.mirror' instead"):
        parse(old)


def test_vqa_training_mirrors_and_is_reproducible_from_train_seed(tmp_path):
    """A tiny VQA run with data.mirror (questions and answers that say left/right) trains end to end, and the same
    config trained twice gives the same weights: train.seed decides the initial weights and the mirroring draws."""
    import json

    from PIL import Image

    from vlfuse.training.vqa import train

    lines = []
    for i in range(12):
        image = Image.new("RGB", (32, 32), "white")
        image.paste((255, 0, 0), (0, 0, 16, 32) if i % 2 else (16, 0, 32, 32))  # red on the left or the right
        image.save(tmp_path / f"{i}.png")
        side = "left" if i % 2 else "right"
        lines.append(json.dumps({"image": f"{i}.png", "question": "which side is red?", "answer": side}))
        lines.append(json.dumps({"image": f"{i}.png", "question": f"is the {side} half red?", "answer": "yes"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    runs = []
    for run in ("a", "b"):
        config = {"task": "vqa", "data": {"path": str(tmp_path / "train.jsonl"), "val_fraction": 0.25,
                                          "test_split": "", "mirror": 0.5},
                  "model": {"vision": {"name": "small-cnn", "channels": 8, "num_layers": 2, "image_size": 32},
                            "text": {"name": "embedding", "embed_dim": 8}, "fusion": {"name": "concat", "dim": 16},
                            "head": {"name": "classifier", "hidden_dim": 16}},
                  "train": {"epochs": 2, "batch_size": 4, "warmup_steps": 1, "out_dir": str(tmp_path / run),
                            "progress": False, "threads": 1}}
        torch.manual_seed(len(runs))  # whatever the global generator held before must not matter
        assert train(config)["answers"] == 3
        runs.append(torch.load(tmp_path / run / "last.pt", weights_only=False)["model"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
