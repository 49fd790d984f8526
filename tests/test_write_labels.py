"""Segmentation stores (NGFF 0.4): image + flattened labels + overlap layers, read back with real readers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from skimage.draw import ellipse

from nuclei_app.core.instances import Instances
from nuclei_app.io.ngff import FLAT_LABEL_NAME, layer_label_name
from nuclei_app.io.ome_zarr import SegmentationZarrWriter, downsample_nearest2, write_segmentation_zarr

SHAPE = (300, 380)


def _overlapping_nuclei() -> Instances:
    """Clusters of 2-4 mutually overlapping ellipses plus isolated ones."""
    rng = np.random.default_rng(7)
    masks = []
    for cy in range(40, SHAPE[0] - 30, 70):
        for cx in range(40, SHAPE[1] - 30, 80):
            for k in range(int(rng.integers(1, 5))):
                mask = np.zeros(SHAPE, dtype=bool)
                rr, cc = ellipse(cy + 5 * k, cx + 7 * k, rng.uniform(8, 13), rng.uniform(6, 10),
                                 rotation=rng.uniform(0, 3), shape=SHAPE)
                mask[rr, cc] = True
                masks.append(mask)
    return Instances(np.stack(masks), rng.uniform(0.4, 1.0, len(masks)).astype(np.float32))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    instances = _overlapping_nuclei()
    image = np.random.default_rng(0).integers(90, 4000, (2, *SHAPE)).astype(np.uint16)
    path = tmp_path_factory.mktemp("store") / "nuclei.ome.zarr"
    write_segmentation_zarr(path, image, ["DAPI", "Histone H3"], instances, pixel_size_um=(0.5, 0.25), chunk=128)
    return path, image, instances


def _layer_names(group) -> list[str]:
    return [name for name in group["labels"].attrs["labels"] if name != FLAT_LABEL_NAME]


def test_every_overlapping_pair_survives_with_both_full_masks(store):
    path, _, instances = store
    group = zarr.open_group(str(path), mode="r")
    layers = {name: np.asarray(group[f"labels/{name}/0"]) for name in _layer_names(group)}
    assert len(layers) >= 2
    # each instance's full mask is in exactly one layer, under its id (1..N in instance order)
    for index, mask in enumerate(instances.masks):
        instance_id = index + 1
        holders = [name for name, layer in layers.items() if (layer == instance_id).any()]
        assert len(holders) == 1
        assert np.array_equal(layers[holders[0]] == instance_id, mask)
    pairs = [
        (i, j) for i in range(len(instances)) for j in range(i + 1, len(instances))
        if (instances.masks[i] & instances.masks[j]).any()
    ]
    assert len(pairs) >= 10
    for i, j in pairs:  # both survive in different layers, each whole
        layer_i = next(n for n, layer in layers.items() if (layer == i + 1).any())
        layer_j = next(n for n, layer in layers.items() if (layer == j + 1).any())
        assert layer_i != layer_j


def test_flattened_view_uses_the_same_ids_and_the_higher_score(store):
    path, _, instances = store
    flat = np.asarray(zarr.open_group(str(path), mode="r")[f"labels/{FLAT_LABEL_NAME}/0"])
    assert flat.dtype == np.uint32
    np.testing.assert_array_equal(flat, instances.to_label_image())
    union = instances.masks.any(axis=0)
    assert np.array_equal(flat > 0, union)


def test_metadata_has_physical_scale_units_and_nearest_pyramids(store):
    path, image, _ = store
    group = zarr.open_group(str(path), mode="r")
    multiscale = group.attrs["multiscales"][0]
    assert multiscale["version"] == "0.4"
    assert [axis["name"] for axis in multiscale["axes"]] == ["c", "y", "x"]
    assert multiscale["axes"][1]["unit"] == "micrometer"
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]]
    assert scales[0] == [1.0, 0.5, 0.25] and scales[1] == [1.0, 1.0, 0.5]
    assert [c["label"] for c in group.attrs["omero"]["channels"]] == ["DAPI", "Histone H3"]
    np.testing.assert_array_equal(np.asarray(group["0"]), image)
    for name in group["labels"].attrs["labels"]:
        label_group = group[f"labels/{name}"]
        assert label_group.attrs["image-label"]["source"]["image"] == "../../"
        level0 = np.asarray(label_group["0"])
        level1 = np.asarray(label_group["1"])
        assert level0.dtype == level1.dtype == np.uint32
        np.testing.assert_array_equal(level1, level0[::2, ::2])
        assert set(np.unique(level1)) <= set(np.unique(level0))


def test_ome_zarr_reader_finds_image_and_every_label(store):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path, image, _ = store
    nodes = list(Reader(parse_url(str(path)))())
    image_node = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in image_node.specs)
    assert image_node.data[0].shape == image.shape
    label_nodes = [node for node in nodes if any(isinstance(spec, Label) for spec in node.specs)]
    names = sorted(node.zarr.basename() for node in label_nodes)
    group = zarr.open_group(str(path), mode="r")
    assert names == sorted(group["labels"].attrs["labels"])
    assert FLAT_LABEL_NAME in names and layer_label_name(0) in names


def test_ome_zarr_models_validate_image_and_labels(store):
    from ome_zarr_models.v04 import Image, ImageLabel

    path, _, _ = store
    group = zarr.open_group(str(path), mode="r")
    image = Image.from_zarr(group)
    assert image.attributes.multiscales[0].axes[1].unit == "micrometer"
    for name in group["labels"].attrs["labels"]:
        ImageLabel.from_zarr(group[f"labels/{name}"])


def test_napari_ome_zarr_reader_returns_labels_layers(store):
    """napari-ome-zarr (the viewer extra) reads the image channels and every labels layer, scaled.

    The reader needs no display; tests/test_napari_viewer.py opens a segment output in a real viewer.
    """
    try:
        import napari_ome_zarr
    except ImportError as error:
        message = f"napari-ome-zarr is not importable ({error}): `make setup` installs the viewer extra"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    path, image, _ = store
    reader = napari_ome_zarr.napari_get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    group = zarr.open_group(str(path), mode="r")
    images = [(data, kwargs) for data, kwargs, kind in layers if kind == "image"]
    labels = {kwargs["name"].rsplit("/", 1)[-1]: (data, kwargs) for data, kwargs, kind in layers if kind == "labels"}
    assert len(images) == 1 and images[0][1]["channel_axis"] == 0
    assert images[0][1]["name"] == ["nuclei: DAPI", "nuclei: Histone H3"]
    assert sorted(labels) == sorted(group["labels"].attrs["labels"]) and len(labels) >= 3
    assert list(images[0][1]["scale"]) == [0.5, 0.25]
    for name, (data, kwargs) in labels.items():
        assert list(kwargs["scale"]) == [0.5, 0.25], name
        assert tuple(kwargs["units"]) == ("micrometer", "micrometer"), name
        np.testing.assert_array_equal(np.asarray(data[0]), np.asarray(group[f"labels/{name}/0"]))


def test_region_by_region_writes_equal_one_write(tmp_path):
    instances = _overlapping_nuclei()
    flat = instances.to_label_image()
    image = np.arange(SHAPE[0] * SHAPE[1], dtype=np.uint16).reshape(1, *SHAPE)
    writer = SegmentationZarrWriter(tmp_path / "s.ome.zarr", SHAPE, np.uint16, ["DAPI"], None, chunk=64)
    writer.add_labels([FLAT_LABEL_NAME])
    for y0 in range(0, SHAPE[0], 64):
        for x0 in range(0, SHAPE[1], 64):
            writer.write_image_region(y0, x0, image[:, y0 : y0 + 64, x0 : x0 + 64])
            writer.write_label_region(FLAT_LABEL_NAME, y0, x0, flat[y0 : y0 + 64, x0 : x0 + 64])
    writer.finish()
    group = zarr.open_group(str(tmp_path / "s.ome.zarr"), mode="r")
    np.testing.assert_array_equal(np.asarray(group["labels/nuclei/0"]), flat)
    levels = len(group.attrs["multiscales"][0]["datasets"])
    assert levels >= 3
    expected = flat
    for level in range(1, levels):
        expected = downsample_nearest2(expected)
        np.testing.assert_array_equal(np.asarray(group[f"labels/nuclei/{level}"]), expected)
    # without a pixel size the scale is in pixels and no unit is claimed
    axes = group.attrs["multiscales"][0]["axes"]
    assert all("unit" not in axis for axis in axes)
