"""`nuclei-app segment --geojson`: valid GeoJSON (the official schema) that QuPath imports as detections.

QuPath's GeoJSON import reads a FeatureCollection; per feature a Polygon geometry and
``properties.objectType`` ("detection" makes a detection object), an optional
``classification`` {name, color} and ``measurements`` (a map name -> number, the form
QuPath >= 0.4 writes and reads). Our measurements are the columns of the nuclei table.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nuclei_app.sample_data import synthesize_slide
from nuclei_app.schemas import load_schema, schema_errors
from nuclei_app.io.tables import read_nuclei_table
from nuclei_app.io.ome_tiff import write_ome_tiff

OFFICIAL = "geojson_feature_collection"  # geojson.org/schema/FeatureCollection.json, vendored


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    from nuclei_app.cli import main

    folder = tmp_path_factory.mktemp("geojson")
    synthetic = synthesize_slide(np.random.default_rng(5), (384, 384))
    slide = write_ome_tiff(folder / "slide.ome.tif", synthetic.image[:2], ["DAPI", "Histone H3"], (0.5, 0.5),
                           tile=(128, 128))
    outputs = {"store": folder / "out.ome.zarr", "table": folder / "out.tsv", "geojson": folder / "out.geojson"}
    code = main(["segment", str(slide), "--method", "weak", "-o", str(outputs["store"]), "--table",
                 str(outputs["table"]), "--geojson", str(outputs["geojson"]), "--no-qc"])
    assert code == 0
    return outputs


def test_the_vendored_schema_is_the_official_geojson_one():
    schema = load_schema(OFFICIAL)
    assert schema["$id"] == "https://geojson.org/schema/FeatureCollection.json"
    # it does reject what is not GeoJSON
    assert schema_errors({"type": "FeatureCollection"}, OFFICIAL)
    bad_polygon = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]}
    assert schema_errors(bad_polygon, OFFICIAL)


def test_segment_geojson_is_valid_geojson_and_matches_our_schema(segmented):
    collection = json.loads(segmented["geojson"].read_text())
    assert schema_errors(collection, OFFICIAL) == []
    assert schema_errors(collection, "nuclei_geojson") == []
    for feature in collection["features"]:
        (ring,) = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and len(ring) >= 4  # closed (the JSON Schema cannot say so)


def test_structure_qupath_reads_with_every_table_measurement(segmented):
    collection = json.loads(segmented["geojson"].read_text())
    table = read_nuclei_table(segmented["table"])
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == table["label"].size > 30
    by_label = {int(label): row for row, label in enumerate(table["label"])}
    columns = list(table)
    assert "mean_DAPI" in columns and "mean_Histone_H3" in columns and "area_um2" in columns
    for feature in features:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["classification"]["name"] == "Nucleus" and len(properties["classification"]["color"]) == 3
        measurements = properties["measurements"]
        assert isinstance(measurements, dict)
        assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in measurements.values())
        row = by_label[properties["label"]]
        assert list(measurements) == columns  # every table column, in table order
        for column in columns:
            assert measurements[column] == pytest.approx(table[column][row]), column
        assert measurements["label"] == properties["label"] and measurements["layer"] == properties["layer"]


def test_without_pixel_size_the_micrometre_measurements_are_left_out(tmp_path):
    from nuclei_app.cli import main

    image = synthesize_slide(np.random.default_rng(6), (256, 256)).image[:1]
    slide = write_ome_tiff(tmp_path / "slide.ome.tif", image, ["DAPI"], None, tile=(128, 128))
    geojson = tmp_path / "out.geojson"
    assert main(["segment", str(slide), "--method", "weak", "-o", str(tmp_path / "out.ome.zarr"),
                 "--geojson", str(geojson), "--no-qc"]) == 0
    collection = json.loads(geojson.read_text())
    assert schema_errors(collection, OFFICIAL) == [] and schema_errors(collection, "nuclei_geojson") == []
    measurements = collection["features"][0]["properties"]["measurements"]
    assert "area_px" in measurements and "mean_DAPI" in measurements
    assert not any(name.endswith(("_um", "_um2")) for name in measurements)
