"""Why does the paper's refinement path (IR labels -> IRN -> random walk) lose on the demo? Trains IRN on a
finished run's CAMs and scores random-walk variants on every training image, against the CAM argmax, the IR
labels (ignore counted as background) and the same walks on ground-truth class boundaries.

A variant is a JSON object of ``RandomWalkParams`` fields plus ``edge`` ("irn" or "gt") and ``scale``: the image
and the CAMs are upscaled by ``scale`` before IRN's boundary map and the walk, and the walked scores brought back
(stride 4 on a 100-pixel image leaves 25 cells; IRN should then be trained on upscaled crops too,
``"scale_range": [1.0, 2.0]``). Two worker processes.

    python bench/irn_path.py runs/synthetic-demo /tmp/irn-s2 --irn '{"scale_range": [1.0, 2.0], "crop": 96,
        "max_steps": 900}' --variants '{"x2": {"proto_weight": 0, "exp_times": 6, "scale": 2}}'

Results in ``<out_dir>/irn_path.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.refine_quality import gt_edges  # noqa: E402
from models.irn import STRIDE  # noqa: E402
from models.metrics import ConfusionMatrix  # noqa: E402
from models.pseudo_labels import RandomWalkParams, cam_labels, upscaled_walk_labels  # noqa: E402
from storage.datasets.split_files import load_split_file  # noqa: E402
from storage.images import IGNORE_INDEX, read_mask  # noqa: E402
from tasks.engine.label_maps import load_image_and_cams  # noqa: E402
from tasks.engine.pseudo_label_worker import edge_map_of  # noqa: E402
from tasks.make_ir_labels import MakeIrLabelsConfig, make_ir_labels  # noqa: E402
from tasks.make_pseudo_labels import MakePseudoLabelsConfig  # noqa: E402
from tasks.train_irn import TrainIrnConfig, train_irn  # noqa: E402


def resized(array: np.ndarray, size: tuple[int, int], mode: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    batch = tensor[None] if tensor.ndim == 3 else tensor[None, None]
    out = F.interpolate(batch, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return out[0] if tensor.ndim == 3 else out[0, 0]


def score_image(item: tuple[str, str, str], store_url: str, irn: str, ir_dir: str, canvas: int,
                variants: dict) -> tuple:
    """(mask, labels by variant) of one (image id, image URL, mask URL)."""
    torch.set_num_threads(1)
    image_id, image_url, mask_url = item
    image, keys, proto_cam, cam = load_image_and_cams(store_url, image_id, image_url)
    mask = read_mask(mask_url)
    ir = np.array(Image.open(f"{ir_dir}/{image_id}.png"))
    labels = {"cam_k (stored background)": cam_labels(keys, proto_cam, cam, 0.0),
              "ir_labels": np.where(ir == IGNORE_INDEX, 0, ir)}
    edges: dict = {}

    def edge_at(source: str, scale: float, size: tuple[int, int]) -> torch.Tensor:
        if (source, size) not in edges:
            if source == "gt":
                edges[source, size] = gt_edges(resized(mask, size, "nearest").numpy().astype(np.uint8), F.max_pool2d)
            else:
                big = image if size == image.shape[:2] else np.array(Image.fromarray(image).resize(size[::-1],
                                                                                               Image.BILINEAR))
                edges[source, size] = edge_map_of(big, irn, "cpu", math.ceil(canvas * scale / STRIDE) * STRIDE).float()
        return edges[source, size]

    for name, spec in variants.items():
        params = dict(spec)
        source, scale = params.pop("edge", "irn"), params.pop("scale", 1)
        labels[name] = upscaled_walk_labels(keys, torch.from_numpy(proto_cam), torch.from_numpy(cam),
                                            partial(edge_at, source, scale), RandomWalkParams(**params), scale)
    return mask, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished run directory with its CAM store (e.g. runs/synthetic-demo)")
    parser.add_argument("out_dir", help="where the IR labels and the IRN go")
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthetic.yaml"))
    parser.add_argument("--ir-labels", default="{}", help="JSON overrides of the make_ir_labels section")
    parser.add_argument("--irn", default="{}", help="JSON overrides of the config's train_irn section")
    parser.add_argument("--variants", required=True, help="JSON: name -> random-walk variant")
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args()
    run, out = args.run, Path(args.out_dir)
    config = yaml.safe_load(Path(args.config).read_text())
    split_url, store_url = f"{run}/prepare_data/train_aug.json", f"{run}/infer_cams/cams.zarr"
    ir_section = {**config.get("make_ir_labels", {}), **json.loads(args.ir_labels)}
    make_ir_labels(MakeIrLabelsConfig(**ir_section), store_url, split_url, str(out / "ir"))
    section = {**config["train_irn"], "weights": f"{run}/train_cam/final.pt", **json.loads(args.irn)}
    irn_manifest = train_irn(TrainIrnConfig(**section), str(out / "ir"), split_url, str(out / "irn"), args.seed,
                             device="cpu")
    canvas = MakePseudoLabelsConfig(**config["make_pseudo_labels"]).edge_canvas
    split = load_split_file(split_url)
    job = partial(score_image, store_url=store_url, irn=irn_manifest["checkpoint"], ir_dir=str(out / "ir"),
                  canvas=canvas, variants=json.loads(args.variants))
    matrices: dict = {}
    with Pool(2) as pool:
        for mask, labels in pool.imap(job, [(i, split.image_url(i), split.mask_url(i)) for i in split.ids],
                                      chunksize=8):
            for name, label in labels.items():
                matrices.setdefault(name, ConfusionMatrix(len(split.class_names))).update(mask, label)
    miou = {name: round(100 * m.scores(split.class_names)["miou"], 1) for name, m in matrices.items()}
    results = {"run": run, "make_ir_labels": ir_section, "train_irn": section,
               "irn_seconds": irn_manifest["train_seconds"],
               "variants": json.loads(args.variants), "miou": miou}
    (out / "irn_path.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(miou, indent=2))


if __name__ == "__main__":
    main()
