"""Stitch per-tile predictions into one whole-slide set of nuclei, without seams.

Tiles overlap by ``overlap`` pixels (at least the largest nucleus). Each tile owns a
*core*: the tile minus half the overlap at every internal border; cores partition
the slide. A tile proposes as *candidates* the instances whose centroid falls in its
core grown by a small *margin* (so an object whose centroid lands on the other side
of the core line in the neighbour's prediction is still proposed by someone).
Candidates of neighbouring tiles that are the same object (IoU >= 0.5, or a tile-cut
piece mostly inside a whole prediction) are de-duplicated: the one with the better
view wins (not cut by its tile's edge, centroid inside its own core, farthest from
its tile's edge, then the earlier tile). Every object therefore comes out once and
whole, from the tile that saw it best.

Survivors get deterministic ids (tile raster order, then candidate order in the
tile) and a *layer*: a greedy colouring of the overlap graph in id order, so no two
overlapping nuclei share a layer and every full mask can be stored losslessly.

Everything here works on `TileCandidates` (bounding box + cropped mask per object,
global coordinates), so memory stays proportional to a few tiles, not the slide.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator
import numpy as np
from nuclei_app.core.instances import Instances
from nuclei_app.core.morphology import shape_descriptors


#: Two candidates from neighbouring tiles with at least this IoU are the same nucleus.
DUPLICATE_IOU = 0.5


#: A candidate cut by its tile's edge is a duplicate of a whole one when at least this
#: fraction of the cut piece lies inside it.
DUPLICATE_CONTAINMENT = 0.5


#: Distance assigned when a candidate's tile has no internal edge (a one-tile slide).
FAR_FROM_EDGE = np.float32(1e9)


Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open, global pixel coordinates


@dataclass
class TileCandidates:
    """Objects one tile proposes, as bounding boxes plus cropped masks in global coordinates.

    Attributes
    ----------
    bboxes : ndarray of int64, shape (N, 4)
        ``(y0, x0, y1, x1)`` half-open box of each mask in slide pixels (level 0).
    crops : list of N ndarrays of bool, shapes (y1 - y0, x1 - x0)
        Each object's full mask inside its box.
    scores, head_agreement : ndarray of float32, shape (N,)
        From the predictor's `Instances`.
    centroids : ndarray of float64, shape (N, 2)
        ``(y, x)`` centroid in slide pixels.
    truncated : ndarray of bool, shape (N,)
        The mask touches an internal edge of its tile (it may be cut there).
    in_core : ndarray of bool, shape (N,)
        The centroid lies in the tile's core (not only in the margin around it).
    edge_distance : ndarray of float32, shape (N,)
        Distance from the centroid to the nearest internal tile edge, pixels.
    areas : ndarray of int64, shape (N,)
        Pixel count of each mask.
    solidity, eccentricity : ndarray of float32, shape (N,)
        Shape descriptors (scikit-image `regionprops` definitions).
    channel_means : ndarray of float32, shape (N, C)
        Mean raw intensity of every slide channel inside each mask.
    """

    bboxes: np.ndarray
    crops: list[np.ndarray]
    scores: np.ndarray
    head_agreement: np.ndarray
    centroids: np.ndarray
    truncated: np.ndarray
    in_core: np.ndarray
    edge_distance: np.ndarray
    areas: np.ndarray
    solidity: np.ndarray
    eccentricity: np.ndarray
    channel_means: np.ndarray

    def __len__(self) -> int:
        return int(self.bboxes.shape[0])

    @classmethod
    def empty(cls, n_channels: int) -> "TileCandidates":
        return cls(
            bboxes=np.zeros((0, 4), np.int64),
            crops=[],
            scores=np.zeros(0, np.float32),
            head_agreement=np.zeros(0, np.float32),
            centroids=np.zeros((0, 2), np.float64),
            truncated=np.zeros(0, bool),
            in_core=np.zeros(0, bool),
            edge_distance=np.zeros(0, np.float32),
            areas=np.zeros(0, np.int64),
            solidity=np.zeros(0, np.float32),
            eccentricity=np.zeros(0, np.float32),
            channel_means=np.zeros((0, n_channels), np.float32),
        )

    def to_bytes(self) -> bytes:
        """Serialise to compressed ``.npz`` bytes (masks bit-packed)."""
        flat = np.concatenate([crop.ravel() for crop in self.crops]) if self.crops else np.zeros(0, bool)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            bboxes=self.bboxes,
            packed_masks=np.packbits(flat),
            n_mask_pixels=np.int64(flat.size),
            scores=self.scores,
            head_agreement=self.head_agreement,
            centroids=self.centroids,
            truncated=self.truncated,
            in_core=self.in_core,
            edge_distance=self.edge_distance,
            areas=self.areas,
            solidity=self.solidity,
            eccentricity=self.eccentricity,
            channel_means=self.channel_means,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TileCandidates":
        """Inverse of `to_bytes`."""
        with np.load(io.BytesIO(data)) as stored:
            arrays = {name: stored[name] for name in stored.files}
        flat = np.unpackbits(arrays.pop("packed_masks"), count=int(arrays.pop("n_mask_pixels"))).astype(bool)
        crops = []
        start = 0
        for y0, x0, y1, x1 in arrays["bboxes"]:
            size = int((y1 - y0) * (x1 - x0))
            crops.append(flat[start : start + size].reshape(int(y1 - y0), int(x1 - x0)))
            start += size
        return cls(crops=crops, **arrays)


def _core_contains(value: np.ndarray, low: int, high: int) -> np.ndarray:
    """Whether the pixel nearest to each float coordinate lies in ``[low, high)``."""
    pixel = np.floor(value + 0.5)
    return (pixel >= low) & (pixel < high)


def _slide_centroids(instances: Instances, y0: int, x0: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask centroids in slide pixels (float64, shape (N,) each); 0 for empty masks."""
    centroid_y = np.zeros(len(instances))
    centroid_x = np.zeros(len(instances))
    for index, crop in enumerate(instances.crops):
        if crop.any():
            ys, xs = np.nonzero(crop)
            centroid_y[index] = ys.mean() + instances.boxes[index, 0] + y0
            centroid_x[index] = xs.mean() + instances.boxes[index, 1] + x0
    return centroid_y, centroid_x


