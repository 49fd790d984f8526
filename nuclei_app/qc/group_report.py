"""Group level of the self-diagnosis: every slide's QC in one table, one JSON and one web page.

`write_group_report` collects the per-slide reports (``*_desc-nuclei_qc.json``), and writes
into the output folder:

- ``group_qc.tsv``: one row per slide, first column the BIDS name (the report's file name
  without ``_desc-nuclei_qc.json``), then status, reasons, outlier flags and the metrics;
- ``group_qc.json``: the same plus robust z-scores and the outlier rule (schema ``group_qc``);
- ``report.html``: a self-contained page (no external resource: styles, script and images
  are inline, PNGs as ``data:`` URIs, plots as inline SVG) with a strip plot per key metric
  across slides (outliers marked), the per-slide metrics with outlier slides highlighted,
  and for every slide the pictures its QC drew (a thumbnail tinted by per-tile QC score, the
  outlines on its worst and median tile) and the overlays of its flagged tiles. The group
  report only embeds pictures; it never reads a slide.

Outlier slides: for each group metric, the robust z-score across slides
``z = (x - median) / spread`` with ``spread = 1.4826 MAD`` (or ``1.2533`` times the mean
absolute deviation when the MAD is 0); a slide is an outlier when some metric lies beyond
``OUTLIER_Z`` in its worse direction (either direction for descriptive metrics), with at
least ``MIN_SLIDES_FOR_OUTLIERS`` slides.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nuclei_app import __version__
from nuclei_app.atomic import atomic_write_json, atomic_write_text
from nuclei_app.core.intensity import robust_z_scores
from nuclei_app.errors import BadDataError, CannotCreateOutputError, MissingInputError, NothingSelectedError
from nuclei_app.provenance import utc_timestamp
from nuclei_app.qc.slide import QC_SUFFIX, check_built_report
from nuclei_app.qc.summary import format_metric
from nuclei_app.schemas import load_schema, validate_instance


GROUP_TSV = "group_qc.tsv"


GROUP_JSON = "group_qc.json"


REPORT_HTML = "report.html"


OUTLIER_Z = 3.5


MIN_SLIDES_FOR_OUTLIERS = 3


MISSING = "n/a"


#: Slide metrics compared across slides (all documented in the qc_report schema).
GROUP_METRICS: tuple[str, ...] = (
    "n_nuclei",
    "density_per_mm2",
    "foreground_coverage",
    "foreground_precision",
    "seed_recall",
    "teacher_student_f1",
    "score_mean",
    "head_agreement_mean",
    "morphology_outlier_share",
    "overlap_share",
    "seam_excess",
    "signal_autocorrelation",
    "median_area_px",
    "qc_score_mean",
    "flagged_tile_share",
    "signal_coverage",
    "clump_share",
)


#: Group metrics drawn as a strip plot across slides at the top of report.html.
PLOT_METRICS: tuple[str, ...] = (
    "signal_coverage", "foreground_coverage", "seed_recall", "teacher_student_f1", "qc_score_mean",
    "flagged_tile_share", "clump_share", "n_nuclei",
)


@dataclass
class GroupReport:
    """Paths written by `write_group_report` and the group summary.

    Attributes
    ----------
    tsv, json, html : Path
        ``group_qc.tsv``, ``group_qc.json``, ``report.html``.
    summary : dict
        The content of ``group_qc.json``.
    """

    tsv: Path
    json: Path
    html: Path
    summary: dict[str, Any]

    def paths(self) -> list[Path]:
        """The three written files: TSV, JSON, HTML."""
        return [self.tsv, self.json, self.html]


# ------------------------------------------------------------------------- statistics


def metric_directions() -> dict[str, str]:
    """``x-better`` (higher | lower | none) of every slide metric, from the qc_report schema."""

    properties = load_schema("qc_report")["properties"]["slide"]["properties"]
    return {name: spec.get("x-better", "none") for name, spec in properties.items()}


def metric_descriptions() -> dict[str, str]:
    """Description (definition, unit, range, better direction) of every slide metric."""

    properties = load_schema("qc_report")["properties"]["slide"]["properties"]
    return {name: spec.get("description", "") for name, spec in properties.items()}


def _number(value: float | None) -> float:
    """A slide metric as a float (NaN for None)."""
    return math.nan if value is None else float(value)


def _is_outlier(z: float | None, better: str) -> bool:
    """Whether robust z-score ``z`` lies beyond `OUTLIER_Z` in the worse direction (``better``: higher | lower | none)."""
    if z is None:
        return False
    if better == "higher":
        return z < -OUTLIER_Z
    if better == "lower":
        return z > OUTLIER_Z
    return abs(z) > OUTLIER_Z


# ------------------------------------------------------------------------- inputs


def collect_qc_reports(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """QC report paths: every ``*_desc-nuclei_qc.json`` below a folder (sorted), or the given list.

    Parameters
    ----------
    source : path or sequence of paths
        A folder, or the report files.

    Returns
    -------
    list of Path

    Raises
    ------
    MissingInputError
        A folder or listed file does not exist.
    NothingSelectedError
        No report was found.
    """
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise MissingInputError("not a folder; give the output folder of `run ... participant`", folder)
        paths = sorted(p for p in folder.rglob(f"*{QC_SUFFIX}") if p.is_file() and ".partial-" not in p.name)
        if not paths:
            raise NothingSelectedError(
                f"no per-slide QC report (*{QC_SUFFIX}) below this folder; run the participant level first", folder
            )
        return paths
    paths = [Path(p) for p in source]
    if not paths:
        raise NothingSelectedError("no QC report given; give at least one *_desc-nuclei_qc.json")
    for path in paths:
        if not path.is_file():
            raise MissingInputError("QC report not found; give an existing *_desc-nuclei_qc.json", path)
    return paths


def read_qc_report(path: str | Path) -> dict[str, Any]:
    """Load one per-slide QC report and check it against the ``qc_report`` schema.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict

    Raises
    ------
    BadDataError
        Unreadable JSON or a report that breaks the schema.
    """

    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BadDataError(f"cannot read the QC report ({error}); rerun `nuclei-app qc` for this slide", path) from None
    validate_instance(report, "qc_report", path)
    return report


def bids_name(report_path: str | Path) -> str:
    """The slide's BIDS name: the report's file name without ``_desc-nuclei_qc.json`` (or ``.json``)."""
    name = Path(report_path).name
    if name.endswith(QC_SUFFIX):
        return name[: -len(QC_SUFFIX)]
    return name[:-5] if name.lower().endswith(".json") else name


# ------------------------------------------------------------------------- outputs


def _cell(value: Any) -> str:
    """A TSV cell: ``n/a`` for None, ``true``/``false``, floats to 6 significant digits, no tabs or newlines."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\t", " ").replace("\n", " ")


