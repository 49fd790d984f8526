"""Label image input/output: label TIFF, plain TIFF masks and OME-Zarr (NGFF) labels.

A label image is a 2-D ``uint32`` array of instance ids (0 = background). This module
reads and writes single label images, as produced by `weak` and scored by `evaluate`;
the full pyramidal, multi-layer slide output lives in the writer of the segmentation
stage.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence
import numpy as np
from scipy import ndimage
from nuclei_app.atomic import atomic_directory, atomic_write_bytes
from nuclei_app.errors import BadDataError, MissingInputError
from nuclei_app.core.metrics import as_label_image


TIFF_EXTENSIONS = (".tif", ".tiff", ".btf")


LABEL_NAME = "nuclei"


_UINT32_MAX = np.iinfo(np.uint32).max


def _to_uint32(labels: np.ndarray, source: str | Path | None = None) -> np.ndarray:
    array = as_label_image(labels, source)
    if array.size and array.max() > _UINT32_MAX:
        raise BadDataError("label ids exceed the uint32 range; relabel the objects 1..N", source)
    return array.astype(np.uint32)


def is_zarr_path(path: Path) -> bool:
    return path.is_dir() and (
        path.name.lower().endswith(".zarr")
        or any((path / marker).exists() for marker in (".zattrs", ".zgroup", "zarr.json"))
    )


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
    return _to_uint32(array, path)


def _ome_attributes(group: Any) -> dict[str, Any]:
    """NGFF attributes of a zarr group: at the top (zarr v2, NGFF <= 0.4) or under "ome" (NGFF 0.5)."""
    attributes = dict(group.attrs)
    return dict(attributes.get("ome", attributes))


def _axis_names(multiscale: dict[str, Any], ndim: int) -> list[str]:
    axes = multiscale.get("axes")
    if not axes:  # NGFF 0.1/0.2: implicitly TCZYX
        return list("tczyx")[-ndim:]
    return [axis["name"] if isinstance(axis, dict) else str(axis) for axis in axes]


def _read_multiscale_level0(group: Any, path: Path) -> np.ndarray:
    multiscales = _ome_attributes(group).get("multiscales")
    if not multiscales:
        raise BadDataError("this zarr group has no 'multiscales' metadata; point at an NGFF label group", path)
    dataset_path = multiscales[0]["datasets"][0]["path"]
    array = group[dataset_path]
    names = _axis_names(multiscales[0], array.ndim)
    if "y" not in names or "x" not in names or len(names) != array.ndim:
        raise BadDataError(f"label axes {names} do not include y and x; give a 2-D label image", path)
    for name, size in zip(names, array.shape):
        if name not in ("y", "x") and size != 1:
            raise BadDataError(
                f"label image has {size} planes along axis {name!r}; give a 2-D label image", path
            )
    index = tuple(slice(None) if name in ("y", "x") else 0 for name in names)
    data = np.asarray(array[index])
    if names.index("y") > names.index("x"):
        data = data.T
    return _to_uint32(data, path)


def _read_zarr_labels(path: Path) -> np.ndarray:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a missing or damaged store
        raise BadDataError(f"cannot open as a zarr group ({error}); give an OME-Zarr", path) from error
    return _read_labels_group(group, path)


def _read_labels_group(group: Any, path: Path, depth: int = 0) -> np.ndarray:
    attributes = _ome_attributes(group)
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
    if is_zarr_path(path):
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
    array = _to_uint32(labels, path)
    options: dict[str, Any] = {"compression": "zlib", "photometric": "minisblack"}
    is_ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    if pixel_size_um is not None:
        size_y, size_x = (float(v) for v in pixel_size_um)
        options["resolution"] = (1e4 / size_x, 1e4 / size_y)  # pixels per centimetre
        options["resolutionunit"] = "CENTIMETER"
    if is_ome:
        options["ome"] = True
        metadata: dict[str, Any] = {"axes": "YX", "Name": LABEL_NAME}
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


def _scale_factors(shape: tuple[int, int], smallest: int = 256) -> tuple[int, ...]:
    """Powers of two while the smaller side stays >= ``smallest`` pixels."""
    factors = []
    factor = 2
    while min(shape) // factor >= smallest:
        factors.append(factor)
        factor *= 2
    return tuple(factors)


def write_labels_ome_zarr(
    path: str | Path,
    labels: np.ndarray,
    image: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    pixel_size_um: tuple[float, float] | None = None,
) -> Path:
    """Write an NGFF (OME-Zarr 0.5, zarr v3) image with the label image ``labels/nuclei``, atomically.

    The store is written under a temporary name and renamed when complete.

    Parameters
    ----------
    path : path
        Output folder, e.g. ``OUT.ome.zarr``.
    labels : ndarray of int, shape (H, W)
        Instance ids, 0 = background; stored as ``uint32``, pyramid by nearest neighbour.
    image : ndarray, shape (C, H, W) or (H, W), optional
        The image the labels belong to (e.g. the nuclear channels or their composite).
        When absent, the image is the nuclei foreground (``uint8``, 255 inside nuclei),
        so that the store remains a valid NGFF image with labels.
    channel_names : sequence of str, optional
        One name per channel of ``image`` (stored as ``omero`` channel labels).
    pixel_size_um : (float, float), optional
        (y, x) pixel size in micrometres, stored as the scale of level 0.

    Returns
    -------
    Path
        The written store.
    """
    import warnings

    import zarr

    with warnings.catch_warnings():  # ome-zarr-py instantiates its own deprecated Scaler at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_image, write_labels

    path = Path(path)
    label_array = _to_uint32(labels, path)
    if image is None:
        image_array = ((label_array > 0) * np.uint8(255))[None]
        channel_names = ["nuclei_foreground"]
    else:
        image_array = np.asarray(image)
        if image_array.ndim == 2:
            image_array = image_array[None]
        if image_array.ndim != 3 or image_array.shape[1:] != label_array.shape:
            raise BadDataError(
                f"image shape {image_array.shape} does not match labels {label_array.shape}; "
                "give the (C, H, W) image the labels were made from",
                path,
            )
    if channel_names is None:
        channel_names = [f"channel_{index}" for index in range(image_array.shape[0])]
    channel_names = [str(name) for name in channel_names]
    if len(channel_names) != image_array.shape[0]:
        raise BadDataError(f"{len(channel_names)} channel names for {image_array.shape[0]} channels", path)
    factors = _scale_factors(label_array.shape)
    spatial: dict[str, Any] = {}
    if pixel_size_um is not None:
        spatial = {
            "scale": {"y": float(pixel_size_um[0]), "x": float(pixel_size_um[1])},
            "axes_units": {"y": "micrometer", "x": "micrometer"},
        }
    low = float(np.min(image_array)) if image_array.size else 0.0
    high = float(np.max(image_array)) if image_array.size else 1.0
    omero = {
        "channels": [
            {"label": name, "active": True, "color": "FFFFFF",
             "window": {"min": low, "max": high, "start": low, "end": high}}
            for name in channel_names
        ]
    }
    with atomic_directory(path) as temporary:
        group = zarr.open_group(str(temporary), mode="w")
        image_scale = {"c": 1.0, **spatial.get("scale", {})} if spatial else None
        write_image(
            image_array,
            group,
            scale_factors=factors,
            axes="cyx",
            scale=image_scale,
            axes_units=spatial.get("axes_units"),
            name=path.name,
            omero=omero,
        )
        write_labels(
            label_array,
            group,
            name=LABEL_NAME,
            scaler=None,
            scale_factors=factors,
            axes="yx",
            scale=spatial.get("scale"),
            axes_units=spatial.get("axes_units"),
            label_metadata={"source": {"image": "../../"}},
        )
    return path

