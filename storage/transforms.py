"""Image transforms. CAM training (docs/method.md section 4): random long-side resize (bicubic), ImageNet
normalisation, horizontal flip, random crop into a zero canvas with a valid-pixel mask. Segmentation training
(section 9, deeplab-pytorch): random scale of image and label, normalisation, padded random crop, horizontal flip."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from models import backbone
from storage.errors import ConfigError

IMAGENET_MEAN = np.array(backbone.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(backbone.IMAGENET_STD, dtype=np.float32)
SEG_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)  # deeplab-pytorch's VOC scale set
SCALE_INTERPOLATIONS = ("linear", "pil_bilinear")


def random_resize_long(image: Image.Image, low: int, high: int, rng: np.random.Generator) -> Image.Image:
    """Resize so that the long side is uniform in [low, high] (bicubic)."""
    target = int(rng.integers(low, high + 1))
    width, height = image.size
    scale = target / max(width, height)
    return image.resize((int(round(width * scale)), int(round(height * scale))), Image.Resampling.BICUBIC)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 ImageNet-normalised (H, W, 3)."""
    return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random ``size`` x ``size`` crop; a smaller side is placed at a random offset in a zero canvas.

    Returns the crop (size, size, C) and the valid mask (size, size) float32 (1 on image pixels).
    """
    height, width = image.shape[:2]
    canvas = np.zeros((size, size) + image.shape[2:], dtype=image.dtype)
    valid = np.zeros((size, size), dtype=np.float32)
    (dst_y, src_y, len_y), (dst_x, src_x, len_x) = (_crop_window(n, size, rng) for n in (height, width))
    canvas[dst_y:dst_y + len_y, dst_x:dst_x + len_x] = image[src_y:src_y + len_y, src_x:src_x + len_x]
    valid[dst_y:dst_y + len_y, dst_x:dst_x + len_x] = 1
    return canvas, valid


def random_crop_pair(image: np.ndarray, label: np.ndarray, size: int, label_fill: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The same random ``size`` x ``size`` window of an image (padded with 0) and its label map (padded with
    ``label_fill``), with the offsets of :func:`random_crop`."""
    height, width = image.shape[:2]
    image_out = np.zeros((size, size) + image.shape[2:], dtype=image.dtype)
    label_out = np.full((size, size), label_fill, dtype=label.dtype)
    (dst_y, src_y, len_y), (dst_x, src_x, len_x) = (_crop_window(n, size, rng) for n in (height, width))
    image_out[dst_y:dst_y + len_y, dst_x:dst_x + len_x] = image[src_y:src_y + len_y, src_x:src_x + len_x]
    label_out[dst_y:dst_y + len_y, dst_x:dst_x + len_x] = label[src_y:src_y + len_y, src_x:src_x + len_x]
    return image_out, label_out


def _crop_window(length: int, size: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(offset in canvas, offset in image, copied length) along one axis."""
    space = length - size
    if space > 0:
        return 0, int(rng.integers(0, space + 1)), size
    return int(rng.integers(0, -space + 1)), 0, length


def augment_for_cam_training(
    image: Image.Image, crop: int, resize_long: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's order: resize, normalise, flip (p=0.5), crop. Returns (3, crop, crop) and (1, crop, crop)."""
    array = normalize(np.asarray(random_resize_long(image, *resize_long, rng)))
    if rng.random() < 0.5:
        array = array[:, ::-1]
    array, valid = random_crop(array, crop, rng)
    return np.ascontiguousarray(array.transpose(2, 0, 1)), valid[None]


@dataclass(frozen=True)
class SegScaling:
    """The scale augmentation of segmentation training: a factor drawn from ``scales`` (uniform choice, the
    deeplab-pytorch default) or, when ``scale_range`` is set, from U(low, high); the image is resized with
    ``interpolation`` (``linear``: OpenCV's INTER_LINEAR as deeplab-pytorch; ``pil_bilinear``: PIL's antialiased
    bilinear), the label with PIL's nearest neighbour."""

    scales: tuple[float, ...] = SEG_SCALES
    scale_range: tuple[float, float] | None = None
    interpolation: str = "linear"

    def draw(self, rng: np.random.Generator) -> float:
        if self.scale_range is not None:
            return float(rng.uniform(*self.scale_range))
        return float(self.scales[int(rng.integers(len(self.scales)))])


def resize_linear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, C) float array resized to ``size`` (h, w) as OpenCV's INTER_LINEAR on float images: half-pixel
    centres, two taps per axis, coordinates clamped at the borders, no antialiasing when shrinking."""
    rows, row_weights = _linear_taps(array.shape[0], size[0])
    cols, col_weights = _linear_taps(array.shape[1], size[1])
    out = array[rows[0]] * (1 - row_weights)[:, None, None] + array[rows[1]] * row_weights[:, None, None]
    out = out[:, cols[0]] * (1 - col_weights)[None, :, None] + out[:, cols[1]] * col_weights[None, :, None]
    return out.astype(array.dtype)


def _linear_taps(length: int, size: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(first and second source index, weight of the second) of each of ``size`` outputs along an axis of
    ``length`` inputs."""
    position = (np.arange(size) + 0.5) * (length / size) - 0.5
    first = np.floor(position).astype(np.int64)
    weight = (position - first).astype(np.float32)
    weight[first < 0] = 0
    weight[first >= length - 1] = 0
    first = np.clip(first, 0, length - 1)
    return (first, np.minimum(first + 1, length - 1)), weight


def rescale_pair(image: Image.Image, label: np.ndarray, factor: float, interpolation: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Image and label scaled by ``factor`` to (int(H factor), int(W factor)) as deeplab-pytorch: the normalised
    image (h, w, 3) float32 (``interpolation`` as :class:`SegScaling`), the label (h, w) by PIL's nearest."""
    width, height = image.size
    size = (max(1, int(width * factor)), max(1, int(height * factor)))
    label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    if interpolation == "pil_bilinear":
        return normalize(np.asarray(image.resize(size, Image.Resampling.BILINEAR))), label
    if interpolation != "linear":
        raise ConfigError(f"unknown interpolation {interpolation!r}; allowed: {', '.join(SCALE_INTERPOLATIONS)}")
    return resize_linear(normalize(np.asarray(image)), size[::-1]), label


def augment_for_segmentation(
    image: Image.Image, label: np.ndarray, crop: int, scaling: SegScaling, rng: np.random.Generator,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """deeplab-pytorch's training augmentation of an (image, label map) pair.

    Scale both by one factor of ``scaling`` (:func:`rescale_pair`), crop a random ``crop`` x ``crop`` window (a
    smaller side is placed at a random offset; padding is 0 in the normalised image, i.e. the mean colour, and
    ``ignore_index`` in the label), flip horizontally with p = 0.5.
    Returns the image (3, crop, crop) float32 and the label (crop, crop) int64.
    """
    array, label = rescale_pair(image, label, scaling.draw(rng), scaling.interpolation)
    stacked = np.concatenate([array, label.astype(np.float32)[..., None]], 2)
    stacked, valid = random_crop(stacked, crop, rng)
    if rng.random() < 0.5:
        stacked, valid = stacked[:, ::-1], valid[:, ::-1]
    labels = np.where(valid > 0, stacked[..., 3], ignore_index).astype(np.int64)
    return np.ascontiguousarray(stacked[..., :3].transpose(2, 0, 1)), labels


def fit_long_side(image: Image.Image, limit: int) -> Image.Image:
    """Shrink (bilinear) so that the long side is at most ``limit``; smaller images are returned unchanged."""
    width, height = image.size
    if max(width, height) <= limit:
        return image
    scale = limit / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
