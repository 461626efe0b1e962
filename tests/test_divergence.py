"""A non-finite loss or gradient norm stops a training stage with TrainingDivergedError naming the step and every
loss term; the bad weights are never saved (the last step checkpoint stays, a rerun resumes from it), the stage's
MLflow run is marked FAILED, and under torchrun every rank stops at the same step."""
from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import tasks.train_cam as train_cam_module
import tasks.train_irn as train_irn_module
import tasks.train_seg as train_seg_module
from storage import checkpoints, fs
from storage.errors import TrainingDivergedError
from storage.tracking import Tracker
from tasks.engine import distributed
from tasks.engine.training import HookBase, Trainer
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.synthetic_splits import stage_inputs
from tests.test_irn import TINY as IRN
from tests.test_segmentation import TINY as SEG
from tests.test_train_cam import TINY as CAM
from tests.tiny_trainer import rank_worker, tiny_training

NAN = float("nan")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return stage_inputs(tmp_path_factory.mktemp("divergence"))


def _spoil_call(monkeypatch, module, name: str, call: int, spoil) -> None:
    """Replace ``module.name`` so that its ``call``-th result passes through ``spoil``."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        return spoil(result) if calls["n"] == call else result

    monkeypatch.setattr(module, name, wrapper)


def _step_checkpoints(out_dir: Path) -> list[int]:
    return [step for step, _ in checkpoints.step_checkpoints(str(out_dir / "checkpoints"))]


def _finite_checkpoint(out_dir: Path, step: int) -> dict:
    state = checkpoints.load(checkpoints.step_url(str(out_dir / "checkpoints"), step), weights_only=False)
    weights = state.get("model") or state["heads"]
    assert state["step"] == step and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    return state


class _Recorder(Tracker):
    """A tracker that keeps the metrics logged and the final status of its stage runs (the flow's MLflow calls)."""

    def __init__(self):
        super().__init__(None, None)
        self.metrics: list[tuple[dict, int | None]] = []
        self.children: dict[str, _Recorder] = {}
        self.status: str | None = None

    def child(self, name: str) -> _Recorder:
        return self.children.setdefault(name, _Recorder())

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((dict(metrics), step))

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status


def test_seg_nan_loss_stops_the_stage_keeps_the_last_checkpoint_and_fails_its_mlflow_run(data, tmp_path,
                                                                                          monkeypatch):
    from flows.pipeline import stage_run

    cfg = train_seg_module.TrainSegConfig(**{**SEG, "val_every": 0, "val_max_images": 2})
    out, parent = tmp_path / "seg", _Recorder()
    # two forwards a step: the 5th loss is the first of step 3
    _spoil_call(monkeypatch, train_seg_module, "msc_cross_entropy", 5, lambda loss: loss * NAN)
    with pytest.raises(TrainingDivergedError) as raised:
        with stage_run(parent, "train_seg") as child:
            train_seg_module.train_seg(cfg, data["train_aug"], data["labels"], data["val"], str(out), seed=1,
                                       device="cpu", tracker=child)
    last_good = checkpoints.step_url(str(out / "checkpoints"), 2)
    assert str(raised.value) == f"train_seg diverged at step 3: loss=nan, gradient norm=nan; the last good " \
                                f"checkpoint is {last_good}"
    assert _step_checkpoints(out) == [2] and not fs.exists(str(out / "final.pt"))
    assert not fs.exists(str(out / "train_seg.json"))
    _finite_checkpoint(out, 2)
    assert parent.children["train_seg"].status == "FAILED"  # the flow's stage run: MLflow status FAILED
    assert [step for metrics, step in child.metrics if "loss" in metrics] == [1, 2]  # no NaN logged

    monkeypatch.undo()
    calls, real = [], train_seg_module.msc_cross_entropy
    monkeypatch.setattr(train_seg_module, "msc_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    manifest = train_seg_module.train_seg(cfg, data["train_aug"], data["labels"], data["val"], str(out), seed=1,
                                          device="cpu")
    assert len(calls) == 4 and manifest["steps"] == 4  # resumed from step 2: steps 3 and 4, two forwards each


def test_cam_nan_loss_term_is_named_with_every_term(data, tmp_path, monkeypatch):
    cfg = train_cam_module.TrainCamConfig(**CAM)
    out = tmp_path / "cam"
    _spoil_call(monkeypatch, train_cam_module, "sfc_step_losses", 5,
                lambda losses: dataclasses.replace(losses, proto=losses.proto * NAN))
    with pytest.raises(TrainingDivergedError, match=r"^train_cam diverged at step 5: loss=nan \(loss_cls=[0-9.e-]+, "
                                                    r"loss_proto=nan, loss_scale=[0-9.e-]+\), gradient norm=nan; "
                                                    r"the last good checkpoint is .*step_0000004\.pt$"):
        train_cam_module.train_cam(cfg, data["train_aug"], None, str(out), seed=1, device="cpu")
    assert _step_checkpoints(out) == [2, 4] and not fs.exists(str(out / "final.pt"))
    _finite_checkpoint(out, 4)


def test_irn_non_finite_gradient_with_a_finite_loss_is_caught(data, tmp_path, monkeypatch):
    """sqrt(0) has an infinite derivative: the loss stays finite, its gradients become NaN."""
    cfg = train_irn_module.TrainIrnConfig(**IRN)
    out = tmp_path / "irn"
    def nan_gradient(losses):
        return dataclasses.replace(losses, total=losses.total + 0 * (losses.total - losses.total).sqrt())

    _spoil_call(monkeypatch, train_irn_module, "irn_losses", 3, nan_gradient)
    with pytest.raises(TrainingDivergedError, match=r"^train_irn diverged at step 3: loss=[0-9.e-]+ \(loss_bg_pos=.*"
                                                    r"loss_dp_bg=[0-9.e-]+\), gradient norm=nan; the last good "
                                                    r"checkpoint is .*step_0000002\.pt$"):
        train_irn_module.train_irn(cfg, data["ir_labels"], data["train_aug"], str(out), seed=3, device="cpu")
    assert _step_checkpoints(out) == [2] and not fs.exists(str(out / "irn.pt"))
    _finite_checkpoint(out, 2)


def test_divergence_before_any_checkpoint_says_a_rerun_starts_over(tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"^tiny diverged at step 1: loss=nan, gradient norm=nan; no step "
                                                    r"checkpoint was written yet: a rerun starts from step 0$"):
        tiny_training(str(tmp_path), distributed.Ranks(), nan_step=1)
    assert _step_checkpoints(tmp_path) == []


class _SpoilWeights(HookBase):
    def after_step(self, trainer: Trainer) -> None:
        if trainer.step == 2:
            trainer.solver.model.bias.data.fill_(float("inf"))


def test_non_finite_weights_are_never_saved(tmp_path):
    """Weights spoilt after a finite step (as an overflowing update would) stop the stage before the checkpoint."""
    with pytest.raises(TrainingDivergedError, match=r"^tiny diverged at step 2: non-finite weights \(bias\) after "
                                                    r"loss=[0-9.e-]+; no step checkpoint was written yet"):
        tiny_training(str(tmp_path), distributed.Ranks(), hooks=[_SpoilWeights()])
    assert _step_checkpoints(tmp_path) == []


def test_every_rank_stops_when_one_rank_diverges(tmp_path):
    """Rank 1 alone sees a NaN loss at step 3; both ranks raise (no rank waits in a collective) naming rank 1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.start_processes(rank_worker, args=(port, str(tmp_path / "out"), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    for process in context.processes:  # the reports decide; gloo may abort a process at exit, after its report
        process.join(120)
    reports = [tmp_path / f"rank{r}.json" for r in range(2)]
    assert all(r.exists() for r in reports), [p.exitcode for p in context.processes]
    messages = [json.loads(r.read_text()) for r in reports]
    assert messages[0] == messages[1]
    assert messages[0].startswith("tiny diverged at step 3 (rank 1): loss=nan, gradient norm=nan; the last good "
                                  "checkpoint is ") and messages[0].endswith("step_0000002.pt")
    assert _step_checkpoints(tmp_path / "out") == [2]
