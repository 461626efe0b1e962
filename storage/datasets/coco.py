"""Convert the official COCO instances JSON (e.g. ``instances_train2014.json`` + ``train2014/``) to the VOC layout
that :class:`storage.datasets.voc_layout.VOCLayoutDataset` reads with ``kind="coco"``::

    out_root/JPEGImages/<id>.jpg                 (hard link of the source where both sides are local, else a copy)
    out_root/SegmentationClass/<id>.png          (palette PNG of class indices, 0 = background, 255 = ignore)
    out_root/ImageSets/Segmentation/<split>.txt  (sorted ids)
    out_root/class_names.txt                     (background first, then the JSON's categories)

``<id>`` is the stem of the image's ``file_name`` (``COCO_train2014_000000000009``). Class index ``c`` is
``1 + position`` of the category in the JSON's categories sorted by category id, so COCO's 80 categories (ids 1..90
with gaps) become 1..80 in the order of :data:`storage.datasets.catalog.COCO_CLASSES`; the names are always taken
from the JSON.

Masks follow the WSSS convention:

* crowd regions (``iscrowd=1``) are set to 255 (ignore) first;
* then the non-crowd instances are painted over them, the largest (in rasterised pixels) first, so smaller objects
  stay visible on top of larger ones; ties are broken by the annotation's position in the JSON.

Segmentations are rasterised exactly as pycocotools' ``COCO.annToMask`` does, the masks every COCO WSSS result is
scored against: polygons (``[[x1, y1, x2, y2, ...], ...]``) through ``frPyObjects`` and ``merge``, uncompressed RLE
(``{"counts": [int, ...], "size": [h, w]}``, column-major, as COCO stores crowd masks) and compressed RLE (``counts``
as a string) through ``decode``. Before pycocotools sees them, polygons must have an even number of finite
coordinates (those of fewer than 3 points are dropped: pycocotools rasterises them to nothing, but refuses a list
that starts with one) and RLE counts must cover exactly H x W pixels (pycocotools' decoder does not check, and
would write past the mask).

Only images whose mask holds at least one class are written and listed (WSSS needs image-level labels; those come from
the masks). Images without a non-crowd annotation (or whose instances rasterise to nothing) are skipped and counted in
the summary as ``dropped_without_labels``: no mask and no JPEG is written for them.

The conversion is resumable: the JPEG is written before the mask and every write is atomic, so an existing mask marks
a finished image, and images whose mask and JPEG both exist are not touched again (their listing is kept). A re-run
therefore does not refresh masks of an image whose annotations changed; delete its mask to redo it.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm import tqdm

from storage import fs
from storage.datasets.catalog import CLASS_NAMES_FILE
from storage.errors import ConfigError, UserError
from storage.images import IGNORE_INDEX, write_mask, write_rgb

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")


class CocoFormatError(UserError, ValueError):
    """Bad COCO input; the message names the file and the offending id."""


# ----------------------------------------------------------------------------------------------------------- RLE

def decode_rle_string(counts: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the format of pycocotools' ``rleToString``), to check a string
    before pycocotools decodes it.

    Each count is written in 5-bit groups, least significant first, as characters ``48 + group``; bit 0x20 of a
    character says another group follows and bit 0x10 of the last group is the sign. From the fourth count on
    (index > 2) the string stores the difference to the count two places before.
    """
    out: list[int] = []
    pos, n = 0, len(counts)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError(f"compressed RLE string ends inside a count (at character {pos})")
            char = ord(counts[pos]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"compressed RLE string has invalid character {counts[pos]!r} at {pos}")
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def _check_counts(counts: list[int], height: int, width: int) -> None:
    if any(c < 0 for c in counts):
        raise ValueError(f"RLE counts hold a negative run ({min(counts)})")
    if sum(counts) != height * width:
        raise ValueError(f"RLE counts sum to {sum(counts)}, not {height}x{width}={height * width} pixels")


# -------------------------------------------------------------------------------------------------- rasterising

