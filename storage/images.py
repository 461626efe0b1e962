"""Image and label-map files: RGB images, palette PNG masks (VOC palette, 255 = ignore)."""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, UnidentifiedImageError

from storage import fs
from storage.errors import UserError

IGNORE_INDEX = 255


@lru_cache(maxsize=1)
def voc_palette() -> tuple[int, ...]:
    """The PASCAL VOC colour map (256 RGB triplets, flattened) used for all label PNGs."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return tuple(palette)


class BadImageError(UserError, ValueError):
    """An image or mask file that is missing, unreadable or holds invalid values."""


def _open(url: str) -> Image.Image:
    try:
        image = Image.open(fs.open_binary(url))
        image.load()
        return image
    except FileNotFoundError as err:
        raise BadImageError(f"{url}: file not found") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadImageError(f"{url}: unreadable image ({err})") from err


def read_pil_rgb(url: str) -> Image.Image:
    return _open(url).convert("RGB")


def read_rgb(url: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    return np.asarray(read_pil_rgb(url))


def read_mask(url: str) -> np.ndarray:
    """(H, W) uint8 class indices of a palette or greyscale PNG."""
    image = _open(url)
    if image.mode not in ("P", "L"):
        raise BadImageError(f"{url}: a label mask must be a palette or greyscale PNG, got mode {image.mode}")
    return np.asarray(image)


def image_size(url: str) -> tuple[int, int]:
    """(H, W) of an image, from its header only."""
    try:
        with Image.open(fs.open_binary(url)) as image:
            width, height = image.size
    except FileNotFoundError as err:
        raise BadImageError(f"{url}: file not found") from err
    except (UnidentifiedImageError, OSError) as err:
        raise BadImageError(f"{url}: unreadable image ({err})") from err
    return height, width


def values_outside(mask: np.ndarray, num_labels: int) -> list[int]:
    """The values of a label map that are neither a class index (0..num_labels-1) nor IGNORE_INDEX."""
    return np.setdiff1d(np.unique(mask), [*range(num_labels), IGNORE_INDEX]).tolist()


def encode_mask_png(mask: np.ndarray) -> bytes:
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_mask(url: str, mask: np.ndarray) -> None:
    """Atomically write a (H, W) class-index map as a VOC-palette PNG."""
    fs.write_bytes(url, encode_mask_png(mask))


def write_rgb(url: str, image: np.ndarray, quality: int = 95) -> None:
    """Atomically write an (H, W, 3) uint8 image; JPEG or PNG by extension."""
    buffer = io.BytesIO()
    fmt = "PNG" if url.lower().endswith(".png") else "JPEG"
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    fs.write_bytes(url, buffer.getvalue())
