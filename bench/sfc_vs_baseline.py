"""SFC vs a plain CAM baseline on the synthetic long-tailed dataset: does SFC raise the tail classes' CAM IoU?

Trains both methods with the same config and budget (only ``train_cam.method`` differs), runs multi-scale CAM
inference and the CAM evaluation on the val split for each, and compares per-class IoU grouped by training-split
frequency N_c:

    .venv/bin/python bench/sfc_vs_baseline.py                       # 300 steps (an earlier demo budget), seed 10
    .venv/bin/python bench/sfc_vs_baseline.py --steps 600 --seed 11 --tag s600-seed11
    .venv/bin/python bench/sfc_vs_baseline.py --steps 1500 --seed 10 --eval-dataset 1:1200 \
        --eval-splits train_aug val test --tag demo-seed10          # the demo's budget (docs/sfc_vs_baseline.md)

The plain stage functions are called directly (no Prefect, no MLflow). Everything a run produces lives under
``--workdir`` (default runs/bench-sfc-vs-baseline/): one sub-folder per (method, steps, seed, config hash), so a
rerun skips finished training (train_cam returns early on a matching manifest) and finished inference (the CAM
store skips completed images). Results: bench/results/sfc_vs_baseline[-TAG].json and .png.

Groups (classes ranked by the training-split N_c of dataset_stats.json, ties broken by VOC N_c, then name):
head = the 5 most frequent, tail = the 5 least frequent, "shared-part rare" = the keys of SHARED_PARTS and
"partners" = their frequent partners. Each variant is scored at its own best background threshold (best mIoU
over all classes incl. background, the usual CAM-evaluation rule); group means are means of foreground IoUs.

Diagnostics computed here besides the stage outputs:
* R: the multi-scale raw classifier CAM (before PCM). The baseline never trains PCM's f9 nor the side heads, so
  its K is its CAM propagated by an untrained affinity and its P is meaningless; R is the plain-CAM baseline in
  the usual sense, and is given for both methods.
* false activation: for each shared-part rare class r with partner p, over the val images that contain r and
  whose label holds p, the fraction of r's ground-truth pixels labelled p (also: labelled r, labelled background).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the config's relative paths (data/synthetic) are relative to the repository root

from flows.config import load_config  # noqa: E402
from models.cam_eval import ThresholdSweep, threshold_labels  # noqa: E402
from models.cam_inference import fuse_scales  # noqa: E402
from storage import fs  # noqa: E402
from storage.cam_store import CamStore  # noqa: E402
from storage.datasets.cam_inference import MultiScaleSet  # noqa: E402
from storage.datasets.split_files import load_split_file, save_split  # noqa: E402
from storage.datasets.synthetic import SHARED_PARTS, SYNTHETIC_CLASSES  # noqa: E402
from storage.datasets.voc_layout import VOCLayoutDataset  # noqa: E402
from storage.images import read_mask  # noqa: E402
from storage.plots import bar_chart_png  # noqa: E402
from tasks.eval_cam import REFERENCE_RULE, RESULTS, eval_cam  # noqa: E402
from tasks.infer_cams import infer_cams, load_cam_network, union_of_splits  # noqa: E402
from tasks.prepare_data import ensure_synthetic, prepare_data  # noqa: E402
from tasks.runtime.device import resolve_device  # noqa: E402
from tasks.runtime.hashing import config_hash  # noqa: E402
from tasks.train_cam import train_cam  # noqa: E402

log = logging.getLogger("bench.sfc_vs_baseline")

METHODS = ("baseline", "sfc")
RAW = "R"
GROUP_SIZE = 5
# What each (method, variant) column means; the baseline's P comes from side heads that never received a gradient.
NOTES = {
    ("baseline", "K"): "classifier CAM after PCM; PCM's f9 is untrained in the baseline (random init)",
    ("baseline", "P"): "MEANINGLESS: prototype CAM from side heads that receive no gradient in the baseline",
    ("baseline", RAW): "raw classifier CAM, no PCM (the plain-CAM baseline in the usual sense; diagnostic)",
    ("sfc", "K"): "PCM classifier CAM",
    ("sfc", "P"): "prototype CAM",
    ("sfc", RAW): "raw classifier CAM, no PCM (diagnostic)",
}
SFC_CANDIDATES = ("K", "P", "K+0.3P", "K+0.7P")


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def class_groups(class_counts: dict[str, int]) -> tuple[list[str], dict[str, list[str]]]:
    """Foreground classes sorted by N_c (most frequent first) and the head/tail/shared-part groups."""
    voc = {c.name: c.voc_count for c in SYNTHETIC_CLASSES}
    ranked = sorted(class_counts, key=lambda c: (-class_counts[c], -voc.get(c, 0), c))
    partners = list(dict.fromkeys(SHARED_PARTS.values()))
    groups = {
        "head": ranked[:GROUP_SIZE],
        "tail": ranked[-GROUP_SIZE:],
        "shared_part_rare": list(SHARED_PARTS),
        "shared_part_partners": partners,
        "all_foreground": ranked,
    }
    return ranked, groups


def load_val_cams(store_url: str, split, proto_weights) -> list[dict]:
    """Every val image's mask, keys, stored P / K and the fused K + wP maps, as eval_cam forms them (still
    background-trick encoded)."""
    store = CamStore.open(store_url)
    items = []
    for image_id in split.ids:
        keys, proto, cam = store.load(image_id)
        mask = torch.from_numpy(read_mask(split.mask_url(image_id)).astype(np.int64))
        item = {"id": image_id, "mask": mask, "keys": torch.from_numpy(keys), "P": proto, "K": cam}
        item.update({f"K+{w}P": (cam + w * proto) / (1 + w) for w in proto_weights})
        items.append(item)
    return items


@torch.no_grad()
def raw_cams(checkpoint_url: str, split, scales, device: str) -> dict[str, np.ndarray]:
    """Multi-scale + flip raw classifier CAMs (before PCM), fused exactly as the stored P and K are."""
    torch_device = resolve_device(device)
    model, _ = load_cam_network(checkpoint_url, split.class_names, torch_device)
    out = {}
    for item in MultiScaleSet(split, split.ids, scales):
        label = item["label"].to(torch_device)
        label_bg = torch.cat([label.new_ones(1), label])
        maps = [model.forward_cams(pair.to(torch_device), label_bg).raw_cam for pair in item["pairs"]]
        keys = torch.cat([torch.zeros(1, dtype=torch.long, device=torch_device), torch.nonzero(label).flatten() + 1])
        out[item["id"]] = fuse_scales(maps, tuple(item["size"]))[keys].float().cpu().numpy()
    return out


def sweep(items: list[dict], variant: str, names, thresholds) -> dict:
    s = ThresholdSweep(len(names), thresholds)
    for it in items:
        s.update(it["mask"], torch.from_numpy(it[variant][1:] / 2.0), it["keys"])
    return s.results(names)


def false_activation(items: list[dict], variant: str, threshold: float, names) -> dict:
    """Per shared-part rare class r (partner p): where r's ground truth lies in images whose label holds p, the
    fractions labelled p / r / background at ``threshold``; plus the whole-split confusion row of r."""
    index = {n: i for i, n in enumerate(names)}
    counts = {r: {"images": 0, "images_with_partner": 0, "pixels": 0, "as_partner": 0, "as_self": 0,
                  "as_background": 0} for r in SHARED_PARTS}
    for it in items:
        labels = it["keys"][threshold_labels(torch.from_numpy(it[variant][1:] / 2.0), threshold)]
        present = set(it["keys"].tolist())
        for rare, partner in SHARED_PARTS.items():
            r, p = index[rare], index[partner]
            region = it["mask"] == r
            if not bool(region.any()):
                continue
            c = counts[rare]
            c["images"] += 1
            if p not in present:
                continue
            pred = labels[region]
            c["images_with_partner"] += 1
            c["pixels"] += int(region.sum())
            c["as_partner"] += int((pred == p).sum())
            c["as_self"] += int((pred == r).sum())
            c["as_background"] += int((pred == 0).sum())
    out = {}
    for rare, c in counts.items():
        px = c["pixels"]
        out[rare] = {"partner": SHARED_PARTS[rare], "val_images_with_class": c["images"],
                     "val_images_with_partner_in_label": c["images_with_partner"], "pixels": px,
                     "frac_as_partner": c["as_partner"] / px if px else None,
                     "frac_as_self": c["as_self"] / px if px else None,
                     "frac_as_background": c["as_background"] / px if px else None}
    out["mean_frac_as_partner"] = _nanmean([v["frac_as_partner"] for v in out.values()
                                            if isinstance(v, dict) and v["frac_as_partner"] is not None])
    return out


def shared_part_activation(items: list[dict], variant: str, names) -> dict:
    """Threshold-free over-activation on shared parts: per shared-part rare class r with partner p, over the images
    whose label holds both, the mean score of p's CAM channel on r's ground-truth pixels (the head class firing on
    the tail object; lower is better) beside r's own mean score there and p's on its own pixels. Scores are the
    stored max-normalised maps (foreground channels halved back to [0, 1])."""
    index = {n: i for i, n in enumerate(names)}
    sums = {r: np.zeros(4) for r in SHARED_PARTS}  # partner-on-rare, self-on-rare, partner-on-partner, images
    for it in items:
        keys = it["keys"].tolist()
        for rare, partner in SHARED_PARTS.items():
            r, p = index[rare], index[partner]
            rare_px, partner_px = it["mask"].numpy() == r, it["mask"].numpy() == p
            if r not in keys or p not in keys or not rare_px.any():
                continue
            scores = it[variant] / 2.0
            on_rare = scores[keys.index(p)][rare_px].mean()
            own = scores[keys.index(r)][rare_px].mean()
            on_partner = scores[keys.index(p)][partner_px].mean() if partner_px.any() else np.nan
            sums[rare] += (on_rare, own, on_partner, 1)
    out = {}
    for rare, (on_rare, own, on_partner, images) in sums.items():
        out[rare] = {"partner": SHARED_PARTS[rare], "images": int(images),
                     "partner_score_on_rare": on_rare / images if images else None,
                     "rare_score_on_rare": own / images if images else None,
                     "partner_score_on_partner": on_partner / images if images else None}
    out["mean_partner_score_on_rare"] = _nanmean([v["partner_score_on_rare"] for v in out.values()])
    return out


def eval_split_url(args, cfg, data_manifest: dict) -> str:
    """The split file CAMs are evaluated on: the data stage's val split, the union of ``--eval-splits`` (every
    split of the synthetic dataset has masks; val and test are disjoint from train_aug), or with
    ``--eval-dataset SEED:IMAGES`` every image of a separately generated synthetic dataset (other images than
    the training set's, as many as the tail classes need)."""
    root = cfg.prepare_data.root
    if args.eval_dataset:
        seed, images = (int(v) for v in args.eval_dataset.split(":"))
        root = f"{cfg.prepare_data.root}-eval-seed{seed}-{images}"
        synthetic = cfg.prepare_data.synthetic.model_copy(update={"num_images": images, "seed": seed})
        ensure_synthetic(cfg.prepare_data.model_copy(update={"root": root, "synthetic": synthetic}))
    elif args.eval_splits == [cfg.prepare_data.val_split]:
        return data_manifest["splits"]["val"]
    dataset = VOCLayoutDataset(root, cfg.prepare_data.kind)
    union = union_of_splits([dataset.load_split(name) for name in args.eval_splits])
    train_ids = set(load_split_file(data_manifest["splits"]["train"]).ids)
    if not args.eval_dataset and train_ids & set(union.ids):
        raise ValueError(f"eval splits {args.eval_splits} overlap the training split")
    url = fs.join(args.workdir, "splits", f"eval-{eval_name(args)}.json")
    save_split(url, union)
    return url


def eval_name(args) -> str:
    prefix = f"seed{args.eval_dataset.replace(':', '-')}-" if args.eval_dataset else ""
    return prefix + "+".join(args.eval_splits)


def run_method(method: str, args, data_manifest: dict, eval_url: str) -> dict:
    overrides = [f"train_cam.max_steps={args.steps}", f"train_cam.method={method}", *args.override,
                 *(args.sfc_override if method == "sfc" else [])]
    cfg = load_config(args.config, overrides)
    train_url, val_url = data_manifest["splits"]["train"], data_manifest["splits"]["val"]
    digest = config_hash(cfg.train_cam, str(args.seed))[:8]
    mdir = fs.join(args.workdir, f"{method}-steps{args.steps}-seed{args.seed}-{digest}")
    timings = {}
    t = time.perf_counter()
    train = train_cam(cfg.train_cam, train_url, val_url, fs.join(mdir, "train_cam"), args.seed, args.device)
    timings["train_cam_s"] = time.perf_counter() - t
    store_url = fs.join(mdir, "cams.zarr" if eval_url == val_url else f"cams-{eval_name(args)}.zarr")
    t = time.perf_counter()
    infer_cams(cfg.infer_cams, train["checkpoint"], [eval_url], store_url, args.device)
    timings["infer_cams_s"] = time.perf_counter() - t
    t = time.perf_counter()
    eval_dir = fs.join(mdir, "eval" if eval_url == val_url else f"eval-{eval_name(args)}")
    eval_cam(cfg.eval_cam, store_url, eval_url, eval_dir)
    timings["eval_cam_s"] = time.perf_counter() - t
    evaluation = json.loads(fs.read_text(fs.join(eval_dir, RESULTS)))

    split = load_split_file(eval_url)
    names = split.class_names
    items = load_val_cams(store_url, split, cfg.eval_cam.proto_weights)
    variants = {v: r for v, r in evaluation["variants"].items()}
    if not args.no_raw:
        t = time.perf_counter()
        raw = raw_cams(train["checkpoint"], split, cfg.infer_cams.scales, args.device)
        for it in items:
            it[RAW] = raw[it["id"]]
        variants[RAW] = sweep(items, RAW, names, cfg.eval_cam.thresholds)
        timings["raw_cams_s"] = time.perf_counter() - t
    fa = {v: false_activation(items, v, r["best_threshold"], names)
          for v, r in variants.items() if "best_threshold" in r}
    activation = {v: shared_part_activation(items, v, names) for v in ("K", "P", RAW) if v in items[0]}
    return {"method": method, "dir": mdir, "checkpoint": train["checkpoint"], "train_manifest": train,
            "timings": timings, "variants": variants, "false_activation": fa, "shared_part_activation": activation,
            "eval_class_images": {n: int(split.labels[:, i - 1].sum()) for i, n in enumerate(names) if i}}


def summarise(runs: dict, class_counts: dict, args) -> dict:
    ranked, groups = class_groups(class_counts)
    table, group_means, miou = {}, {}, {}
    for method, run in runs.items():
        for variant, r in run["variants"].items():
            column = f"{method} {variant}"
            per_class = r["best"]["per_class"]
            table[column] = {c: per_class[c]["iou"] for c in ranked}
            group_means[column] = {g: _nanmean([per_class[c]["iou"] for c in cs]) for g, cs in groups.items()}
            note = NOTES.get((method, variant), "")
            if method == "baseline" and "P" in variant and variant != "P":
                note = "MEANINGLESS: built from the baseline's untrained prototype CAM P"
            miou[column] = {"miou_incl_background": r["best"]["miou"], "best_threshold": r.get("best_threshold"),
                            "note": note}
    sfc_pick = max(SFC_CANDIDATES, key=lambda v: runs["sfc"]["variants"][v]["best"]["miou"])
    base = group_means["baseline K"]
    comparisons = {}
    for sfc_variant in (*SFC_CANDIDATES, REFERENCE_RULE, *([RAW] if RAW in runs["sfc"]["variants"] else [])):
        for base_variant in ("K", *([RAW] if RAW in runs["baseline"]["variants"] else [])):
            s, b = group_means[f"sfc {sfc_variant}"], group_means[f"baseline {base_variant}"]
            comparisons[f"sfc {sfc_variant} - baseline {base_variant}"] = {
                **{g: _diff(s[g], b[g]) for g in groups},
                "tail_pass": (s["tail"] or 0.0) > (b["tail"] or 0.0),
            }
    primary = f"sfc {sfc_pick} - baseline K"
    return {
        "settings": {"config": args.config, "steps": args.steps, "seed": args.seed, "device": args.device,
                     "overrides": args.override,
                     "sfc_only_overrides": args.sfc_override, "workdir": args.workdir,
                     "eval_splits": args.eval_splits, "eval_dataset": args.eval_dataset,
                     "threshold_rule": "each variant at its best background threshold (best mIoU incl. background)",
                     "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "class_counts_train": {c: class_counts[c] for c in ranked},
        "eval_images_per_class": {c: runs["sfc"]["eval_class_images"][c] for c in ranked},
        "groups": groups,
        "columns": miou,
        "per_class_iou": table,
        "group_mean_iou": group_means,
        "sfc_variant_selected": {"variant": sfc_pick, "rule": "the SFC variant among K, P, K+0.3P, K+0.7P with "
                                 "the best overall mIoU (chosen without looking at the tail)"},
        "differences": comparisons,
        "claim": {
            "statement": "SFC tail mean IoU > baseline tail mean IoU",
            "primary_comparison": primary,
            "sfc_tail": group_means[f"sfc {sfc_pick}"]["tail"],
            "baseline_tail": base["tail"],
            "difference": comparisons[primary]["tail"],
            "pass": comparisons[primary]["tail_pass"],
            "like_for_like_K_pass": comparisons["sfc K - baseline K"]["tail_pass"],
        },
        "false_activation": {f"{m} {v}": fa for m, run in runs.items() for v, fa in run["false_activation"].items()},
        "shared_part_activation": {f"{m} {v}": a for m, run in runs.items()
                                   for v, a in run["shared_part_activation"].items()},
        "runs": {m: {"dir": run["dir"], "timings": run["timings"],
                     "train_seconds": run["train_manifest"].get("train_seconds"),
                     "images_per_second": run["train_manifest"].get("images_per_second"),
                     "first_losses": run["train_manifest"].get("first_losses"),
                     "last_losses": run["train_manifest"].get("last_losses"),
                     "single_scale_validation": run["train_manifest"].get("validation")}
                 for m, run in runs.items()},
    }


def _cell(v: float | None) -> str:
    return "    - " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.1f}"


def print_table(report: dict) -> None:
    columns = ["baseline K", "baseline R", "sfc K", "sfc P", "sfc K+0.3P", "sfc R"]
    columns = [c for c in columns if c in report["per_class_iou"]]
    groups = report["groups"]
    tag = {c: "H" for c in groups["head"]} | {c: "T" for c in groups["tail"]}
    width = 12
    print(f"\n{'class':<{width + 2}} {'N_c':>4} {'eval':>4}  " + " ".join(f"{c:>11}" for c in columns))
    for c, n in report["class_counts_train"].items():
        marks = tag.get(c, " ") + ("*" if c in SHARED_PARTS else " ")
        print(f"{c:<{width}}{marks} {n:>4} {report['eval_images_per_class'][c]:>4}  "
              + " ".join(f"{_cell(report['per_class_iou'][col][c]):>11}" for col in columns))
    for g in ("head", "tail", "shared_part_rare", "shared_part_partners", "all_foreground"):
        print(f"{g[:26]:<26}" + " ".join(f"{_cell(report['group_mean_iou'][col][g]):>11}" for col in columns))
    print(f"{'mIoU (incl. bg)':<26}" + " ".join(
        f"{_cell(report['columns'][col]['miou_incl_background']):>11}" for col in columns))
    print(f"{'best threshold':<26}" + " ".join(
        f"{report['columns'][col]['best_threshold']!s:>11}" for col in columns))
    print(f"{'false act. (mean)':<26}" + " ".join(
        f"{_cell(report['false_activation'][col]['mean_frac_as_partner']):>11}" for col in columns))
    activation = report["shared_part_activation"]
    print(f"{'partner score on rare':<26}" + " ".join(
        f"{_cell(activation[col]['mean_partner_score_on_rare']) if col in activation else '    -':>11}"
        for col in columns))
    claim = report["claim"]
    print(f"\nH head, T tail, * shared-part rare class. Claim '{claim['statement']}' ({claim['primary_comparison']}):"
          f" {_cell(claim['sfc_tail'])} vs {_cell(claim['baseline_tail'])} -> {'PASS' if claim['pass'] else 'FAIL'}"
          f"; like-for-like K: {'PASS' if claim['like_for_like_K_pass'] else 'FAIL'}")


def plot(report: dict) -> bytes:
    pick = f"sfc {report['sfc_variant_selected']['variant']}"
    series = ["baseline K", pick, *(["sfc K"] if pick != "sfc K" else [])]
    series += [c for c in ("baseline R", "sfc R") if c in report["per_class_iou"]]
    tags = {c: "H" for c in report["groups"]["head"]} | {c: "T" for c in report["groups"]["tail"]}
    label = {c: f"{c} ({n}{', ' + tags[c] if c in tags else ''})" for c, n in report["class_counts_train"].items()}
    groups = {s: {label[c]: report["per_class_iou"][s][c] for c in report["class_counts_train"]} for s in series}
    s = report["settings"]
    title = (f"synthetic {'+'.join(s['eval_splits'])}, per-class CAM IoU (classes by train N_c; H head, T tail); "
             f"{s['steps']} steps, seed {s['seed']}")
    return bar_chart_png(groups, title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--workdir", default="runs/bench-sfc-vs-baseline")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    parser.add_argument("--override", action="append", default=[], help="extra dotted config override (repeatable)")
    parser.add_argument("--sfc-override", action="append", default=[],
                        help="dotted override for the SFC run only (ablations, e.g. train_cam.ibr.enabled=false); "
                             "breaks the same-config rule on purpose, and is recorded in the results")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-CAM (no PCM) diagnostic")
    parser.add_argument("--eval-splits", nargs="+", default=["val"],
                        help="splits (with masks, disjoint from training) to evaluate on, e.g. val test")
    parser.add_argument("--eval-dataset", default=None, metavar="SEED:IMAGES",
                        help="evaluate on a separately generated synthetic dataset (its --eval-splits), e.g. 1:1200")
    parser.add_argument("--tag", default="", help="suffix of the result files: sfc_vs_baseline-TAG.json")
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    cfg = load_config(args.config, args.override)
    data_manifest = prepare_data(cfg.prepare_data, args.workdir, fs.join(args.workdir, "_cache"))
    class_counts = json.loads(fs.read_text(data_manifest["stats"]))["class_counts"]
    eval_url = eval_split_url(args, cfg, data_manifest)
    runs = {}
    for method in METHODS:
        print(f"=== {method}: {args.steps} steps, seed {args.seed} ===", flush=True)
        runs[method] = run_method(method, args, data_manifest, eval_url)
    report = summarise(runs, class_counts, args)
    stem = "sfc_vs_baseline" + (f"-{args.tag}" if args.tag else "")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.png").write_bytes(plot(report))
    print_table(report)
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
