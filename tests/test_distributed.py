"""Data-parallel training: two gloo processes on the CPU (the torchrun environment set by hand) train CAM, IRN and
segmentation stages, and run ``sfc train``; gradients are averaged, rank 0 alone writes, and a resumed 2-process
run ends identical."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import flows.pipeline
from flows.cli import main as cli
from flows.config import load_config
from flows.records import manifest_url
from flows.stages import STAGES
from storage import checkpoints, fs
from storage.datasets.split_files import load_split_file
from storage.tracking import Tracker
from tasks.engine import distributed
from tasks.engine.distributed import Ranks
from tasks.engine.resume import restore_rank_state
from tasks.train_cam import TrainCamConfig, build_model, train_cam
from tasks.train_irn import TrainIrnConfig, train_irn
from tasks.train_seg import TrainSegConfig, train_seg
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.synthetic_splits import stage_inputs

CAM = dict(backbone="resnet18", trainable_from=3, crop=64, resize_long=(48, 80), batch_size=2, num_workers=0,
           class_weights="uniform", keep_checkpoints=5)
CLI_CAM = dict(method="baseline", norm="frozen", max_steps=2, val_max_images=2)  # no BN statistics, no image bank
SEG = dict(backbone="resnet18", norm="batch", crop=48, batch_size=1, iter_size=2, max_steps=2, num_workers=0,
           val_every=0, val_size=80, val_max_images=2)
IRN = dict(backbone="resnet18", crop=32, radius=3, batch_size=2, max_steps=2, num_workers=0, mean_shift_images=4)
WORLD = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Synthetic splits; ground-truth masks stand in for pseudo labels and (with ignored borders) IR labels."""
    return stage_inputs(tmp_path_factory.mktemp("ddp"), 24, 3, 56, 72)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_overrides(run_root: str) -> list[str]:
    cam = {**CAM, **CLI_CAM, "resize_long": "[48,80]"}
    return [f"run.root={run_root}", "run.name=ddp", "run.seed=1", "run.device=cpu",
            *(f"train_cam.{key}={value}" for key, value in cam.items())]


def _run_job(job: dict, data: dict[str, str]) -> dict:
    kind, out = job["kind"], job["out"]
    if kind == "cli":
        flows.pipeline.open_tracker = lambda *args, **kwargs: Tracker.null()  # no MLflow store to set up
        cli(["train", "train_cam", "-c", "configs/synthetic.yaml", *_cli_overrides(out)], standalone_mode=False)
        return json.loads(fs.read_text(f"{out}/ddp/manifests/train_cam.json"))["manifest"]
    if kind == "cam":
        return train_cam(TrainCamConfig(**job["cfg"]), data["train_aug"], job.get("val"), out, seed=1, device="cpu")
    if kind == "seg":
        return train_seg(TrainSegConfig(**job["cfg"]), data["train_aug"], data["labels"], data["val"], out, seed=1,
                         device="cpu")
    return train_irn(TrainIrnConfig(**job["cfg"]), data["ir_labels"], data["train_aug"], out, seed=1, device="cpu")


