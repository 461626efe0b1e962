"""A deterministic synthetic dataset in the PASCAL VOC layout, built to exercise Shared Feature Calibration.

Twenty classes (the VOC names) are drawn as flat shapes with a class-specific shape, colour and texture on muted,
smoothly varying backgrounds. Image-level class frequencies follow the long tail of VOC ``train_aug``, and five rare
classes share a visual part with a frequent class that co-occurs with them (see :data:`SHARED_PARTS`): the upper
part of the rare object is painted with the frequent partner's colour and texture while the whole object is
labelled as the rare class. A classifier trained on image labels then tends to fire for the frequent class on the
rare object, which is the over-activation SFC calibrates.

Layout written under ``out`` (any fsspec URL)::

    JPEGImages/syn_000000.jpg             RGB, sides uniform in [min_size, max_size]
    SegmentationClassAug/syn_000000.png   every image (VOC palette, 0 background, 1..20 classes)
    SegmentationClass/syn_000000.png      images of train, val and test
    Annotations/syn_000000.xml            one <object> per visible object
    ImageSets/Segmentation/{train_aug,train,val,test}.txt
    class_names.txt
    synthetic.json                        summary and class specs, written last (marks a complete dataset)

Everything but the timing fields of ``synthetic.json`` is byte-identical for identical arguments.
"""
from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from storage import fs
from storage.datasets.catalog import CLASS_NAMES_FILE, VOC_CLASSES
from storage.errors import ConfigError
from storage.images import encode_mask_png, read_mask, read_rgb, voc_palette, write_rgb

MARKER = "synthetic.json"
ID_PREFIX = "syn_"
SPLITS = ("train_aug", "train", "val", "test")

# Saturated object colours (RGB). Backgrounds are muted greys with a faint tint, so they never look like these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "orange": (250, 130, 10),
    "yellow": (245, 215, 0),
    "lime": (150, 230, 30),
    "green": (10, 150, 50),
    "teal": (0, 150, 140),
    "cyan": (40, 200, 245),
    "blue": (25, 70, 225),
    "purple": (125, 45, 205),
    "magenta": (225, 20, 190),
    "pink": (255, 130, 190),
    "brown": (135, 75, 25),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

# Number of images containing each class in VOC 2012 train_aug (10582 images): the target long tail.
VOC_TRAIN_AUG_COUNTS: dict[str, int] = {
    "aeroplane": 590, "bicycle": 504, "bird": 705, "boat": 468, "bottle": 714, "bus": 393, "car": 1150,
    "cat": 1005, "chair": 1228, "cow": 267, "diningtable": 613, "dog": 1188, "horse": 445, "motorbike": 492,
    "person": 4155, "pottedplant": 522, "sheep": 300, "sofa": 649, "train": 503, "tvmonitor": 567,
}
VOC_TRAIN_AUG_IMAGES = 10582


@dataclass(frozen=True)
class SyntheticClass:
    """How one class is drawn: shape, colour (a key of :data:`COLOURS`), texture, and the frequent class whose
    colour and texture cover the upper part of its objects (``None`` for classes without a shared part)."""

    name: str
    shape: str
    colour: str
    texture: str
    shared_with: str | None = None

    @property
    def index(self) -> int:
        """Class index in the masks (1..20)."""
        return VOC_CLASSES.index(self.name)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def voc_count(self) -> int:
        """N_c of the class in VOC train_aug, the target frequency this dataset is proportional to."""
        return VOC_TRAIN_AUG_COUNTS[self.name]