TSV_COLUMNS: tuple[tuple[str, str], ...] = (
    ("bids_name", "Source entities of the slide (the QC report's name without _desc-nuclei_qc.json)"),
    ("qc_report", "Path of the per-slide QC report, relative to the group output folder"),
    ("status", "pass | warn | fail of the slide (qc_report status)"),
    ("reasons", "Comma-separated reason codes of the status (n/a when it passed)"),
    ("outlier", "true when some metric is a robust outlier across slides (|z| > 3.5 in its worse direction)"),
    ("outlier_metrics", "Comma-separated metrics that make the slide an outlier (n/a when none)"),
)


def _overlay_data_uri(report_path: Path, relative: str | None) -> str | None:
    """An overlay PNG (path relative to its QC report) as a ``data:`` URI; None when missing or not a PNG."""
    if not relative:
        return None
    path = (report_path.parent / relative).resolve()
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5rem;color:#1b1b1b;background:#fff}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}h3{font-size:1rem}
table{border-collapse:collapse;font-size:.85rem}th,td{border:1px solid #ccc;padding:.25rem .45rem;text-align:right}
th{background:#f0f0f0;position:sticky;top:0}td.name,th.name{text-align:left}
.status-pass{background:#d8f0d8}.status-warn{background:#fff0c0}.status-fail{background:#f8d0d0}
td.outlier{background:#f4b6b6;font-weight:bold}tr.outlier td:first-child{border-left:4px solid #c00}
td:first-child{white-space:nowrap}
.tiles{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;max-width:280px}
figure img{width:256px;height:auto;image-rendering:pixelated;border:1px solid #999;display:block}
figcaption{font-size:.8rem}dl{font-size:.85rem}dt{font-weight:bold;margin-top:.4rem}.note{color:#555;font-size:.85rem}
figure.thumb{max-width:380px}figure.thumb img{width:360px}
.plots{display:flex;flex-wrap:wrap;gap:.5rem 1.5rem}.plots figure{max-width:none}.plots svg{display:block}
.scale{display:inline-block;width:160px;height:.8rem;vertical-align:middle;border:1px solid #999;
background:linear-gradient(to right,rgb(215,48,39) 0%,rgb(215,48,39) var(--red),rgb(254,224,100) var(--yellow),rgb(26,152,80) 100%)}
.frame-worst{color:rgb(230,0,230);font-weight:bold}.frame-median{color:rgb(0,160,210);font-weight:bold}
"""


# Sets data-images-total / data-images-rendered on <body> once the page has loaded, so a
# headless browser (and a person with the developer tools) can check every image decoded.
_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var rendered = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute('data-images-total', String(images.length));
  document.body.setAttribute('data-images-rendered', String(rendered.length));
  document.body.setAttribute('data-ready', 'true');
});
"""


def _slides_table_html(summary: dict[str, Any], descriptions: dict[str, str]) -> list[str]:
    """HTML lines of the per-slide table: status, reasons and every group metric (outlier cells marked)."""
    escape = html.escape
    out = ['<table id="slides"><thead><tr><th class="name">BIDS name</th><th>status</th><th class="name">reasons</th>']
    for metric in GROUP_METRICS:
        out.append(f'<th title="{escape(descriptions.get(metric, ""))}">{escape(metric)}</th>')
    out.append("</tr></thead><tbody>")
    for slide in summary["slides"]:
        row_class = ' class="outlier"' if slide["outlier"] else ""
        reasons = ", ".join(slide["reasons"]) or "&mdash;"
        out.append(
            f'<tr{row_class}><td class="name"><a href="#slide-{escape(slide["bids_name"])}">'
            f'{escape(slide["bids_name"])}</a></td><td class="status-{slide["status"]}">{slide["status"]}</td>'
            f'<td class="name">{escape(reasons) if slide["reasons"] else reasons}</td>'
        )
        for metric in GROUP_METRICS:
            flagged = metric in slide["outlier_metrics"]
            z = slide["robust_z"].get(metric)
            title = f' title="robust z = {z:.2f}"' if z is not None else ""
            css = ' class="outlier"' if flagged else ""
            out.append(f"<td{css}{title}>{escape(format_metric(slide['metrics'].get(metric)))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return out


def _figure_html(report_path: Path, entry: dict[str, Any], name: str) -> str | None:
    """One flagged tile's overlay as an inline ``<figure>``; None when its PNG is missing."""
    uri = _overlay_data_uri(report_path, entry.get("overlay"))
    if uri is None:
        return None
    caption = (f"#{entry['rank']}: y {entry['y0']}, x {entry['x0']} px"
               + (f" ({entry['y0_um']:.1f}, {entry['x0_um']:.1f} µm)" if entry.get("y0_um") is not None else "")
               + f", {entry['height']}&times;{entry['width']} px, QC score "
               + format_metric(entry["qc_score"]) + (": " + ", ".join(entry["reasons"]) if entry["reasons"] else ""))
    return (
        f'<figure><img src="{uri}" alt="tile y{entry["y0"]} x{entry["x0"]} of {html.escape(name)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _tile_picture_html(report_path: Path, entry: dict[str, Any] | None, what: str, name: str) -> str | None:
    """The worst or median tile's overlay (``pictures``) as an inline ``<figure>``; None when missing."""
    if not entry:
        return None
    uri = _overlay_data_uri(report_path, entry.get("overlay"))
    if uri is None:
        return None
    css = "frame-worst" if what == "worst" else "frame-median"
    reasons = ", ".join(entry["reasons"])
    return (
        f'<figure><img src="{uri}" alt="{what} tile of {html.escape(name)}"><figcaption><span class="{css}">'
        f"{what.capitalize()} tile</span>: y {entry['y0']}, x {entry['x0']} px, {entry['height']}&times;"
        f"{entry['width']} px, QC score {format_metric(entry['qc_score'])}{': ' + html.escape(reasons) if reasons else ''}"
        "</figcaption></figure>"
    )


def _slide_pictures_html(report_path: Path, report: dict[str, Any], name: str) -> list[str]:
    """HTML lines of a slide's pictures: the score thumbnail, the worst and the median tile."""
    pictures = report.get("pictures") or {}
    figures = []
    thumbnail = _overlay_data_uri(report_path, pictures.get("thumbnail"))
    if thumbnail is not None:
        slide = report["slide"]
        figures.append(
            f'<figure class="thumb"><img src="{thumbnail}" alt="thumbnail of {html.escape(name)}"><figcaption>'
            f"Whole slide (1:{pictures['thumbnail_downsample']}), tiles tinted by QC score; "
            f"signal coverage {format_metric(slide.get('signal_coverage'))}, {slide.get('clump_count', MISSING)} clump(s)."
            "</figcaption></figure>"
        )
    for what in ("worst", "median"):
        figure = _tile_picture_html(report_path, pictures.get(f"{what}_tile"), what, name)
        if figure is not None:
            figures.append(figure)
    return [f'<div class="tiles">{"".join(figures)}</div>'] if figures else []


def _slide_section_html(report_path: Path, report: dict[str, Any], name: str) -> list[str]:
    """HTML lines of one slide's section: status, reasons, its pictures and the overlays of its flagged tiles."""
    escape = html.escape
    out = [f'<section id="slide-{escape(name)}"><h3>{escape(name)} &mdash; '
           f'<span class="status-{report["status"]}">{report["status"]}</span></h3>']
    if report["reasons"]:
        out.append("<ul>" + "".join(
            f"<li><code>{escape(r['code'])}</code> ({r['severity']}): {escape(r['message'])}</li>"
            for r in report["reasons"]) + "</ul>")
    out.extend(_slide_pictures_html(report_path, report, name))
    flagged = report["flagged_tiles"]
    if not flagged:
        out.append('<p class="note">No flagged tile.</p></section>')
        return out
    figures = [figure for figure in (_figure_html(report_path, entry, name) for entry in flagged) if figure]
    without = len(flagged) - len(figures)
    out.append(f"<h4>Flagged tiles ({len(flagged)})</h4>")
    out.append(f'<div class="tiles">{"".join(figures)}</div>')
    if without:
        out.append(f'<p class="note">{without} more flagged tile(s) without an overlay (beyond max_overlays); '
                   "coordinates in the slide's QC report.</p>")
    out.append("</section>")
    return out


def strip_plot_svg(metric: str, slides: list[dict[str, Any]], better: str) -> str | None:
    """An inline SVG strip plot of one metric across slides: a dot per slide, outliers red, the median a line.

    Parameters
    ----------
    metric : str
        A group metric.
    slides : list of dict
        Entries of the group summary (``metrics``, ``outlier_metrics``, ``bids_name``).
    better : {"higher", "lower", "none"}
        Written under the plot.

    Returns
    -------
    str or None
        The ``<svg>`` element; None when no slide has a value.
    """
    points = [(s["bids_name"], float(s["metrics"][metric]), metric in s["outlier_metrics"])
              for s in slides if s["metrics"].get(metric) is not None]
    if not points:
        return None
    width, height, margin = 300, 52, 12
    values = np.asarray([value for _, value, _ in points])
    low, high = float(values.min()), float(values.max())
    span = high - low or 1.0

    def x_of(value: float) -> float:
        return margin + (value - low) / span * (width - 2 * margin) if high > low else width / 2

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(metric)} across slides">',
           f'<line x1="{margin}" y1="24" x2="{width - margin}" y2="24" stroke="#bbb"/>',
           f'<line x1="{x_of(float(np.median(values))):.1f}" y1="8" x2="{x_of(float(np.median(values))):.1f}" '
           'y2="40" stroke="#555" stroke-dasharray="3,2"><title>median</title></line>']
    for index, (name, value, outlier) in enumerate(points):
        y = 24 + ((index * 7) % 5 - 2) * 3  # a little deterministic jitter, so equal values stay visible
        style = 'r="5" fill="#c00" stroke="#000"' if outlier else 'r="3.5" fill="#3a6ea5" fill-opacity=".8"'
        out.append(f'<a href="#slide-{html.escape(name)}"><circle cx="{x_of(value):.1f}" cy="{y}" {style}>'
                   f"<title>{html.escape(name)}: {format_metric(value)}{' (outlier)' if outlier else ''}</title>"
                   "</circle></a>")
    out.append(f'<text x="{margin}" y="50" font-size="10" fill="#333">{format_metric(low)}</text>')
    out.append(f'<text x="{width - margin}" y="50" font-size="10" fill="#333" text-anchor="end">{format_metric(high)}</text>')
    out.append(f'<text x="{width / 2:.0f}" y="50" font-size="10" fill="#777" text-anchor="middle">'
               f"{'higher is better' if better == 'higher' else 'lower is better' if better == 'lower' else ''}</text>")
    out.append("</svg>")
    return "".join(out)


def _plots_html(summary: dict[str, Any]) -> list[str]:
    """HTML lines of the strip plots of `PLOT_METRICS` across slides."""
    directions = summary["outlier_rule"]["directions"]
    figures = []
    for metric in PLOT_METRICS:
        svg = strip_plot_svg(metric, summary["slides"], directions.get(metric, "none"))
        if svg is not None:
            figures.append(f'<figure class="plot">{svg}<figcaption><b>{html.escape(metric)}</b></figcaption></figure>')
    return ['<div class="plots">' + "".join(figures) + "</div>"]


def _score_legend_html(reports: list[tuple[Path, dict[str, Any]]]) -> str:
    """One line explaining the thumbnails' colours (the scale of the first report that has pictures)."""
    scale = next((r["pictures"]["score_scale"] for _, r in reports if r.get("pictures")), None)
    if scale is None:
        return ""
    red, yellow = 100 * scale["red_at"], 100 * scale["yellow_at"]
    return (f'<p class="note">Thumbnails: the nuclear channel(s) in grey, each analysed tile tinted by its QC score '
            f'<span class="scale" style="--red:{red:.0f}%;--yellow:{yellow:.0f}%"></span> (0 to 1: red up to '
            f"{scale['red_at']:g}, yellow at the flag threshold {scale['yellow_at']:g}, green at 1; empty tiles "
            'untinted); the <span class="frame-worst">worst</span> and the <span class="frame-median">median</span> '
            "tile are framed and shown beside it with the nucleus outlines in yellow.</p>")


def render_html(summary: dict[str, Any], reports: list[tuple[Path, dict[str, Any]]]) -> str:
    """The self-contained report page for a group summary and its slide reports.

    Parameters
    ----------
    summary : dict
        The group summary (``group_qc.json``).
    reports : list of (Path, dict)
        Each slide's QC report path and content, in the order of ``summary["slides"]``.

    Returns
    -------
    str
        The HTML document.
    """
    escape = html.escape
    descriptions = metric_descriptions()
    counts = summary["status_counts"]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched: images are data: URIs, style and script are inline.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>nuclei-app QC report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>nuclei-app quality control: segmentation without ground truth</h1>",
        f"<p>{summary['n_slides']} slide(s): <span class=\"status-pass\">{counts['pass']} pass</span>, "
        f"<span class=\"status-warn\">{counts['warn']} warn</span>, "
        f"<span class=\"status-fail\">{counts['fail']} fail</span>; "
        f"{summary['n_outliers']} outlier slide(s). Generated by nuclei-app {escape(summary['software']['version'])} "
        f"at {escape(summary['created_at'])}.</p>",
        f"<p class=\"note\">Outlier cells (red): robust z-score across slides beyond {OUTLIER_Z} in the metric's "
        f"worse direction (z = (x - median) / (1.4826 MAD)); computed with at least {MIN_SLIDES_FOR_OUTLIERS} "
        "slides. Hover a column header for the metric's definition.</p>",
        "<h2>Key metrics across slides</h2>",
        '<p class="note">One dot per slide (hover for its name and value, click to jump to it); red: an outlier '
        "slide for that metric; dashed: the median.</p>",
        *_plots_html(summary),
        "<h2>Slides</h2>",
        *_slides_table_html(summary, descriptions),
        "<h2>Every slide</h2>",
        _score_legend_html(reports),
        '<p class="note">Flagged tiles: the nuclear channel(s) of the tile in grey with the nucleus outlines of '
        "the segmentation in yellow, worst tile (lowest QC score) first.</p>",
    ]
    for (report_path, report), slide in zip(reports, summary["slides"]):
        out.extend(_slide_section_html(report_path, report, slide["bids_name"]))
    out.append("<h2>Metric definitions</h2><dl>")
    for metric in GROUP_METRICS:
        out.append(f"<dt>{escape(metric)}</dt><dd>{escape(descriptions.get(metric, ''))}</dd>")
    out.append("</dl>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(out) + "\n"


def slide_summaries(reports: list[tuple[Path, dict[str, Any]]], output_dir: Path) -> list[dict[str, Any]]:
    """One group entry per slide report: status, reasons, metrics, robust z-scores and outlier metrics.

    The z-scores (`robust_z_scores` of each of `GROUP_METRICS` across the slides) are
    computed with at least `MIN_SLIDES_FOR_OUTLIERS` slides, else they are None.

    Parameters
    ----------
    reports : list of (Path, dict)
        Each slide's QC report path and content.
    output_dir : Path
        The group output folder (report paths are written relative to it when below it).

    Returns
    -------
    list of dict
        Entries of the ``slides`` array of the ``group_qc`` schema, in the order of ``reports``.
    """
    directions = metric_directions()
    use_outliers = len(reports) >= MIN_SLIDES_FOR_OUTLIERS
    z_scores = {
        metric: robust_z_scores(np.asarray([_number(report["slide"].get(metric)) for _, report in reports]))
        if use_outliers else np.full(len(reports), np.nan)
        for metric in GROUP_METRICS
    }
    slides = []
    for index, (path, report) in enumerate(reports):
        robust = {metric: (round(float(z_scores[metric][index]), 4) if np.isfinite(z_scores[metric][index]) else None)
                  for metric in GROUP_METRICS}
        outlier_metrics = [m for m in GROUP_METRICS if _is_outlier(robust[m], directions.get(m, "none"))]
        try:
            relative = str(path.resolve().relative_to(output_dir.resolve()))
        except ValueError:
            relative = str(path.resolve())
        slides.append({
            "bids_name": bids_name(path),
            "qc_report": relative,
            "source": report["provenance"]["image"]["path"],
            "status": report["status"],
            "reasons": [reason["code"] for reason in report["reasons"]],
            "n_flagged_tiles": len(report["flagged_tiles"]),
            "metrics": {metric: report["slide"].get(metric) for metric in GROUP_METRICS},
            "robust_z": robust,
            "outlier": bool(outlier_metrics),
            "outlier_metrics": outlier_metrics,
        })
    return slides


def group_summary(slides: list[dict[str, Any]], applied: bool) -> dict[str, Any]:
    """The content of ``group_qc.json`` (schema ``group_qc``) for the slide entries.

    Parameters
    ----------
    slides : list of dict
        From `slide_summaries`.
    applied : bool
        Whether the outlier rule was applied (enough slides).

    Returns
    -------
    dict
    """
    directions = metric_directions()
    descriptions = metric_descriptions()
    return {
        "schema_version": "1.0",
        "created_at": utc_timestamp(),
        "software": {"name": "nuclei-app", "version": __version__},
        "n_slides": len(slides),
        "status_counts": {status: sum(1 for s in slides if s["status"] == status) for status in ("pass", "warn", "fail")},
        "n_outliers": sum(1 for s in slides if s["outlier"]),
        "outlier_rule": {
            "statistic": "robust z = (x - median) / (1.4826 MAD); 1.2533 x mean absolute deviation when MAD = 0",
            "threshold": OUTLIER_Z,
            "min_slides": MIN_SLIDES_FOR_OUTLIERS,
            "applied": applied,
            "directions": {metric: directions.get(metric, "none") for metric in GROUP_METRICS},
        },
        "metrics": list(GROUP_METRICS),
        "columns": {name: {"Description": text} for name, text in TSV_COLUMNS}
        | {metric: {"Description": descriptions.get(metric, "")} for metric in GROUP_METRICS},
        "slides": slides,
    }


def group_tsv(slides: list[dict[str, Any]]) -> str:
    """The text of ``group_qc.tsv``: `TSV_COLUMNS` then `GROUP_METRICS`, one row per slide entry."""
    header = [name for name, _ in TSV_COLUMNS] + list(GROUP_METRICS)
    lines = ["\t".join(header)]
    for slide in slides:
        row = [slide["bids_name"], slide["qc_report"], slide["status"], ",".join(slide["reasons"]) or MISSING,
               _cell(slide["outlier"]), ",".join(slide["outlier_metrics"]) or MISSING]
        row += [_cell(slide["metrics"][metric]) for metric in GROUP_METRICS]
        lines.append("\t".join(row))
    return "\n".join(lines) + "\n"


def write_group_report(
    qc_reports: str | Path | Sequence[str | Path], output_dir: str | Path
) -> GroupReport:
    """Aggregate per-slide QC reports into ``group_qc.tsv``, ``group_qc.json`` and ``report.html``.

    Parameters
    ----------
    qc_reports : path or sequence of paths
        A folder (every ``*_desc-nuclei_qc.json`` below it is used, e.g. the BIDS derivative
        output folder) or a list of per-slide QC report files.
    output_dir : path
        Folder to write the three files into (created when missing).

    Returns
    -------
    GroupReport
        The written paths and the group summary.

    Raises
    ------
    MissingInputError (66)
        A given folder or report does not exist.
    NothingSelectedError (18)
        No report found.
    BadDataError (65)
        A report is unreadable or breaks the ``qc_report`` schema.
    CannotCreateOutputError (73)
        The output folder cannot be written.
    InvalidQCReportError
        The group summary breaks the ``group_qc`` schema (a bug: nothing is written).
    """

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CannotCreateOutputError("exists and is not a folder; give an output folder", output_dir)
    paths = collect_qc_reports(qc_reports)
    reports = [(path, read_qc_report(path)) for path in paths]
    summary = group_summary(slide_summaries(reports, output_dir), applied=len(reports) >= MIN_SLIDES_FOR_OUTLIERS)
    check_built_report(summary, "group_qc", "group QC summary")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create folder ({error.strerror}); choose a writable path", output_dir)
    tsv = atomic_write_text(output_dir / GROUP_TSV, group_tsv(summary["slides"]))
    page = atomic_write_text(output_dir / REPORT_HTML, render_html(summary, reports))
    json_path = atomic_write_json(output_dir / GROUP_JSON, summary)
    return GroupReport(tsv, json_path, page, summary)
