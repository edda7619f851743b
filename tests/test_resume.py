"""Kill -9 a training run mid-epoch, resume it with ``--resume``: it ends with the same weights, bit for bit, and
the same validation metrics as a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
from conftest import REPO, tiny_config, write_config
from safetensors.torch import load_file

from vlfuse.cli.main import main

# ``vlfuse train`` whose process stops dead after its ``stop_after``-th optimizer step (touching ``marker`` first),
# so that the test kills it at a known point: mid-epoch, steps past its last mid-epoch checkpoint.
TRAIN_THEN_HANG = """
import pathlib, sys, time
import torch
from vlfuse.cli.main import main

stop_after, marker, config = int(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
step, calls = torch.optim.AdamW.step, []

def step_then_hang(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == stop_after:
        marker.touch()
        time.sleep(600)  # SIGKILL arrives here
    return out

torch.optim.AdamW.step = step_then_hang
sys.exit(main(["train", "--config", config]))
"""


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, feature_cache, trained_run):
    """``trained_run`` is the uninterrupted run: the same config, with checkpoints at epoch ends only (saving
    draws no random numbers). This one checkpoints every 3 steps (120 captions in batches of 16: 7 steps an
    epoch, 2 epochs), is killed after step 11 — mid-epoch 2, two steps past its last checkpoint — and resumed."""
    config = write_config(tmp_path / "c.json", tiny_config(tmp_path, feature_cache, checkpoint_every=3))
    marker = tmp_path / "hanging"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    victim = subprocess.Popen([sys.executable, "-c", TRAIN_THEN_HANG, "11", str(marker), str(config)], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached step 11"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    run = tmp_path / "run"
    state = torch.load(run / "last.pt", weights_only=False)["state"]
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (9, 1, 2)  # steps 10-11 are lost
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # no half-written file left behind

    assert main(["train", "--config", str(config), "--resume"]) == 0
    resumed = torch.load(run / "last.pt", weights_only=False)
    uninterrupted = torch.load(trained_run / "last.pt", weights_only=False)
    assert resumed["state"]["global_step"] == uninterrupted["state"]["global_step"] == 14
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    different = [k for k in uninterrupted["model"] if not torch.equal(resumed["model"][k], uninterrupted["model"][k])]
    assert not different, different
    best, best_uninterrupted = (load_file(r / "best" / "model.safetensors") for r in (run, trained_run))
    assert best.keys() == best_uninterrupted.keys()
    assert all(torch.equal(best[k], best_uninterrupted[k]) for k in best)  # (the file's header order varies)

    def val_metrics(r):
        return [{k: v for k, v in json.loads(line).items() if k.startswith("val_")}
                for line in (r / "metrics.jsonl").read_text().splitlines()]
    assert val_metrics(run) == val_metrics(trained_run)  # epoch 1 was logged before the kill, epoch 2 after
