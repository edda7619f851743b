"""The package's layers point down: import-linter's contracts in pyproject.toml hold (no cycles between layers,
no upward imports), and importing the library does not import the service or training-only dependencies."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and "KEPT" in out.stdout


def test_importing_the_library_stays_light():
    # PyAV, PySceneDetect and OpenCV (the optional video extra) are imported only when a video is read; Ray (the
    # optional ray extra) only when a batch job runs on it; faiss only when an index needs it
    code = ("import sys, vlfuse, vlfuse.tasks.caption, vlfuse.tasks.vqa, vlfuse.tasks.retrieval, vlfuse.metrics.wups, "
            "vlfuse.tasks.subtitle, vlfuse.data.video, vlfuse.scale.batch, vlfuse.scale.cluster, "
            "vlfuse.tasks.retrieval.shards, vlfuse.cli.caption, vlfuse.cli.index; "
            "heavy = [m for m in ('fastapi', 'uvicorn', 'pycocoevalcap', 'matplotlib', 'playwright', 'nltk', 'av', "
            "'scenedetect', 'cv2', 'ray', 'faiss', 'schemathesis') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing vlfuse imported {out.stdout.strip()}"
