"""Group QC: group_qc.tsv, group_qc.json (schema-valid) and the self-contained report.html."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from nuclei_app.config import QCThresholds
from nuclei_app.errors import BadDataError, MissingInputError, NothingSelectedError
from nuclei_app.qc.slide import write_qc_report
from nuclei_app.qc.group_report import GROUP_METRICS, write_group_report
from nuclei_app.schemas import schema_errors

#: (subject, image) of the human-mask slides; sub-04 gets the same image as sub-02 with half its nuclei deleted.
SLIDES = (("01", "dsb_5488e8df5440"), ("02", "dsb_f6863b83d75e"), ("03", "dsb_9bb6e39d5f44"))


@pytest.fixture(scope="module")
def derivatives(nuclei_gt_dir: Path, tmp_path_factory) -> Path:
    """A BIDS derivative folder with four per-slide QC reports: three good slides and one broken one."""
    root = tmp_path_factory.mktemp("derivatives")
    folder = nuclei_gt_dir / "dsb2018-stage1-fixed"
    thresholds = QCThresholds(tile_size_px=128, max_overlays=4)
    for subject, name in SLIDES:
        micr = root / f"sub-{subject}" / "micr"
        write_qc_report(folder / f"{name}_masks.tif", folder / f"{name}_img.tif",
                        micr / f"sub-{subject}_sample-A_desc-nuclei_qc.json", thresholds=thresholds)
    truth = tifffile.imread(folder / "dsb_f6863b83d75e_masks.tif")
    ids = np.unique(truth)[1:]
    broken = root / "sub-04" / "micr" / "sub-04_sample-A_labels.tif"
    broken.parent.mkdir(parents=True)
    tifffile.imwrite(broken, np.where(np.isin(truth, ids[::2]), 0, truth))
    write_qc_report(broken, folder / "dsb_f6863b83d75e_img.tif", broken.parent / "sub-04_sample-A_desc-nuclei_qc.json",
                    thresholds=thresholds)
    return root


def test_group_z_scores_fall_back_to_the_mean_absolute_deviation_when_the_mad_is_zero(derivatives, tmp_path):
    # Four copies of one slide's report; one has more nuclei: the MAD of n_nuclei is 0.
    source = derivatives / "sub-01" / "micr" / "sub-01_sample-A_desc-nuclei_qc.json"
    paths = []
    for index, n_nuclei in enumerate((36, 36, 36, 80)):
        report = json.loads(source.read_text())
        report["slide"]["n_nuclei"] = n_nuclei
        paths.append(tmp_path / f"sub-{index}_desc-nuclei_qc.json")
        paths[-1].write_text(json.dumps(report))
    slides = write_group_report(paths, tmp_path / "group").summary["slides"]
    z = [slide["robust_z"]["n_nuclei"] for slide in slides]
    assert z[:3] == [0.0, 0.0, 0.0] and z[3] == pytest.approx(44 / (1.2533 * 11), abs=1e-4)
    assert [slide["robust_z"]["seed_recall"] for slide in slides] == [0.0] * 4  # all equal


def test_group_report_from_an_output_folder(derivatives: Path, tmp_path: Path):
    result = write_group_report(derivatives, derivatives)
    assert result.paths() == [derivatives / "group_qc.tsv", derivatives / "group_qc.json", derivatives / "report.html"]

    summary = json.loads(result.json.read_text())
    assert schema_errors(summary, "group_qc") == []
    assert summary["n_slides"] == 4
    assert summary["status_counts"] == {"pass": 3, "warn": 0, "fail": 1}
    by_name = {slide["bids_name"]: slide for slide in summary["slides"]}
    assert list(by_name) == [f"sub-0{i}_sample-A" for i in range(1, 5)]
    broken = by_name["sub-04_sample-A"]
    assert broken["status"] == "fail" and "low_seed_recall" in broken["reasons"]
    assert broken["outlier"] and {"seed_recall", "foreground_coverage"} <= set(broken["outlier_metrics"])
    assert broken["robust_z"]["seed_recall"] < -3.5
    # Good slides: no quality metric stands out; sub-01's nuclei are ~5x larger (a descriptive outlier).
    assert by_name["sub-01_sample-A"]["outlier_metrics"] == ["median_area_px"]
    assert not by_name["sub-02_sample-A"]["outlier"] and not by_name["sub-03_sample-A"]["outlier"]
    assert by_name["sub-01_sample-A"]["qc_report"] == "sub-01/micr/sub-01_sample-A_desc-nuclei_qc.json"

    with result.tsv.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    assert rows[0][0] == "bids_name" and rows[0][6:] == list(GROUP_METRICS)
    assert [row[0] for row in rows[1:]] == list(by_name)
    assert rows[4][2:5] == ["fail", ",".join(broken["reasons"]), "true"]
    assert all(len(row) == len(rows[0]) for row in rows)


def test_report_html_is_self_contained_with_outliers_and_overlays(derivatives: Path, tmp_path: Path):
    page = write_group_report(derivatives, tmp_path / "group").html.read_text()
    # Nothing is fetched from anywhere: no URL in any src/href, a CSP that forbids it.
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)
    assert "default-src 'none'" in page and "<link" not in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    broken_report = json.loads((derivatives / "sub-04/micr/sub-04_sample-A_desc-nuclei_qc.json").read_text())
    drawn = [entry for entry in broken_report["flagged_tiles"] if entry["overlay"]]
    assert drawn and len(images) >= len(drawn)
    import base64

    for encoded in images:
        assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")
    # The outlier slide's row and its outlier cells are highlighted.
    row = re.search(r'<tr class="outlier"><td class="name"><a href="#slide-sub-04_sample-A">', page)
    assert row is not None
    assert page.count('<td class="outlier"') >= 2
    for subject in ("01", "02", "03", "04"):
        assert f'id="slide-sub-{subject}_sample-A"' in page
    # Every slide shows the pictures its QC drew: the score thumbnail, the worst and the median tile.
    for subject in ("01", "02", "03", "04"):
        for what in ("thumbnail of", "worst tile of", "median tile of"):
            assert f'alt="{what} sub-{subject}_sample-A"' in page
    # A strip plot per key metric; the broken slide is the red (outlier) dot of seed_recall.
    plot = re.search(r'<svg [^>]*aria-label="seed_recall across slides">(.*?)</svg>', page).group(1)
    assert plot.count("<circle") == 4
    assert re.search(r'<circle [^>]*fill="#c00"[^>]*><title>sub-04_sample-A: [0-9.]+ \(outlier\)</title>', plot)


def test_group_report_from_a_list_of_reports(derivatives: Path, tmp_path: Path):
    reports = sorted(derivatives.rglob("*_desc-nuclei_qc.json"))[:2]
    result = write_group_report(reports, tmp_path)
    summary = result.summary
    assert summary["n_slides"] == 2
    assert summary["outlier_rule"]["applied"] is False  # too few slides to call outliers
    assert all(value is None for value in summary["slides"][0]["robust_z"].values())
    assert summary["slides"][0]["qc_report"] == str(reports[0].resolve())


def test_group_report_bad_inputs(derivatives: Path, tmp_path: Path):
    with pytest.raises(NothingSelectedError):
        write_group_report(tmp_path, tmp_path / "out")
    with pytest.raises(MissingInputError):
        write_group_report(tmp_path / "absent", tmp_path / "out")
    with pytest.raises(MissingInputError):
        write_group_report([tmp_path / "absent_desc-nuclei_qc.json"], tmp_path / "out")
    bad = tmp_path / "sub-09_desc-nuclei_qc.json"
    bad.write_text(json.dumps({"status": "pass"}))
    with pytest.raises(BadDataError, match="does not match schema qc_report"):
        write_group_report([bad], tmp_path / "out")
    assert not (tmp_path / "out" / "group_qc.json").exists()
