"""BIDS microscopy discovery: names, filters, sidecar inheritance, units, escape guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nuclei_app.bids.discover import bids_derivative_name, channel_names_with_staining, discover, parse_bids_name
from nuclei_app.errors import BadDataError, MissingInputError, UsageError
from nuclei_app.io.ome_tiff import write_ome_tiff
from nuclei_app.io.ome_zarr import write_ome_zarr_image


def _json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two subjects, sessions on one of them, four slides, sidecars at three levels."""
    root = tmp_path / "bids"
    image = np.random.default_rng(0).integers(0, 500, (2, 64, 64)).astype(np.uint16)
    slides = [
        "sub-01/ses-pre/micr/sub-01_ses-pre_sample-A_FLUO.ome.tif",
        "sub-01/ses-post/micr/sub-01_ses-post_sample-B_acq-hi_stain-dapi_run-1_CONF.ome.zarr",
        "sub-02/micr/sub-02_sample-C_FLUO.ome.btf",
        "sub-02/micr/sub-02_sample-D_chunk-2_FLUO.ome.tif",
    ]
    for relative in slides:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".ome.zarr"):
            write_ome_zarr_image(path, image, ["DAPI", "GFAP"], n_levels=1)
        else:
            write_ome_tiff(path, image, ["DAPI", "GFAP"], (0.5, 0.5), tile=(32, 32))
    # not slides: wrong name, unsupported extension, hidden, partial write, anat folder
    (root / "sub-02/micr/notbids.ome.tif").write_bytes(b"x")
    (root / "sub-02/micr/sub-02_sample-E_FLUO.png").write_bytes(b"x")
    (root / "sub-02/micr/.sub-02_sample-F_FLUO.ome.tif").write_bytes(b"x")
    (root / "sub-02/micr/sub-02_sample-G_FLUO.ome.tif.partial-123").write_bytes(b"x")
    _json(root / "dataset_description.json", {"Name": "t", "BIDSVersion": "1.9.0"})
    _json(root / "FLUO.json", {"PixelSize": [0.5, 0.5], "PixelSizeUnits": "um", "Level": "root"})
    _json(root / "CONF.json", {"PixelSize": [200, 250], "PixelSizeUnits": "nm", "Level": "root-conf"})
    _json(root / "sub-02/sub-02_FLUO.json", {"Level": "subject", "SampleStaining": ["DAPI", "GFAP"]})
    _json(root / "sub-02/micr/sub-02_sample-D_FLUO.json", {"Level": "sample-D-all-chunks"})
    _json(root / "sub-02/micr/sub-02_sample-D_chunk-2_FLUO.json", {"Level": "file", "PixelSize": [1, 1],
                                                                    "PixelSizeUnits": "mm"})
    _json(root / "sub-02/micr/sub-02_sample-C_CONF.json", {"Level": "wrong-suffix"})
    return root


def test_parse_bids_name_entities_suffix_extension():
    parsed = parse_bids_name("sub-01_ses-2_sample-A_acq-hi_stain-dapi_run-3_chunk-4_FLUO.ome.tif")
    assert parsed == {"sub": "01", "ses": "2", "sample": "A", "acq": "hi", "stain": "dapi", "run": "3",
                      "chunk": "4", "suffix": "FLUO", "extension": ".ome.tif"}
    assert parse_bids_name("sub-01_sample-A_FLUO.ome.zarr")["extension"] == ".ome.zarr"
    assert parse_bids_name("sub-01_sample-A_FLUO.json")["extension"] == ".json"
    for bad in ["sample-A_sub-01_FLUO.ome.tif",  # order
                "sub-01_acq-x_sample-A_FLUO.ome.tif",  # order
                "sub-0_1_sample-A_FLUO.ome.tif",  # label characters
                "sub-01_sample-A-1_FLUO.ome.tif",
                "sub-01_ses-1_FLUO.ome.tif",  # sample missing
                "sub-01_sample-A_run-x_FLUO.ome.tif"]:  # run must be an index
        assert parse_bids_name(bad) is None, bad


