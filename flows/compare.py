"""`sfc compare`: two or more finished (or partial) runs side by side, from their run records and results files
(nothing is re-run): every headline figure, per-class IoU deltas of each evaluation, the settings that differ,
and a per-class bar chart."""
from __future__ import annotations

import math
from dataclasses import dataclass

from flows.config import PipelineConfig
from flows.headline import COLUMNS, LABELS, Headline, finished_records, headline, seconds_metric
from flows.stages import STAGE_NAMES
from storage.errors import DataError
from storage.plots import bar_chart_png
from storage.tracking import flatten

IGNORED_SETTINGS = ("run.name",)  # differs between any two runs


@dataclass
class Comparison:
    names: list[str]  # the runs, the first is the reference of every delta
    headlines: list[Headline]
    class_names: list[str]
    settings: dict[str, list]  # dotted key -> value in each run, for the keys whose values differ


def compare(cfgs: list[PipelineConfig]) -> Comparison:
    """Compare runs of one dataset (the same class list); a run without a finished prepare_data, or of other
    classes, is a clear error."""
    classes: list[list[str]] = []
    headlines = []
    for cfg in cfgs:
        finished = finished_records(cfg)
        if "prepare_data" not in finished:
            raise DataError(f"run {cfg.run.name} ({cfg.run_dir}) has no finished prepare_data stage: nothing to "
                            "compare")
        classes.append(list(finished["prepare_data"]["manifest"]["class_names"]))
        headlines.append(headline(cfg, finished, per_class=True))
    for cfg, names in zip(cfgs[1:], classes[1:]):
        if names != classes[0]:
            raise DataError(f"runs {cfgs[0].run.name} and {cfg.run.name} are of different datasets: their classes "
                            f"differ ({len(classes[0])} vs {len(names)}: {_first_difference(classes[0], names)})")
    trees = [flatten(cfg.model_dump(mode="json")) for cfg in cfgs]
    keys = sorted(set().union(*trees) - set(IGNORED_SETTINGS))
    settings = {key: [tree.get(key) for tree in trees] for key in keys
                if any(tree.get(key) != trees[0].get(key) for tree in trees[1:])}
    return Comparison([cfg.run.name for cfg in cfgs], headlines, classes[0], settings)


def _first_difference(a: list[str], b: list[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x!r} vs {y!r}"
    return "one list is longer"


def format_comparison(comparison: Comparison) -> str:
    names, headlines = comparison.names, comparison.headlines
    width = max(12, *(len(n) for n in names))
    delta_head = "".join(f"  {'d ' + n:>{width}}" for n in names[1:])
    lines = ["Headline figures (mIoU as fractions; d = run minus " + names[0] + ")",
             f"{'figure':<28}" + "".join(f"  {n:>{width}}" for n in names) + delta_head]
    figures = [*COLUMNS, *(seconds_metric(s) for s in STAGE_NAMES)]
    for figure in figures:
        values = [h.metrics.get(figure) for h in headlines]
        if all(v is None for v in values):
            continue
        lines.append(f"{figure:<28}" + "".join(f"  {_number(v):>{width}}" for v in values)
                     + "".join(f"  {_delta(values[0], v):>{width}}" for v in values[1:]))
    for figure in [f for f in COLUMNS if any(f in h.per_class for h in headlines)]:
        lines += ["", f"Per-class IoU: {LABELS[figure]}",
                  f"{'class':<28}" + "".join(f"  {n:>{width}}" for n in names) + delta_head]
        tables = [h.per_class.get(figure, {}) for h in headlines]
        for name in comparison.class_names:
            values = [t.get(name) for t in tables]
            lines.append(f"{name:<28}" + "".join(f"  {_number(v):>{width}}" for v in values)
                         + "".join(f"  {_delta(values[0], v):>{width}}" for v in values[1:]))
    lines += ["", "Settings that differ" if comparison.settings else "Settings: identical (but for run.name)"]
    lines += [f"  {key}: " + " | ".join(f"{n}={value}" for n, value in zip(names, values))
              for key, values in comparison.settings.items()]
    missing = [f"{n}: {', '.join(h.missing)}" for n, h in zip(names, headlines) if h.missing]
    if missing:
        lines += ["", "Stages not finished (their figures are missing): " + "; ".join(missing)]
    return "\n".join(lines)


def comparison_chart(comparison: Comparison) -> bytes | None:
    """Per-class IoU bars of each run for the last stage that all of them evaluated (None when none did)."""
    for figure in reversed(COLUMNS):
        tables = [h.per_class.get(figure) for h in comparison.headlines]
        if all(tables):
            groups = {name: {c: table.get(c, math.nan) for c in comparison.class_names}
                      for name, table in zip(comparison.names, tables) if table is not None}
            return bar_chart_png(groups, f"per-class IoU: {LABELS[figure]}")
    return None


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}" if abs(value) <= 1 else f"{value:.1f}"


def _delta(reference: float | None, value: float | None) -> str:
    if reference is None or value is None or math.isnan(reference) or math.isnan(value):
        return "-"
    delta = value - reference
    return f"{delta:+.4f}" if max(abs(reference), abs(value)) <= 1 else f"{delta:+.1f}"