def _polygon_mask(polygons: Any, height: int, width: int) -> np.ndarray:
    kept = []
    for polygon in polygons:
        if not isinstance(polygon, (list, tuple)):
            raise ValueError("a polygon must be a list [x1, y1, x2, y2, ...]")
        if len(polygon) % 2:
            raise ValueError(f"a polygon has an odd number of coordinates ({len(polygon)})")
        try:
            coords = [float(v) for v in polygon]
        except (TypeError, ValueError):
            raise ValueError("a polygon holds a non-numeric coordinate") from None
        if not all(math.isfinite(v) for v in coords):
            raise ValueError("a polygon holds a non-finite coordinate")
        if len(coords) >= 6:
            kept.append(coords)
    if not kept:
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(kept, height, width))).astype(bool)


def rasterise(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of one COCO segmentation (polygons, uncompressed RLE or compressed RLE), as annToMask."""
    if isinstance(segmentation, list):
        return _polygon_mask(segmentation, height, width)
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError("segmentation must be a list of polygons or an RLE {'counts', 'size'}")
    size = segmentation["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and list(size) == [height, width]):
        raise ValueError(f"RLE size {size!r} does not match the image's [height, width] [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, str):
        _check_counts(decode_rle_string(counts), height, width)
        rle = {"size": [height, width], "counts": counts.encode("ascii")}
    elif isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        _check_counts(counts, height, width)
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        raise ValueError("RLE counts must be a list of integers or a compressed RLE string")
    return mask_utils.decode(rle).astype(bool)


@dataclass
class _Image:
    key: Any  # the JSON's image id
    stem: str
    file_name: str
    height: int
    width: int
    annotations: list[tuple[Any, int, bool, Any]] = field(default_factory=list)  # (ann id, class, crowd, seg)


def build_mask(image: _Image, source: str) -> np.ndarray:
    """(H, W) uint8 class map of one image: crowd = 255, then non-crowd instances, largest first."""
    mask = np.zeros((image.height, image.width), dtype=np.uint8)
    things = []
    for order, (ann_id, class_index, crowd, segmentation) in enumerate(image.annotations):
        try:
            region = rasterise(segmentation, image.height, image.width)
        except ValueError as err:
            raise CocoFormatError(
                f"{source}: annotation id {ann_id!r} of image id {image.key!r}: bad segmentation ({err})") from None
        if crowd:
            mask[region] = IGNORE_INDEX
        else:
            things.append((-int(region.sum()), order, region, class_index))
    for _, _, region, class_index in sorted(things, key=lambda t: t[:2]):
        mask[region] = class_index
    return mask


# ------------------------------------------------------------------------------------------------------ reading

def _load_json(url: str) -> dict:
    try:
        text = fs.read_text(url)
    except FileNotFoundError:
        raise CocoFormatError(f"{url}: file not found") from None
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"{url}: not UTF-8 text ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{url}: malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{url}: the top level must be an object with categories, images and annotations")
    for key in ("categories", "images", "annotations"):
        if key not in data:
            raise CocoFormatError(f"{url}: missing key {key!r}")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{url}: {key!r} must be a list")
    return data


def _field(url: str, entry: Any, key: str, what: str, index: int) -> Any:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{url}: {what} #{index} is not an object")
    if key not in entry:
        label = f"id {entry['id']!r}" if "id" in entry else f"#{index}"
        raise CocoFormatError(f"{url}: {what} {label} is missing key {key!r}")
    return entry[key]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_categories(url: str, data: dict) -> tuple[list[str], dict[int, int]]:
    """Class names (background first) and category id -> class index."""
    entries = []
    for index, entry in enumerate(data["categories"]):
        cat_id = _field(url, entry, "id", "category", index)
        name = _field(url, entry, "name", "category", index)
        if not _is_int(cat_id):
            raise CocoFormatError(f"{url}: category id {cat_id!r} is not an integer")
        if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
            raise CocoFormatError(f"{url}: category id {cat_id}: bad name {name!r}")
        entries.append((cat_id, name.strip()))
    if not entries:
        raise CocoFormatError(f"{url}: no categories")
    entries.sort()
    names = ["background"]
    index_of: dict[int, int] = {}
    for cat_id, name in entries:
        if cat_id in index_of:
            raise CocoFormatError(f"{url}: duplicate category id {cat_id}")
        if name in names:
            raise CocoFormatError(f"{url}: category id {cat_id}: duplicate (or reserved) class name {name!r}")
        index_of[cat_id] = len(names)
        names.append(name)
    if len(names) > IGNORE_INDEX:
        raise CocoFormatError(
            f"{url}: {len(names) - 1} categories do not fit a uint8 mask with {IGNORE_INDEX} = ignore")
    return names, index_of


def _read_images(url: str, data: dict, class_of: dict[int, int]) -> list[_Image]:
    images: dict[Any, _Image] = {}
    stems: dict[str, Any] = {}
    for index, entry in enumerate(data["images"]):
        key = _field(url, entry, "id", "image", index)
        file_name = _field(url, entry, "file_name", "image", index)
        height = _field(url, entry, "height", "image", index)
        width = _field(url, entry, "width", "image", index)
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise CocoFormatError(f"{url}: image #{index} has a bad id {key!r}")
        if key in images:
            raise CocoFormatError(f"{url}: duplicate image id {key!r}")
        if not isinstance(file_name, str) or not file_name.strip("/"):
            raise CocoFormatError(f"{url}: image id {key!r}: bad file_name {file_name!r}")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise CocoFormatError(f"{url}: image id {key!r}: bad height/width {height!r}x{width!r}")
        stem = posixpath.splitext(posixpath.basename(file_name.replace("\\", "/")))[0]
        if not stem or any(c.isspace() for c in stem):
            raise CocoFormatError(f"{url}: image id {key!r}: file_name {file_name!r} gives an unusable id {stem!r}")
        if stem in stems:
            raise CocoFormatError(f"{url}: image ids {stems[stem]!r} and {key!r} share the file stem {stem!r}")
        stems[stem] = key
        images[key] = _Image(key, stem, file_name.lstrip("/"), height, width)
    for index, entry in enumerate(data["annotations"]):
        image_key = _field(url, entry, "image_id", "annotation", index)
        cat_id = _field(url, entry, "category_id", "annotation", index)
        segmentation = _field(url, entry, "segmentation", "annotation", index)
        ann_id = entry.get("id", f"#{index}")
        crowd = entry.get("iscrowd", 0)
        if not isinstance(image_key, (int, str)) or isinstance(image_key, bool) or image_key not in images:
            raise CocoFormatError(f"{url}: annotation id {ann_id!r} references unknown image id {image_key!r}")
        if not _is_int(cat_id) or cat_id not in class_of:
            raise CocoFormatError(f"{url}: annotation id {ann_id!r} references unknown category id {cat_id!r}")
        if crowd not in (0, 1):  # True/False compare equal to 1/0
            raise CocoFormatError(f"{url}: annotation id {ann_id!r}: iscrowd must be 0 or 1, not {crowd!r}")
        images[image_key].annotations.append((ann_id, class_of[cat_id], bool(crowd), segmentation))
    return list(images.values())


# ------------------------------------------------------------------------------------------------------ writing

def _local_path(url: str) -> str | None:
    filesystem, path = fs.filesystem(url)
    return path if isinstance(filesystem, LocalFileSystem) else None


def _check_size(image: _Image, source: str, size: tuple[int, int], json_url: str) -> None:
    width, height = size
    if (height, width) != (image.height, image.width):
        raise CocoFormatError(
            f"{source}: image is {height}x{width} but {json_url} gives image id {image.key!r} "
            f"{image.height}x{image.width}")


def _write_image(image: _Image, source: str, target: str, link: bool, json_url: str) -> None:
    """Put the source image at ``target`` (a JPEG): hard link or copy of a JPEG source, else re-encoded."""
    is_jpeg = image.file_name.lower().endswith(JPEG_SUFFIXES)
    src_path, dst_path = _local_path(source), _local_path(target)
    try:
        if link and is_jpeg and src_path is not None and dst_path is not None:
            with Image.open(src_path) as handle:
                _check_size(image, source, handle.size, json_url)
            if os.path.exists(dst_path) and os.path.samefile(src_path, dst_path):
                return  # already linked by an earlier run (whose mask write did not happen)
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            tmp = f"{dst_path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                os.link(src_path, tmp)
                # POSIX rename() is a no-op that keeps both names when they are links of one file; checked above,
                # but a concurrent run could still get there, so drop a leftover tmp name
                os.replace(tmp, dst_path)
                if os.path.lexists(tmp):
                    os.remove(tmp)
                return
            except OSError as err:  # other device, no hard-link support: copy instead
                if os.path.lexists(tmp):
                    os.remove(tmp)
                log.debug("hard link %s -> %s failed (%s); copying", src_path, dst_path, err)
        data = fs.read_bytes(source)
        with Image.open(io.BytesIO(data)) as handle:
            _check_size(image, source, handle.size, json_url)
            if is_jpeg:
                fs.write_bytes(target, data)
            else:
                write_rgb(target, np.asarray(handle.convert("RGB")))
    except FileNotFoundError:
        raise CocoFormatError(f"{source}: image file of image id {image.key!r} not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise CocoFormatError(f"{source}: unreadable image file of image id {image.key!r} ({err})") from None


def _write_class_names(out_root: str, names: list[str]) -> None:
    url = fs.join(out_root, CLASS_NAMES_FILE)
    if fs.exists(url):
        existing = [line.strip() for line in fs.read_text(url).splitlines() if line.strip()]
        if existing != names:
            raise CocoFormatError(
                f"{url}: already exists with different classes ({len(existing) - 1} listed, the JSON has "
                f"{len(names) - 1}); convert into another out_root or remove the file")
        return
    fs.write_text(url, "\n".join(names) + "\n")


def _existing(out_root: str, folder: str, suffix: str) -> set[str]:
    url = fs.join(out_root, folder)
    if not fs.isdir(url):
        return set()
    return {name[: -len(suffix)] for name in fs.listdir(url) if name.endswith(suffix)}


def convert_coco(instances_json: str, images_dir: str, out_root: str, split: str, link_images: bool = True,
                 workers: int = 4) -> dict:
    """Convert one COCO instances JSON (+ its image folder) into the VOC layout under ``out_root``.

    Returns ``{"images": listed, "dropped_without_labels": k, "classes": foreground classes, "split": split}``.
    Raises :class:`CocoFormatError` (a ``ValueError``) naming the file and the offending id on bad input; the whole
    JSON is validated before anything is written.
    """
    if not split or "/" in split or any(c.isspace() for c in split):
        raise ConfigError(f"bad split name {split!r}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    data = _load_json(instances_json)
    names, class_of = _read_categories(instances_json, data)
    images = _read_images(instances_json, data, class_of)
    del data

    out_root = out_root.rstrip("/")
    fs.makedirs(out_root)
    _write_class_names(out_root, names)
    done = _existing(out_root, "SegmentationClass", ".png") & _existing(out_root, "JPEGImages", ".jpg")

    def convert_one(image: _Image) -> bool:
        """Write one image and its mask; False when the mask has no class (nothing is written then)."""
        if image.stem in done:
            return True
        mask = build_mask(image, instances_json)
        if not ((mask > 0) & (mask != IGNORE_INDEX)).any():
            return False
        source = fs.join(images_dir, image.file_name)
        _write_image(image, source, fs.join(out_root, "JPEGImages", f"{image.stem}.jpg"), link_images,
                     instances_json)
        write_mask(fs.join(out_root, "SegmentationClass", f"{image.stem}.png"), mask)  # last: marks it done
        return True

    listed: list[str] = []
    dropped = 0
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(images), desc=f"coco {split}", unit="img") as bar:
        futures = {pool.submit(convert_one, image): image for image in images}
        try:
            for future in as_completed(futures):
                if future.result():
                    listed.append(futures[future].stem)
                else:
                    dropped += 1
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    if not listed:
        raise CocoFormatError(f"{instances_json}: none of its {len(images)} images has a non-crowd annotation; "
                              f"nothing to list for split {split!r}")

    listed.sort()
    list_url = fs.join(out_root, "ImageSets", "Segmentation", f"{split}.txt")
    text = "".join(f"{stem}\n" for stem in listed)
    if not (fs.exists(list_url) and fs.read_text(list_url) == text):  # a re-run leaves an identical list alone
        fs.write_text(list_url, text)
    summary = {"images": len(listed), "dropped_without_labels": dropped, "classes": len(names) - 1, "split": split}
    log.info("converted %s -> %s: %s", instances_json, out_root, summary)
    return summary