SYNTHETIC_CLASSES: tuple[SyntheticClass, ...] = (
    SyntheticClass("aeroplane", "cross", "cyan", "solid"),
    SyntheticClass("bicycle", "ring", "black", "solid"),
    SyntheticClass("bird", "triangle", "yellow", "solid"),
    SyntheticClass("boat", "semicircle", "blue", "vertical stripes", shared_with="person"),
    SyntheticClass("bottle", "rectangle", "green", "solid"),
    SyntheticClass("bus", "rectangle", "yellow", "horizontal stripes", shared_with="car"),
    SyntheticClass("car", "hexagon", "red", "checker"),
    SyntheticClass("cat", "diamond", "purple", "solid"),
    SyntheticClass("chair", "cross", "brown", "checker"),
    SyntheticClass("cow", "hexagon", "white", "dots", shared_with="person"),
    SyntheticClass("diningtable", "trapezoid", "brown", "vertical stripes"),
    SyntheticClass("dog", "pentagon", "magenta", "diagonal stripes"),
    SyntheticClass("horse", "crescent", "teal", "solid", shared_with="person"),
    SyntheticClass("motorbike", "ring", "pink", "dots"),
    SyntheticClass("person", "ellipse", "orange", "horizontal stripes"),
    SyntheticClass("pottedplant", "triangle", "green", "dots"),
    SyntheticClass("sheep", "star", "white", "checker", shared_with="dog"),
    SyntheticClass("sofa", "L-shape", "purple", "horizontal stripes"),
    SyntheticClass("train", "chevron", "lime", "anti-diagonal stripes"),
    SyntheticClass("tvmonitor", "frame", "teal", "checker"),
)
SHARED_PARTS: dict[str, str] = {c.name: c.shared_with for c in SYNTHETIC_CLASSES if c.shared_with}
_BY_NAME = {c.name: c for c in SYNTHETIC_CLASSES}

NUM_OBJECTS_P = (0.5, 0.38, 0.12)  # P(1, 2, 3 objects) before partners are added
COOCCURRENCE = 0.6                 # P(partner in image | rare class with a shared part in image)
SHARED_FRACTION = 0.4              # upper fraction of a rare object painted like its partner
OBJECT_SIDE = (0.25, 0.6)          # object side as a fraction of the image side
MIN_VISIBLE = 0.5                  # every object keeps at least this fraction of its pixels visible
MIN_AREA = 0.01                    # and covers at least this fraction of the image
_ATTEMPTS = 12


# ----------------------------------------------------------------------------------------------------------- shapes
# Each shape maps normalised box coordinates u (columns, (1, w)) and v (rows, (h, 1)), both -1..1 over the object's
# box with v growing downwards, to a boolean mask.

def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = math.pi / points
    p2 = (inner * math.cos(a), inner * math.sin(a))            # inner vertex; the outer one is (1, 0)
    normal = (p2[1], 1.0 - p2[0])
    norm = math.hypot(*normal)
    dist, alpha = normal[0] / norm, math.atan2(normal[1], normal[0])
    phi = np.mod(np.arctan2(v, u) + math.pi / 2, 2 * a)         # angle from the upward outer vertex
    psi = np.minimum(phi, 2 * a - phi)
    return np.hypot(u, v) <= dist / np.cos(psi - alpha)


def _pentagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    apothem = math.cos(math.pi / 5)
    for k in range(5):
        theta = -math.pi / 2 + math.pi / 5 + 2 * math.pi * k / 5
        out &= u * math.cos(theta) + v * math.sin(theta) <= apothem
    return out


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "ellipse": lambda u, v: u * u + v * v <= 1,
    "rectangle": lambda u, v: (np.abs(u) <= 1) & (np.abs(v) <= 1),
    "triangle": lambda u, v: (np.abs(v) <= 1) & (np.abs(u) <= (v + 1) / 2),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1)),
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.55 ** 2),
    "hexagon": lambda u, v: (np.abs(v) <= 1) & (np.abs(u) + 0.5 * np.abs(v) <= 1),
    "star": _star,
    "trapezoid": lambda u, v: (np.abs(v) <= 1) & (np.abs(u) <= 0.55 + 0.225 * (v + 1)),
    "pentagon": _pentagon,
    "semicircle": lambda u, v: (u * u + ((v - 1) / 2) ** 2 <= 1) & (v <= 1),
    "crescent": lambda u, v: (u * u + v * v <= 1) & ((u - 0.5) ** 2 + (v + 0.15) ** 2 > 0.8 ** 2),
    "L-shape": lambda u, v: (((u <= -0.2) & (u >= -1)) & (np.abs(v) <= 1))
    | (((v >= 0.2) & (v <= 1)) & (np.abs(u) <= 1)),
    "chevron": lambda u, v: (np.abs(v) <= 1) & (np.abs(u) <= 1) & (u <= 1 - 2 * np.abs(v))
    & (u >= 0.1 - 2 * np.abs(v)),
    "frame": lambda u, v: (np.abs(u) <= 1) & (np.abs(v) <= 1) & ((np.abs(u) > 0.6) | (np.abs(v) > 0.6)),
}


