"""Stitching across tile seams: candidates, de-duplication, ids, overlap layers, painting."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import ellipse

from nuclei_app.core.instances import Instances
from nuclei_app.core.tiling import make_tile_grid
from nuclei_app.core.stitching import SlideStitcher, TileCandidates, greedy_layers, instance_layers, kept_candidates, paint_region, tile_candidates
from nuclei_app.core.morphology import shape_descriptors


def _disc(shape, cy, cx, ry, rx, rotation=0.0):
    mask = np.zeros(shape, dtype=bool)
    rr, cc = ellipse(cy, cx, ry, rx, shape=shape, rotation=rotation)
    mask[rr, cc] = True
    return mask


def _synthetic_nuclei(shape=(300, 340), seed=3, n=60, max_radius=9):
    """Ellipses at random places; many overlap (also pairs straddling tile seams)."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5)
        masks.append(_disc(shape, cy, cx, rng.uniform(4, max_radius), rng.uniform(4, max_radius), rng.uniform(0, 3)))
        if rng.uniform() < 0.4:  # a partner overlapping it
            masks.append(_disc(shape, cy + rng.uniform(-6, 6), cx + rng.uniform(4, 8), 6, 5))
    masks = [mask for mask in masks if mask.any()]
    return Instances(np.stack(masks), rng.uniform(0.5, 1.0, len(masks)).astype(np.float32))


def _crop_predictor(truth: Instances, window):
    """What a perfect per-tile predictor sees: each object's part inside the window (pieces at edges)."""
    y0, x0, y1, x1 = window
    masks = truth.masks[:, y0:y1, x0:x1]
    present = masks.reshape(len(masks), -1).any(axis=1)
    return Instances(masks[present], truth.scores[present])


