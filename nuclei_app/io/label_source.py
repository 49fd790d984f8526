"""Open a segmentation (OME-Zarr labels or label TIFF) for region reads, and find its table."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
import numpy as np
from nuclei_app.errors import BadDataError, MissingInputError
from nuclei_app.io.labels import read_labels
from nuclei_app.io.ngff import is_zarr_store, label_array_level0, ome_attributes
from nuclei_app.io.tables import SCORES_NAME


@dataclass
class LabelSource:
    """Label image(s) of a slide, read region by region.

    Attributes
    ----------
    path : Path
        The TIFF or OME-Zarr that was opened.
    shape : (int, int)
        (Y, X) of the label image.
    flat : array-like
        The flattened view (every instance, one id per pixel); sliceable ``[y0:y1, x0:x1]``.
    layers : list of array-like
        Overlap layers (``labels/nuclei_layer-<k>``), empty when the input has none.
    store : Path or None
        The OME-Zarr store the labels belong to (holds the completion record).
    """

    path: Path
    shape: tuple[int, int]
    flat: Any
    layers: list[Any] = field(default_factory=list)
    store: Path | None = None
    integer_dtype: bool = True

    def read(self, array: Any, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Region ``[y0:y1, x0:x1]`` of ``array`` (the flat view or a layer) as uint32."""
        block = np.asarray(array[y0:y1, x0:x1])
        if not self.integer_dtype:
            if not np.all(np.isfinite(block)) or np.any(block != np.round(block)) or np.any(block < 0):
                raise BadDataError(
                    "label image holds non-integer values; give an instance label image (integer ids, 0 = background)",
                    self.path,
                )
        return block.astype(np.uint32, copy=False)


class _Plane:
    """The (y, x) plane of an NGFF label array whose other axes are singletons."""

    def __init__(self, array: Any, axes: list[str], path: Path) -> None:
        self.array = array
        self.prefix: tuple[int, ...] = ()
        if axes[-2:] != ["y", "x"]:
            raise BadDataError(f"label axes {axes} do not end with y, x; give a 2-D label image", path)
        for name, size in zip(axes[:-2], array.shape[:-2]):
            if size != 1:
                raise BadDataError(f"label image has {size} planes along axis {name!r}; give a 2-D label image", path)
        self.prefix = (0,) * (array.ndim - 2)
        self.shape = tuple(int(v) for v in array.shape[-2:])
        self.dtype = np.dtype(array.dtype)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.array[self.prefix + tuple(key)])


def _label_plane(group: Any, path: Path) -> _Plane:
    array, axes = label_array_level0(group, path)
    return _Plane(array, list(axes), path)


def open_label_source(path: str | Path) -> LabelSource:
    """Open a label TIFF or an OME-Zarr segmentation (flattened view + overlap layers).

    OME-Zarr: the store (``OUT.ome.zarr``) or its ``labels/`` or ``labels/nuclei`` group;
    ``labels/nuclei`` (or the first listed label) is the flattened view and
    ``labels/<name>_layer-<k>`` are its overlap layers. TIFF: read whole with
    `nuclei_app.labels.read_labels` (no layers).

    Raises
    ------
    MissingInputError
        The path does not exist.
    BadDataError
        Not a label image, not 2-D, or not integer-valued.
    """

    path = Path(path)
    if not path.exists():
        raise MissingInputError("does not exist; give an existing label TIFF or OME-Zarr", path)
    if not is_zarr_store(path):
        flat = read_labels(path)
        return LabelSource(path, tuple(flat.shape), flat)
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a missing or damaged store
        raise BadDataError(f"cannot open as a zarr group ({error}); give an OME-Zarr", path) from None
    store = path
    attributes = ome_attributes(group)
    if "image-label" in attributes:  # a label image itself: no sibling layers known
        plane = _label_plane(group, path)
        labels_group, flat_name = None, None
        store = path.parent.parent
    else:
        child = None
        if "labels" not in attributes:
            try:  # a direct lookup: listing members would trip over non-zarr files (run record)
                child = group["labels"]
            except KeyError:
                child = None
        if child is not None:
            group = child
            attributes = ome_attributes(group)
        else:
            store = path.parent
        names = attributes.get("labels")
        if not isinstance(names, list) or not names:
            raise BadDataError(
                "this OME-Zarr holds no label image (no labels/ group); point at OUT.ome.zarr or its labels/NAME",
                path,
            )
        flat_name = "nuclei" if "nuclei" in names else names[0]
        labels_group = group
        plane = _label_plane(group[flat_name], path / flat_name)
    layers = []
    if labels_group is not None:
        pattern = re.compile(rf"^{re.escape(flat_name)}_layer-(\d+)$")
        numbered = sorted(
            (int(match.group(1)), name)
            for name in ome_attributes(labels_group).get("labels", [])
            if (match := pattern.match(name))
        )
        layers = [_label_plane(labels_group[name], path / name) for _, name in numbered]
    for layer in layers:
        if layer.shape != plane.shape:
            raise BadDataError(f"overlap layer shape {layer.shape} differs from labels {plane.shape}", path)
    integer = plane.dtype.kind in "iub"
    if plane.dtype.kind not in "iubf":
        raise BadDataError(f"label image has dtype {plane.dtype}; give integer ids (0 = background)", path)
    return LabelSource(path, plane.shape, plane, layers, store if is_zarr_store(store) else None, integer)


def find_objects_table(labels_path: str | Path, run_record: dict | None = None) -> Path | None:
    """The per-nucleus TSV written with a segmentation, when present.

    Looked up in the completion record (``parameters.table``), then beside the labels by
    BIDS naming: ``<entities>_<suffix>.ome.zarr`` -> ``<entities>_objects.tsv``, then
    ``<stem>_objects.tsv`` and ``<stem>.tsv``.
    """
    if run_record:
        recorded = (run_record.get("parameters") or {}).get("table")
        if recorded and Path(recorded).is_file():
            return Path(recorded)
    labels_path = Path(labels_path)
    name = labels_path.name
    for extension in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(extension):
            name = name[: -len(extension)]
            break
    candidates = []
    if "_" in name:
        candidates.append(f"{name.rsplit('_', 1)[0]}_objects.tsv")
    candidates += [f"{name}_objects.tsv", f"{name}.tsv"]
    for candidate in candidates:
        path = labels_path.parent / candidate
        if path.is_file():
            return path
    return None



def find_segmentation_scores(store: str | Path | None) -> Path | None:
    """The per-nucleus scores sidecar a segmentation store holds (`SCORES_NAME`), when present.

    Stores written by ``nuclei-app segment`` before the sidecar existed have none.
    """
    if store is None:
        return None
    path = Path(store) / SCORES_NAME
    return path if path.is_file() else None
