"""Reliability: SIGKILL the `sfc run` process group in the middle of each long stage (CAM training and inference,
IR labels, IRN, pseudo labels, segmentation training), `sfc resume` it each time, and compare every output with
an uninterrupted run of the same configuration: identical on CPU.

Opt-in (several pipeline processes, minutes on 2 cores): ``SFC_INTEGRATION=1 .venv/bin/python -m pytest
tests/test_kill_resume.py``. The per-stage kill tests of the default suite simulate the kill inside the process
(tests/interrupt.py); this one kills the real process, Prefect's server included."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flows.config import load_config
from storage import fs
from tests.compare_runs import assert_same_cam_stores, assert_same_label_pngs
from tests.test_flow import TINY

ROOT = Path(__file__).resolve().parents[1]
LONGER = ["train_cam.max_steps=6", "train_cam.checkpoint_every=2", "train_irn.max_steps=6",
          "train_irn.checkpoint_every=2", "train_seg.max_steps=6", "train_seg.checkpoint_every=2"]
KILL_AFTER = [  # the first sign that each long stage is under way
    "train_cam/checkpoints/step_0000002.pt", "infer_cams/cams.zarr/*/zarr.json", "make_ir_labels/*.png",
    "train_irn/checkpoints/step_0000002.pt", "make_pseudo_labels/*.png", "train_seg/checkpoints/step_0000002.pt",
]

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    os.environ.get("SFC_INTEGRATION") != "1", reason="set SFC_INTEGRATION=1 (several pipeline processes)")]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen, path: str, timeout: float = 600) -> None:
    """SIGKILL the process group as soon as a file matching ``path`` exists (the stage is under way)."""
    deadline = time.time() + timeout
    while not glob.glob(path):
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {process.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _weights(url: str) -> dict:
    state = torch.load(url, map_location="cpu", weights_only=False)
    return state["model"] if "model" in state else state


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    from flows.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("kill")
    common = [*TINY, *LONGER, f"run.root={tmp / 'runs'}", f"prepare_data.root={tmp / 'data'}"]
    reference = load_config("configs/synthetic.yaml", [*common, "run.name=straight"])
    run_pipeline(reference)
    killed = load_config("configs/synthetic.yaml", [*common, "run.name=killed"])
    process = _start(["run", "--config", "configs/synthetic.yaml", *common, "run.name=killed"])
    for marker in KILL_AFTER:
        _kill_when(process, f"{killed.run_dir}/{marker}")
        process = _start(["resume", "killed", "--root", killed.run.root])
    assert process.wait(timeout=900) == 0, process.stderr.read().decode()[-3000:]
    return reference, killed


def test_killed_and_resumed_run_equals_uninterrupted_run(runs):
    reference, killed = runs
    for checkpoint in ("train_cam/final.pt", "train_irn/irn.pt", "train_seg/final.pt"):
        ours, theirs = _weights(f"{killed.run_dir}/{checkpoint}"), _weights(f"{reference.run_dir}/{checkpoint}")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), checkpoint
    assert_same_cam_stores(f"{killed.run_dir}/infer_cams/cams.zarr", f"{reference.run_dir}/infer_cams/cams.zarr")
    for folder in ("make_ir_labels", "make_pseudo_labels"):
        assert_same_label_pngs(f"{killed.run_dir}/{folder}", f"{reference.run_dir}/{folder}")
    pseudo = [json.loads(fs.read_text(f"{d}/eval_pseudo_labels/pseudo_label_eval.json"))["scores"]
              for d in (killed.run_dir, reference.run_dir)]
    assert pseudo[0] == pseudo[1]
    seg = [json.loads(fs.read_text(f"{d}/eval_seg/seg_eval.json")) for d in (killed.run_dir, reference.run_dir)]
    assert [s["val"]["crf"] for s in seg] == [seg[1]["val"]["crf"]] * 2
    assert [s["val"]["no_crf"] for s in seg] == [seg[1]["val"]["no_crf"]] * 2