def _worker(rank: int, port: int, jobs: list[dict], data: dict[str, str], report_dir: str) -> None:
    """One torchrun-like rank: run the jobs in order, recording every file this rank writes."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    writes: list[str] = []
    real_save, real_write_text = checkpoints.save, fs.write_text

    def save(url: str, state: dict) -> None:
        writes.append(url)
        real_save(url, state)

    def write_text(url: str, text: str) -> None:
        writes.append(url)
        real_write_text(url, text)

    checkpoints.save, fs.write_text = save, write_text
    manifests = []
    for job in jobs:
        if "resume_from" in job and rank == 0:
            source = checkpoints.step_url(job["resume_from"][0], job["resume_from"][1])
            os.makedirs(Path(job["out"]) / "checkpoints")
            shutil.copy(source, Path(job["out"]) / "checkpoints" / Path(source).name)
        if "resume_from" in job:
            torch.distributed.barrier()
        manifests.append(_run_job(job, data))
    distributed.cleanup()
    report = {"rank": rank, "writes": writes, "manifests": manifests}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report, default=str))


def _spawn(jobs: list[dict], data: dict[str, str], report_dir: Path) -> list[dict]:
    report_dir.mkdir()
    mp.spawn(_worker, args=(_free_port(), jobs, data, str(report_dir)), nprocs=WORLD, join=True)
    return [json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _weights(url: str) -> dict[str, torch.Tensor]:
    return checkpoints.load(url)["model"]


@pytest.fixture(scope="module")
def ddp_runs(data, tmp_path_factory) -> dict:
    """One 2-process launch running every job: SFC CAM with the image bank for 3 steps (checkpoint at step 2), the
    same resumed from that checkpoint, IRN and segmentation for 2 steps, and ``sfc train train_cam`` (baseline
    method, 2 steps) in a run directory whose prepare_data stage is recorded as done."""
    tmp = tmp_path_factory.mktemp("ddp_runs")
    out = {name: str(tmp / name) for name in ("runs", "full", "resumed", "irn", "seg")}
    splits = {"train": data["train_aug"], "val": data["val"]}
    record = {"stage": "prepare_data", "cache_key": "prepare_data-test", "manifest": {"splits": splits}}
    fs.write_text(manifest_url(f"{out['runs']}/ddp", "prepare_data"), json.dumps(record))
    jobs = [
        {"kind": "cam", "out": out["full"], "cfg": {**CAM, "max_steps": 3, "checkpoint_every": 2}},
        {"kind": "cam", "out": out["resumed"], "resume_from": (f"{out['full']}/checkpoints", 2),
         "cfg": {**CAM, "max_steps": 3, "checkpoint_every": 2}},
        {"kind": "irn", "out": out["irn"], "cfg": IRN},
        {"kind": "seg", "out": out["seg"], "cfg": SEG},
        {"kind": "cli", "out": out["runs"]},  # last: the command destroys the process group
    ]
    return {"reports": _spawn(jobs, data, tmp / "reports"), "out": out, "tmp": tmp}


def test_both_ranks_ran_and_only_rank_0_wrote(ddp_runs):
    main, other = ddp_runs["reports"]
    assert other["writes"] == []
    assert main["manifests"] == other["manifests"] and len(main["manifests"]) == 5
    written = set(main["writes"])
    for out_dir in (ddp_runs["out"]["full"], ddp_runs["out"]["resumed"], f"{ddp_runs['out']['runs']}/ddp/train_cam"):
        assert f"{out_dir}/train_cam.json" in written
    assert checkpoints.step_url(f"{ddp_runs['out']['full']}/checkpoints", 2) in written
    assert f"{ddp_runs['out']['full']}/final.pt" in written


def test_train_command_records_the_stage_for_the_flow(ddp_runs):
    """``sfc train`` under two ranks leaves the record the flow writes, with the flow's cache key."""
    cfg = load_config("configs/synthetic.yaml", _cli_overrides(ddp_runs["out"]["runs"]))
    record = json.loads(fs.read_text(f"{cfg.run_dir}/manifests/train_cam.json"))
    stage = next(s for s in STAGES if s.name == "train_cam")
    inputs = {"prepare_data": json.loads(fs.read_text(f"{cfg.run_dir}/manifests/prepare_data.json"))["manifest"]}
    assert record["cache_key"] == stage.cache_key(cfg, inputs)
    assert record["manifest"] == ddp_runs["reports"][1]["manifests"][-1]
    assert fs.exists(f"{cfg.run_dir}/config.yaml")


def test_gradients_are_averaged_over_the_union_batch(ddp_runs, data):
    """Two ranks of 2 images equal one process of 4 (the union of both shards) from the same init."""
    cfg = load_config("configs/synthetic.yaml", _cli_overrides(ddp_runs["out"]["runs"])).train_cam
    single = train_cam(cfg.model_copy(update={"batch_size": 4}), data["train_aug"], None,
                       str(ddp_runs["tmp"] / "single"), seed=1, device="cpu")
    expected = _weights(single["final_checkpoint"])
    actual = _weights(ddp_runs["reports"][0]["manifests"][-1]["final_checkpoint"])
    torch.manual_seed(1)
    initial = build_model(cfg, load_split_file(data["train_aug"]).num_classes).state_dict()
    moved = [k for k in expected if expected[k].is_floating_point() and not torch.equal(expected[k], initial[k])]
    assert moved
    for key in moved:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_resumed_two_process_run_ends_identical(ddp_runs):
    full, resumed = ddp_runs["reports"][0]["manifests"][:2]
    expected, actual = _weights(full["final_checkpoint"]), _weights(resumed["final_checkpoint"])
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key
    state = checkpoints.load(checkpoints.step_url(f"{ddp_runs['out']['full']}/checkpoints", 2), weights_only=False)
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    with pytest.raises(ValueError, match="written by 2 training process"):
        restore_rank_state(state, Ranks())


def test_irn_and_segmentation_train_on_two_ranks(ddp_runs):
    irn, seg = ddp_runs["reports"][0]["manifests"][2:4]
    assert irn["steps"] == 2 and np.isfinite(irn["mean_shift"]).all() and fs.exists(irn["checkpoint"])
    assert seg["steps"] == 2 and [v["step"] for v in seg["validation"]] == [2] and fs.exists(seg["checkpoint"])


def test_single_process_outside_torchrun():
    ranks, device = distributed.setup(torch.device("cpu"))
    assert ranks == Ranks() and device == torch.device("cpu") and not torch.distributed.is_initialized()
    assert ranks.shard([1, 2, 3]) == [1, 2, 3] and ranks.rank_seed(5) == 5
    assert Ranks(1, 2).shard([0, 1, 2, 3]) == [2, 3] and Ranks(1, 2).rank_seed(5) == 6


def test_more_ranks_than_gpus_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=1 needs CUDA device 1, but this node has 1 CUDA device"):
        distributed.setup(torch.device("cuda"))
