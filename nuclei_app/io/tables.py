"""Per-nucleus outputs: the object table (TSV + BIDS-style JSON sidecar) and GeoJSON polygons.

The table has one row per nucleus, keyed by the same ``label`` id as the label images of
the segmentation store (flattened view and overlap layers). Columns (units in the sidecar):

label, layer, centroid_y_px, centroid_x_px, centroid_y_um, centroid_x_um, area_px, area_um2,
bbox_y0, bbox_x0, bbox_y1, bbox_x1, solidity, eccentricity, score, head_agreement,
n_overlapping_neighbours, then ``mean_<channel>`` for every channel of the slide (the
marker intensities inside the nucleus). Missing values (µm columns without a pixel size)
are ``n/a``, as BIDS tables write them.

Every segmentation store also holds ``nuclei-app_scores.tsv`` (`SCORES_NAME`, written by
`NucleusScoresWriter` whatever the options): ``label``, ``score``, ``head_agreement``,
``n_overlapping_neighbours``, ``solidity`` and ``eccentricity`` of each nucleus, so that the
self-diagnosis reads what the segmentation computed instead of running the model (and the
shape measures) again.

The GeoJSON is a FeatureCollection of polygons in level-0 pixel coordinates (x, y), one
``"objectType": "detection"`` feature per nucleus, which QuPath imports as detections.

Both writers stream: rows and features are appended tile by tile to a temporary file that
is renamed when complete, so memory does not grow with the slide.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence
import numpy as np
from nuclei_app.atomic import atomic_write_json, partial_name
from nuclei_app.schemas import validate_instance
from nuclei_app.core.stitching import StitchedTile


MISSING = "n/a"


#: (name, description, units) of the fixed columns, in order.
FIXED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("label", "Instance id, the same in labels/nuclei, labels/nuclei_layer-<k> and the GeoJSON", "n/a"),
    ("layer", "Index k of the overlap layer labels/nuclei_layer-<k> that holds the full mask", "n/a"),
    ("centroid_y_px", "Row of the mask centroid in level-0 pixels (0 = top edge's first pixel centre)", "pixel"),
    ("centroid_x_px", "Column of the mask centroid in level-0 pixels", "pixel"),
    ("centroid_y_um", "Centroid row times the pixel size (n/a when the slide has no pixel size)", "um"),
    ("centroid_x_um", "Centroid column times the pixel size (n/a when the slide has no pixel size)", "um"),
    ("area_px", "Number of pixels of the full mask", "pixel"),
    ("area_um2", "Mask area in square micrometres (n/a when the slide has no pixel size)", "um^2"),
    ("bbox_y0", "First row of the bounding box, level-0 pixels (inclusive)", "pixel"),
    ("bbox_x0", "First column of the bounding box, level-0 pixels (inclusive)", "pixel"),
    ("bbox_y1", "Row after the last row of the bounding box (exclusive)", "pixel"),
    ("bbox_x1", "Column after the last column of the bounding box (exclusive)", "pixel"),
    ("solidity", "Pixel count divided by the pixel count of the mask's convex hull image (scikit-image regionprops "
                 "solidity, as the QC measures it; 1 = convex)", "n/a"),
    ("eccentricity", "Eccentricity of the ellipse with the same second moments (0 = circle)", "n/a"),
    ("score", "Detection confidence of the predictor, 0 to 1", "n/a"),
    ("head_agreement", "Mean mask IoU between the model's heads for this nucleus (1 for the weak labeler)", "n/a"),
    ("n_overlapping_neighbours", "Number of other nuclei whose full masks share pixels with this one", "n/a"),
)


def channel_column_names(channel_names: Sequence[str]) -> list[str]:
    """``mean_<name>`` per slide channel, made safe for TSV headers and unique."""
    columns: list[str] = []
    for index, name in enumerate(channel_names):
        base = re.sub(r"[^0-9A-Za-z]+", "_", str(name)).strip("_") or f"channel_{index}"
        column = f"mean_{base}"
        suffix = 2
        while column in columns:
            column = f"mean_{base}_{suffix}"
            suffix += 1
        columns.append(column)
    return columns


def table_sidecar(channel_names: Sequence[str]) -> dict[str, dict[str, str]]:
    """The BIDS-style column dictionary: ``{column: {"Description": ..., "Units": ...}}``."""
    sidecar = {name: {"Description": description, "Units": units} for name, description, units in FIXED_COLUMNS}
    for name, column in zip(channel_names, channel_column_names(channel_names)):
        sidecar[column] = {
            "Description": f"Mean raw intensity of slide channel '{name}' over the nucleus's full mask",
            "Units": "arbitrary",
        }
    return sidecar


def format_number(value: float, digits: int) -> str:
    return MISSING if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def nucleus_rows(stitched: StitchedTile, pixel_size_um: tuple[float, float] | None) -> list[list[str]]:
    """Table rows (as strings, in column order) of one stitched tile's nuclei, in id order."""
    candidates = stitched.candidates
    rows = []
    size_y, size_x = pixel_size_um if pixel_size_um is not None else (None, None)
    for position, index in enumerate(stitched.kept):
        centroid_y, centroid_x = candidates.centroids[index]
        area = int(candidates.areas[index])
        y0, x0, y1, x1 = (int(v) for v in candidates.bboxes[index])
        row = [
            str(int(stitched.ids[position])),
            str(int(stitched.layers[position])),
            f"{centroid_y:.2f}",
            f"{centroid_x:.2f}",
            format_number(centroid_y * size_y, 3) if size_y else MISSING,
            format_number(centroid_x * size_x, 3) if size_x else MISSING,
            str(area),
            format_number(area * size_y * size_x, 3) if size_y else MISSING,
            str(y0),
            str(x0),
            str(y1),
            str(x1),
            format_number(float(candidates.solidity[index]), 4),
            format_number(float(candidates.eccentricity[index]), 4),
            format_number(float(candidates.scores[index]), 4),
            format_number(float(candidates.head_agreement[index]), 4),
            str(int(stitched.n_overlapping[position])),
        ]
        row.extend(
            MISSING if not np.isfinite(value) else f"{value:.6g}" for value in candidates.channel_means[index]
        )
        rows.append(row)
    return rows


