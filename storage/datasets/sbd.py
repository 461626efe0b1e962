"""Convert the official SBD download (Hariharan et al., ``benchmark_RELEASE``) into the masks and list that
:class:`storage.datasets.voc_layout.VOCLayoutDataset` reads from a VOC2012 folder::

    benchmark_RELEASE/dataset/cls/<id>.mat       (MATLAB struct GTcls; GTcls.Segmentation: (H, W) class indices)
    benchmark_RELEASE/dataset/train.txt, val.txt (SBD's own split lists, one id per line)
      -> VOC2012/SegmentationClassAug/<id>.png   (VOC-palette PNG, one per SBD train + val id)
      -> VOC2012/ImageSets/Segmentation/train_aug.txt

``train_aug`` is the usual definition: SBD train + SBD val + VOC train, minus VOC val (10,582 images with the
official downloads). Every write is atomic and existing PNGs are kept, so an interrupted conversion resumes.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError
from tqdm import tqdm

from storage import fs
from storage.datasets.voc_layout import TRAIN_AUG, read_id_list
from storage.errors import ConfigError, DataError
from storage.images import IGNORE_INDEX, values_outside, write_mask

log = logging.getLogger(__name__)

SBD_CLASSES = 21  # background + the 20 VOC classes, in VOC order
AUG_FOLDER = "SegmentationClassAug"


def sbd_dataset_dir(sbd_root: str) -> str:
    """The folder holding ``cls/`` and the lists: ``<root>/dataset`` of ``benchmark_RELEASE``, or ``root`` itself."""
    for candidate in (fs.join(sbd_root, "dataset"), sbd_root.rstrip("/")):
        if fs.isdir(fs.join(candidate, "cls")):
            return candidate
    raise DataError(f"{sbd_root}: no SBD 'dataset/cls' (or 'cls') folder; give the unpacked benchmark_RELEASE folder")


def read_sbd_mask(url: str) -> np.ndarray:
    """(H, W) uint8 class indices of one SBD ``cls/<id>.mat`` (field ``GTcls.Segmentation``)."""
    try:
        data = loadmat(fs.open_binary(url), squeeze_me=True, struct_as_record=False)
    except FileNotFoundError:
        raise DataError(f"{url}: file not found") from None
    except (MatReadError, ValueError, OSError) as err:
        raise DataError(f"{url}: not a readable MATLAB file ({err})") from None
    segmentation = getattr(data.get("GTcls"), "Segmentation", None)
    if segmentation is None:
        raise DataError(f"{url}: no field GTcls.Segmentation")
    mask = np.asarray(segmentation)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{url}: GTcls.Segmentation must be a 2-D integer array, got {mask.dtype} {mask.shape}")
    bad = values_outside(mask, SBD_CLASSES)
    if bad:
        raise DataError(f"{url}: GTcls.Segmentation values {bad} outside the {SBD_CLASSES} classes and {IGNORE_INDEX}")
    return mask.astype(np.uint8)


def train_aug_ids(sbd_ids: set[str], voc_train: list[str], voc_val: list[str]) -> list[str]:
    """SBD train + val + VOC train, minus VOC val, sorted."""
    return sorted((sbd_ids | set(voc_train)) - set(voc_val))


def convert_sbd(sbd_root: str, voc_root: str, workers: int = 4) -> dict:
    """Write ``SegmentationClassAug/<id>.png`` for every SBD train/val id and ``train_aug.txt`` into ``voc_root``
    (a VOC2012 folder with JPEGImages and ImageSets/Segmentation/{train,val}.txt). Returns a summary."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    dataset = sbd_dataset_dir(sbd_root)
    sbd_ids = sorted(set(read_id_list(fs.join(dataset, "train.txt"))) | set(read_id_list(fs.join(dataset, "val.txt"))))
    lists = fs.join(voc_root, "ImageSets", "Segmentation")
    voc_train, voc_val = read_id_list(fs.join(lists, "train.txt")), read_id_list(fs.join(lists, "val.txt"))
    ids = train_aug_ids(set(sbd_ids), voc_train, voc_val)
    images = fs.join(voc_root, "JPEGImages")
    present = {n[:-4] for n in fs.listdir(images) if n.endswith(".jpg")} if fs.isdir(images) else set()
    missing = [i for i in ids if i not in present]
    if missing:
        raise DataError(f"{images}: {len(missing)} train_aug images missing, e.g. {missing[0]}.jpg "
                        "(is voc_root the VOC2012 folder of VOCtrainval_11-May-2012.tar?)")
    cls_dir, out_dir = fs.join(dataset, "cls"), fs.join(voc_root, AUG_FOLDER)
    mats = {n[:-4] for n in fs.listdir(cls_dir) if n.endswith(".mat")}
    absent = [i for i in sbd_ids if i not in mats]
    if absent:
        raise DataError(f"{cls_dir}: {len(absent)} listed ids have no .mat file, e.g. {absent[0]}.mat")
    done = {n[:-4] for n in fs.listdir(out_dir) if n.endswith(".png")} if fs.isdir(out_dir) else set()
    todo = [i for i in sbd_ids if i not in done]

    def convert_one(image_id: str) -> None:
        write_mask(fs.join(out_dir, f"{image_id}.png"), read_sbd_mask(fs.join(cls_dir, f"{image_id}.mat")))

    with ThreadPoolExecutor(workers) as pool:
        for _ in tqdm(pool.map(convert_one, todo), total=len(todo), desc="sbd masks", unit="img"):
            pass
    list_url = fs.join(lists, f"{TRAIN_AUG}.txt")
    text = "".join(f"{i}\n" for i in ids)
    if not (fs.exists(list_url) and fs.read_text(list_url) == text):
        fs.write_text(list_url, text)
    summary = {"sbd_masks": len(sbd_ids), "written": len(todo), "train_aug": len(ids), "list": list_url}
    log.info("converted %s -> %s: %s", sbd_root, voc_root, summary)
    return summary