# --------------------------------------------------------------------------------------------------------- textures
# Each texture maps integer object-local rows y (h, 1) and columns x (1, w) and a half period to the boolean
# mask of the pixels painted in the secondary colour.

def _dots(y: np.ndarray, x: np.ndarray, half: int) -> np.ndarray:
    period = 2 * half
    dy, dx = (y % period) - half + 0.5, (x % period) - half + 0.5
    return dy * dy + dx * dx < (0.65 * half) ** 2


TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "solid": lambda y, x, half: np.zeros((1, 1), dtype=bool),
    "horizontal stripes": lambda y, x, half: (y // half) % 2 == 1,
    "vertical stripes": lambda y, x, half: (x // half) % 2 == 1,
    "checker": lambda y, x, half: (y // half + x // half) % 2 == 1,
    "dots": _dots,
    "diagonal stripes": lambda y, x, half: ((x + y) // half) % 2 == 1,
    "anti-diagonal stripes": lambda y, x, half: ((x - y) // half) % 2 == 1,
}


def _secondary(rgb: tuple[int, int, int]) -> np.ndarray:
    """The texture's second colour: a dark shade of a light colour, a light tint of a dark one."""
    c = np.asarray(rgb, dtype=np.float64)
    luminance = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return c * 0.35 if luminance > 100 else c + (255 - c) * 0.55


def _paint(spec: SyntheticClass, y: np.ndarray, x: np.ndarray, half: int, gain: float) -> np.ndarray:
    """(h, w, 3) float colours of ``spec``'s colour and texture over an object-local grid."""
    pattern = TEXTURES[spec.texture](y, x, half)
    pattern = np.broadcast_to(pattern, (y.shape[0], x.shape[1]))
    primary = np.asarray(spec.rgb, dtype=np.float64) * gain
    return np.where(pattern[..., None], _secondary(spec.rgb) * gain, primary)


# ------------------------------------------------------------------------------------------------------ label sets

def _sample_label_sets(rng: np.random.Generator, n: int, weights: np.ndarray) -> list[list[int]]:
    """Class indices (0-based over the 20 foreground classes) of ``n`` images, in drawing order.

    1-3 distinct classes are drawn without replacement proportionally to ``weights`` (Gumbel top-k); then every
    rare class with a shared part gets its partner in the image with probability :data:`COOCCURRENCE` (added, or
    replacing another class) and loses it otherwise (replaced by the next class of the weighted order).
    """
    count = rng.choice(3, size=n, p=NUM_OBJECTS_P) + 1
    order = np.argsort(-(np.log(weights)[None, :] + rng.gumbel(size=(n, len(weights)))), axis=1, kind="stable")
    decide = rng.random((n, 3))
    slot = rng.integers(0, 1 << 30, size=n)
    partner_of = {_BY_NAME[r].index - 1: _BY_NAME[p].index - 1 for r, p in SHARED_PARTS.items()}
    rare = np.zeros(len(weights), dtype=bool)
    rare[list(partner_of)] = True
    sets = [order[i, :count[i]].tolist() for i in range(n)]
    for i in np.nonzero((rare[order] & (np.arange(len(weights))[None, :] < count[:, None])).any(axis=1))[0]:
        labels = sets[i]
        for step, cls in enumerate(list(labels)):
            if cls not in partner_of or cls not in labels:
                continue
            partner = partner_of[cls]
            if decide[i, step] < COOCCURRENCE:
                if partner in labels:
                    continue
                if len(labels) < 3:
                    labels.insert(int(slot[i] % (len(labels) + 1)), partner)
                else:
                    others = [k for k, c in enumerate(labels) if c != cls]
                    labels[others[int(slot[i] % len(others))]] = partner
            elif partner in labels:
                labels[labels.index(partner)] = int(next(c for c in order[i] if c not in labels and c != partner))
        sets[i] = labels
    return sets


@lru_cache(maxsize=1)
def _class_weights() -> np.ndarray:
    """Sampling weights calibrated (by a fixed-seed simulation) so that image counts are proportional to the VOC
    N_c despite sampling without replacement and the partner co-occurrence rule."""
    target = np.array([c.voc_count for c in SYNTHETIC_CLASSES], dtype=np.float64)
    target /= target.sum()
    weights = target.copy()
    for _ in range(6):
        sets = _sample_label_sets(np.random.default_rng(20240101), 30000, weights)
        counts = np.bincount(np.fromiter((c for s in sets for c in s), dtype=np.int64), minlength=len(weights))
        share = np.maximum(counts / counts.sum(), 1e-6)
        weights = weights * (target / share)
        weights /= weights.sum()
    return weights


# ------------------------------------------------------------------------------------------------------- rendering

def _interpolation(size: int, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation from ``nodes`` evenly spaced control points to ``size`` samples: for each sample the
    index of the control point before it and the weight (0..1) of the one after it."""
    t = np.linspace(0.0, nodes - 1, size)
    low = np.minimum(np.floor(t).astype(np.int64), nodes - 2)
    return low, t - low


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted low-frequency colour field with faint stripes: (H, W, 3) float64.

    Images are composed in float64 with element-wise operations only (no BLAS), so that the rounding to uint8
    does not depend on the CPU's kernels."""
    gh, gw = (int(k) for k in rng.integers(2, 5, size=2))
    nodes = rng.uniform(75, 185, size=(gh, gw, 1)) + rng.uniform(-22, 22, size=(gh, gw, 3))
    low, frac = _interpolation(height, gh)
    along_rows = nodes[low] * (1 - frac)[:, None, None] + nodes[low + 1] * frac[:, None, None]   # (H, gw, 3)
    low, frac = _interpolation(width, gw)
    field = along_rows[:, low] * (1 - frac)[None, :, None] + along_rows[:, low + 1] * frac[None, :, None]
    angle, period, amplitude, phase = rng.uniform(0, math.pi), rng.uniform(5, 24), rng.uniform(2, 8), \
        rng.uniform(0, 2 * math.pi)
    # amplitude * sin(kx x + ky y + phase), separably
    kx, ky = math.cos(angle) * 2 * math.pi / period, math.sin(angle) * 2 * math.pi / period
    x = np.arange(width, dtype=np.float64) * kx
    y = np.arange(height, dtype=np.float64) * ky + phase
    stripes = amplitude * (np.sin(y)[:, None] * np.cos(x)[None, :] + np.cos(y)[:, None] * np.sin(x)[None, :])
    field += stripes[..., None]
    return field


@dataclass
class _Object:
    cls: int            # 0-based foreground class
    top: int
    left: int
    shape: np.ndarray   # (h, w) bool over the box starting at (top, left)
    area: int
    half: int           # texture half period
    gain: float         # brightness jitter


def _place(rng: np.random.Generator, cls: int, height: int, width: int, owner: np.ndarray, visible: list[int],
           placed: list[_Object], force: bool) -> _Object | None:
    """Draw an object's box and shape so that it is big enough and leaves every earlier object at least
    :data:`MIN_VISIBLE` of its pixels; ``None`` after :data:`_ATTEMPTS` failures unless ``force``."""
    spec = SYNTHETIC_CLASSES[cls]
    min_area = max(8, MIN_AREA * height * width)
    for attempt in range(_ATTEMPTS + (8 if force else 0)):
        last = force and attempt == _ATTEMPTS + 7
        side = OBJECT_SIDE[1] if last else rng.uniform(*OBJECT_SIDE)
        aspect = math.exp(rng.uniform(-0.2, 0.2))
        bw = float(np.clip(side * width * aspect, 4, width))
        bh = float(np.clip(side * height / aspect, 4, height))
        cx = width / 2 if last else rng.uniform(bw / 2, width - bw / 2)
        cy = height / 2 if last else rng.uniform(bh / 2, height - bh / 2)
        x0, x1 = max(0, math.floor(cx - bw / 2)), min(width, math.ceil(cx + bw / 2))
        y0, y1 = max(0, math.floor(cy - bh / 2)), min(height, math.ceil(cy + bh / 2))
        u = ((np.arange(x0, x1, dtype=np.float64) + 0.5 - cx) / (bw / 2))[None, :]
        v = ((np.arange(y0, y1, dtype=np.float64) + 0.5 - cy) / (bh / 2))[:, None]
        shape = np.broadcast_to(SHAPES[spec.shape](u, v), (y1 - y0, x1 - x0))
        area = int(shape.sum())
        if area < min_area and not (last and area > 0):
            continue
        hidden = np.bincount(owner[y0:y1, x0:x1][shape] + 1, minlength=len(placed) + 1)[1:]
        if not last and any(visible[j] - hidden[j] < MIN_VISIBLE * placed[j].area for j in range(len(placed))):
            continue
        for j in range(len(placed)):
            visible[j] -= int(hidden[j])
        owner[y0:y1, x0:x1][shape] = len(placed)
        visible.append(area)
        half = int(np.clip(round(min(bw, bh) / 10), 2, 8))
        return _Object(cls, y0, x0, np.ascontiguousarray(shape), area, half, float(rng.uniform(0.88, 1.06)))
    return None


def _render(rng: np.random.Generator, classes: list[int], height: int, width: int
            ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
    """Image (H, W, 3) uint8, mask (H, W) uint8 and the visible objects as (class index 1..20, VOC bndbox)."""
    image = _background(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    owner = np.full((height, width), -1, dtype=np.int16)
    visible: list[int] = []
    placed: list[_Object] = []
    for cls in classes:
        obj = _place(rng, cls, height, width, owner, visible, placed, force=not placed)
        if obj is not None:
            placed.append(obj)
    objects = []
    for k, obj in enumerate(placed):
        h, w = obj.shape.shape
        spec = SYNTHETIC_CLASSES[obj.cls]
        y, x = np.arange(h)[:, None], np.arange(w)[None, :]
        colours = _paint(spec, y, x, obj.half, obj.gain)
        if spec.shared_with:
            rows = np.nonzero(obj.shape.any(axis=1))[0]
            cut = rows[0] + round(SHARED_FRACTION * (rows[-1] - rows[0] + 1))
            partner = _BY_NAME[spec.shared_with]
            colours[:cut] = _paint(partner, y[:cut], x, obj.half, obj.gain)
        mine = owner[obj.top:obj.top + h, obj.left:obj.left + w] == k
        image[obj.top:obj.top + h, obj.left:obj.left + w][mine] = colours[mine]
        mask[obj.top:obj.top + h, obj.left:obj.left + w][mine] = spec.index
        ys, xs = np.nonzero(mine)
        box = (obj.left + int(xs.min()) + 1, obj.top + int(ys.min()) + 1,
               obj.left + int(xs.max()) + 1, obj.top + int(ys.max()) + 1)
        objects.append((spec.index, box))
    image += rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(2, 5)
    np.rint(image, out=image)
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8), mask, objects


def _annotation_xml(image_id: str, height: int, width: int,
                    objects: list[tuple[int, tuple[int, int, int, int]]]) -> str:
    parts = ["<annotation>", "  <folder>synthetic</folder>", f"  <filename>{image_id}.jpg</filename>",
             f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
             "  <segmented>1</segmented>"]
    for index, (xmin, ymin, xmax, ymax) in objects:
        parts.append(f"  <object><name>{VOC_CLASSES[index]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>0</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                     f"<ymax>{ymax}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------------ generation

def _check_arguments(num_images, seed, min_size, max_size, fractions: dict[str, float]) -> None:
    def integer(name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")

    for name, value in (("num_images", num_images), ("seed", seed), ("min_size", min_size), ("max_size", max_size)):
        integer(name, value)
    if num_images < 10:
        raise ConfigError(f"num_images must be at least 10, got {num_images}")
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    if min_size < 16:
        raise ConfigError(f"min_size must be at least 16, got {min_size}")
    if max_size < min_size:
        raise ConfigError(f"max_size ({max_size}) must be at least min_size ({min_size})")
    for name, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")
    if fractions["val_fraction"] + fractions["test_fraction"] >= 1:
        raise ConfigError(f"val_fraction + test_fraction must be below 1, got {fractions['val_fraction']} + "
                          f"{fractions['test_fraction']}")


def _split_ids(rng: np.random.Generator, ids: list[str], val_fraction: float, test_fraction: float,
               train_fraction: float) -> dict[str, list[str]]:
    n = len(ids)
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise ConfigError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no train_aug images "
                          f"out of num_images={n}")
    perm = rng.permutation(n)
    val = sorted(ids[i] for i in perm[:n_val])
    test = sorted(ids[i] for i in perm[n_val:n_val + n_test])
    train_aug = sorted(ids[i] for i in perm[n_val + n_test:])
    train = train_aug[:max(1, round(len(train_aug) * train_fraction))]
    return {"train_aug": train_aug, "train": train, "val": val, "test": test}


def _remove_stale(out: str, ids: set[str], with_class_mask: set[str]) -> None:
    """Drop ``syn_*`` files a previous generation left that this one does not write."""
    for folder, suffix, keep in (("JPEGImages", ".jpg", ids), ("SegmentationClassAug", ".png", ids),
                                 ("SegmentationClass", ".png", with_class_mask), ("Annotations", ".xml", ids)):
        url = fs.join(out, folder)
        if not fs.isdir(url):
            continue
        for name in fs.listdir(url):
            if name.startswith(ID_PREFIX) and name.endswith(suffix) and name[: -len(suffix)] not in keep:
                fs.remove(fs.join(url, name))


def generate_synthetic(out: str, num_images: int = 800, seed: int = 0, min_size: int = 96, max_size: int = 128,
                       val_fraction: float = 0.15, test_fraction: float = 0.15, train_fraction: float = 0.25
                       ) -> dict:
    """Write the synthetic dataset under ``out`` (path or fsspec URL) and return its summary:
    ``{"num_images", "splits": {split: count}, "class_counts": {class: N_c over train_aug}, "seconds",
    "images_per_second"}``. ``synthetic.json`` (summary, arguments, class specs) is written last."""
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction, "train_fraction": train_fraction}
    _check_arguments(num_images, seed, min_size, max_size, fractions)
    start = time.perf_counter()
    out = str(out).rstrip("/")
    fs.remove(fs.join(out, MARKER))

    streams = np.random.SeedSequence(int(seed)).spawn(num_images + 1)
    master = np.random.default_rng(streams[0])
    weights = _class_weights()
    ids = [f"{ID_PREFIX}{i:06d}" for i in range(num_images)]
    splits = _split_ids(master, ids, val_fraction, test_fraction, train_fraction)
    with_class_mask = set(splits["train"]) | set(splits["val"]) | set(splits["test"])
    _remove_stale(out, set(ids), with_class_mask)

    labels: dict[str, set[int]] = {}
    for i, image_id in enumerate(ids):
        # image i depends only on (seed, i, min_size, max_size): a smaller dataset is a prefix of a larger one
        rng = np.random.default_rng(streams[i + 1])
        classes = _sample_label_sets(rng, 1, weights)[0]
        height, width = (int(s) for s in rng.integers(min_size, max_size + 1, size=2))
        image, mask, objects = _render(rng, classes, height, width)
        write_rgb(fs.join(out, "JPEGImages", f"{image_id}.jpg"), image)
        png = encode_mask_png(mask)
        fs.write_bytes(fs.join(out, "SegmentationClassAug", f"{image_id}.png"), png)
        if image_id in with_class_mask:
            fs.write_bytes(fs.join(out, "SegmentationClass", f"{image_id}.png"), png)
        fs.write_text(fs.join(out, "Annotations", f"{image_id}.xml"), _annotation_xml(image_id, height, width,
                                                                                       objects))
        labels[image_id] = {index for index, _ in objects}

    for split, members in splits.items():
        fs.write_text(fs.join(out, "ImageSets", "Segmentation", f"{split}.txt"), "\n".join(members) + "\n")
    fs.write_text(fs.join(out, CLASS_NAMES_FILE), "\n".join(VOC_CLASSES) + "\n")

    counts = np.zeros(len(VOC_CLASSES), dtype=np.int64)
    for image_id in splits["train_aug"]:
        counts[list(labels[image_id])] += 1
    seconds = time.perf_counter() - start
    summary = {
        "num_images": num_images,
        "splits": {split: len(members) for split, members in splits.items()},
        "class_counts": {name: int(counts[i]) for i, name in enumerate(VOC_CLASSES) if i},
        "seconds": round(seconds, 3),
        "images_per_second": round(num_images / seconds, 1),
    }
    record = {
        **summary,
        "arguments": {"num_images": num_images, "seed": seed, "min_size": min_size, "max_size": max_size,
                      **fractions},
        "classes": [{"index": c.index, **asdict(c), "rgb": list(c.rgb), "voc_count": c.voc_count}
                    for c in SYNTHETIC_CLASSES],
        "shared_parts": dict(SHARED_PARTS),
        "class_names": list(VOC_CLASSES),
    }
    fs.write_text(fs.join(out, MARKER), json.dumps(record, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------------------- samples

def _read_labels(root: str, image_id: str) -> list[str]:
    import xml.etree.ElementTree as ET

    tree = ET.fromstring(fs.read_bytes(fs.join(root, "Annotations", f"{image_id}.xml")))
    return [node.findtext("name") or "?" for node in tree.iter("object")]


def render_samples(root: str, out_png: str, n: int = 8) -> None:
    """Write a PNG grid of ``n`` images of the dataset at ``root`` beside their colour masks and class names.

    About half the samples are chosen among images holding a rare class with a shared part, so the figure shows
    the shared parts; the rest are the first remaining images by id.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    ids = sorted({line.strip() for split in ("train_aug", "val", "test")
                  for line in fs.read_text(fs.join(root, "ImageSets", "Segmentation", f"{split}.txt")).splitlines()
                  if line.strip()})
    names = {i: _read_labels(root, i) for i in ids[: max(400, 4 * n)]}
    shared = [i for i in names if any(name in SHARED_PARTS for name in names[i])][: n // 2]
    chosen = sorted(shared + [i for i in names if i not in shared][: n - len(shared)])

    cell, pad, text_h = 128, 6, 16
    columns = min(len(chosen), 4)
    rows = math.ceil(len(chosen) / columns)
    sample_w, sample_h = 2 * cell + pad, cell + text_h
    canvas = Image.new("RGB", (columns * (sample_w + pad) + pad, rows * (sample_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, image_id in enumerate(chosen):
        x0 = pad + (k % columns) * (sample_w + pad)
        y0 = pad + (k // columns) * (sample_h + pad)
        image = Image.fromarray(read_rgb(fs.join(root, "JPEGImages", f"{image_id}.jpg")))
        mask = Image.fromarray(read_mask(fs.join(root, "SegmentationClassAug", f"{image_id}.png")), mode="P")
        mask.putpalette(voc_palette())
        scale = cell / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        canvas.paste(image.resize(size, Image.Resampling.BILINEAR), (x0, y0))
        canvas.paste(mask.convert("RGB").resize(size, Image.Resampling.NEAREST), (x0 + cell + pad, y0))
        draw.text((x0, y0 + cell + 2), f"{image_id}: {', '.join(names[image_id])}", fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    fs.write_bytes(out_png, buffer.getvalue())