def _stitch(truth: Instances, tile: int, overlap: int):
    grid = make_tile_grid(truth.shape, tile, overlap)
    candidates = {
        position: tile_candidates(
            _crop_predictor(truth, grid.window(*position)), grid.window(*position), grid.core(*position),
            truth.shape, max(1, overlap // 4),
        )
        for position in grid.positions()
    }
    stitcher = SlideStitcher(grid.n_rows, grid.n_cols, lambda r, c: candidates[(r, c)], cache_size=12)
    tiles = list(stitcher.run())
    return grid, stitcher, tiles


def _full_masks(shape, tiles):
    """Every survivor's full mask on the slide, by id."""
    masks = {}
    for stitched in tiles:
        for position, index in enumerate(stitched.kept):
            y0, x0, y1, x1 = stitched.candidates.bboxes[index]
            mask = np.zeros(shape, dtype=bool)
            mask[y0:y1, x0:x1] = stitched.candidates.crops[index]
            masks[int(stitched.ids[position])] = (mask, int(stitched.layers[position]))
    return masks


def test_every_object_comes_out_once_and_whole_across_seams():
    truth = _synthetic_nuclei()
    grid, stitcher, tiles = _stitch(truth, tile=96, overlap=32)
    assert grid.n_rows >= 4 and grid.n_cols >= 4
    survivors = _full_masks(truth.shape, tiles)
    assert stitcher.n_instances == len(survivors) == len(truth)
    # each true object matches exactly one survivor, pixel for pixel
    remaining = dict(survivors)
    for mask in truth.masks:
        match = [key for key, (other, _) in remaining.items() if np.array_equal(other, mask)]
        assert len(match) == 1
        remaining.pop(match[0])
    assert not remaining
    # ids are 1..N in raster order of tiles
    assert sorted(survivors) == list(range(1, len(truth) + 1))


def test_overlapping_objects_never_share_a_layer_and_counts_are_symmetric():
    truth = _synthetic_nuclei()
    _, stitcher, tiles = _stitch(truth, tile=96, overlap=32)
    survivors = _full_masks(truth.shape, tiles)
    counts = {}
    for stitched in tiles:
        for position in range(len(stitched.kept)):
            counts[int(stitched.ids[position])] = int(stitched.n_overlapping[position])
    n_pairs = 0
    for first, (mask_a, layer_a) in survivors.items():
        overlapping = 0
        for second, (mask_b, layer_b) in survivors.items():
            if first != second and (mask_a & mask_b).any():
                overlapping += 1
                assert layer_a != layer_b
                n_pairs += 1
        assert counts[first] == overlapping
    assert n_pairs > 10, "the synthetic data should contain overlapping pairs"
    assert stitcher.n_layers >= 2


def test_duplicate_across_neighbours_is_kept_once_with_the_better_view():
    shape = (100, 200)
    whole = _disc(shape, 50, 92, 10, 10)  # x 83..101: crosses the core line at x = 100; the right tile (from x = 84) cuts it
    left_window, right_window = (0, 0, 100, 116), (0, 84, 100, 200)
    left_core, right_core = (0, 0, 100, 100), (0, 100, 100, 200)
    truth = Instances(whole[None], np.asarray([0.9], np.float32))
    left = tile_candidates(_crop_predictor(truth, left_window), left_window, left_core, shape, margin=8)
    right = tile_candidates(_crop_predictor(truth, right_window), right_window, right_core, shape, margin=8)
    assert len(left) == 1 and len(right) == 1  # both propose it (centroid within the margin)
    assert not left.truncated[0] and right.truncated[0]
    keep_left = kept_candidates(left, 0, [(right, 1)])
    keep_right = kept_candidates(right, 1, [(left, 0)])
    assert keep_left.tolist() == [True] and keep_right.tolist() == [False]


def test_candidates_outside_the_grown_core_are_not_proposed():
    shape = (100, 200)
    far = _disc(shape, 50, 112, 5, 5)  # centroid 12 px into the right neighbour's core
    window, core = (0, 0, 100, 116), (0, 0, 100, 100)
    truth = Instances(far[None], np.asarray([0.9], np.float32))
    assert len(tile_candidates(_crop_predictor(truth, window), window, core, shape, margin=8)) == 0
    assert len(tile_candidates(_crop_predictor(truth, window), window, core, shape, margin=16)) == 1


def test_candidates_round_trip_through_bytes():
    truth = _synthetic_nuclei(shape=(120, 140), n=12)
    channels = np.random.default_rng(0).integers(0, 1000, (3, 120, 140)).astype(np.uint16)
    original = tile_candidates(truth, (0, 0, 120, 140), (0, 0, 120, 140), (120, 140), 4, channels=channels)
    restored = TileCandidates.from_bytes(original.to_bytes())
    assert len(restored) == len(original) > 0
    for name in ("bboxes", "scores", "centroids", "areas", "channel_means", "solidity", "eccentricity"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(original, name))
    for a, b in zip(restored.crops, original.crops):
        np.testing.assert_array_equal(a, b)
    # channel means are the mean raw intensity inside each mask
    first = truth.masks[np.argmin([abs(m.nonzero()[0].mean() - original.centroids[0, 0]) for m in truth.masks])]
    np.testing.assert_allclose(original.channel_means[0], channels[:, first].mean(axis=1), rtol=1e-5)


def test_greedy_layers_separate_overlaps_and_reuse_layers():
    shape = (40, 80)
    masks = np.stack([_disc(shape, 20, 15, 8, 8), _disc(shape, 20, 25, 8, 8), _disc(shape, 20, 60, 8, 8)])
    layers = instance_layers(Instances(masks, np.ones(3, np.float32)))
    assert layers.tolist() == [0, 1, 0]
    boxes = np.asarray([[12, 7, 29, 24], [12, 17, 29, 34], [12, 52, 29, 69]])
    crops = [masks[i][b[0] : b[2], b[1] : b[3]] for i, b in enumerate(boxes)]
    layers, counts = greedy_layers(boxes, crops)
    assert layers.tolist() == [0, 1, 0] and counts.tolist() == [1, 1, 0]


def test_paint_region_higher_score_wins_and_layers_hold_full_masks():
    shape = (40, 60)
    a, b = _disc(shape, 20, 20, 10, 10), _disc(shape, 20, 32, 10, 10)
    items = []
    for instance_id, (mask, layer, score) in enumerate(((a, 0, 0.6), (b, 1, 0.9)), start=1):
        ys, xs = np.nonzero(mask)
        box = np.asarray([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
        items.append((instance_id, layer, score, box, mask[box[0] : box[2], box[1] : box[3]]))
    flat, layers = paint_region((0, 0, 40, 60), items, 2)
    assert (flat[a & b] == 2).all()  # the higher score takes the shared pixels
    assert ((flat == 1) == (a & ~b)).all()
    assert ((layers[0] == 1) == a).all() and ((layers[1] == 2) == b).all()
    # a sub-region gives the same pixels as the whole
    part_flat, part_layers = paint_region((10, 25, 30, 50), items, 2)
    np.testing.assert_array_equal(part_flat, flat[10:30, 25:50])
    np.testing.assert_array_equal(part_layers, layers[:, 10:30, 25:50])


def test_shape_descriptors_of_simple_shapes():
    square = np.ones((10, 10), dtype=bool)
    assert shape_descriptors(square) == pytest.approx((1.0, 0.0), abs=1e-6)
    bar = np.ones((3, 30), dtype=bool)
    solidity, eccentricity = shape_descriptors(bar)
    assert solidity == pytest.approx(1.0) and eccentricity > 0.99
    ring = _disc((40, 40), 20, 20, 15, 15) & ~_disc((40, 40), 20, 20, 10, 10)
    assert shape_descriptors(ring)[0] < 0.6


# ----------------------------------------------------------------------------- outline trimming


def _disk(shape, centre, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_trim_to_local_contrast_pulls_spilled_outlines_back_to_the_stain():
    from nuclei_app.core.instances import trim_to_local_contrast

    shape = (64, 96)
    nucleus, dim_nucleus = _disk(shape, (32, 24), 8), _disk(shape, (32, 70), 8)
    stain = np.full(shape, 0.05, np.float32)
    stain[nucleus] = 0.8
    stain[_disk(shape, (32, 24), 2)] = 0.1  # a dark nucleolus: not a hole in the nucleus
    stain[dim_nucleus] = 0.2
    stain += np.random.default_rng(0).normal(0, 0.01, shape).astype(np.float32)
    spilled = [_disk(shape, (32, 24), 10), _disk(shape, (32, 70), 10)]  # the model draws ~2 px wide
    instances = Instances(np.stack(spilled), np.array([0.9, 0.4], np.float32), np.array([0.8, 0.7], np.float32))
    trimmed = trim_to_local_contrast(instances, stain, diameter=16.0, fraction=0.3)
    masks = trimmed.masks
    for before, after, truth in zip(spilled, masks, (nucleus, dim_nucleus)):
        # Trimmed, never grown, to within about a pixel of the stain edge (the outline is
        # drawn on the smoothed stain, 30% of the way up: soft edges stay in).
        assert not (after & ~before).any()
        assert _iou(before, truth) < 0.65 and _iou(after, truth) > 0.78
    assert masks[0][32, 24]  # the nucleolus stays inside
    assert trimmed.scores.tolist() == pytest.approx([0.9, 0.4])
    assert trimmed.head_agreement.tolist() == pytest.approx([0.8, 0.7])


def test_trim_to_local_contrast_leaves_objects_that_do_not_stand_out_alone():
    from nuclei_app.core.instances import trim_to_local_contrast

    shape = (48, 48)
    flat = np.full(shape, 0.3, np.float32)
    instances = Instances(_disk(shape, (24, 24), 9)[None], np.array([0.7], np.float32))
    trimmed = trim_to_local_contrast(instances, flat, diameter=16.0)
    assert np.array_equal(trimmed.masks, instances.masks)
    assert len(trim_to_local_contrast(Instances.empty(shape), flat, diameter=16.0)) == 0