def _internal_edge_facts(local_box: Box, centroid: tuple[float, float], window: Box,
                         image_shape: tuple[int, int]) -> tuple[bool, float]:
    """Whether a mask touches an internal edge of its tile window (it may be cut there), and its
    centroid's distance to the nearest internal edge (`FAR_FROM_EDGE` when the window has none)."""
    ly0, lx0, ly1, lx1 = local_box
    wy0, wx0, wy1, wx1 = window
    height, width = image_shape
    top, bottom, left, right = wy0 > 0, wy1 < height, wx0 > 0, wx1 < width
    truncated = (top and ly0 == 0) or (bottom and ly1 == wy1 - wy0) or (left and lx0 == 0) or (right and lx1 == wx1 - wx0)
    cy, cx = centroid
    distances = [d for inside, d in ((top, cy - wy0), (bottom, wy1 - 1 - cy), (left, cx - wx0), (right, wx1 - 1 - cx))
                 if inside]
    return bool(truncated), (min(distances) if distances else FAR_FROM_EDGE)


def tile_candidates(
    instances: Instances,
    window: Box,
    core: Box,
    image_shape: tuple[int, int],
    margin: int,
    channels: np.ndarray | None = None,
) -> TileCandidates:
    """Keep the instances a tile should propose and describe them in slide coordinates.

    Parameters
    ----------
    instances : Instances
        Predictions over the tile; masks have shape (N, y1 - y0, x1 - x0) of ``window``.
    window : (y0, x0, y1, x1)
        The pixels the tile covers in the slide (level 0).
    core : (y0, x0, y1, x1)
        The part of the slide this tile owns (cores of all tiles partition the slide).
    image_shape : (Y, X)
        Slide size, to tell internal tile edges from slide borders.
    margin : int
        How far (pixels) beyond an internal core border a centroid may lie and still be
        proposed; duplicates this creates are removed by `kept_candidates`.
    channels : ndarray, shape (C, y1 - y0, x1 - x0), optional
        Raw intensities of every slide channel over the window, for per-nucleus means.

    Returns
    -------
    TileCandidates
        Proposed objects ordered by centroid (y, then x), then by descending score.
    """
    wy0, wx0, wy1, wx1 = window
    cy0, cx0, cy1, cx1 = core
    height, width = image_shape
    n_channels = 0 if channels is None else int(channels.shape[0])
    if len(instances) == 0:
        return TileCandidates.empty(n_channels)

    boxes = instances.boxes
    areas = instances.areas()
    centroid_y, centroid_x = _slide_centroids(instances, wy0, wx0)

    # Internal borders get the margin; at the slide border the core already reaches the edge.
    grow_top = margin if cy0 > 0 else 0
    grow_left = margin if cx0 > 0 else 0
    grow_bottom = margin if cy1 < height else 0
    grow_right = margin if cx1 < width else 0
    proposed = (
        _core_contains(centroid_y, cy0 - grow_top, cy1 + grow_bottom)
        & _core_contains(centroid_x, cx0 - grow_left, cx1 + grow_right)
        & (areas > 0)
    )
    in_core = _core_contains(centroid_y, cy0, cy1) & _core_contains(centroid_x, cx0, cx1)
    chosen = np.flatnonzero(proposed)
    if len(chosen) == 0:
        return TileCandidates.empty(n_channels)
    order = np.lexsort((np.arange(len(chosen)), -instances.scores[chosen], centroid_x[chosen], centroid_y[chosen]))
    chosen = chosen[order]

    bboxes, crops, truncated, edge_distance = [], [], [], []
    solidity, eccentricity, means = [], [], []
    for index in chosen:
        ly0, lx0, ly1, lx1 = (int(v) for v in boxes[index])
        crop = instances.crops[index]
        bboxes.append((wy0 + ly0, wx0 + lx0, wy0 + ly1, wx0 + lx1))
        crops.append(crop)
        cut, distance = _internal_edge_facts((ly0, lx0, ly1, lx1), (centroid_y[index], centroid_x[index]), window,
                                             image_shape)
        truncated.append(cut)
        edge_distance.append(distance)
        shape_solidity, shape_eccentricity = shape_descriptors(crop)
        solidity.append(shape_solidity)
        eccentricity.append(shape_eccentricity)
        if channels is not None:
            pixels = channels[:, ly0:ly1, lx0:lx1][:, crop]
            means.append(pixels.astype(np.float64).mean(axis=1))

    return TileCandidates(
        bboxes=np.asarray(bboxes, dtype=np.int64).reshape(-1, 4),
        crops=crops,
        scores=instances.scores[chosen].astype(np.float32),
        head_agreement=instances.head_agreement[chosen].astype(np.float32),
        centroids=np.stack([centroid_y[chosen], centroid_x[chosen]], axis=1),
        truncated=np.asarray(truncated, dtype=bool),
        in_core=in_core[chosen],
        edge_distance=np.asarray(edge_distance, dtype=np.float32),
        areas=areas[chosen].astype(np.int64),
        solidity=np.asarray(solidity, dtype=np.float32),
        eccentricity=np.asarray(eccentricity, dtype=np.float32),
        channel_means=(
            np.asarray(means, dtype=np.float32).reshape(len(chosen), n_channels)
            if channels is not None
            else np.zeros((len(chosen), 0), np.float32)
        ),
    )


