"""One self-contained HTML page per run (``<run_dir>/report.html``): the headline table, each stage's state and
time, the pictures the evaluations wrote (CAM threshold curves, per-class bars, overlays of CAMs, pseudo labels
and predictions) embedded as data URIs, and the resolved config. Rendered from the files the stages wrote; a
partial run's report shows what exists and names the stages that are missing."""
from __future__ import annotations

import base64
import html
import time

from flows.config import PipelineConfig
from flows.headline import (
    CAM_SEED_VARIANT_TAG,
    COLUMNS,
    LABELS,
    Headline,
    finished_records,
    headline,
    publish_headline,
    seconds_metric,
)
from flows.runs import run_status
from storage import fs

REPORT = "report.html"
OVERLAYS_PER_STAGE = 6
EVALUATIONS = ("eval_cam", "eval_pseudo_labels", "eval_seg")

# Filled in by the page once loaded: how many pictures it holds and how many failed to load (a browser check
# reads them; a person sees a warning).
_IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((image) => !(image.complete && image.naturalWidth > 0));
  document.body.dataset.images = String(images.length);
  document.body.dataset.broken = String(broken.length);
  if (broken.length) {
    const note = document.createElement("p");
    note.className = "warning";
    note.textContent = broken.length + " picture(s) failed to load: " + broken.map((i) => i.alt).join(", ");
    document.body.prepend(note);
  }
});
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; margin: 4px; border: 1px solid #eee; }
.missing { color: #a40; } .warning { color: #fff; background: #a00; padding: 6px; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
</style>"""


def report_url(cfg: PipelineConfig) -> str:
    return fs.join(cfg.run_dir, REPORT)


def write_report(cfg: PipelineConfig, mlflow_run_id: str | None = None) -> str:
    """Write the run's report (atomically) and return its location."""
    url = report_url(cfg)
    fs.write_text(url, render_report(cfg, mlflow_run_id))
    return url


def publish_report(cfg: PipelineConfig) -> tuple[str, str | None]:
    """Write the run's report and, when the run has an MLflow parent run, refresh that run's headline figures
    and log the report to it. Returns (the report's location, the MLflow run id or None)."""
    from storage.tracking import existing_run

    tracker = existing_run(cfg.tracking_uri(), cfg.tracking.experiment, cfg.parent_run_tags())
    url = write_report(cfg, tracker.run_id if tracker else None)
    if tracker is not None:
        publish_headline(cfg, tracker)
        tracker.log_artifact(url)
    return url, tracker.run_id if tracker else None


def render_report(cfg: PipelineConfig, mlflow_run_id: str | None = None) -> str:
    finished = finished_records(cfg)
    summary = headline(cfg, finished)
    body = [f"<h1>SFC run {_e(cfg.run.name)}</h1>",
            f"<p>{_e(cfg.run_dir)} &middot; config {cfg.digest()}"
            + (f" &middot; MLflow run {_e(mlflow_run_id)}" if mlflow_run_id else "")
            + f" &middot; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    if summary.missing:
        body.append(f"<p class='missing'>Stages not finished: {_e(', '.join(summary.missing))}. "
                    "This report shows what exists.</p>")
    body += [_headline_table(summary), _stage_table(cfg, summary)]
    for stage in EVALUATIONS:
        if stage in finished:
            body.append(_pictures(stage, cfg))
    body += ["<h2>Resolved configuration</h2>", f"<pre>{_e(cfg.to_yaml())}</pre>"]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>SFC run {_e(cfg.run.name)}</title>{_STYLE}</head>\n<body>\n" + "\n".join(body)
            + f"\n{_IMAGE_CHECK}\n</body></html>\n")


def _headline_table(summary: Headline) -> str:
    rows = [f"<tr><td>{_e(LABELS[name])}</td><td><code>{_e(name)}</code></td>"
            f"<td class='num'>{_figure(name, summary.metrics.get(name))}</td></tr>" for name in COLUMNS]
    if CAM_SEED_VARIANT_TAG in summary.tags:
        rows.insert(1, f"<tr><td>CAM seed variant and threshold</td><td><code>{CAM_SEED_VARIANT_TAG}</code></td>"
                       f"<td>{_e(summary.tags[CAM_SEED_VARIANT_TAG])} at "
                       f"{summary.metrics.get('cam_seed_threshold', '-')}</td></tr>")
    return ("<h2>Headline</h2>\n<table><tr><th>figure</th><th>MLflow name</th><th>value</th></tr>" + "".join(rows)
            + "</table><p>mIoU as fractions, background included.</p>")


def _stage_table(cfg: PipelineConfig, summary: Headline) -> str:
    """Each stage's state as `sfc status` tells it (done, stale, failed, started, pending, disabled) and seconds."""
    rows = []
    for status in run_status(cfg):
        state = f"{status.state}: {status.error}" if status.error else status.state
        seconds = summary.metrics.get(seconds_metric(status.name))
        rows.append(f"<tr><td>{status.name}</td><td>{_e(state)}</td>"
                    f"<td class='num'>{'-' if seconds is None else f'{seconds:.1f}'}</td></tr>")
    return ("<h2>Stages</h2>\n<table><tr><th>stage</th><th>state</th><th>seconds</th></tr>" + "".join(rows)
            + "</table>")


def _pictures(stage: str, cfg: PipelineConfig) -> str:
    """The stage's charts (PNGs in its folder), then up to ``OVERLAYS_PER_STAGE`` overlays of each subfolder."""
    folder = fs.join(cfg.run_dir, stage)
    charts, overlays = [], []
    for name in sorted(fs.listdir(folder)):
        url = fs.join(folder, name)
        if name.endswith(".png"):
            charts.append((name, url))
        elif name != "shards" and fs.isdir(url):
            pngs = sorted(n for n in fs.listdir(url) if n.endswith(".png"))[:OVERLAYS_PER_STAGE]
            overlays += [(f"{name}/{n}", fs.join(url, n)) for n in pngs]
    parts = [f"<h2>{stage}</h2>"]
    parts += [_image(name, url) for name, url in charts]
    if overlays:
        parts.append("<h3>overlays</h3>")
        parts += [_image(name, url) for name, url in overlays]
    return "\n".join(parts)


def _image(name: str, url: str) -> str:
    data = base64.b64encode(fs.read_bytes(url)).decode()
    return f"<img alt='{_e(name)}' title='{_e(name)}' src='data:image/png;base64,{data}'>"


def _figure(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if name.startswith("seconds/") else f"{value:.4f}"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
