"""Image transforms. CAM training (docs/method.md section 4): random long-side resize (bicubic), ImageNet
normalisation, horizontal flip, random crop into a zero canvas with a valid-pixel mask. Segmentation training
(section 9, deeplab-pytorch): random scale of image and label, normalisation, padded random crop, horizontal flip."""
from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def random_resize_long(image: Image.Image, low: int, high: int, rng: np.random.Generator) -> Image.Image:
    """Resize so that the long side is uniform in [low, high] (bicubic)."""
    target = int(rng.integers(low, high + 1))
    width, height = image.size
    scale = target / max(width, height)
    return image.resize((int(round(width * scale)), int(round(height * scale))), Image.BICUBIC)


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


def augment_for_segmentation(
    image: Image.Image, label: np.ndarray, crop: int, scale_range: tuple[float, float], rng: np.random.Generator,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """deeplab-pytorch's training augmentation of an (image, label map) pair.

    Scale both by one factor uniform in ``scale_range`` (image bilinear, label nearest), normalise, crop a random
    ``crop`` x ``crop`` window (a smaller side is placed at a random offset; padding is 0 in the normalised image,
    i.e. the mean colour, and ``ignore_index`` in the label), flip horizontally with p = 0.5.
    Returns the image (3, crop, crop) float32 and the label (crop, crop) int64.
    """
    factor = rng.uniform(*scale_range)
    width, height = image.size
    size = (max(1, int(width * factor)), max(1, int(height * factor)))
    image = image.resize(size, Image.BILINEAR)
    label_image = Image.fromarray(label).resize(size, Image.NEAREST)
    stacked = np.concatenate([normalize(np.asarray(image)), np.asarray(label_image, dtype=np.float32)[..., None]], 2)
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
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
