"""Label image I/O: label TIFF, plain masks, OME-Zarr labels (zarr v2 and v3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr

from nuclei_app.errors import BadDataError, MissingInputError
from nuclei_app.io.labels import read_labels, write_label_tiff
from nuclei_app.io.ngff import NGFF_VERSION
from nuclei_app.io.ome_zarr import write_labels_ome_zarr


def sample_labels(shape=(300, 520)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint32)
    labels[10:40, 10:50] = 1
    labels[100:160, 200:260] = 7
    labels[200:290, 400:500] = 70_000  # beyond uint16
    return labels


def test_label_tiff_roundtrip_is_uint32_zlib_with_resolution(tmp_path):
    labels = sample_labels()
    path = write_label_tiff(tmp_path / "sub" / "labels.tif", labels, pixel_size_um=(0.5, 0.25))
    back = read_labels(path)
    assert back.dtype == np.uint32 and back.shape == labels.shape
    np.testing.assert_array_equal(back, labels)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        x_res = page.tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 0.25)
    assert not list(tmp_path.glob("sub/*.partial-*"))


def test_ome_tiff_label_has_physical_size(tmp_path):
    path = write_label_tiff(tmp_path / "labels.ome.tif", sample_labels(), pixel_size_um=(0.65, 0.65))
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ome
        assert 'PhysicalSizeX="0.65"' in tiff.ome_metadata
    np.testing.assert_array_equal(read_labels(path), sample_labels())


def test_plain_binary_masks_become_connected_components(tmp_path):
    mask = np.zeros((50, 50), dtype=np.uint8)
    mask[5:10, 5:10] = 255
    mask[20:30, 20:30] = 255
    tifffile.imwrite(tmp_path / "mask255.tif", mask)
    tifffile.imwrite(tmp_path / "maskbool.tif", mask > 0)
    for name in ("mask255.tif", "maskbool.tif"):
        labels = read_labels(tmp_path / name)
        assert labels.dtype == np.uint32
        assert sorted(np.unique(labels)) == [0, 1, 2]


def test_label_tiff_errors(tmp_path):
    with pytest.raises(MissingInputError):
        read_labels(tmp_path / "absent.tif")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 10, 10), np.uint16), photometric="minisblack")
    with pytest.raises(BadDataError, match="2-D"):
        read_labels(tmp_path / "stack.tif")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(BadDataError, match="TIFF"):
        read_labels(tmp_path / "broken.tif")
    with pytest.raises(BadDataError, match="non-integer"):
        write_label_tiff(tmp_path / "x.tif", np.full((4, 4), 0.5))


def test_ome_zarr_roundtrip_readable_by_ome_zarr_reader(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    labels = sample_labels()
    image = np.stack([np.linspace(0, 1, labels.size).reshape(labels.shape)] * 2).astype(np.float32)
    path = write_labels_ome_zarr(
        tmp_path / "out.ome.zarr", labels, image=image, channel_names=["DAPI", "Histone"], pixel_size_um=(0.5, 0.5)
    )
    for target in (path, path / "labels", path / "labels" / "nuclei"):
        np.testing.assert_array_equal(read_labels(target), labels)
    nodes = list(Reader(parse_url(str(path)))())
    label_nodes = [node for node in nodes if any(isinstance(spec, Label) for spec in node.specs)]
    assert len(label_nodes) == 1
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), labels)
    assert label_nodes[0].metadata.get("name") == "nuclei"
    # The weak labeler's store is written by the same writer as whole-slide segmentations: NGFF 0.4 (Zarr v2).
    root = json.loads((path / ".zattrs").read_text())
    assert root["multiscales"][0]["version"] == NGFF_VERSION == "0.4"
    assert [c["label"] for c in root["omero"]["channels"]] == ["DAPI", "Histone"]
    assert root["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.5, 0.5]
    label_meta = json.loads((path / "labels" / "nuclei" / ".zattrs").read_text())
    assert "image-label" in label_meta
    assert zarr.open_array(str(path / "labels" / "nuclei" / "0"), mode="r").dtype == np.uint32
    assert not list(tmp_path.glob("*.partial-*"))


def test_ome_zarr_without_image_stores_foreground(tmp_path):
    path = write_labels_ome_zarr(tmp_path / "bare.ome.zarr", sample_labels((64, 64)))
    np.testing.assert_array_equal(read_labels(path), sample_labels((64, 64)))
    image = zarr.open_array(str(path / "0"), mode="r")[:]
    np.testing.assert_array_equal(image[0] > 0, sample_labels((64, 64)) > 0)


def test_ome_zarr_writer_rejects_mismatched_image_and_leaves_nothing(tmp_path):
    with pytest.raises(BadDataError, match="does not match"):
        write_labels_ome_zarr(tmp_path / "bad.ome.zarr", sample_labels(), image=np.zeros((1, 10, 10)))
    assert not list(tmp_path.iterdir())


def test_reads_zarr_v2_ngff_04_labels(tmp_path):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image, write_labels

    labels = sample_labels((64, 80))
    group = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    write_image(np.zeros((1, 64, 80), np.uint8), group, scale_factors=(), axes="cyx", fmt=FormatV04())
    write_labels(labels, group, name="cells", scaler=None, scale_factors=(), axes="yx", fmt=FormatV04())
    assert (tmp_path / "v2.zarr" / ".zattrs").exists()
    np.testing.assert_array_equal(read_labels(tmp_path / "v2.zarr"), labels)
    np.testing.assert_array_equal(read_labels(tmp_path / "v2.zarr" / "labels" / "cells"), labels)


def test_ome_zarr_without_labels_is_bad_data(ome_samples_dir):
    empty_labels = ome_samples_dir / "galaxy-image-analysis" / "ome-zarr-examples" / "image-02.zarr"
    with pytest.raises(BadDataError, match="empty"):
        read_labels(empty_labels)
    no_labels = ome_samples_dir / "viv" / "blobs_image_v05.ome.zarr"
    with pytest.raises(BadDataError, match="no label image"):
        read_labels(no_labels)