def box_pairs(boxes_a: np.ndarray, boxes_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` whose boxes ``boxes_a[i]`` and ``boxes_b[j]`` (N, 4) intersect."""
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    a = boxes_a[:, None, :]
    b = boxes_b[None, :, :]
    hit = (
        (np.maximum(a[..., 0], b[..., 0]) < np.minimum(a[..., 2], b[..., 2]))
        & (np.maximum(a[..., 1], b[..., 1]) < np.minimum(a[..., 3], b[..., 3]))
    )
    return np.nonzero(hit)


def intersection_area(box_a: np.ndarray, crop_a: np.ndarray, box_b: np.ndarray, crop_b: np.ndarray) -> int:
    """Pixels two cropped masks share, given their global boxes ``(y0, x0, y1, x1)``."""
    y0, x0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    y1, x1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if y0 >= y1 or x0 >= x1:
        return 0
    part_a = crop_a[y0 - box_a[0] : y1 - box_a[0], x0 - box_a[1] : x1 - box_a[1]]
    part_b = crop_b[y0 - box_b[0] : y1 - box_b[0], x0 - box_b[1] : x1 - box_b[1]]
    return int(np.count_nonzero(part_a & part_b))


def _priority(candidates: TileCandidates, index: int, tile_order: int) -> tuple:
    """Sort key of a candidate's view of its object: larger is better."""
    return (
        not bool(candidates.truncated[index]),
        bool(candidates.in_core[index]),
        float(candidates.edge_distance[index]),
        -tile_order,
    )


def _same_object(a: TileCandidates, i: int, b: TileCandidates, j: int) -> bool:
    shared = intersection_area(a.bboxes[i], a.crops[i], b.bboxes[j], b.crops[j])
    if shared == 0:
        return False
    area_a, area_b = int(a.areas[i]), int(b.areas[j])
    if shared / (area_a + area_b - shared) >= DUPLICATE_IOU:
        return True
    # A piece cut by a tile edge is small next to the whole object: compare by containment.
    if a.truncated[i] and shared / area_a >= DUPLICATE_CONTAINMENT:
        return True
    if b.truncated[j] and shared / area_b >= DUPLICATE_CONTAINMENT:
        return True
    return False


def kept_candidates(
    center: TileCandidates, center_order: int, neighbours: list[tuple[TileCandidates, int]]
) -> np.ndarray:
    """Which candidates of one tile survive de-duplication against its neighbours' candidates.

    A candidate is dropped when a candidate of a neighbouring tile shows the same
    object with a better view (see module docstring). The rule depends only on the
    candidates, never on processing order, so any execution order gives the same set.

    Parameters
    ----------
    center : TileCandidates
        The tile's candidates.
    center_order : int
        The tile's raster index (tie-breaker: the earlier tile wins).
    neighbours : list of (TileCandidates, int)
        Candidates and raster index of every neighbouring tile (up to 8).

    Returns
    -------
    ndarray of bool, shape (N,)
    """
    keep = np.ones(len(center), dtype=bool)
    for other, other_order in neighbours:
        for i, j in zip(*box_pairs(center.bboxes, other.bboxes)):
            if not keep[i]:
                continue
            if _same_object(center, int(i), other, int(j)) and _priority(other, int(j), other_order) > _priority(
                center, int(i), center_order
            ):
                keep[i] = False
    return keep


def greedy_layers(boxes: np.ndarray, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Colour the overlap graph of N masks greedily in index order.

    Returns ``(layers, n_overlapping)``: the smallest layer not used by an earlier
    overlapping mask (int32, (N,)), and how many other masks each one overlaps (int32, (N,)).
    """
    n = len(crops)
    layers = np.zeros(n, dtype=np.int32)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for i, j in zip(*box_pairs(boxes, boxes)):
        if i < j and intersection_area(boxes[i], crops[i], boxes[j], crops[j]) > 0:
            neighbours[i].append(int(j))
            neighbours[j].append(int(i))
    for i in range(n):
        used = {int(layers[j]) for j in neighbours[i] if j < i}
        layer = 0
        while layer in used:
            layer += 1
        layers[i] = layer
    return layers, np.asarray([len(found) for found in neighbours], dtype=np.int32)


def instance_layers(instances: Instances) -> np.ndarray:
    """Layer of every instance (greedy overlap-graph colouring in instance order), int32 (N,)."""
    return greedy_layers(instances.boxes, instances.crops)[0]


@dataclass
class StitchedTile:
    """The survivors of one tile, in id order.

    Attributes
    ----------
    row, col : int
        Tile position in the grid.
    candidates : TileCandidates
        All candidates the tile proposed.
    kept : ndarray of intp, shape (K,)
        Indices into ``candidates`` of the survivors, in id order.
    ids : ndarray of uint32, shape (K,)
        Slide-wide instance ids (1-based).
    layers : ndarray of int32, shape (K,)
        Overlap layer of each survivor.
    n_overlapping : ndarray of int32, shape (K,)
        Number of other surviving nuclei each survivor overlaps (anywhere on the slide).
    """

    row: int
    col: int
    candidates: TileCandidates
    kept: np.ndarray
    ids: np.ndarray
    layers: np.ndarray
    n_overlapping: np.ndarray


class SlideStitcher:
    """Stitch a grid of tiles' candidates in raster order with memory bounded by a few tiles.

    Parameters
    ----------
    n_rows, n_cols : int
        Tile grid size.
    load_tile : callable (row, col) -> TileCandidates or None
        Loads a tile's candidates (None for a tile that was not segmented, e.g. no tissue).
        Tiles are re-loaded when they fall out of the small cache, so it should be cheap
        (e.g. read from the per-tile cache files).
    cache_size : int
        How many tiles' candidates to hold in memory at once.

    Notes
    -----
    Candidates only interact with the 8 neighbouring tiles (the overlap is at most half
    a tile), so de-duplication needs 3 x 3 tiles and the layer of a nucleus depends
    only on already-processed neighbours. `run` yields tiles in raster order; after it
    finished, `instances_in` returns every survivor touching a region, with id and layer.
    """

    def __init__(
        self,
        n_rows: int,
        n_cols: int,
        load_tile: Callable[[int, int], TileCandidates | None],
        cache_size: int = 48,
    ) -> None:
        self.n_rows = n_rows
        self.n_cols = n_cols
        self._load_tile = load_tile
        self._cache: OrderedDict[tuple[int, int], TileCandidates | None] = OrderedDict()
        self._cache_size = max(cache_size, 12)
        self._kept: dict[tuple[int, int], np.ndarray] = {}
        self._first_id: dict[tuple[int, int], int] = {}
        self._layers: dict[tuple[int, int], np.ndarray] = {}
        self.n_instances = 0
        self.n_layers = 0

    def _order(self, row: int, col: int) -> int:
        return row * self.n_cols + col

    def candidates(self, row: int, col: int) -> TileCandidates | None:
        """The candidates of tile (row, col), through a small LRU cache."""
        key = (row, col)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        loaded = self._load_tile(row, col)
        self._cache[key] = loaded
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return loaded

    def _neighbours(self, row: int, col: int) -> Iterator[tuple[int, int]]:
        for r in range(max(row - 1, 0), min(row + 2, self.n_rows)):
            for c in range(max(col - 1, 0), min(col + 2, self.n_cols)):
                if (r, c) != (row, col):
                    yield r, c

    def kept(self, row: int, col: int) -> np.ndarray:
        """Indices of tile (row, col)'s candidates that survive de-duplication (memoised)."""
        key = (row, col)
        if key not in self._kept:
            center = self.candidates(row, col)
            if center is None or len(center) == 0:
                self._kept[key] = np.zeros(0, np.intp)
            else:
                neighbours = []
                for r, c in self._neighbours(row, col):
                    other = self.candidates(r, c)
                    if other is not None and len(other):
                        neighbours.append((other, self._order(r, c)))
                keep = kept_candidates(center, self._order(row, col), neighbours)
                self._kept[key] = np.flatnonzero(keep)
        return self._kept[key]

    def run(self) -> Iterator[StitchedTile]:
        """Yield every tile's survivors with ids, layers and overlap counts, in raster order.

        Every tile is yielded, also those without survivors (empty arrays).
        """
        next_id = 1
        for row in range(self.n_rows):
            for col in range(self.n_cols):
                candidates = self.candidates(row, col)
                kept = self.kept(row, col)
                self._first_id[(row, col)] = next_id
                if candidates is None or len(kept) == 0:
                    self._layers[(row, col)] = np.zeros(0, np.int32)
                    yield StitchedTile(
                        row, col, candidates if candidates is not None else TileCandidates.empty(0),
                        np.zeros(0, np.intp), *(np.zeros(0, t) for t in ("u4", "i4", "i4")),
                    )
                    continue
                boxes = candidates.bboxes[kept]
                crops = [candidates.crops[i] for i in kept]
                within = _overlap_lists(boxes, crops, boxes, crops, same=True)
                n_overlapping = np.asarray([len(found) for found in within], dtype=np.int32)
                used_by_earlier: list[set[int]] = [set() for _ in kept]
                for r, c in self._neighbours(row, col):
                    other = self.candidates(r, c)
                    if other is None:
                        continue
                    other_kept = self.kept(r, c)
                    if len(other_kept) == 0:
                        continue
                    other_boxes = other.bboxes[other_kept]
                    other_crops = [other.crops[j] for j in other_kept]
                    earlier = self._order(r, c) < self._order(row, col)
                    for i, j in _overlap_pairs(boxes, crops, other_boxes, other_crops):
                        n_overlapping[i] += 1
                        if earlier:
                            used_by_earlier[i].add(int(self._layers[(r, c)][j]))
                # Greedy colouring in id order: earlier tiles' layers are fixed, then in-tile order.
                layers = np.zeros(len(kept), dtype=np.int32)
                for i in range(len(kept)):
                    used = used_by_earlier[i] | {int(layers[j]) for j in within[i] if j < i}
                    layer = 0
                    while layer in used:
                        layer += 1
                    layers[i] = layer
                ids = np.arange(next_id, next_id + len(kept), dtype=np.uint32)
                next_id += len(kept)
                self._layers[(row, col)] = layers
                self.n_layers = max(self.n_layers, int(layers.max()) + 1)
                yield StitchedTile(row, col, candidates, kept, ids, layers, n_overlapping)
        self.n_instances = next_id - 1

    def instances_in(self, box: Box, row: int, col: int) -> list[tuple[int, int, float, np.ndarray, np.ndarray]]:
        """Survivors from tile (row, col) and its neighbours whose box intersects ``box``.

        Returns a list of ``(id, layer, score, bbox, crop)`` sorted by id. Valid after `run`.
        """
        found = []
        region = np.asarray([box], dtype=np.int64)
        for r in range(max(row - 1, 0), min(row + 2, self.n_rows)):
            for c in range(max(col - 1, 0), min(col + 2, self.n_cols)):
                candidates = self.candidates(r, c)
                kept = self.kept(r, c)
                if candidates is None or len(kept) == 0:
                    continue
                hits, _ = box_pairs(candidates.bboxes[kept], region)
                for position in hits:
                    index = kept[position]
                    found.append(
                        (
                            self._first_id[(r, c)] + int(position),
                            int(self._layers[(r, c)][position]),
                            float(candidates.scores[index]),
                            candidates.bboxes[index],
                            candidates.crops[index],
                        )
                    )
        found.sort(key=lambda item: item[0])
        return found


def _overlap_pairs(
    boxes_a: np.ndarray, crops_a: list[np.ndarray], boxes_b: np.ndarray, crops_b: list[np.ndarray]
) -> list[tuple[int, int]]:
    """Pairs (i, j) of masks from two sets that share at least one pixel."""
    return [
        (int(i), int(j))
        for i, j in zip(*box_pairs(boxes_a, boxes_b))
        if intersection_area(boxes_a[i], crops_a[i], boxes_b[j], crops_b[j]) > 0
    ]


def _overlap_lists(
    boxes_a: np.ndarray, crops_a: list[np.ndarray], boxes_b: np.ndarray, crops_b: list[np.ndarray], same: bool
) -> list[list[int]]:
    """For each mask of set a, the masks of set b it overlaps (excluding itself when ``same``)."""
    lists: list[list[int]] = [[] for _ in range(len(crops_a))]
    for i, j in _overlap_pairs(boxes_a, crops_a, boxes_b, crops_b):
        if same and i == j:
            continue
        lists[i].append(j)
    return lists


def paint_region(
    box: Box, instances: list[tuple[int, int, float, np.ndarray, np.ndarray]], n_layers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise survivors into one region: the flattened view and every layer.

    Parameters
    ----------
    box : (y0, x0, y1, x1)
        The region, slide pixels.
    instances : list of (id, layer, score, bbox, crop)
        As returned by `SlideStitcher.instances_in`, sorted by id.
    n_layers : int
        Number of layer images to fill.

    Returns
    -------
    flat : ndarray of uint32, shape (y1 - y0, x1 - x0)
        Each pixel goes to the covering nucleus with the highest score (ties: lower id).
    layers : ndarray of uint32, shape (n_layers, y1 - y0, x1 - x0)
        Every nucleus's full mask in its own layer.
    """
    y0, x0, y1, x1 = box
    shape = (y1 - y0, x1 - x0)
    flat = np.zeros(shape, dtype=np.uint32)
    best = np.full(shape, -np.inf, dtype=np.float32)
    layers = np.zeros((n_layers, *shape), dtype=np.uint32)
    for instance_id, layer, score, bbox, crop in instances:
        iy0, ix0 = max(bbox[0], y0), max(bbox[1], x0)
        iy1, ix1 = min(bbox[2], y1), min(bbox[3], x1)
        if iy0 >= iy1 or ix0 >= ix1:
            continue
        piece = crop[iy0 - bbox[0] : iy1 - bbox[0], ix0 - bbox[1] : ix1 - bbox[1]]
        target = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
        take = piece & (np.float32(score) > best[target])
        flat[target][take] = instance_id
        best[target][take] = score
        layers[layer][target][piece] = instance_id
    return flat, layers

