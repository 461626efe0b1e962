"""Small synthetic datasets with their split files, for stage tests."""
from __future__ import annotations

from pathlib import Path

from storage.datasets.split_files import save_split
from storage.datasets.synthetic import generate_synthetic
from storage.datasets.voc_layout import VOCLayoutDataset


def synthetic_split_files(root: Path, names: tuple[str, ...], num_images: int, seed: int, min_size: int,
                          max_size: int) -> dict[str, str]:
    """Generate a synthetic dataset under ``root/data`` and write the split files of ``names``; return their URLs."""
    generate_synthetic(str(root / "data"), num_images=num_images, seed=seed, min_size=min_size, max_size=max_size)
    dataset = VOCLayoutDataset(str(root / "data"), "synthetic")
    urls = {}
    for name in names:
        urls[name] = str(root / f"{name}.json")
        save_split(urls[name], dataset.load_split(name))
    return urls


def stage_inputs(root: Path, num_images: int = 24, seed: int = 3, min_size: int = 56,
                 max_size: int = 72) -> dict[str, str]:
    """Splits train_aug and val; the ground-truth masks of train_aug stand in for pseudo labels (``labels``) and,
    with ignored borders, IR labels (``ir_labels``)."""
    from storage.datasets.irn import ir_label_url
    from storage.datasets.split_files import load_split_file
    from storage.images import read_mask, write_mask
    from tests.test_irn import ir_label_from_mask  # test_irn imports this module

    urls = synthetic_split_files(root, ("train_aug", "val"), num_images, seed, min_size, max_size)
    split = load_split_file(urls["train_aug"])
    for image_id in split.ids:
        mask = read_mask(split.mask_url(image_id))
        write_mask(str(root / "labels" / f"{image_id}.png"), mask)
        write_mask(ir_label_url(str(root / "ir_labels"), image_id), ir_label_from_mask(mask))
    return {**urls, "labels": str(root / "labels"), "ir_labels": str(root / "ir_labels")}