def test_discover_finds_slides_with_entities_and_inherited_metadata(dataset):
    records = discover(dataset)
    assert [r.path.name for r in records] == [
        "sub-01_ses-post_sample-B_acq-hi_stain-dapi_run-1_CONF.ome.zarr",
        "sub-01_ses-pre_sample-A_FLUO.ome.tif",
        "sub-02_sample-C_FLUO.ome.btf",
        "sub-02_sample-D_chunk-2_FLUO.ome.tif",
    ]
    conf, fluo_a, fluo_c, fluo_d = records
    assert conf.entities == {"sub": "01", "ses": "post", "sample": "B", "acq": "hi", "stain": "dapi", "run": "1"}
    assert (conf.subject, conf.session, conf.sample, conf.suffix, conf.extension) == ("01", "post", "B", "CONF",
                                                                                        ".ome.zarr")
    assert conf.metadata["Level"] == "root-conf"  # FLUO sidecars do not apply to CONF
    assert conf.pixel_size_um == pytest.approx((0.25, 0.2))  # [x, y] in nm -> (y, x) in um
    assert fluo_a.metadata["Level"] == "root" and fluo_a.session == "pre"
    assert fluo_c.metadata["Level"] == "subject"  # sub-02_FLUO.json overrides the root
    assert fluo_c.metadata["SampleStaining"] == ["DAPI", "GFAP"]
    assert fluo_d.metadata["Level"] == "file"  # deepest, most specific wins
    assert [p.name for p in fluo_d.sidecars] == ["FLUO.json", "sub-02_FLUO.json", "sub-02_sample-D_FLUO.json",
                                                 "sub-02_sample-D_chunk-2_FLUO.json"]
    assert fluo_d.pixel_size_um == (1000.0, 1000.0)  # mm
    assert fluo_d.session is None and fluo_d.relative_dir == Path("sub-02/micr")


@pytest.mark.parametrize(
    ("filters", "expected_samples"),
    [
        ({"participant_label": "01"}, ["B", "A"]),
        ({"participant_label": "sub-02"}, ["C", "D"]),
        ({"participant_label": ["sub-01", "02"]}, ["B", "A", "C", "D"]),
        ({"participant_label": "01,02"}, ["B", "A", "C", "D"]),
        ({"session_label": "ses-pre"}, ["A"]),
        ({"participant_label": "01", "session_label": "post"}, ["B"]),
        ({"sample_label": "sample-D"}, ["D"]),
        ({"sample_label": ["C", "A"]}, ["A", "C"]),
        ({"participant_label": "03"}, []),
    ],
)
def test_discover_filters_accept_labels_with_or_without_prefix(dataset, filters, expected_samples):
    assert [r.sample for r in discover(dataset, **filters)] == expected_samples


@pytest.mark.parametrize("label", ["..", "../sub-01", "01/../02", "a\\b", "sub-01!", "sub-01_x", "", "sub-"])
def test_bad_labels_are_usage_errors(dataset, label):
    with pytest.raises(UsageError) as raised:
        discover(dataset, participant_label=label)
    assert raised.value.exit_code == 64 and "\n" not in str(raised.value)


def test_empty_label_string_is_refused(dataset):
    with pytest.raises(UsageError):
        discover(dataset, session_label="ses-")


def test_missing_or_file_bids_dir_is_missing_input(tmp_path):
    with pytest.raises(MissingInputError):
        discover(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MissingInputError, match="not a BIDS dataset folder"):
        discover(tmp_path / "file")


def test_symlink_escaping_the_dataset_is_refused(dataset, tmp_path):
    outside = tmp_path / "elsewhere.ome.tif"
    outside.write_bytes((dataset / "sub-02/micr/sub-02_sample-C_FLUO.ome.btf").read_bytes())
    link = dataset / "sub-02/micr/sub-02_sample-Z_FLUO.ome.tif"
    link.symlink_to(outside)
    with pytest.raises(BadDataError, match="outside the dataset") as raised:
        discover(dataset)
    assert str(link) in str(raised.value)
    assert [r.sample for r in discover(dataset, sample_label="A")] == ["A"]  # filtered out: not opened


def test_invalid_sidecar_json_is_bad_data(dataset):
    (dataset / "sub-02/sub-02_FLUO.json").write_text("{not json")
    with pytest.raises(BadDataError, match="not valid JSON"):
        discover(dataset, participant_label="02")


def test_derivative_name_keeps_source_entities(dataset):
    record = discover(dataset, sample_label="B")[0]
    assert bids_derivative_name(record, "nuclei", "FLUO", ".ome.zarr") == (
        "sub-01_ses-post_sample-B_acq-hi_stain-dapi_run-1_desc-nuclei_FLUO.ome.zarr"
    )
    assert bids_derivative_name(record, "nuclei", "qc", "json").endswith("_desc-nuclei_qc.json")
    with pytest.raises(UsageError):
        bids_derivative_name(record, "bad-desc", "qc", ".json")


def test_sample_staining_names_generic_channels():
    assert channel_names_with_staining(["channel_0", "channel_1"], {"SampleStaining": ["DAPI", "NeuN"]}) == [
        "DAPI", "NeuN"]
    assert channel_names_with_staining(["Channel 0"], {"SampleStaining": "Hoechst"}) == ["Hoechst"]
    assert channel_names_with_staining(["DAPI", "x"], {"SampleStaining": ["a", "b"]}) == ["DAPI", "x"]
    assert channel_names_with_staining(["channel_0"], {"SampleStaining": ["a", "b"]}) == ["channel_0"]
