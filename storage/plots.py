"""Pictures for reports, as PNG bytes: metric curves, per-class bar charts, label overlays."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from storage.images import voc_palette


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def curves_png(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
               title: str) -> bytes:
    """One line per named (x, y) curve."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        axis.plot(x, y, marker="o", markersize=3, label=name)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    return _figure_png(figure)


def bar_chart_png(groups: Mapping[str, Mapping[str, float]], title: str) -> bytes:
    """Grouped bars: one group per class, one bar per series (NaN drawn as 0)."""
    plt = _pyplot()
    series = list(groups)
    classes = list(next(iter(groups.values())))
    width = 0.8 / max(1, len(series))
    figure, axis = plt.subplots(figsize=(max(6, 0.45 * len(classes) * max(1, len(series)) / 2), 4))
    positions = np.arange(len(classes))
    for k, name in enumerate(series):
        values = np.nan_to_num([groups[name][c] for c in classes])
        axis.bar(positions + k * width, values, width, label=name)
    axis.set_xticks(positions + width * (len(series) - 1) / 2, classes, rotation=60, ha="right")
    axis.set(ylabel="IoU", title=title, ylim=(0, 1))
    axis.legend()
    return _figure_png(figure)


def colorize(labels: np.ndarray) -> Image.Image:
    """A (H, W) class-index map in VOC colours."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    return image.convert("RGB")


def overlay_png(image: np.ndarray, target: np.ndarray, predictions: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """Side by side: the image, the ground truth and each named prediction blended over the image."""
    base = Image.fromarray(image)
    panels = [("image", base), ("GT", Image.blend(base, colorize(target), 0.6))]
    panels += [(name, Image.blend(base, colorize(labels), 0.6)) for name, labels in predictions]
    width, height = base.size
    canvas = Image.new("RGB", (len(panels) * (width + 4), height + 14), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (name, panel) in enumerate(panels):
        canvas.paste(panel, (k * (width + 4), 14))
        draw.text((k * (width + 4) + 2, 1), name, fill=(0, 0, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
