"""One definition of nuclear shape: the objects table and the QC give a nucleus the same solidity and eccentricity."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, ellipse
from skimage.measure import regionprops
from skimage.segmentation import relabel_sequential
import tifffile

from nuclei_app.core.instances import Instances
from nuclei_app.core.morphology import label_solidities, object_properties, shape_descriptors
from nuclei_app.core.stitching import SlideStitcher, paint_region, tile_candidates
from nuclei_app.io.tables import NucleiTableWriter, read_nuclei_table

SHAPE = (160, 200)


def _varied_nuclei() -> Instances:
    """Round, elongated, rotated, small, merged (concave) and crescent nuclei; two of them overlap."""
    shapes = []
    for cy, cx, ry, rx, rotation in ((30, 30, 14, 9, 0.0), (30, 75, 16, 6, 0.7), (30, 120, 5, 5, 0.0),
                                     (30, 165, 20, 4, 1.2), (45, 42, 10, 10, 0.0)):  # the last overlaps the first
        mask = np.zeros(SHAPE, bool)
        mask[ellipse(cy, cx, ry, rx, shape=SHAPE, rotation=rotation)] = True
        shapes.append(mask)
    merged = np.zeros(SHAPE, bool)  # two touching discs: a merge, concave
    merged[disk((100, 40), 11, shape=SHAPE)] = True
    merged[disk((100, 60), 11, shape=SHAPE)] = True
    crescent = np.zeros(SHAPE, bool)
    crescent[disk((110, 130), 18, shape=SHAPE)] = True
    crescent[disk((110, 142), 15, shape=SHAPE)] = False
    masks = np.stack(shapes + [merged, crescent])
    n = len(masks)
    return Instances(masks, np.linspace(0.9, 0.6, n).astype(np.float32), np.ones(n, np.float32))


def test_table_and_qc_give_each_nucleus_the_same_solidity_and_eccentricity(tmp_path):
    instances = _varied_nuclei()
    box = (0, 0, *SHAPE)
    candidates = tile_candidates(instances, box, box, SHAPE, margin=4, channels=np.ones((1, *SHAPE), np.uint8))
    stitcher = SlideStitcher(1, 1, lambda r, c: candidates)
    writer = NucleiTableWriter(tmp_path / "nuclei.tsv", ["DAPI"], None)
    for stitched in stitcher.run():
        writer.write_tile(stitched)
    writer.close()
    table = read_nuclei_table(tmp_path / "nuclei.tsv")
    assert len(table["label"]) == len(instances)

    # The QC measures the overlap layers of the segmentation store, painted as segment paints them.
    survivors = stitcher.instances_in(box, 0, 0)
    _, layers = paint_region(box, survivors, int(table["layer"].max()) + 1)
    qc = [object_properties(layer) for layer in layers]
    qc_labels = np.concatenate([p["label"] for p in qc])
    order = np.argsort(qc_labels)
    assert qc_labels[order].tolist() == sorted(table["label"].tolist())
    by_label = np.argsort(table["label"])
    for name in ("solidity", "eccentricity"):
        qc_values = np.concatenate([p[name] for p in qc])[order]
        np.testing.assert_allclose(table[name][by_label], qc_values, atol=5.1e-5)  # the table keeps 4 decimals
    assert table["solidity"].min() < 0.85 < table["solidity"].max()  # the concave ones are told apart


def test_shape_descriptors_are_scikit_image_regionprops():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((60, 60), bool)
        cy, cx = rng.integers(20, 40, 2)
        mask[ellipse(cy, cx, rng.uniform(3, 15), rng.uniform(3, 15), shape=mask.shape,
                     rotation=rng.uniform(0, np.pi))] = True
        mask[rng.integers(0, 60, 5), rng.integers(0, 60, 5)] = False  # a few holes and notches
        region = max(regionprops(mask.astype(np.uint8)), key=lambda r: r.area)
        solidity, eccentricity = shape_descriptors(region.image)
        # Same definitions, computed without a RegionProperties object: equal up to rounding.
        assert solidity == pytest.approx(region.solidity, abs=1e-12)
        assert eccentricity == pytest.approx(region.eccentricity, abs=1e-12)
        # Padding around the crop does not change them.
        assert shape_descriptors(np.pad(region.image, 3)) == pytest.approx((solidity, eccentricity), abs=1e-12)


def test_label_solidities_are_regionprops_solidity_of_every_object(nuclei_gt_dir):
    labels = tifffile.imread(nuclei_gt_dir / "dsb2018-stage1-fixed" / "dsb_f6863b83d75e_masks.tif")
    labels, _, _ = relabel_sequential(labels.astype(np.int64))
    expected = [region.solidity for region in regionprops(labels)]
    assert label_solidities(labels) == pytest.approx(expected, abs=1e-12)
    assert label_solidities(np.zeros((3, 3), np.int64)).shape == (0,)


def test_shape_descriptors_of_edge_cases():
    assert shape_descriptors(np.zeros((5, 5), bool)) == (0.0, 0.0)
    assert shape_descriptors(np.ones((1, 1), bool)) == (1.0, 0.0)
    solidity, eccentricity = shape_descriptors(np.ones((1, 9), bool))
    assert solidity == 1.0 and eccentricity == pytest.approx(1.0)
    assert shape_descriptors(np.eye(6, dtype=bool))[0] == 1.0  # a diagonal line is digitally convex
    empty = object_properties(np.zeros((4, 4), np.uint16))
    assert all(values.size == 0 for values in empty.values())
