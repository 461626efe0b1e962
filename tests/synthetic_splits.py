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
