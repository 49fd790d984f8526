"""Per-nucleus table (TSV + sidecar) and GeoJSON polygons."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.draw import ellipse

from nuclei_app.core.instances import Instances
from nuclei_app.schemas import schema_errors
from nuclei_app.core.stitching import SlideStitcher, tile_candidates
from nuclei_app.io.tables import GeoJSONWriter, NucleiTableWriter, channel_column_names, nucleus_polygon, read_nuclei_table, table_sidecar

SHAPE = (120, 160)
CHANNEL_NAMES = ["DAPI", "CD3 (T cells)", "CD3-T cells"]


def _two_overlapping_and_one_alone():
    masks = np.zeros((3, *SHAPE), dtype=bool)
    for index, (cy, cx) in enumerate(((40, 40), (40, 55), (90, 120))):
        rr, cc = ellipse(cy, cx, 12, 9, shape=SHAPE)
        masks[index, rr, cc] = True
    return Instances(masks, np.asarray([0.9, 0.7, 0.8], np.float32), np.asarray([0.95, 0.6, 1.0], np.float32))


def _stitched_single_tile(instances, channels):
    box = (0, 0, *SHAPE)
    candidates = tile_candidates(instances, box, box, SHAPE, margin=4, channels=channels)
    stitcher = SlideStitcher(1, 1, lambda r, c: candidates)
    return list(stitcher.run())


def _shoelace(ring):
    xs, ys = np.asarray(ring)[:, 0], np.asarray(ring)[:, 1]
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def test_table_rows_sidecar_and_marker_means(tmp_path):
    instances = _two_overlapping_and_one_alone()
    # channel c is constant (c + 1) * 100 inside nucleus 3 and 7 elsewhere
    channels = np.full((3, *SHAPE), 7, dtype=np.uint16)
    for c in range(3):
        channels[c][instances.masks[2]] = (c + 1) * 100
    tiles = _stitched_single_tile(instances, channels)
    writer = NucleiTableWriter(tmp_path / "nuclei.tsv", CHANNEL_NAMES, (0.5, 0.4))
    for stitched in tiles:
        writer.write_tile(stitched)
    assert not (tmp_path / "nuclei.tsv").exists()  # only a partial file until closed
    writer.close()
    table = read_nuclei_table(tmp_path / "nuclei.tsv")
    assert table["label"].tolist() == [1, 2, 3]
    assert table["layer"].tolist() == [0, 1, 0]
    assert table["n_overlapping_neighbours"].tolist() == [1, 1, 0]
    assert table["area_px"].tolist() == instances.areas().tolist()
    np.testing.assert_allclose(table["area_um2"], instances.areas() * 0.2, rtol=1e-3)
    np.testing.assert_allclose(table["centroid_y_um"], table["centroid_y_px"] * 0.5, atol=1e-2)
    np.testing.assert_allclose(table["score"], [0.9, 0.7, 0.8])
    np.testing.assert_allclose(table["head_agreement"], [0.95, 0.6, 1.0])
    columns = channel_column_names(CHANNEL_NAMES)
    assert columns == ["mean_DAPI", "mean_CD3_T_cells", "mean_CD3_T_cells_2"]
    assert [table[column][2] for column in columns] == [100, 200, 300]
    assert table["mean_DAPI"][0] == 7
    assert 0.85 < table["solidity"][0] <= 1.0 and 0.5 < table["eccentricity"][0] < 0.8
    assert (table["bbox_y1"] - table["bbox_y0"]).tolist() == [23, 23, 23]
    sidecar = json.loads((tmp_path / "nuclei.json").read_text())
    assert list(sidecar) == list(table)
    assert sidecar["area_um2"]["Units"] == "um^2" and "Description" in sidecar["mean_DAPI"]
    assert not schema_errors(sidecar, "nuclei_table_sidecar")
    assert schema_errors({"label": {"Description": "x"}}, "nuclei_table_sidecar")  # incomplete: refused


def test_micrometre_columns_are_na_without_a_pixel_size(tmp_path):
    tiles = _stitched_single_tile(_two_overlapping_and_one_alone(), np.ones((1, *SHAPE), np.uint8))
    writer = NucleiTableWriter(tmp_path / "t.tsv", ["DAPI"], None)
    for stitched in tiles:
        writer.write_tile(stitched)
    writer.close()
    lines = (tmp_path / "t.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    first = dict(zip(header, lines[1].split("\t")))
    assert first["area_um2"] == first["centroid_x_um"] == "n/a"
    assert np.isnan(read_nuclei_table(tmp_path / "t.tsv")["area_um2"]).all()


def test_polygons_outline_the_masks_and_validate_as_qupath_detections(tmp_path):
    instances = _two_overlapping_and_one_alone()
    tiles = _stitched_single_tile(instances, None)
    writer = GeoJSONWriter(tmp_path / "nuclei.geojson")
    for stitched in tiles:
        writer.write_tile(stitched)
    writer.close()
    collection = json.loads((tmp_path / "nuclei.geojson").read_text())
    assert not schema_errors(collection, "nuclei_geojson")
    features = collection["features"]
    assert [f["properties"]["label"] for f in features] == [1, 2, 3]
    assert all(f["properties"]["objectType"] == "detection" for f in features)
    for feature, mask in zip(features, instances.masks):
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        ys, xs = np.nonzero(mask)
        # the outline runs through pixel edges: its area is close to the pixel count
        assert _shoelace(ring) == pytest.approx(mask.sum(), rel=0.12)
        ring_xs = [point[0] for point in ring]
        assert min(ring_xs) >= xs.min() - 0.01 and max(ring_xs) <= xs.max() + 1.01


def test_polygon_of_a_single_pixel_is_a_valid_ring():
    ring = nucleus_polygon((10, 20, 11, 21), np.ones((1, 1), bool))
    assert len(ring) >= 4 and ring[0] == ring[-1]
    assert all(20 <= x <= 21 and 10 <= y <= 11 for x, y in ring)


def test_discard_leaves_nothing_behind(tmp_path):
    writer = NucleiTableWriter(tmp_path / "gone.tsv", ["DAPI"], None)
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_sidecar_describes_every_column():
    sidecar = table_sidecar(["DAPI", "GFAP"])
    assert "mean_GFAP" in sidecar and sidecar["centroid_x_px"]["Units"] == "pixel"
    assert all(entry["Description"] for entry in sidecar.values())
