"""A short human summary of a QC report: what `nuclei-app qc` and `segment` print when they finish.

The same rows serve both outputs: a `rich` table for a person at a terminal (`summary_table`)
and plain ``key: value`` lines for logs, CI and batch systems (`summary_lines`), so a pipeline
can grep them and a person can read them.
"""
from __future__ import annotations

from typing import Any

#: How many of the lowest-scoring tiles the summary names.
WORST_TILES_SHOWN = 3


def format_metric(value: Any) -> str:
    """A QC metric for people (summary, report.html): ``n/a`` for None, floats to 3 decimals
    (none from 1000 on), anything else as it is."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def worst_tiles(report: dict[str, Any], count: int = WORST_TILES_SHOWN) -> list[dict[str, Any]]:
    """The ``count`` tile records of lowest QC score (ties: grid order); tiles without a score are left out.

    Parameters
    ----------
    report : dict
        A QC report (schema ``qc_report``).
    count : int

    Returns
    -------
    list of dict
    """
    scored = [t for t in report["tiles"] if t.get("qc_score") is not None]
    return sorted(scored, key=lambda t: (t["qc_score"], t["index"]))[:count]


def _coverage_text(slide: dict[str, Any], channels: list[str]) -> str:
    """``0.912 (dilated 1-4 px: 0.930, ...; noise threshold DAPI 12.5)`` for the seed paper's coverage."""
    coverage = slide.get("signal_coverage")
    if "signal_coverage" not in slide:
        return "n/a (report written before nuclei-app measured it)"
    by_radius = slide.get("signal_coverage_by_dilation") or {}
    dilated = ", ".join(format_metric(by_radius.get(str(r))) for r in range(1, 5))
    noise = ", ".join(f"{name} {value:g}" for name, value in zip(channels, slide.get("noise_threshold") or []))
    return f"{format_metric(coverage)} (dilated 1-4 px: {dilated}; noise threshold {noise or 'n/a'})"


def summary_rows(report: dict[str, Any], count: int = WORST_TILES_SHOWN) -> list[tuple[str, str]]:
    """The summary as (label, text) rows: status, reasons, signal coverage, clumps, worst tiles.

    Parameters
    ----------
    report : dict
        A QC report (schema ``qc_report``).
    count : int
        Worst tiles named.

    Returns
    -------
    list of (str, str)
        ``status`` first; one ``worst tile`` row per tile named (none when no tile has a score).
    """
    slide = report["slide"]
    codes = ", ".join(reason["code"] for reason in report["reasons"])
    rows = [("status", f"{report['status']}{f' ({codes})' if codes else ''}")]
    rows.append(("reasons", "; ".join(f"{r['severity']}: {r['message']}" for r in report["reasons"]) or "none"))
    channels = list(report["provenance"]["parameters"].get("nuclear_channels", []))
    rows.append(("signal coverage", _coverage_text(slide, channels)))
    if "clump_count" in slide:
        rows.append(("clumps", f"{slide['clump_count']} ({format_metric(slide.get('clump_share'))} per nucleus)"))
    for rank, tile in enumerate(worst_tiles(report, count), start=1):
        reasons = ", ".join(tile.get("flag_reasons") or []) or ("flagged" if tile.get("flagged") else "not flagged")
        rows.append((f"worst tile {rank}", f"y {tile['y0']}, x {tile['x0']} ({tile['height']}x{tile['width']} px): "
                                           f"QC score {format_metric(tile['qc_score'])} ({reasons})"))
    return rows


def summary_lines(rows: list[tuple[str, str]]) -> list[str]:
    """Plain ``label: text`` lines of `summary_rows` (for logs and pipes)."""
    return [f"{label}: {text}" for label, text in rows]


def summary_table(rows: list[tuple[str, str]], title: str = "QC summary") -> Any:
    """A `rich.table.Table` of `summary_rows`, the status coloured (pass green, warn yellow, fail red)."""
    from rich.table import Table  # deferred: rich is only needed on a terminal
    from rich.text import Text

    colour = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, text in rows:
        style = colour.get(text.split(" ", 1)[0], "") if label == "status" else ""
        table.add_row(label, Text(text, style=style))  # Text: a "[" in a message is not markup
    return table