#: The per-nucleus scores sidecar inside a segmentation store (beside the run record).
SCORES_NAME = "nuclei-app_scores.tsv"


#: Columns of the scores sidecar (a subset of `FIXED_COLUMNS`, same meaning and format).
SCORES_COLUMNS: tuple[str, ...] = (
    "label", "score", "head_agreement", "n_overlapping_neighbours", "solidity", "eccentricity",
)


def score_rows(stitched: StitchedTile) -> list[list[str]]:
    """Scores-sidecar rows (`SCORES_COLUMNS`, as strings) of one stitched tile's nuclei, in id order."""
    candidates = stitched.candidates
    return [
        [
            str(int(stitched.ids[position])),
            format_number(float(candidates.scores[index]), 4),
            format_number(float(candidates.head_agreement[index]), 4),
            str(int(stitched.n_overlapping[position])),
            format_number(float(candidates.solidity[index]), 4),
            format_number(float(candidates.eccentricity[index]), 4),
        ]
        for position, index in enumerate(stitched.kept)
    ]


class _StreamingFile:
    """A text file written to a temporary name and renamed onto ``path`` by `close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = partial_name(self.path)
        self.handle = open(self.temporary, "w", encoding="utf-8", newline="\n")
        self.committed: list[Path] = []

    def _commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temporary, self.path)
        self.committed.append(self.path)

    def discard(self) -> None:
        """Drop the partial file, and what `close` already put in place (after a later failure).

        The output these files belong to failed, so nothing of it may look complete.
        """
        if not self.handle.closed:
            try:
                self.handle.close()
            except OSError:  # a full disk: the buffered rest cannot be flushed, and is dropped anyway
                pass
        self.temporary.unlink(missing_ok=True)
        for path in self.committed:
            path.unlink(missing_ok=True)
        self.committed.clear()


class NucleiTableWriter(_StreamingFile):
    """Stream the per-nucleus TSV; `close` renames it and writes the ``.json`` column sidecar.

    Parameters
    ----------
    path : str or Path
        The ``.tsv`` to write; the sidecar is the same path with suffix ``.json``.
    channel_names : sequence of str
        Every channel of the slide (one ``mean_<name>`` column each).
    pixel_size_um : (float, float) or None
        Level-0 pixel size for the µm columns.
    """

    def __init__(
        self, path: str | Path, channel_names: Sequence[str], pixel_size_um: tuple[float, float] | None
    ) -> None:
        super().__init__(path)
        self.channel_names = [str(name) for name in channel_names]
        self.pixel_size_um = pixel_size_um
        self.columns = [name for name, _, _ in FIXED_COLUMNS] + channel_column_names(self.channel_names)
        self.handle.write("\t".join(self.columns) + "\n")
        self.n_rows = 0

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".json")

    def write_tile(self, stitched: StitchedTile) -> None:
        """Append the rows of one stitched tile."""
        for row in nucleus_rows(stitched, self.pixel_size_um):
            self.handle.write("\t".join(row) + "\n")
            self.n_rows += 1

    def close(self) -> None:
        """Finish: rename the TSV into place, then write its sidecar (schema ``nuclei_table_sidecar``)."""
        sidecar = table_sidecar(self.channel_names)
        validate_instance(sidecar, "nuclei_table_sidecar", self.sidecar_path)
        self._commit()
        atomic_write_json(self.sidecar_path, sidecar)
        self.committed.append(self.sidecar_path)


class NucleusScoresWriter(_StreamingFile):
    """Stream the scores sidecar (`SCORES_COLUMNS`); `close` renames it into place.

    Parameters
    ----------
    path : str or Path
        The ``.tsv`` to write (segment writes it in its work dir, then moves it into the store).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.handle.write("\t".join(SCORES_COLUMNS) + "\n")

    def write_tile(self, stitched: StitchedTile) -> None:
        """Append the rows of one stitched tile."""
        for row in score_rows(stitched):
            self.handle.write("\t".join(row) + "\n")

    def close(self) -> None:
        """Finish: rename the TSV into place."""
        self._commit()


