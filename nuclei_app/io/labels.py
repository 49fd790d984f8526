"""Label image input/output: label TIFF, plain TIFF masks and OME-Zarr (NGFF) labels.

A label image is a 2-D ``uint32`` array of instance ids (0 = background). This module
reads and writes single label images, as produced by `weak` and scored by `evaluate`;
the full pyramidal, multi-layer slide output lives in the writer of the segmentation
stage.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any
import numpy as np
from scipy import ndimage
from nuclei_app.atomic import atomic_write_bytes
from nuclei_app.errors import BadDataError, MissingInputError
from nuclei_app.core.metrics import as_label_image
from nuclei_app.io.ngff import is_zarr_store, label_array_level0, ome_attributes
from nuclei_app.io.ngff import FLAT_LABEL_NAME


TIFF_EXTENSIONS = (".tif", ".tiff", ".btf")



_UINT32_MAX = np.iinfo(np.uint32).max


def as_uint32_labels(labels: np.ndarray, source: str | Path | None = None) -> np.ndarray:
    """``labels`` as a ``uint32`` instance image (`as_label_image` checks; ids must fit uint32)."""
    array = as_label_image(labels, source)
    if array.size and array.max() > _UINT32_MAX:
        raise BadDataError("label ids exceed the uint32 range; relabel the objects 1..N", source)
    return array.astype(np.uint32)


# --------------------------------------------------------------------------- reading


def _read_tiff_labels(path: Path) -> np.ndarray:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as error:  # tifffile raises many types for damaged or non-TIFF files
        raise BadDataError(f"cannot read as TIFF ({error}); give a label TIFF", path) from error
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise BadDataError(f"expected a 2-D label image, got shape {array.shape}; give one label plane", path)
    # A plain binary mask (bool, or uint8 with only 0 and 255) is not an instance image:
    # its connected components are the objects.
    if array.dtype == bool or (array.dtype == np.uint8 and np.isin(np.unique(array), (0, 255)).all() and array.max() == 255):
        objects, _ = ndimage.label(array > 0)
        return objects.astype(np.uint32)
    return as_uint32_labels(array, path)


def _read_multiscale_level0(group: Any, path: Path) -> np.ndarray:
    array, axes = label_array_level0(group, path)
    if "y" not in axes or "x" not in axes:
        raise BadDataError(f"label axes {list(axes)} do not include y and x; give a 2-D label image", path)
    for name, size in zip(axes, array.shape):
        if name not in ("y", "x") and size != 1:
            raise BadDataError(
                f"label image has {size} planes along axis {name!r}; give a 2-D label image", path
            )
    index = tuple(slice(None) if name in ("y", "x") else 0 for name in axes)
    data = np.asarray(array[index])
    if axes.index("y") > axes.index("x"):
        data = data.T
    return as_uint32_labels(data, path)


def _read_zarr_labels(path: Path) -> np.ndarray:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a missing or damaged store
        raise BadDataError(f"cannot open as a zarr group ({error}); give an OME-Zarr", path) from error
    return _read_labels_group(group, path)


def _read_labels_group(group: Any, path: Path, depth: int = 0) -> np.ndarray:
    attributes = ome_attributes(group)
    members = set(group.group_keys()) if hasattr(group, "group_keys") else set()
    if "image-label" in attributes:  # a label image itself, e.g. OUT.ome.zarr/labels/nuclei
        return _read_multiscale_level0(group, path)
    if "labels" in attributes and isinstance(attributes["labels"], list):  # the labels/ group
        names = attributes["labels"]
        if not names:
            raise BadDataError("the OME-Zarr 'labels' list is empty; it holds no label image", path)
        return _read_multiscale_level0(group[names[0]], path / names[0])
    if "labels" in members:  # an image with labels/
        return _read_labels_group(group["labels"], path / "labels", depth + 1)
    if "bioformats2raw.layout" in attributes and "0" in members and depth == 0:
        return _read_labels_group(group["0"], path / "0", depth + 1)
    raise BadDataError(
        "this OME-Zarr holds no label image (no labels/ group, no image-label metadata); "
        "point at OUT.ome.zarr or OUT.ome.zarr/labels/NAME",
        path,
    )


def read_labels(path: str | Path) -> np.ndarray:
    """Read an instance label image.

    Parameters
    ----------
    path : path
        One of: a label TIFF (integer ids, 0 = background); a plain TIFF mask (bool,
        or uint8 with only 0/255: each connected component becomes one object); an
        OME-Zarr image (zarr v2 or v3) with a ``labels/`` group, from which the first
        label image listed in ``labels`` is read at full resolution; or a path straight
        to a label group (``OUT.ome.zarr/labels/nuclei``) or to ``labels/``.

    Returns
    -------
    ndarray of uint32, shape (H, W)

    Raises
    ------
    MissingInputError
        The path does not exist.
    BadDataError
        Not a readable label image, not 2-D, or not integer-valued.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError("does not exist; give an existing label TIFF or OME-Zarr", path)
    if is_zarr_store(path):
        return _read_zarr_labels(path)
    if path.is_file() and path.name.lower().endswith(TIFF_EXTENSIONS):
        return _read_tiff_labels(path)
    if path.is_file():
        raise BadDataError("unknown label format; give a .tif label image or an .ome.zarr", path)
    raise BadDataError("is a folder but not an OME-Zarr; give a label file", path)


# --------------------------------------------------------------------------- writing


def write_label_tiff(
    path: str | Path, labels: np.ndarray, pixel_size_um: tuple[float, float] | None = None
) -> Path:
    """Write ``labels`` as a zlib-compressed ``uint32`` TIFF, atomically.

    Parameters
    ----------
    path : path
        Output file. A name ending ``.ome.tif``/``.ome.tiff`` gets OME-XML metadata.
    labels : ndarray of int, shape (H, W)
        Instance ids, 0 = background.
    pixel_size_um : (float, float), optional
        (y, x) pixel size in micrometres, stored as the TIFF resolution (and in OME-XML).

    Returns
    -------
    Path
        The written path.
    """
    import tifffile

    path = Path(path)
    array = as_uint32_labels(labels, path)
    options: dict[str, Any] = {"compression": "zlib", "photometric": "minisblack"}
    is_ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    if pixel_size_um is not None:
        size_y, size_x = (float(v) for v in pixel_size_um)
        options["resolution"] = (1e4 / size_x, 1e4 / size_y)  # pixels per centimetre
        options["resolutionunit"] = "CENTIMETER"
    if is_ome:
        options["ome"] = True
        metadata: dict[str, Any] = {"axes": "YX", "Name": FLAT_LABEL_NAME}
        if pixel_size_um is not None:
            metadata.update(
                PhysicalSizeY=size_y, PhysicalSizeYUnit="µm", PhysicalSizeX=size_x, PhysicalSizeXUnit="µm"
            )
        options["metadata"] = metadata
    else:
        options["metadata"] = None
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return atomic_write_bytes(path, buffer.getvalue())


def write_label_layers_tiff(path: str | Path, layers: np.ndarray) -> Path:
    """Write overlap layers (K, H, W) of instance ids as one zlib-compressed ``uint32`` TIFF stack, atomically.

    Layer k holds the full masks of the instances assigned to it (ids shared with the flat view).
    """
    import tifffile

    path = Path(path)
    array = np.asarray(layers)
    if array.ndim != 3:
        raise BadDataError(f"expected overlap layers (K, H, W), got shape {array.shape}", path)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.stack([as_uint32_labels(layer, path) for layer in array]), compression="zlib",
                     photometric="minisblack")
    return atomic_write_bytes(path, buffer.getvalue())
