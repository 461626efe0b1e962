"""Evaluation reports: MLflow metrics per class name and a per-class table readable in the terminal."""
from __future__ import annotations

import math
from collections.abc import Mapping


def _percent(value: float | None) -> str:
    return "   -  " if value is None or math.isnan(value) else f"{100 * value:6.2f}"


def format_table(scores: Mapping, title: str = "") -> str:
    """Per-class IoU / precision / recall as a fixed-width text table, with mIoU and pixel accuracy."""
    rows = scores["per_class"]
    width = max(len("class"), *(len(name) for name in rows))
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'IoU':>6}  {'prec':>6}  {'recall':>6}")
    lines += [f"{name:<{width}}  {_percent(r['iou'])}  {_percent(r['precision'])}  {_percent(r['recall'])}"
              for name, r in rows.items()]
    lines.append(f"{'mIoU':<{width}}  {_percent(scores['miou'])}   pixel accuracy {_percent(scores['pixel_accuracy'])}")
    return "\n".join(lines)


def class_metrics(scores: Mapping, prefix: str) -> dict[str, float]:
    """Flat MLflow metrics: ``{prefix}/miou``, ``{prefix}/pixel_accuracy``, ``{prefix}/iou/<class>`` ..."""
    out = {f"{prefix}/miou": scores["miou"], f"{prefix}/pixel_accuracy": scores["pixel_accuracy"]}
    for name, row in scores["per_class"].items():
        for key, value in row.items():
            if not math.isnan(value):
                out[f"{prefix}/{key}/{name}"] = value
    return out
