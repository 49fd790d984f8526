"""report.html in a real headless browser (Debian's chromium): every image decodes and shows.

Every slide shows its score thumbnail, its worst and median tile and its flagged tiles' overlays;
the screenshot is kept as a test artefact (``test-artifacts/report_html.png``) for a person to look at.

Chromium is installed by `make test` when it runs as root (apt-get install chromium); the
test fails in CI (CI=true) without it and is skipped elsewhere, with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nuclei_app.config import QCThresholds
from nuclei_app.qc.slide import write_qc_report
from nuclei_app.qc.group_report import write_group_report

IMAGES = ("dsb_5488e8df5440", "dsb_9bb6e39d5f44")
#: Pictures per slide: the score thumbnail, the worst and the median tile, 3 flagged-tile overlays.
IMAGES_PER_SLIDE = 3 + 3
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
OUTLINE_RGB = (255, 214, 0)  # nucleus outlines in the overlays


def chromium() -> str:
    """Path of the chromium binary; fail in CI, skip locally when it is absent."""
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    message = "Debian's chromium is not installed (`apt-get install chromium`; `make test` does it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def run_chromium(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", *mode, page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=profile)


def body_attributes(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


@pytest.fixture(scope="module")
def report_page(nuclei_gt_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    folder = nuclei_gt_dir / "dsb2018-stage1-fixed"
    # Flag every tile so that each slide has overlays to show.
    thresholds = QCThresholds(tile_size_px=128, flag_tile_score_below=1.0, max_overlays=3)
    for subject, name in enumerate(IMAGES, start=1):
        write_qc_report(folder / f"{name}_masks.tif", folder / f"{name}_img.tif",
                        root / f"sub-0{subject}" / "micr" / f"sub-0{subject}_sample-A_desc-nuclei_qc.json",
                        thresholds=thresholds)
    return write_group_report(root, root).html


def test_every_overlay_renders_in_headless_chromium(report_page: Path, tmp_path: Path):
    page = report_page.read_text()
    n_images = page.count("<img ")
    assert n_images == len(IMAGES) * IMAGES_PER_SLIDE
    assert page.count('alt="thumbnail of ') == page.count('alt="worst tile of ') == len(IMAGES)
    assert page.count("<svg ") >= 5  # the strip plots of the key metrics
    result = run_chromium(report_page, tmp_path, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    attributes = body_attributes(result.stdout)
    assert attributes.get("data-ready") == "true"
    assert attributes["data-images-total"] == str(n_images)
    assert attributes["data-images-rendered"] == str(n_images)


def test_a_broken_image_is_caught_by_the_same_check(report_page: Path, tmp_path: Path):
    page = report_page.read_text()
    first = re.search(r'data:image/png;base64,([A-Za-z0-9+/=]{40})', page)
    damaged = tmp_path / "damaged.html"
    damaged.write_text(page.replace(first.group(0), "data:image/png;base64," + "A" * 40, 1))
    result = run_chromium(damaged, tmp_path, "--dump-dom")
    attributes = body_attributes(result.stdout)
    n_images = len(IMAGES) * IMAGES_PER_SLIDE
    assert attributes["data-images-total"] == str(n_images)
    assert attributes["data-images-rendered"] == str(n_images - 1)


def test_screenshot_shows_the_overlays(report_page: Path, tmp_path: Path):
    import imagecodecs

    shot = tmp_path / "report.png"
    result = run_chromium(report_page, tmp_path, f"--screenshot={shot}", "--window-size=1400,2400",
                          "--hide-scrollbars")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = imagecodecs.png_decode(shot.read_bytes())[..., :3].astype(int)
    assert pixels.std() > 10  # not a blank page
    # The overlays' yellow outlines reached the screen (text and tables are never that colour).
    outline = np.all(np.abs(pixels - np.array(OUTLINE_RGB)) <= 12, axis=-1)
    assert outline.sum() > 200
    # The thumbnails' worst-tile frames (magenta) reached the screen too.
    frame = np.all(np.abs(pixels - np.array((230, 0, 230))) <= 12, axis=-1)
    assert frame.sum() > 100
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report_html.png").write_bytes(shot.read_bytes())