def read_nuclei_table(path: str | Path) -> dict[str, np.ndarray]:
    """Read a nuclei TSV into columns: float64 arrays (``n/a`` -> NaN); ``label``/``layer`` int64."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    cells = [line.split("\t") for line in lines[1:] if line]
    columns: dict[str, np.ndarray] = {}
    for position, name in enumerate(header):
        values = [row[position] for row in cells]
        numbers = np.asarray([np.nan if value == MISSING else float(value) for value in values], dtype=np.float64)
        columns[name] = numbers.astype(np.int64) if name in ("label", "layer") else numbers
    return columns


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove the points of a closed ring (N, 2) that lie on a straight run (same step in and out)."""
    if len(ring) < 4:
        return ring
    open_ring = ring[:-1] if np.allclose(ring[0], ring[-1]) else ring
    step_in = open_ring - np.roll(open_ring, 1, axis=0)
    step_out = np.roll(open_ring, -1, axis=0) - open_ring
    cross = step_in[:, 0] * step_out[:, 1] - step_in[:, 1] * step_out[:, 0]
    corners = open_ring[np.abs(cross) > 1e-9]
    return corners if len(corners) >= 3 else open_ring


def nucleus_polygon(bbox: Sequence[int], crop: np.ndarray) -> list[list[float]]:
    """Closed outline ``[[x, y], ...]`` of a cropped mask in level-0 pixel coordinates.

    Pixel ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)`` (the QuPath convention); the outline
    runs through the boundary between mask and background pixels. A mask in several pieces
    is outlined by its largest piece.
    """
    from skimage.measure import find_contours

    padded = np.pad(crop.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        return []
    contour = _drop_collinear(max(contours, key=len))
    # padded index -> pixel index is -1; pixel index -> QuPath coordinate of its centre is +0.5
    ys = contour[:, 0] - 1 + 0.5 + int(bbox[0])
    xs = contour[:, 1] - 1 + 0.5 + int(bbox[1])
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in zip(xs, ys)]
    if ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    while len(ring) < 4:  # GeoJSON needs four positions; a 1-pixel object gives a degenerate ring
        ring.insert(1, list(ring[0]))
    return ring


def nucleus_feature(
    label: int, layer: int, score: float, head_agreement: float, area: int, bbox: Sequence[int], crop: np.ndarray,
    measurements: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One GeoJSON Feature (QuPath detection) of a nucleus.

    ``measurements`` (name -> number, QuPath's map form) defaults to label, layer, score,
    head_agreement and area_px; `GeoJSONWriter` passes every numeric column of the table.
    """
    if measurements is None:
        measurements = {
            "label": int(label),
            "layer": int(layer),
            "score": round(float(score), 4),
            "head_agreement": round(float(head_agreement), 4),
            "area_px": int(area),
        }
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [nucleus_polygon(bbox, crop)]},
        "properties": {
            "objectType": "detection",
            "name": f"nucleus {label}",
            "classification": {"name": "Nucleus", "color": [0, 128, 255]},
            "label": int(label),
            "layer": int(layer),
            "measurements": measurements,
        },
    }


class GeoJSONWriter(_StreamingFile):
    """Stream a GeoJSON FeatureCollection, one feature per nucleus (schema ``nuclei_geojson``).

    The first features are checked against the schema (every feature is built by the same
    function, so checking a sample keeps large slides fast). Given the slide's channel names
    (and pixel size), each feature's ``measurements`` hold every column of the nuclei table
    with a value (``n/a`` cells are left out), under the same names, as QuPath imports them.
    """

    VALIDATE_FIRST = 16

    def __init__(self, path: str | Path, channel_names: Sequence[str] | None = None,
                 pixel_size_um: tuple[float, float] | None = None) -> None:
        super().__init__(path)
        self.handle.write('{"type": "FeatureCollection", "features": [\n')
        self.n_features = 0
        self.pixel_size_um = pixel_size_um
        self.columns = None if channel_names is None else (
            [name for name, _, _ in FIXED_COLUMNS] + channel_column_names([str(name) for name in channel_names]))

    def write_tile(self, stitched: StitchedTile) -> None:
        """Append one feature per nucleus of a stitched tile."""
        candidates = stitched.candidates
        rows = nucleus_rows(stitched, self.pixel_size_um) if self.columns is not None else None
        for position, index in enumerate(stitched.kept):
            measurements = None if rows is None else {
                column: float(value) for column, value in zip(self.columns, rows[position]) if value != MISSING}
            feature = nucleus_feature(
                int(stitched.ids[position]),
                int(stitched.layers[position]),
                float(candidates.scores[index]),
                float(candidates.head_agreement[index]),
                int(candidates.areas[index]),
                candidates.bboxes[index],
                candidates.crops[index],
                measurements,
            )
            if self.n_features < self.VALIDATE_FIRST:
                validate_instance({"type": "FeatureCollection", "features": [feature]}, "nuclei_geojson", self.path)
            self.handle.write(("" if self.n_features == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
            self.n_features += 1

    def close(self) -> None:
        """Finish the collection and rename it into place."""
        self.handle.write("\n]}\n")
        self._commit()

